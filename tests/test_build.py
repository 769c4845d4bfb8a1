import os
import shutil

import torch

import fastllm.ops as ops
from fastllm.profiling import nvtx_enabled, nvtx_is_enabled


def test_extension_is_built():
    info = ops.build_info()
    assert info["compiled"], info.get("error")
    assert info["openmp"]


def test_cuda_kernels_built_whenever_nvcc_is_present():
    # CI relies on this: with nvcc on PATH the CUDA sources must have been compiled, so a CUDA
    # compile error cannot pass as a CPU-only build.
    forced = os.environ.get("FASTLLM_CUDA", "").upper()
    if forced in ("0", "OFF", "FALSE", "NO"):
        assert not ops.build_info()["cuda"]
    elif shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"):
        info = ops.build_info()
        assert info["cuda"] and info["cuda_archs"]


def test_triton_kernels_ship_inside_the_package():
    import fastllm.triton_kernels

    assert os.path.dirname(fastllm.triton_kernels.__file__).endswith("triton_kernels")


def test_nvtx_ranges_can_be_switched_on():
    params = [torch.randn(3)]
    states = [[torch.rand(3)] for _ in range(3)]
    with nvtx_enabled():
        assert nvtx_is_enabled()
        ops.ademamix_step_(params, [torch.randn(3)], *states, lr=1e-3, beta1=0.9, beta2=0.999, beta3=0.999,
                           alpha=1.0, eps=1e-8, weight_decay=0.0, bias_correction1=0.1, bias_correction2=0.001)
    assert torch.isfinite(params[0]).all()
