"""Causal depthwise conv1d against a direct sum over taps in fp64, forward and every gradient.

On a machine without a GPU the Triton kernels run in the interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1), in float32 and float16; bfloat16 runs on GPUs only. The C++ CPU kernels run
in float32 and bfloat16 on every machine.
"""

import importlib

import pytest
import torch

from fastllm.ops import _backend, use_backend
from fastllm.ops.causal_conv1d import causal_conv1d, causal_conv1d_state, causal_conv1d_update
from fastllm.ops.causal_conv1d_ref import causal_conv1d_reference as reference
from fastllm.testing import BACKWARD_FACTOR, assert_error_ratio, poison_, requires_cuda

conv = importlib.import_module("fastllm.ops.causal_conv1d")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(conv._kernels is None, reason="needs triton")
needs_cpp = pytest.mark.skipif(not _backend.has_cpu_kernels(), reason="needs the compiled CPU kernels")


def _skip_unless_cpp_takes_device_tensors():
    if DEVICE != "cpu" or not _backend.has_cpu_kernels():
        pytest.skip("the C++ kernels run on CPU tensors")


@pytest.fixture(autouse=True)
def triton_on_cpu(monkeypatch):
    """The Triton kernels on CPU tensors too (under the interpreter); the reference backend opts out."""
    monkeypatch.setattr(conv, "TRITON_ON_CPU", True)


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-filled buffers for the Triton launchers, so unwritten elements show."""
    if conv._kernels is not None:
        monkeypatch.setattr(conv._kernels, "_empty", lambda shape, dtype, device: poison_(
            torch.empty(shape, dtype=dtype, device=device)))


@pytest.fixture
def cpp_path(monkeypatch):
    """CPU tensors go to the C++ kernels, whose outputs are NaN-filled first."""
    monkeypatch.setattr(conv, "TRITON_ON_CPU", False)
    monkeypatch.setattr(conv, "_empty_cpu", lambda shape, dtype: poison_(torch.empty(shape, dtype=dtype)))


def _channels_last(t):
    """t's values laid out (B, L, D) and viewed as (B, D, L), as a Mamba block's input projection gives them."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _check(shape, width, dtype, activation, with_bias=True, channels_last=False, weight_dtype=None, device=DEVICE,
           path=None):
    """Forward and every gradient in ``dtype`` against fp64, the same direct sum in ``dtype`` as baseline."""
    batch, dim, length = shape
    x64 = torch.randn(shape, dtype=torch.float64, device=device)
    w64 = torch.randn(dim, width, dtype=torch.float64, device=device) * 0.5
    b64 = torch.randn(dim, dtype=torch.float64, device=device) if with_bias else None
    weight_dtype = weight_dtype or dtype
    inputs64 = [None if t is None else t.requires_grad_() for t in (x64, w64, b64)]

    def inputs():  # (x, weight, bias) as the op gets them, bias possibly None
        x = x64.detach().to(dtype)
        x = (_channels_last(x) if channels_last else x).requires_grad_()
        return [x, *(None if t is None else t.detach().to(weight_dtype).requires_grad_() for t in (w64, b64))]

    kernel_in, base_in = inputs(), inputs()
    assert path is None or conv._path(kernel_in[0]) == path
    out = causal_conv1d(*kernel_in, activation)
    ref = reference(*inputs64, activation)
    base = reference(*base_in, activation)
    assert out.dtype == dtype and out.shape == shape
    assert_error_ratio("out", out, ref, base)
    dout = torch.randn_like(ref)
    for y, d in ((out, dout.to(dtype)), (ref, dout), (base, dout.to(dtype))):
        y.backward(d)
    for name, t, t64, tb in zip(("dx", "dweight", "dbias"), kernel_in, inputs64, base_in):
        if t is None:
            continue
        assert t.grad.dtype == t.dtype
        assert_error_ratio(name, t.grad, t64.grad, tb.grad, factor=BACKWARD_FACTOR)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("shape,width", [((2, 5, 19), 4), ((1, 3, 1), 4), ((3, 9, 17), 2), ((1, 6, 11), 1),
                                         ((2, 4, 9), 5)])
def test_matches_reference(poisoned, shape, width, activation, dtype):
    _check(shape, width, dtype, activation)


@needs_triton
@pytest.mark.parametrize("case", ["channels_last", "no_bias", "float32_weights"])
def test_layouts_and_dtypes(poisoned, case):
    _check((2, 7, 13), 4, torch.float16, "silu", with_bias=case != "no_bias", channels_last=case == "channels_last",
           weight_dtype=torch.float32 if case == "float32_weights" else None)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("shape,width,case", [
    ((2, 5, 19), 4, "contiguous"), ((1, 3, 1), 4, "contiguous"), ((3, 9, 17), 2, "channels_last"),
    ((1, 6, 11), 1, "contiguous"), ((2, 4, 9), 5, "channels_last"), ((2, 70, 600), 4, "channels_last"),
    ((3, 33, 257), 3, "contiguous"), ((2, 7, 13), 4, "no_bias"), ((2, 7, 300), 4, "float32_weights")])
