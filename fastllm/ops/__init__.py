"""fastllm.ops: drop-in custom ops (torch.library, namespace ``fastllm``).

Every op validates its inputs, dispatches by device to a CUDA, Triton or C++ CPU kernel, and keeps
a pure-PyTorch reference as the oracle. ``FASTLLM_BACKEND=reference`` (or ``use_backend``) runs the
references everywhere; ``available()`` tells what this build will run.
"""

from __future__ import annotations

import importlib.util

import torch

from fastllm.ops import _backend
from fastllm.ops._backend import build_info, current_backend, use_backend
from fastllm.ops.ademamix import ademamix_step_
from fastllm.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from fastllm.ops.depth_weighted_average import depth_weighted_average, depth_weighted_average_backward
from fastllm.ops.flash_attention import (attention_implementation, flash_attention, hash_sparse_attention,
                                         qk_sparse_attention)
from fastllm.ops.linear_cross_entropy import implementation as _linear_cross_entropy_implementation
from fastllm.ops.linear_cross_entropy import linear_cross_entropy
from fastllm.ops.selective_scan import selective_scan
from fastllm.ops.selective_state_update import selective_state_update
from fastllm.ops.xielu import has_cpp_kernels as _xielu_has_cpp
from fastllm.ops.xielu import xielu


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _compiled(launcher: str) -> bool:
    return _backend._C is not None and hasattr(_backend._C, launcher)


def available() -> dict:
    """The compiled module's contents and the implementation each op will use per device."""
    reference = current_backend() == "reference"

    def pick(cpu: str, cuda: str) -> dict:
        return {"cpu": "reference" if reference else cpu, "cuda": "reference" if reference else cuda}

    cpp = "cpp" if _backend.has_cpu_kernels() else "reference"
    triton = "triton" if _triton_installed() else "torch-fp32"
    return {
        "backend": current_backend(),
        "build": build_info(),
        "triton": _triton_installed(),
        "torch_cuda": torch.cuda.is_available(),
        "ops": {
            "ademamix_step_": pick(cpp, "cuda" if _compiled("ademamix_step_cuda") else "reference"),
            "xielu": pick("cpp" if _xielu_has_cpp() else "torch-fp32", triton),
            "selective_scan": pick(cpp, "cuda" if _compiled("selective_scan_fwd_cuda") else "reference"),
            "selective_state_update": pick(cpp, "cuda" if _compiled("selective_state_update_cuda") else "reference"),
            "causal_conv1d": pick("cpp" if _backend.has_cpu_kernels() else "torch",
                                  "triton" if _triton_installed() else "torch"),
            "depth_weighted_average": pick(cpp, "cuda" if _compiled("depth_weighted_average_forward_cuda") else "reference"),
            **dict.fromkeys(("flash_attention", "qk_sparse_attention", "hash_sparse_attention"),
                            {"cpu": attention_implementation("cpu"), "cuda": attention_implementation("cuda")}),
            "linear_cross_entropy": {"cpu": _linear_cross_entropy_implementation("cpu"),
                                     "cuda": _linear_cross_entropy_implementation("cuda")},
        },
    }


__all__ = ["ademamix_step_", "available", "build_info", "causal_conv1d", "causal_conv1d_update", "current_backend",
           "depth_weighted_average", "depth_weighted_average_backward", "flash_attention", "hash_sparse_attention",
           "linear_cross_entropy", "qk_sparse_attention", "selective_scan", "selective_state_update", "use_backend", "xielu"]
