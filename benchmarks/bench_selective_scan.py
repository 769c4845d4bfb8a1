"""Selective scan: fastllm's kernels against the sequential PyTorch reference and a log-depth
parallel-scan PyTorch implementation (forward, and forward + backward), on CPU and GPU; the decoding
step; the causal conv1d choice (CPU: torch's convolution against shift-and-add; GPU: fastllm's Triton
kernels against both).

Targets (issue 5): on the 2-core CPU >= 20x the sequential reference at batch 2, dim 256, L 512,
N 16; on GPU, bf16 batch 8, dim 2048, L 2048, N 16 (variable B/C, z, delta_bias, softplus),
forward <= 0.40 ms and backward <= 1.5 ms on an H200, reported with the bandwidth floor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastllm.ops.causal_conv1d import _preactivation_torch, causal_conv1d
from fastllm.ops.causal_conv1d_ref import causal_conv1d_reference
from fastllm.ops.selective_scan import chunk_length, num_chunks, selective_scan
from fastllm.ops.selective_scan_ref import selective_scan_parallel, selective_scan_reference
from fastllm.ops.selective_state_update import selective_state_update
from fastllm.ops.selective_state_update_ref import selective_state_update_reference
from fastllm.testing import misaligned

# Peak DRAM bandwidth (bytes/s) for the bandwidth floor, by device name.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def scan_inputs(batch, dim, length, nstate, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    return dict(u=rand(batch, dim, length).to(dtype), delta=(rand(batch, dim, length) * 0.5 - 1).to(dtype),
                A=-(torch.rand(dim, nstate, generator=g) * 2 + 0.3).to(device),
                B=rand(batch, 1, nstate, length).to(dtype), C=rand(batch, 1, nstate, length).to(dtype),
                D=rand(dim), z=rand(batch, dim, length).to(dtype), delta_bias=rand(dim) * 0.3)


def scan_bytes(batch, dim, length, nstate, dtype, device, backward=False):
    """Compulsory DRAM traffic: forward reads u, delta, z, B, C and writes out + chunk states; the
    backward reads those inputs, dout and the states, and writes du, ddelta, dz, dB, dC."""
    e = torch.finfo(dtype).bits // 8
    per_channel = batch * dim * length * e
    per_bc = batch * nstate * length * e
    states = batch * dim * num_chunks(length, chunk_length(torch.device(device))) * nstate * 4
    if not backward:
        return 4 * per_channel + 2 * per_bc + states
    return 7 * per_channel + 4 * per_bc + states


IMPLEMENTATIONS = {
    "fastllm": selective_scan,
    "sequential_reference": selective_scan_reference,
    "parallel_scan_pytorch": selective_scan_parallel,
}


def _forward(fn, x):
    return lambda: fn(**x, delta_softplus=True)


def _forward_backward(fn, x):
    leaves = {k: v.detach().requires_grad_() for k, v in x.items()}

    def run():
        out = fn(**leaves, delta_softplus=True)
        out.backward(torch.ones_like(out))
    return run


CPU_CASES = [("forward", impl) for impl in IMPLEMENTATIONS] + [
    # The sequential reference's autograd over 512 steps takes most of a minute per call: left out.
    ("forward_backward", "fastllm"), ("forward_backward", "parallel_scan_pytorch")]


@pytest.mark.parametrize("mode,impl", CPU_CASES)
def test_cpu_scan(timer, impl, mode):
    shape = (2, 256, 512, 16)
    x = scan_inputs(*shape, torch.float32, "cpu")
    make = _forward if mode == "forward" else _forward_backward
    rounds = 3 if impl != "fastllm" or mode == "forward_backward" else 10
    timer(make(IMPLEMENTATIONS[impl], x), group=f"selective_scan cpu {mode} b2 d256 L512 N16", name=impl,
          device="cpu", bytes_moved=scan_bytes(*shape, torch.float32, "cpu", mode != "forward"), rounds=rounds,
          warmup=1)


GPU_SHAPE = (8, 2048, 2048, 16)
# "fastllm_scalar_loads" runs the op on the same values stored one element past a 16-byte boundary,
# where the CUDA kernels fall back from vector to scalar loads: the vector loads' gain, in one run.
GPU_IMPLEMENTATIONS = {**IMPLEMENTATIONS, "fastllm_scalar_loads": selective_scan}


def gpu_scan_inputs(impl):
    x = scan_inputs(*GPU_SHAPE, torch.bfloat16, "cuda")
    if impl == "fastllm_scalar_loads":
        x.update({k: misaligned(x[k]) for k in ("u", "delta", "B", "C", "z")})
    return x


def _floor_ms(bytes_moved: float) -> float | None:
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BANDWIDTH.items() if k in name), None)
    return None if peak is None else bytes_moved / peak * 1e3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["fastllm", "fastllm_scalar_loads", "parallel_scan_pytorch", "sequential_reference"])
def test_cuda_scan_forward(timer, benchmark, impl):
    x = gpu_scan_inputs(impl)
    bytes_moved = scan_bytes(*GPU_SHAPE, torch.bfloat16, "cuda")
    rounds = 20 if impl.startswith("fastllm") else 3
    timer(_forward(GPU_IMPLEMENTATIONS[impl], x), group="selective_scan cuda forward bf16 b8 d2048 L2048 N16",
          name=impl, device="cuda", bytes_moved=bytes_moved, rounds=rounds, warmup=1)
    benchmark.extra_info["bandwidth_floor_ms"] = _floor_ms(bytes_moved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["fastllm", "fastllm_scalar_loads", "parallel_scan_pytorch"])
def test_cuda_scan_backward(timer, benchmark, impl):
    """The backward alone: the forward runs once, outside the timed region."""
    x = gpu_scan_inputs(impl)
    leaves = {k: v.detach().requires_grad_() for k, v in x.items()}
    try:  # the parallel scan's autograd keeps every doubling step: tens of GB at this shape
        out = GPU_IMPLEMENTATIONS[impl](**leaves, delta_softplus=True)
    except torch.OutOfMemoryError:
        pytest.skip(f"{impl} backward does not fit in GPU memory at this shape")
    dout = torch.randn_like(out)
    bytes_moved = scan_bytes(*GPU_SHAPE, torch.bfloat16, "cuda", backward=True)
    timer(lambda: torch.autograd.grad(out, list(leaves.values()), dout, retain_graph=True),
          group="selective_scan cuda backward bf16 b8 d2048 L2048 N16", name=impl, device="cuda",
          bytes_moved=bytes_moved, rounds=10, warmup=1)
    benchmark.extra_info["bandwidth_floor_ms"] = _floor_ms(bytes_moved)


@pytest.mark.parametrize("impl", ["fastllm", "reference"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_state_update(timer, impl, device):
    batch, dim, nstate = (64, 2048, 16) if device == "cuda" else (8, 512, 16)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = scan_inputs(batch, dim, 1, nstate, dtype, device)
    state = torch.randn(batch, dim, nstate, device=device)
    fn = selective_state_update if impl == "fastllm" else selective_state_update_reference
    e = torch.finfo(dtype).bits // 8
    timer(lambda: fn(state, x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0, :, 0], x["C"][..., 0, :, 0],
                     x["D"], x["z"][..., 0], x["delta_bias"], True),
          group=f"selective_state_update {device} b{batch} d{dim} N{nstate}", name=impl, device=device,
          bytes_moved=2 * state.numel() * 4 + 4 * batch * dim * e, rounds=50, warmup=5)


@pytest.mark.parametrize("impl", ["fastllm", "torch_conv1d", "shift_add"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_causal_conv1d_cpu(timer, impl, layout):
    """The op's C++ CPU kernels, forward + backward, against torch's convolution under autograd and
    shift-and-add; channels_last is a Mamba block's (B, D, L) view of its (B, L, D) projection."""
    batch, dim, length = 2, 512, 512
    if layout == "channels_last":
        x = torch.randn(batch, length, dim).transpose(1, 2)
    else:
        x = torch.randn(batch, dim, length)
    x.requires_grad_()
    w, b = torch.randn(dim, 4, requires_grad=True), torch.randn(dim, requires_grad=True)
    fn = CONV_IMPLEMENTATIONS[impl]
    timer(lambda: fn(x, w, b).sum().backward(), name=impl, device="cpu", rounds=10, warmup=2,
          group=f"causal_conv1d cpu fwd+bwd b{batch} d{dim} L{length} w4 {layout}")


