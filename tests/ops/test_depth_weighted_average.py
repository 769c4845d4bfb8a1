"""Depth-weighted average: kernels against the fp64 reference, forward and both gradients."""

from __future__ import annotations

import ctypes
import importlib

import pytest
import torch

from fastllm.ops import _backend, use_backend
from fastllm.ops.depth_weighted_average import (
    _backward,
    _forward,
    depth_weighted_average,
    depth_weighted_average_backward,
)
from fastllm.ops.depth_weighted_average_ref import (
    depth_weighted_average_backward_reference,
    depth_weighted_average_reference,
)
from fastllm.testing import (
    BACKWARD_FACTOR,
    DispatchedOps,
    assert_error_ratio,
    misaligned,
    poison_,
    requires_cuda,
)

# (rows in the buffer, K used, state shape): K = 1, odd sizes, a partly filled buffer, 0 elements.
SHAPES = [
    (1, 1, (7,)),
    (3, 3, (5, 33)),
    (9, 6, (2, 3, 129)),
    (25, 25, (4, 67)),
    (4, 2, (0, 8)),
]
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _inputs(rows, k, shape, dtype, device="cpu"):
    states = torch.randn(rows, *shape, device=device).to(dtype)
    weights = torch.randn(k, device=device)
    grad_out = torch.randn(shape, device=device).to(dtype)
    return states, weights, grad_out


def _check(states, weights, grad_out, factor_fwd=2.0):
    """Kernel forward and gradients vs the fp64 oracle, judged against the same-dtype reference."""
    k = weights.shape[0]
    used = states[:k]
    s = states.clone().requires_grad_(True)
    w = weights.clone().requires_grad_(True)
    out = depth_weighted_average(s, w)
    out.backward(grad_out)

    oracle = depth_weighted_average_reference(used.double(), weights.double())
    baseline = depth_weighted_average_reference(used, weights)
    assert out.dtype == states.dtype and out.shape == states.shape[1:]
    assert_error_ratio("out", out, oracle, baseline, factor_fwd)

    oracle_gs, oracle_gw = depth_weighted_average_backward_reference(grad_out.double(), used.double(),
                                                                     weights.double())
    base_gs, base_gw = depth_weighted_average_backward_reference(grad_out, used, weights)
    assert_error_ratio("grad states", s.grad[:k], oracle_gs, base_gs, BACKWARD_FACTOR)
    assert_error_ratio("grad weights", w.grad, oracle_gw, base_gw, BACKWARD_FACTOR)
    # Rows of the buffer past K are neither read nor given a gradient.
    assert torch.equal(s.grad[k:], torch.zeros_like(s.grad[k:]))


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("rows,k,shape", SHAPES)
def test_matches_fp64_reference_cpu(rows, k, shape, dtype):
    _check(*_inputs(rows, k, shape, dtype))


def test_reference_backward_matches_autograd():
    states, weights, grad_out = _inputs(5, 5, (3, 11), torch.float64)
    weights = weights.double()
    s, w = states.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    torch.tensordot(w, s, dims=1).backward(grad_out)
    grad_states, grad_weights = depth_weighted_average_backward_reference(grad_out, states, weights)
    torch.testing.assert_close(grad_states, s.grad)
    torch.testing.assert_close(grad_weights, w.grad)


def test_unread_buffer_rows_may_hold_anything():
    states, weights, grad_out = _inputs(6, 4, (3, 17), torch.float32)
    poison_(states[4:])
    out = depth_weighted_average(states, weights)
    grad_states, grad_weights = depth_weighted_average_backward(grad_out, states, weights)
    assert torch.isfinite(out).all() and torch.isfinite(grad_states).all() and torch.isfinite(grad_weights).all()
    torch.testing.assert_close(out, depth_weighted_average_reference(states[:4], weights))