def test_cpp_kernels_match_reference(cpp_path, shape, width, case, activation, dtype):
    """Several tiles of channels and positions (16 x 128) included, so halos cross tile edges."""
    _check(shape, width, dtype, activation, with_bias=case != "no_bias", channels_last=case == "channels_last",
           weight_dtype=torch.float32 if case == "float32_weights" else None, device="cpu", path="cpp")


@needs_cpp
def test_cpp_gradients_do_not_depend_on_thread_count(cpp_path):
    x = torch.randn(3, 70, 600).transpose(1, 2).contiguous().transpose(1, 2)
    weight, bias, dout = torch.randn(70, 4), torch.randn(70), torch.randn(3, 70, 600)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
            causal_conv1d(*leaves, "silu").backward(dout)
            runs.append([t.grad for t in leaves])
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for value, expected in zip(run, runs[0]):
            assert torch.equal(value, expected)


@pytest.mark.parametrize("path", ["kernels", "cpp", "torch", "reference"])
def test_empty_sequence(path, monkeypatch):
    if path == "cpp":
        _skip_unless_cpp_takes_device_tensors()
        monkeypatch.setattr(conv, "TRITON_ON_CPU", False)
    if path == "torch":
        monkeypatch.setattr(conv, "_path", lambda x: "torch")
    x = torch.randn(2, 3, 0, device=DEVICE, requires_grad=True)
    weight = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    bias = torch.randn(3, device=DEVICE, requires_grad=True)
    with use_backend("reference" if path == "reference" else "auto"):
        y = causal_conv1d(x, weight, bias, "silu")
    assert y.shape == (2, 3, 0)
    y.sum().backward()
    assert (weight.grad == 0).all() and (bias.grad == 0).all()


@pytest.mark.parametrize("path", ["kernels", "cpp", "torch"])
@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 0, 5)], ids=["no-batch", "no-channels"])
def test_empty_batch_or_channels(path, shape, monkeypatch):
    """Other empty inputs than L = 0, eagerly on every path and under tracing (torch's grouped
    convolution refuses groups = dim = 0), the weight strided (the fake's dweight strides)."""
    if path == "cpp":
        _skip_unless_cpp_takes_device_tensors()
        monkeypatch.setattr(conv, "TRITON_ON_CPU", False)
    if path == "torch":
        monkeypatch.setattr(conv, "_path", lambda x: "torch")
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    weight = torch.randn(4, shape[1], device=DEVICE).t().requires_grad_()
    bias = torch.randn(shape[1], device=DEVICE, requires_grad=True)
    y = causal_conv1d(x, weight, bias, "silu")
    assert y.shape == shape
    y.sum().backward()
    assert (weight.grad == 0).all() and (bias.grad == 0).all()
    torch.library.opcheck(conv._forward, (x.detach(), weight.detach(), bias.detach(), True),
                          test_utils=("test_faketensor",))
    dout = torch.randn(shape, device=DEVICE)
    torch.library.opcheck(conv._backward, (dout, x.detach(), weight.detach(), bias.detach(), True),
                          test_utils=("test_faketensor",))


@pytest.mark.parametrize("path", ["torch", "cpp"])
def test_paths_match_triton_path(path, monkeypatch):
    if conv._kernels is None:
        pytest.skip("needs triton")
    if path == "cpp":
        _skip_unless_cpp_takes_device_tensors()
    x, weight, bias = (torch.randn(s, device=DEVICE) for s in ((2, 6, 21), (6, 4), (6,)))
    dout = torch.randn(2, 6, 21, device=DEVICE)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        y = causal_conv1d(*leaves, "silu")
        y.backward(dout)
        return [y, *(t.grad for t in leaves)]

    assert conv._path(x) == "triton"
    kernels = run()
    monkeypatch.setattr(conv, "_path", lambda x: path)
    for value, expected in zip(kernels, run()):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)


def test_reference_backend_runs_the_reference():
    x, weight, bias = (torch.randn(s, device=DEVICE) for s in ((2, 6, 21), (6, 4), (6,)))
    with use_backend("reference"):
        assert torch.equal(causal_conv1d(x, weight, bias, "silu"), reference(x, weight, bias, "silu"))