CONV_GPU_SHAPE = (8, 2048, 2048)  # batch, dim, length


def conv_gpu_inputs(requires_grad):
    """(x, weight, bias, dout) on the GPU in bf16: x is a Mamba block's conv input, the x half of its
    input projection, a channel-contiguous (B, D, L) view; width 4."""
    batch, dim, length = CONV_GPU_SHAPE
    projection = torch.randn(batch, length, 2 * dim, device="cuda", dtype=torch.bfloat16)
    x = projection.transpose(1, 2)[:, :dim].detach().requires_grad_(requires_grad)
    w = torch.randn(dim, 4, device="cuda", dtype=torch.bfloat16, requires_grad=requires_grad)
    b = torch.randn(dim, device="cuda", dtype=torch.bfloat16, requires_grad=requires_grad)
    return x, w, b, torch.randn(batch, dim, length, device="cuda", dtype=torch.bfloat16)


CONV_IMPLEMENTATIONS = {
    "fastllm": lambda x, w, b: causal_conv1d(x, w, b, "silu"),
    "torch_conv1d": lambda x, w, b: F.silu(_preactivation_torch(x, w, b)),  # the op's fallback path
    "shift_add": lambda x, w, b: causal_conv1d_reference(x, w, b, "silu"),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", list(CONV_IMPLEMENTATIONS))
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_causal_conv1d_cuda(timer, impl, backward):
    """The GPU choice of fastllm.ops.causal_conv1d on a Mamba block's input (conv_gpu_inputs), silu."""
    batch, dim, length = CONV_GPU_SHAPE
    x, w, b, dout = conv_gpu_inputs(requires_grad=backward)
    fn = CONV_IMPLEMENTATIONS[impl]
    if backward:
        run = lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), dout)  # noqa: E731
    else:
        run = lambda: fn(x, w, b)  # noqa: E731
    passes = 5 if backward else 2  # x in, out; backward: x and dout in, dx out
    timer(run, group=f"causal_conv1d cuda {'fwd+bwd' if backward else 'fwd'} b{batch} d{dim} L{length} w4 bf16",
          name=impl, device="cuda", bytes_moved=passes * x.numel() * 2, rounds=30, warmup=5)