def test_no_states_gives_zeros():
    states, _, grad_out = _inputs(3, 0, (2, 5), torch.float32)
    weights = torch.empty(0)
    assert torch.equal(depth_weighted_average(states, weights), torch.zeros(2, 5))
    grad_states, grad_weights = depth_weighted_average_backward(grad_out, states, weights)
    assert grad_states.shape == (0, 2, 5) and grad_weights.shape == (0,)


@pytest.mark.parametrize("states_dtype,weights_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float64)])
def test_no_states_backward_on_the_reference_path(states_dtype, weights_dtype):
    """K = 0 where the reference runs (float64 states or weights): empty gradients, through autograd too."""
    states = torch.randn(3, 2, 5, dtype=states_dtype, requires_grad=True)
    weights = torch.empty(0, dtype=weights_dtype, requires_grad=True)
    grad_states, grad_weights = depth_weighted_average_backward(torch.randn(2, 5, dtype=states_dtype), states.detach(),
                                                                weights.detach())
    assert grad_states.shape == (0, 2, 5) and grad_weights.shape == (0,)
    depth_weighted_average(states, weights).sum().backward()
    assert torch.equal(states.grad, torch.zeros_like(states)) and weights.grad.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_kernel_writes_every_output(dtype):
    """Calls the compiled kernels on NaN-poisoned outputs: every element must be written."""
    if not _backend.has_cpu_kernels():
        pytest.skip("fastllm._C is not built")
    k, numel = 5, 2 * 2048 + 3  # two full chunks and a ragged one
    states, weights, grad_out = _inputs(k, k, (numel,), dtype)
    code = _backend.DTYPE_CODES[dtype]
    out = poison_(torch.empty(numel, dtype=dtype))
    _backend._C.depth_weighted_average_forward_cpu(states.data_ptr(), weights.data_ptr(), out.data_ptr(), numel, k,
                                                   code, 2)
    torch.testing.assert_close(out, depth_weighted_average_reference(states, weights))
    grad_states, grad_weights = poison_(torch.empty_like(states)), poison_(torch.empty_like(weights))
    _backend._C.depth_weighted_average_backward_cpu(grad_out.data_ptr(), states.data_ptr(), weights.data_ptr(),
                                                    grad_states.data_ptr(), grad_weights.data_ptr(), numel, k, code, 2)
    ref_gs, ref_gw = depth_weighted_average_backward_reference(grad_out, states, weights)
    assert torch.equal(grad_states, ref_gs)
    torch.testing.assert_close(grad_weights, ref_gw, rtol=1e-5, atol=1e-5)


def test_results_do_not_depend_on_thread_count():
    # Large enough (K * numel > 2^19) for the kernels to use two OpenMP threads.
    states, weights, grad_out = _inputs(8, 8, (34 * 2048 + 5,), torch.float32)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (depth_weighted_average(states, weights), *depth_weighted_average_backward(grad_out, states, weights))
        torch.set_num_threads(2)
        two = (depth_weighted_average(states, weights), *depth_weighted_average_backward(grad_out, states, weights))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    _check(states, weights, grad_out)


def test_reference_backend_matches_reference():
    states, weights, _ = _inputs(4, 3, (2, 9), torch.bfloat16)
    with use_backend("reference"):
        out = depth_weighted_average(states, weights)
    assert torch.equal(out, depth_weighted_average_reference(states[:3], weights))


def test_float64_runs_the_reference():
    states, weights, grad_out = _inputs(4, 4, (3, 5), torch.float64)
    _check(states, weights.double(), grad_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    states, weights, grad_out = _inputs(4, 4, (3, 10), dtype)
    torch.library.opcheck(_forward, (states, weights.requires_grad_(True)))
    torch.library.opcheck(_backward, (grad_out, states, weights.detach()))


def test_torch_compile_fullgraph():
    states, weights, grad_out = _inputs(6, 5, (2, 3, 16), torch.float32)

    def loss(s, w):
        return (depth_weighted_average(s, w) * grad_out).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    s1, w1 = states.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    s2, w2 = states.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    compiled(s1, w1).backward()
    loss(s2, w2).backward()
    torch.testing.assert_close(s1.grad, s2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize(
    "states,weights,error,match",
    [
        (torch.randn(3, 4).int(), torch.randn(3), TypeError, "states"),
        ([[1.0]], torch.randn(1), TypeError, "states"),
        (torch.randn(3, 4), torch.randn(3).bfloat16(), TypeError, "weights"),
        (torch.randn(3, 4), torch.randn(3, 1), ValueError, "weights"),
        (torch.randn(3, 4), torch.randn(4), ValueError, "weights"),
        (torch.tensor(1.0), torch.randn(1), ValueError, "states"),
        (torch.randn(4, 3).t(), torch.randn(3), ValueError, "states must be contiguous"),
        (torch.randn(3, 4), torch.randn(3, device="meta"), ValueError, "weights"),
    ],
)
def test_bad_inputs_name_the_argument(states, weights, error, match):
    with pytest.raises(error, match=match):
        depth_weighted_average(states, weights)


def test_bad_grad_out():
    states, weights, grad_out = _inputs(3, 3, (4, 5), torch.float32)
    with pytest.raises(TypeError, match="grad_out"):
        depth_weighted_average_backward(grad_out.double(), states, weights)
    with pytest.raises(ValueError, match="grad_out"):
        depth_weighted_average_backward(grad_out[:, :4], states, weights)


def test_registered_ops_check_their_inputs():
    """Anyone can call torch.ops.fastllm.*: inputs their kernels would index out of bounds (one more
    weight than states, a short gradient) are errors there too, not memory faults."""
    states, weights, grad_out = _inputs(11, 11, (8, 16), torch.float32)
    longer = torch.randn(12)
    with pytest.raises(ValueError, match="weights has 12 entries"):
        torch.ops.fastllm.depth_weighted_average(states, longer)
    with pytest.raises(ValueError, match="weights has 12 entries"):
        torch.ops.fastllm.depth_weighted_average_backward(grad_out, states, longer)
    with pytest.raises(ValueError, match="states must hold exactly the 10"):
        torch.ops.fastllm.depth_weighted_average_backward(grad_out, states, weights[:10])
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.fastllm.depth_weighted_average_backward(grad_out[:, :15], states, weights)
    with pytest.raises(TypeError, match="grad_out"):
        torch.ops.fastllm.depth_weighted_average_backward(grad_out.double(), states, weights)


def test_eager_calls_skip_the_dispatcher_only_when_nothing_must_see_the_op(monkeypatch):
    """Without autograd to record, eager calls run the implementation directly; with it, or under a
    dispatch mode (or torch.compile, above), they go through the registered ops. Same results."""
    states, weights, grad_out = _inputs(6, 5, (3, 17), torch.float32)
    direct = (depth_weighted_average(states, weights), *depth_weighted_average_backward(grad_out, states, weights))
    with DispatchedOps() as seen:
        through_ops = (depth_weighted_average(states, weights),
                       *depth_weighted_average_backward(grad_out, states, weights))
    assert {"fastllm.depth_weighted_average", "fastllm.depth_weighted_average_backward"} <= set(seen.ops)
    for a, b in zip(direct, through_ops):
        assert torch.equal(a, b)

    def unreachable(*args):
        raise AssertionError("called the registered op")

    dwa_module = importlib.import_module("fastllm.ops.depth_weighted_average")
    monkeypatch.setattr(dwa_module, "_forward", unreachable)
    monkeypatch.setattr(dwa_module, "_backward", unreachable)
    assert torch.equal(depth_weighted_average(states, weights), direct[0])
    assert torch.equal(depth_weighted_average_backward(grad_out, states, weights)[0], direct[1])
    with pytest.raises(AssertionError, match="registered op"):
        depth_weighted_average(states, weights.requires_grad_(True))
    with torch.no_grad():
        assert torch.equal(depth_weighted_average(states, weights), direct[0])


# GPU: vectorised (16-byte) and scalar paths, K beyond one backward launch, determinism.
GPU_SHAPES = SHAPES + [(8, 8, (3, 1001)), (1030, 1030, (2, 64)), (25, 25, (2, 64, 1024))]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("rows,k,shape", GPU_SHAPES)
def test_matches_fp64_reference_cuda(rows, k, shape, dtype):
    _check(*_inputs(rows, k, shape, dtype, device="cuda"))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_kernel(dtype):
    states, weights, grad_out = _inputs(9, 9, (5, 257), dtype)
    out_cpu = depth_weighted_average(states, weights)
    out_gpu = depth_weighted_average(states.cuda(), weights.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu)
    gs_cpu, gw_cpu = depth_weighted_average_backward(grad_out, states, weights)
    gs_gpu, gw_gpu = depth_weighted_average_backward(grad_out.cuda(), states.cuda(), weights.cuda())
    assert torch.equal(gs_gpu.cpu(), gs_cpu)
    torch.testing.assert_close(gw_gpu.cpu(), gw_cpu, rtol=1e-5, atol=1e-5)


@requires_cuda
def test_cuda_backward_is_deterministic():
    states, weights, grad_out = _inputs(25, 25, (4, 1000, 64), torch.bfloat16, device="cuda")
    first = depth_weighted_average_backward(grad_out, states, weights)
    for _ in range(3):
        again = depth_weighted_average_backward(grad_out, states, weights)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@requires_cuda
@pytest.mark.parametrize("numel", [8 * 1024, 8 * 1024 + 3])
def test_cuda_kernel_writes_every_output(numel):
    k, dtype = 6, torch.bfloat16
    states, weights, grad_out = _inputs(k, k, (numel,), dtype, device="cuda")
    code, stream = _backend.DTYPE_CODES[dtype], _backend.cuda_stream(states.device)
    out = poison_(torch.empty(numel, dtype=dtype, device="cuda"))
    _backend._C.depth_weighted_average_forward_cuda(states.data_ptr(), weights.data_ptr(), out.data_ptr(), numel, k,
                                                    code, states.device.index, stream)
    torch.testing.assert_close(out, depth_weighted_average_reference(states, weights))
    grad_states, grad_weights = poison_(torch.empty_like(states)), poison_(torch.empty_like(weights))
    workspace = poison_(torch.empty(_backend._C.depth_weighted_average_cuda_workspace(numel, k, code),
                                    device="cuda"))
    _backend._C.depth_weighted_average_backward_cuda(
        grad_out.data_ptr(), states.data_ptr(), weights.data_ptr(), grad_states.data_ptr(), grad_weights.data_ptr(),
        workspace.data_ptr(), numel, k, code, states.device.index, stream)
    ref_gs, ref_gw = depth_weighted_average_backward_reference(grad_out, states, weights)
    assert torch.equal(grad_states, ref_gs)
    torch.testing.assert_close(grad_weights, ref_gw, rtol=1e-4, atol=1e-4)


@requires_cuda
def test_cuda_torch_compile_fullgraph():
    states, weights, grad_out = _inputs(6, 5, (2, 3, 16), torch.bfloat16, device="cuda")
    s, w = states.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    compiled = torch.compile(lambda s, w: (depth_weighted_average(s, w) * grad_out).float().sum(), fullgraph=True)
    compiled(s, w).backward()
    ref_gs, ref_gw = depth_weighted_average_backward_reference(grad_out, states[:5], weights)
    assert torch.equal(s.grad[:5], ref_gs)
    torch.testing.assert_close(w.grad, ref_gw, rtol=1e-3, atol=1e-3)


def test_full_buffer_is_not_sliced():
    """A slice in the graph would copy the whole state gradient in backward; only partial buffers slice."""
    states = torch.randn(4, 3, 5, requires_grad=True)
    full = depth_weighted_average(states, torch.randn(4))
    assert full.grad_fn.next_functions[0][0].variable is states
    partial = depth_weighted_average(states, torch.randn(3))
    assert "Slice" in type(partial.grad_fn.next_functions[0][0]).__name__


# ---- the CUDA kernels on the CPU (tests/cuda_emulator): vector and scalar paths, grid-stride loops ----

class _EmulatedKernels:
    """The emulator's entry points, called like the module's depth_weighted_average_*_cuda."""

    def __init__(self, lib):
        self.lib = lib
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.emulated_dwa_workspace.restype = i64
        lib.emulated_dwa_workspace.argtypes = [i64, i64, i32]
        lib.emulated_dwa_forward.argtypes = [p, p, p, i64, i64, i32, i32]
        lib.emulated_dwa_backward.argtypes = [p, p, p, p, p, p, i64, i64, i32]

    def forward(self, states, weights, multiprocessors):
        out = poison_(states.new_empty(states.shape[1:]))
        self.lib.emulated_dwa_forward(states.data_ptr(), weights.data_ptr(), out.data_ptr(), out.numel(),
                                      weights.shape[0], _backend.DTYPE_CODES[states.dtype], multiprocessors)
        return out

    def backward(self, grad_out, states, weights):
        numel, k, code = grad_out.numel(), weights.shape[0], _backend.DTYPE_CODES[states.dtype]
        grad_states, grad_weights = poison_(torch.empty_like(states)), poison_(torch.empty_like(weights))
        workspace = poison_(torch.empty(self.lib.emulated_dwa_workspace(numel, k, code)))
        self.lib.emulated_dwa_backward(grad_out.data_ptr(), states.data_ptr(), weights.data_ptr(),
                                       grad_states.data_ptr(), grad_weights.data_ptr(), workspace.data_ptr(), numel,
                                       k, code)
        return grad_states, grad_weights


EMULATOR_CASES = [
    (25, 9000, "vectorised"),  # 4 blocks of 256 threads on one multiprocessor: the forward loops over items
    (5, 1001, "scalar"),  # numel not a multiple of the vector width
    (3, 2048, "misaligned"),  # states 2 bytes past a 16-byte boundary
    (1, 8, "vectorised"),
    (2, 300_000, "vectorised"),  # over 128 backward blocks: the whole reduction tree in use
]


# More states than one backward launch's shared memory holds, in float32 only: its 1030 reduction
# blocks take 30 s under the emulator.
@pytest.mark.parametrize("dtype,k,numel,case", [(dtype, *case) for dtype in (torch.float32, *LOW_PRECISION)
                                                for case in EMULATOR_CASES] + [(torch.float32, 1030, 24, "vectorised")])
def test_cuda_kernels_under_emulator(cuda_emulator, k, numel, case, dtype):
    kernels = _EmulatedKernels(cuda_emulator("depth_weighted_average.cpp"))
    states = torch.randn(k, numel).to(dtype)
    if case == "misaligned":
        states = misaligned(states)
    weights, grad_out = torch.randn(k), torch.randn(numel).to(dtype)

    out = kernels.forward(states, weights, multiprocessors=1)
    assert_error_ratio("out", out, depth_weighted_average_reference(states.double(), weights.double()),
                       depth_weighted_average_reference(states, weights))
    grad_states, grad_weights = kernels.backward(grad_out, states, weights)
    oracle_gs, oracle_gw = depth_weighted_average_backward_reference(grad_out.double(), states.double(),
                                                                     weights.double())
    base_gs, base_gw = depth_weighted_average_backward_reference(grad_out, states, weights)
    assert_error_ratio("grad states", grad_states, oracle_gs, base_gs, BACKWARD_FACTOR)
    assert_error_ratio("grad weights", grad_weights, oracle_gw, base_gw, BACKWARD_FACTOR)