def test_opcheck():
    x = torch.randn(2, 5, 9, device=DEVICE)
    weight, bias = torch.randn(5, 4, device=DEVICE), torch.randn(5, device=DEVICE)
    torch.library.opcheck(conv._forward, (x, weight, bias, True))
    torch.library.opcheck(conv._forward, (x, weight, None, False))


def test_compile_fullgraph():
    x = torch.randn(2, 5, 9, device=DEVICE, requires_grad=True)
    weight = torch.randn(5, 4, device=DEVICE, requires_grad=True)
    compiled = torch.compile(lambda x, w: causal_conv1d(x, w, None, "silu").square().sum(), fullgraph=True)
    loss = compiled(x, weight)
    loss.backward()
    x_eager, w_eager = x.detach().requires_grad_(), weight.detach().requires_grad_()
    causal_conv1d(x_eager, w_eager, None, "silu").square().sum().backward()
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, w_eager.grad, rtol=1e-5, atol=1e-5)


@requires_cuda
@needs_triton
@pytest.mark.parametrize("activation", [None, "silu"])
def test_gpu_bfloat16(activation):
    _check((2, 300, 700), 4, torch.bfloat16, activation, channels_last=True, weight_dtype=torch.float32)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("length,width", [(1, 4), (7, 4), (33, 2), (3, 5)])
def test_matches_direct_sum_and_decoding(length, width, activation):
    x = torch.randn(2, 6, length)
    weight, bias = torch.randn(6, width), torch.randn(6)
    y = causal_conv1d(x, weight, bias, activation)
    torch.testing.assert_close(y.double(), reference(x.double(), weight.double(), bias.double(), activation),
                               rtol=1e-5, atol=1e-5)
    # Decoding: prefill the first half, then step through the rest.
    split = length // 2
    state = causal_conv1d_state(x[..., :split], width)
    steps = [causal_conv1d_update(x[..., t], state, weight, bias, activation) for t in range(split, length)]
    if steps:
        torch.testing.assert_close(torch.stack(steps, -1), y[..., split:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, causal_conv1d_state(x, width))


def test_bad_inputs():
    x, weight = torch.randn(2, 6, 5), torch.randn(6, 4)
    with pytest.raises(ValueError, match="weight must have shape"):
        causal_conv1d(x, torch.randn(5, 4))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, activation="relu")
    with pytest.raises(TypeError, match="floating-point"):
        causal_conv1d(x.long(), weight)
    with pytest.raises(TypeError, match="weight must have dtype"):
        causal_conv1d(x, weight.long())
    with pytest.raises(ValueError, match="width >= 1"):
        causal_conv1d(x, torch.randn(6, 0))
    with pytest.raises(TypeError, match="bias must have dtype"):
        causal_conv1d(x, weight, torch.ones(6, dtype=torch.int32))
    with pytest.raises(ValueError, match="conv_state must have the shape"):
        causal_conv1d_update(x[..., 0], torch.zeros(2, 6, 3), weight)


def test_update_checks_conv_state():
    """An integer or bool state used to truncate each new input silently; a state on another device
    failed inside torch.cat without naming it."""
    x, weight, bias = torch.randn(2, 6), torch.randn(6, 4), torch.randn(6)
    for dtype in (torch.int32, torch.int64, torch.bool):
        with pytest.raises(TypeError, match="conv_state must have dtype"):
            causal_conv1d_update(x, torch.zeros(2, 6, 4, dtype=dtype), weight, bias)
    with pytest.raises(ValueError, match="conv_state is on meta"):
        causal_conv1d_update(x, torch.zeros(2, 6, 4, device="meta"), weight, bias)
    # A float16 state (a half-precision cache) stays allowed: it stores what it can hold.
    state = torch.zeros(2, 6, 4, dtype=torch.float16)
    y = causal_conv1d_update(x, state, weight, bias)
    torch.testing.assert_close(y, (state.float() * weight).sum(-1) + bias)


@needs_triton
@pytest.mark.parametrize("activation", [None, "silu"])
def test_strided_bias(poisoned, activation):
    """A bias that is a strided view (one column of a packed parameter): the kernels used to read it as
    contiguous, taking the neighbouring column's values."""
    x64 = torch.randn(2, 9, 17, dtype=torch.float64, device=DEVICE)
    w64 = torch.randn(9, 4, dtype=torch.float64, device=DEVICE) * 0.5
    packed64 = torch.randn(9, 2, dtype=torch.float64, device=DEVICE)
    leaves = [t.float().requires_grad_() for t in (x64, w64, packed64)]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out = causal_conv1d(leaves[0], leaves[1], leaves[2][:, 0], activation)
    ref = reference(leaves64[0], leaves64[1], leaves64[2][:, 0], activation)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(ref)
    out.backward(dout.float())
    ref.backward(dout)
    for t, t64 in zip(leaves, leaves64):
        torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-5)
