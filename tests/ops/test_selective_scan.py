import ctypes

import pytest
import torch

from fastllm.ops import _backend, use_backend
from fastllm.ops.selective_scan import (SCAN_CHUNK, SCAN_CHUNK_CUDA, _kernel_backward, _kernel_forward,
                                         _reference_backward, _reference_forward, selective_scan)
from fastllm.ops.selective_scan_ref import (selective_scan_backward_reference, selective_scan_parallel,
                                             selective_scan_reference)
from fastllm.testing import BACKWARD_FACTOR, assert_error_ratio, misaligned, requires_cuda

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(batch, dim, length, nstate, groups=None, dtype=torch.float32, *, z=True, D=True, bias=True,
                softplus=True, initial=True, device="cpu"):
    """Fresh random inputs in Mamba's ranges: A < 0, delta such that exp(delta A) spans (0, 1)."""
    g = torch.Generator().manual_seed(batch * 1000 + dim * 10 + length + nstate)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc_shape = (batch, nstate, length) if groups is None else (batch, groups, nstate, length)
    if softplus:
        delta = rand(batch, dim, length) * 0.5 - 1.0
    else:  # positive, so that exp(delta A) < 1
        delta = torch.rand(batch, dim, length, generator=g) * 0.4 + 0.02
    t = {
        "u": rand(batch, dim, length).to(dtype),
        "delta": delta.to(dtype),
        "A": -(torch.rand(dim, nstate, generator=g) * 2 + 0.3),
        "B": rand(*bc_shape).to(dtype),
        "C": rand(*bc_shape).to(dtype),
        "D": rand(dim) if D else None,
        "z": rand(batch, dim, length).to(dtype) if z else None,
        "delta_bias": rand(dim) * 0.3 if bias else None,
        "initial_state": rand(batch, dim, nstate) if initial else None,
    }
    return {k: (v.to(device) if v is not None else None) for k, v in t.items()}, softplus


def run(fn, inputs, softplus, dtype=None, grad=False):
    """fn's (out, last_state), inputs cast to ``dtype`` (params to fp64 when dtype is fp64)."""
    leaves = {}
    for name, x in inputs.items():
        if x is not None:
            if dtype is not None and (dtype == torch.float64 or name in ("u", "delta", "B", "C", "z")):
                x = x.to(dtype)
            x = x.detach().requires_grad_(grad)
        leaves[name] = x
    out, last = fn(**leaves, delta_softplus=softplus, return_last_state=True)
    return out, last, leaves


CASES = [
    # batch, dim, L, N, groups, flags
    dict(batch=2, dim=5, length=300, nstate=16),  # L not a multiple of the chunk
    dict(batch=1, dim=3, length=1, nstate=1),  # L = 1, N = 1
    dict(batch=2, dim=6, length=77, nstate=64, groups=3, z=False, initial=False),  # grouped B/C, N = 64
    dict(batch=1, dim=9, length=2 * SCAN_CHUNK + 1, nstate=16, groups=1, D=False, bias=False, softplus=False),
    dict(batch=1, dim=16, length=40, nstate=16, groups=16, z=True, D=True, bias=False),  # one channel per group
]


