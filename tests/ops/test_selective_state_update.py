import ctypes
import importlib

import pytest
import torch

from fastllm.ops.selective_scan import selective_scan
from fastllm.ops.selective_scan_ref import selective_scan_reference
from fastllm.ops.selective_state_update import _launch, selective_state_update
from fastllm.ops.selective_state_update_ref import selective_state_update_reference
from fastllm.testing import DispatchedOps, assert_error_ratio, requires_cuda


def make_sequence(batch, dim, length, nstate, groups=None, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(dim * 100 + length + nstate)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (batch, nstate, length) if groups is None else (batch, groups, nstate, length)
    t = dict(u=rand(batch, dim, length).to(dtype), delta=(rand(batch, dim, length) * 0.5 - 1).to(dtype),
             A=-(torch.rand(dim, nstate, generator=g) * 2 + 0.3), B=rand(*bc).to(dtype), C=rand(*bc).to(dtype),
             D=rand(dim), z=rand(batch, dim, length).to(dtype), delta_bias=rand(dim) * 0.3,
             initial_state=rand(batch, dim, nstate))
    return {k: v.to(device) for k, v in t.items()}


def step_through(update, s, state):
    outs = []
    for t in range(s["u"].shape[2]):
        outs.append(update(state, s["u"][..., t], s["delta"][..., t], s["A"], s["B"][..., t], s["C"][..., t],
                           s["D"], s["z"][..., t], s["delta_bias"], True))
    return torch.stack(outs, dim=-1)


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("nstate", [1, 16])
def test_steps_equal_the_scan(groups, nstate, device="cpu"):
    s = make_sequence(2, 6, 37, nstate, groups, device=device)
    state = s["initial_state"].clone()
    stepped = step_through(selective_state_update, s, state)
    out, last = selective_scan(**s, delta_softplus=True, return_last_state=True)
    # Same per-position math as the CPU scan; the CUDA scan computes exp on the special-function unit.
    tol = 1e-5 if device == "cpu" else 1e-4
    torch.testing.assert_close(stepped, out, rtol=tol, atol=tol)
    torch.testing.assert_close(state, last, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_fp64_reference(dtype, device="cpu"):
    s = make_sequence(3, 10, 4, 16, groups=5, dtype=dtype, device=device)
    state = s["initial_state"].clone()
    state64 = s["initial_state"].double()
    state32 = s["initial_state"].clone()
    s64 = {k: v.double() for k, v in s.items()}
    for t in range(4):
        out = selective_state_update(state, s["u"][..., t], s["delta"][..., t], s["A"], s["B"][..., t], s["C"][..., t],
                                     s["D"], s["z"][..., t], s["delta_bias"], True)
        ref = selective_state_update_reference(state64, s64["u"][..., t], s64["delta"][..., t], s64["A"],
                                               s64["B"][..., t], s64["C"][..., t], s64["D"], s64["z"][..., t],
                                               s64["delta_bias"], True)
        base = selective_state_update_reference(state32, s["u"][..., t], s["delta"][..., t], s["A"],
                                                s["B"][..., t], s["C"][..., t], s["D"], s["z"][..., t],
                                                s["delta_bias"], True)
        assert out.dtype == dtype
        assert_error_ratio("out", out, ref, base)
        assert_error_ratio("state", state, state64, state32)


def test_without_optional_inputs_and_reference_scan():
    s = make_sequence(2, 4, 5, 8)
    state = torch.zeros(2, 4, 8)
    outs = [selective_state_update(state, s["u"][..., t], s["delta"][..., t], s["A"], s["B"][..., t], s["C"][..., t])
            for t in range(5)]
    ref = selective_scan_reference(*(s[k].double() for k in ("u", "delta", "A", "B", "C")))
    torch.testing.assert_close(torch.stack(outs, -1).double(), ref, rtol=1e-5, atol=1e-5)


def test_opcheck():
    s = make_sequence(2, 4, 1, 8, groups=2)
    args = (s["initial_state"].clone(), s["u"][..., 0], s["delta"][..., 0], s["A"], s["B"][..., 0], s["C"][..., 0],
            s["D"], s["z"][..., 0], s["delta_bias"], True)
    torch.library.opcheck(torch.ops.fastllm.selective_state_update_.default, args)


def test_torch_compile_fullgraph():
    s = make_sequence(2, 4, 3, 8)
    compiled = torch.compile(selective_state_update, fullgraph=True, backend="aot_eager")
    state_a, state_b = s["initial_state"].clone(), s["initial_state"].clone()
    out_a = step_through(compiled, s, state_a)
    out_b = step_through(selective_state_update, s, state_b)
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(state_a, state_b)


def test_eager_steps_skip_the_dispatcher_only_when_nothing_must_see_the_op(monkeypatch):
    s = make_sequence(2, 4, 3, 8, groups=2)
    state_direct, state_ops = s["initial_state"].clone(), s["initial_state"].clone()
    direct = step_through(selective_state_update, s, state_direct)
    with DispatchedOps() as seen:
        through_ops = step_through(selective_state_update, s, state_ops)
    assert seen.ops.count("fastllm.selective_state_update_") == 3
    assert torch.equal(direct, through_ops) and torch.equal(state_direct, state_ops)

    def unreachable(*args):
        raise AssertionError("called the registered op")

    monkeypatch.setattr(importlib.import_module("fastllm.ops.selective_state_update"), "_state_update", unreachable)
    state = s["initial_state"].clone()
    assert torch.equal(step_through(selective_state_update, s, state), direct)
    assert state._version >= 3  # each in-place update is visible to autograd's checks
    s["D"].requires_grad_(True)  # autograd would have to see the op, which has no backward
    with pytest.raises(AssertionError, match="registered op"):
        step_through(selective_state_update, s, state)


def test_bad_inputs():
    s = make_sequence(2, 4, 1, 8)
    good = dict(state=s["initial_state"].clone(), x=s["u"][..., 0], dt=s["delta"][..., 0], A=s["A"],
                B=s["B"][..., 0], C=s["C"][..., 0])

    def call(**changes):
        selective_state_update(**{**good, **changes})

    with pytest.raises(ValueError, match="state must have the shape"):
        call(state=torch.zeros(2, 4, 7))
    with pytest.raises(TypeError, match="state must have dtype"):
        call(state=good["state"].half())
    with pytest.raises(TypeError, match="dt must have the dtype of x"):
        call(dt=good["dt"].half())
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        call(x=s["u"])
    with pytest.raises(ValueError, match="B must have shape"):
        call(B=torch.randn(2, 3, 8))
    with pytest.raises(TypeError, match="dt must be a torch.Tensor"):
        call(dt=None)
    with pytest.raises(ValueError, match="dt_bias must have the shape"):
        call(dt_bias=torch.zeros(3))


@requires_cuda
@pytest.mark.parametrize("groups", [None, 2])
def test_cuda_steps_equal_the_scan(groups):
    test_steps_equal_the_scan(groups, 16, device="cuda")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_fp64_reference(dtype):
    test_matches_fp64_reference(dtype, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nstate,groups", [(16, 5), (1, 1), (5, 1), (40, 2), (64, 10), (200, 2)])
def test_cuda_kernel_under_emulator(cuda_emulator, nstate, groups, dtype):
    """The CUDA kernel run on the CPU by tests/cuda_emulator: 1 to 32 lanes per row (up to 7 states
    each), rows past the last in a block, groups."""
    lib = cuda_emulator("selective_scan.cpp")
    lib.emulated_state_update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_bool, ctypes.c_int]

    def emulated(sizes, pointers, softplus, dtype_code):
        lib.emulated_state_update((ctypes.c_int64 * 4)(*sizes), (ctypes.c_uint64 * 10)(*pointers), softplus,
                                  dtype_code)

    s = make_sequence(3, 10, 4, nstate, groups=groups, dtype=dtype)
    state, state64, state32 = s["initial_state"].clone(), s["initial_state"].double(), s["initial_state"].clone()
    s64 = {k: v.double() for k, v in s.items()}
    for t in range(4):
        step = [s["u"][..., t], s["delta"][..., t], s["A"], s["B"][..., t], s["C"][..., t], s["D"], s["z"][..., t],
                s["delta_bias"]]
        out = _launch(emulated, state, *step, True)
        ref = selective_state_update_reference(state64, s64["u"][..., t], s64["delta"][..., t], s64["A"],
                                               s64["B"][..., t], s64["C"][..., t], s64["D"], s64["z"][..., t],
                                               s64["delta_bias"], True)
        base = selective_state_update_reference(state32, *step, True)
        assert_error_ratio("out", out, ref, base)
        assert_error_ratio("state", state, state64, state32)