def _check(case, dtype, device="cpu"):
    inputs, softplus = make_inputs(**case, dtype=dtype, device=device)
    out, last, leaves = run(selective_scan, inputs, softplus, grad=True)
    ref_out, ref_last, ref_leaves = run(selective_scan_reference, inputs, softplus, torch.float64, grad=True)
    base_out, base_last, base_leaves = run(selective_scan_reference, inputs, softplus, grad=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    assert_error_ratio("out", out, ref_out, base_out)
    assert_error_ratio("last_state", last, ref_last, base_last)
    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device)
    w_last = torch.randn(last.shape, generator=g, dtype=torch.float64).to(device)
    for o, l, lv in ((out, last, leaves), (ref_out, ref_last, ref_leaves), (base_out, base_last, base_leaves)):
        ((o.double() * w_out).sum() + (l.double() * w_last).sum()).backward()
    for name in NAMES:
        if leaves[name] is None:
            continue
        assert leaves[name].grad is not None, name
        assert leaves[name].grad.dtype == leaves[name].dtype, name
        assert_error_ratio(f"d{name}", leaves[name].grad, ref_leaves[name].grad, base_leaves[name].grad,
                           factor=BACKWARD_FACTOR)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_matches_fp64_reference(case):
    _check(case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    _check(CASES[0], dtype)
    _check(CASES[2], dtype)


@pytest.mark.parametrize("used", ["out", "last_state"])
def test_gradient_through_one_output(used):
    """Only one output reaches the loss: the other's gradient is None (not materialised as zeros)."""
    inputs, softplus = make_inputs(2, 5, 90, 8, groups=1)
    results = [run(fn, inputs, softplus, dtype, grad=True) for fn, dtype in
               ((selective_scan, None), (selective_scan_reference, torch.float64), (selective_scan_reference, None))]
    weight = torch.randn(results[0][0 if used == "out" else 1].shape, dtype=torch.float64)
    for out, last, _ in results:
        ((out if used == "out" else last).double() * weight).sum().backward()
    (_, _, leaves), (_, _, ref_leaves), (_, _, base_leaves) = results
    for name in NAMES:
        if ref_leaves[name].grad is None:  # D and z do not reach the last state
            assert leaves[name].grad is None or not leaves[name].grad.any(), name
            continue
        assert_error_ratio(f"d{name}", leaves[name].grad, ref_leaves[name].grad, base_leaves[name].grad,
                           factor=BACKWARD_FACTOR)


def test_return_last_state_off_and_no_optional_inputs():
    inputs, _ = make_inputs(2, 4, 33, 8, z=False, D=False, bias=False, initial=False, softplus=False)
    out = selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    ref = selective_scan_reference(*(inputs[k].double() for k in ("u", "delta", "A", "B", "C")))
    base = selective_scan_reference(*(inputs[k] for k in ("u", "delta", "A", "B", "C")))
    assert_error_ratio("out", out, ref, base)


def test_reference_backend_and_parallel_scan_agree():
    inputs, softplus = make_inputs(2, 5, 300, 4, groups=5)
    out, last, _ = run(selective_scan, inputs, softplus)
    with use_backend("reference"):
        ref_out, ref_last, _ = run(selective_scan, inputs, softplus)
    par_out, par_last, _ = run(selective_scan_parallel, inputs, softplus, torch.float64)
    seq_out, seq_last, _ = run(selective_scan_reference, inputs, softplus, torch.float64)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, ref_last, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(par_out, seq_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(par_last, seq_last, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("z,groups", [(True, 2), (False, None)])
def test_backward_reference_equals_autograd(z, groups):
    inputs, softplus = make_inputs(2, 4, 13, 3, groups=groups, z=z)
    out, last, leaves = run(selective_scan_reference, inputs, softplus, torch.float64, grad=True)
    dout, dlast = torch.randn_like(out), torch.randn_like(last)
    wanted = [leaves[k] for k in NAMES if leaves[k] is not None]
    expected = dict(zip([k for k in NAMES if leaves[k] is not None],
                        torch.autograd.grad((out, last), wanted, (dout, dlast))))
    args = {k: v.detach() if v is not None else None for k, v in leaves.items()}
    got = dict(zip(NAMES, selective_scan_backward_reference(dout, dlast, **args, delta_softplus=softplus)))
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-10, atol=1e-10, msg=name)


def test_chunk_size_matches_compiled_module():
    if _backend._C is None:
        pytest.skip("fastllm._C not built")
    assert _backend._C.selective_scan_chunk == SCAN_CHUNK
    if hasattr(_backend._C, "selective_scan_cuda_chunk"):  # built with nvcc
        assert _backend._C.selective_scan_cuda_chunk == SCAN_CHUNK_CUDA


def test_opcheck():
    inputs, softplus = make_inputs(1, 3, 20, 4, groups=1)
    args = [inputs[k] for k in NAMES]
    for i in (0, 1, 3, 4, 6):  # differentiable activations
        args[i] = args[i].requires_grad_()
    torch.library.opcheck(torch.ops.fastllm.selective_scan_fwd.default, (*args, softplus))


@pytest.mark.parametrize("change", ["A_transposed", "D_float64", "delta_bias_float64", "A_float64",
                                    "strided_float64"])
def test_backward_fake_matches_real(change):
    """The backward op's fake gives each gradient the real one's dtype and strides: parameters of
    mixed dtypes (each runs the reference, gradients in its own dtype) and strided inputs.
    Under inductor a wrong dtype silently reinterprets dD's bytes, a wrong stride fails an assert."""
    inputs, softplus = make_inputs(2, 4, 7, 3, groups=2)
    if change == "A_transposed":
        inputs["A"] = inputs["A"].t().contiguous().t()
    elif change == "strided_float64":
        inputs = {k: v.double() for k, v in inputs.items()}
        inputs = {k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() >= 2 else v
                  for k, v in inputs.items()}
    else:
        name = change.removesuffix("_float64")
        inputs[name] = inputs[name].double()
    args = [inputs[k] for k in NAMES]
    out, chunk_states = torch.ops.fastllm.selective_scan_fwd(*args, softplus)
    dout, dlast = torch.randn_like(out), torch.randn_like(chunk_states[:, :, -1])
    torch.library.opcheck(torch.ops.fastllm.selective_scan_bwd.default,
                          (dout, dlast, *args, chunk_states, softplus), test_utils=("test_faketensor",))


def test_torch_compile_fullgraph():
    inputs, softplus = make_inputs(2, 4, 50, 8)

    def loss(u, delta, A, B, C, D, z, delta_bias, initial_state):
        out, last = selective_scan(u, delta, A, B, C, D, z, delta_bias, softplus, True, initial_state)
        return out.square().sum() + last.sum()

    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(**leaves).backward()
    eager = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    loss(**eager).backward()
    for k in NAMES:
        torch.testing.assert_close(leaves[k].grad, eager[k].grad, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    inputs, _ = make_inputs(2, 4, 10, 8)
    good = {k: inputs[k] for k in NAMES}

    def call(**changes):
        selective_scan(**{**good, **changes})

    with pytest.raises(TypeError, match="u must have dtype"):
        call(u=good["u"].int())
    with pytest.raises(TypeError, match="delta must have the dtype of u"):
        call(delta=good["delta"].half())
    with pytest.raises(ValueError, match="delta must have the shape of u"):
        call(delta=good["delta"][:, :, :5])
    with pytest.raises(ValueError, match="A must have shape"):
        call(A=good["A"][:3])
    with pytest.raises(ValueError, match="A must have shape"):
        call(A=-torch.rand(4, 257), B=torch.randn(2, 257, 10), C=torch.randn(2, 257, 10))
    with pytest.raises(TypeError, match="A must have dtype"):
        call(A=good["A"].int())
    with pytest.raises(ValueError, match="groups"):
        call(B=torch.randn(2, 3, 8, 10), C=torch.randn(2, 3, 8, 10))
    with pytest.raises(ValueError, match="B must have the shape"):
        call(B=torch.randn(2, 8, 11))
    with pytest.raises(ValueError, match="z must have the shape of u"):
        call(z=good["z"][:1])
    with pytest.raises(ValueError, match="D must have the shape"):
        call(D=torch.randn(5))
    with pytest.raises(ValueError, match="initial_state must have the shape"):
        call(initial_state=torch.randn(2, 4, 7))
    with pytest.raises(ValueError, match="at least one position"):
        call(**{k: (v[..., :0] if k in ("u", "delta", "B", "C", "z") else v) for k, v in good.items()})
    with pytest.raises(TypeError, match="B must be a torch.Tensor"):
        call(B=None)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="is on"):
            call(u=good["u"].cuda())


def test_half_precision_parameters_are_cast():
    inputs, softplus = make_inputs(2, 4, 30, 8)
    params = ("A", "D", "delta_bias", "initial_state")
    half = {k: (v.bfloat16().requires_grad_() if k in params else v) for k, v in inputs.items()}
    out = selective_scan(**half, delta_softplus=softplus)
    as_float = {k: (v.float() if k in params else v) for k, v in half.items()}
    expected = selective_scan(**as_float, delta_softplus=softplus)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert all(half[k].grad is not None and half[k].grad.dtype == torch.bfloat16 for k in params)


def test_non_contiguous_inputs():
    inputs, softplus = make_inputs(2, 4, 30, 8)
    strided = {k: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if v is not None and v.dim() == 3 else v)
               for k, v in inputs.items()}
    assert not strided["u"].is_contiguous()
    out, last, _ = run(selective_scan, strided, softplus)
    ref_out, ref_last, _ = run(selective_scan, inputs, softplus)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_cuda_matches_fp64_reference(case):
    _check(case, torch.float32, device="cuda")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_inputs(dtype):
    _check(CASES[0], dtype, device="cuda")
    _check(CASES[2], dtype, device="cuda")


@requires_cuda
def test_cuda_long_sequence_bf16():
    _check(dict(batch=2, dim=37, length=3 * SCAN_CHUNK + 5, nstate=16, groups=1), torch.bfloat16, device="cuda")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_vector_loads(dtype):
    """L a multiple of 8: the kernels load 16-byte vectors (the emulator cases check the tiling)."""
    _check(dict(batch=2, dim=37, length=200, nstate=16), dtype, device="cuda")


# ---- the CUDA kernels on the CPU (tests/cuda_emulator): their tiling, chunks and reductions ----------

EMULATED_CASES = [
    dict(batch=2, dim=5, length=150, nstate=16),  # two chunks and a partial one
    dict(batch=1, dim=3, length=1, nstate=1),
    dict(batch=2, dim=6, length=37, nstate=5, groups=3, z=False, initial=False),  # N not a multiple of 4
    dict(batch=1, dim=40, length=70, nstate=16, groups=1, D=False, bias=False, softplus=False),  # 2 blocks
    dict(batch=1, dim=2, length=21, nstate=130, D=False, initial=False),  # 8 states per lane
    # The other lanes-per-channel layouts, each over two blocks.
    dict(batch=1, dim=17, length=67, nstate=32, initial=False),
    dict(batch=1, dim=10, length=13, nstate=64, groups=2),
    dict(batch=1, dim=5, length=9, nstate=100, z=False),
    dict(batch=0, dim=4, length=9, nstate=16),  # no launch
    # L a multiple of 8: vector loads of up to 16 bytes (fp32 and bf16), a partial last tile
    dict(batch=2, dim=5, length=136, nstate=16),
    dict(batch=1, dim=130, length=24, nstate=3, groups=2, initial=False),  # one lane per channel
    dict(batch=1, dim=2, length=40, nstate=130, D=False),  # 4-position forward tiles
    dict(batch=1, dim=5, length=48, nstate=16, misaligned=True),  # inputs off 16 bytes: scalar loads
    # The backward's pass 1 in several steps per chunk, then a chunk of one tile
    dict(batch=1, dim=6, length=72, nstate=4, z=False),
    dict(batch=1, dim=9, length=130, nstate=64, groups=3, initial=False),
]


class _Emulated:
    """The emulator's entry points, called like the module's selective_scan_{fwd,bwd}_cuda."""

    def __init__(self, lib):
        self.lib = lib
        lib.emulated_scan_tiles.restype = lib.emulated_scan_chunk.restype = ctypes.c_int64
        lib.emulated_scan_tiles.argtypes = [ctypes.c_int64, ctypes.c_int64]
        lib.emulated_scan_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_bool, ctypes.c_uint64,
                                              ctypes.c_uint64, ctypes.c_int]
        lib.emulated_scan_backward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p,
                                               ctypes.c_int]

    @staticmethod
    def _array(ctype, values):
        return (ctype * len(values))(*values)

    def forward(self, sizes, pointers, softplus, out, states, dtype):
        self.lib.emulated_scan_forward(self._array(ctypes.c_int64, sizes), self._array(ctypes.c_uint64, pointers),
                                       softplus, out, states, dtype)

    def backward(self, sizes, pointers, softplus, grads, dtype):
        self.lib.emulated_scan_backward(self._array(ctypes.c_int64, sizes), self._array(ctypes.c_uint64, pointers),
                                        softplus, self._array(ctypes.c_uint64, grads), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", EMULATED_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_cuda_kernels_under_emulator(cuda_emulator, case, dtype):
    emulated = _Emulated(cuda_emulator("selective_scan.cpp"))
    assert emulated.lib.emulated_scan_chunk() == SCAN_CHUNK_CUDA
    case = dict(case)
    off_alignment = case.pop("misaligned", False)
    inputs, softplus = make_inputs(**case, dtype=dtype)
    if inputs["B"].dim() == 3:
        inputs["B"], inputs["C"] = inputs["B"].unsqueeze(1), inputs["C"].unsqueeze(1)
    if off_alignment:
        inputs.update({k: misaligned(inputs[k]) for k in ("u", "delta", "B", "C", "z")})
    args = [inputs[k] for k in NAMES]
    args64 = [None if x is None else x.double() for x in args]

    out, states = _kernel_forward(emulated.forward, SCAN_CHUNK_CUDA, *args, softplus)
    ref_out, ref_states = _reference_forward(SCAN_CHUNK_CUDA, *args64, softplus)
    base_out, base_states = _reference_forward(SCAN_CHUNK_CUDA, *args, softplus)
    assert_error_ratio("out", out, ref_out, base_out)
    assert_error_ratio("chunk_states", states, ref_states, base_states)

    batch, dim, _ = inputs["u"].shape
    groups, nstate = inputs["B"].shape[1], inputs["A"].shape[1]
    dout, dlast = torch.randn_like(out), torch.randn(batch, dim, nstate)
    tiles = emulated.lib.emulated_scan_tiles(dim // groups, nstate)
    grads = _kernel_backward(emulated.backward, tiles, dout, dlast, *args, states, softplus)
    ref_grads = _reference_backward(dout.double(), dlast.double(), *args64, softplus)
    base_grads = _reference_backward(dout, dlast, *args, softplus)
    for name, x, grad, ref, base in zip(NAMES, args, grads, ref_grads, base_grads):
        if x is not None:
            assert_error_ratio(f"d{name}", grad, ref, base, factor=BACKWARD_FACTOR)


@requires_cuda
def test_cuda_empty_batch_and_dim():
    for batch, dim in ((0, 4), (2, 0)):
        inputs, softplus = make_inputs(batch, dim, 9, 16, device="cuda")
        out, last, leaves = run(selective_scan, inputs, softplus, grad=True)
        assert out.shape == (batch, dim, 9) and last.shape == (batch, dim, 16)
        (out.sum() + last.sum()).backward()
        assert leaves["A"].grad is not None and not leaves["A"].grad.any()
