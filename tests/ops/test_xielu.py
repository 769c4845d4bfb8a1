import importlib

import pytest
import torch

from fastllm.ops import available, use_backend, xielu
from fastllm.ops.xielu_ref import xielu_backward_reference, xielu_reference
from fastllm.testing import BACKWARD_FACTOR, assert_error_ratio, poison_, requires_cuda

# The function fastllm.ops.xielu shadows its module's name.
xielu_module = importlib.import_module("fastllm.ops.xielu")

SHAPES = [(0,), (1,), (7,), (3001,), (3, 5, 17)]
BETA, EPS = 0.5, -1e-6


def make_inputs(shape, dtype, device="cpu"):
    x = torch.randn(shape, dtype=torch.float64) * 2
    # Some values in the narrow band around eps, where expm1's accuracy matters.
    flat = x.view(-1)
    flat[::5] = -torch.rand(flat[::5].shape, dtype=torch.float64) * 1e-4
    alpha_p = torch.randn(1, dtype=torch.float64) * 0.5
    alpha_n = torch.randn(1, dtype=torch.float64) * 0.5
    grad = torch.randn(shape, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, alpha_p, alpha_n, grad)]


def oracle(x, alpha_p, alpha_n, grad):
    """fp64 values and gradients of sum(grad * xielu(x)) through torch autograd."""
    leaves = [t.detach().double().requires_grad_() for t in (x, alpha_p, alpha_n)]
    y = xielu_reference(*leaves, BETA, EPS)
    y.backward(grad.double())
    return y.detach(), [leaf.grad for leaf in leaves]


def baseline(x, alpha_p, alpha_n, grad):
    """The same-precision PyTorch implementation: the reference run in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, alpha_p, alpha_n)]
    y = xielu_reference(*leaves, BETA, EPS)
    y.backward(grad)
    return y.detach(), [leaf.grad for leaf in leaves]


def check_against_oracle(y, grads, x, alpha_p, alpha_n, grad):
    y_ref, grads_ref = oracle(x, alpha_p, alpha_n, grad)
    y_base, grads_base = baseline(x, alpha_p, alpha_n, grad)
    assert y.dtype == x.dtype
    assert_error_ratio("y", y, y_ref, y_base)
    for name, value, ref, base in zip(("dx", "d_alpha_p", "d_alpha_n"), grads, grads_ref, grads_base):
        assert value.dtype == base.dtype
        assert_error_ratio(name, value, ref, base, factor=BACKWARD_FACTOR)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["cpp", "torch"])
def test_op_cpu_matches_fp64(shape, dtype, path, monkeypatch):
    if path == "cpp" and not xielu_module.has_cpp_kernels():
        pytest.skip("fastllm._C has no xIELU kernels")
    if path == "cpp" and dtype not in xielu_module.CPP_DTYPES:
        pytest.skip(f"the C++ kernel takes {xielu_module.CPP_DTYPES}; {dtype} runs the torch path, tested there")
    if path == "torch":
        monkeypatch.setattr(xielu_module, "has_cpp_kernels", lambda: False)
    x, alpha_p, alpha_n, grad = make_inputs(shape, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, alpha_p, alpha_n)]
    y = xielu(*leaves, BETA, EPS)
    y.backward(grad)
    check_against_oracle(y.detach(), [leaf.grad for leaf in leaves], x, alpha_p, alpha_n, grad)


def test_cpu_kernel_is_compiled():
    # The build ships the C++ kernel; the op reports it.
    assert available()["ops"]["xielu"]["cpu"] == "cpp"


def test_backward_reference_matches_autograd():
    x, alpha_p, alpha_n, grad = make_inputs((513,), torch.float64)
    _, grads = oracle(x, alpha_p, alpha_n, grad)
    for value, expected in zip(xielu_backward_reference(grad, x, alpha_p, alpha_n, BETA, EPS), grads):
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)


def test_matches_issue_formula():
    # alpha_p = softplus(a_p), alpha_n = beta + softplus(a_n); one point on each branch.
    alpha_p, alpha_n = torch.tensor([0.2], dtype=torch.float64), torch.tensor([-0.4], dtype=torch.float64)
    ap, an = torch.nn.functional.softplus(alpha_p), BETA + torch.nn.functional.softplus(alpha_n)
    x = torch.tensor([1.5, -2.0], dtype=torch.float64)
    expected = torch.cat([ap * 1.5**2 + BETA * 1.5, an * torch.expm1(torch.tensor([-2.0], dtype=torch.float64))
                          - an * -2.0 + BETA * -2.0])
    torch.testing.assert_close(xielu(x, alpha_p, alpha_n), expected)


def test_noncontiguous_input():
    x, alpha_p, alpha_n, _ = make_inputs((6, 9), torch.float32)
    torch.testing.assert_close(xielu(x.t(), alpha_p, alpha_n), xielu(x.t().contiguous(), alpha_p, alpha_n))


def test_reference_backend():
    x, alpha_p, alpha_n, _ = make_inputs((101,), torch.bfloat16)
    with use_backend("reference"):
        y = xielu(x, alpha_p, alpha_n)
    torch.testing.assert_close(y, xielu_reference(x, alpha_p, alpha_n), rtol=0, atol=0)


def test_opcheck():
    x, alpha_p, alpha_n, _ = make_inputs((4, 33), torch.float32)
    args = (x.requires_grad_(), alpha_p.requires_grad_(), alpha_n.requires_grad_(), BETA, EPS)
    torch.library.opcheck(torch.ops.fastllm.xielu.default, args)
    grad = torch.randn_like(x)
    torch.library.opcheck(torch.ops.fastllm.xielu_backward.default, (grad, x.detach(), alpha_p.detach(),
                                                                        alpha_n.detach(), BETA, EPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fake_matches_real_layout_for_transposed_input(dtype):
    """A dense but transposed x: the fake implementations must give the real outputs' strides
    (inductor asserts them, or reads the outputs with the fake's strides)."""
    x, alpha_p, alpha_n, grad = make_inputs((7, 5), dtype)
    x = x.t().contiguous().t()
    fake_only = ("test_faketensor",)
    torch.library.opcheck(torch.ops.fastllm.xielu.default, (x, alpha_p, alpha_n, BETA, EPS), test_utils=fake_only)
    torch.library.opcheck(torch.ops.fastllm.xielu_backward.default, (grad, x, alpha_p, alpha_n, BETA, EPS),
                          test_utils=fake_only)


def test_compile_fullgraph():
    x, alpha_p, alpha_n, grad = make_inputs((5, 37), torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, alpha_p, alpha_n):
        return xielu(x * 1.0, alpha_p, alpha_n) * 2.0

    leaves = [t.clone().requires_grad_() for t in (x, alpha_p, alpha_n)]
    f(*leaves).backward(grad)
    eager = [t.clone().requires_grad_() for t in (x, alpha_p, alpha_n)]
    (xielu(*eager) * 2.0).backward(grad)
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)


def test_bad_inputs():
    x, alpha_p, alpha_n, _ = make_inputs((8,), torch.float32)
    with pytest.raises(TypeError, match="x must have dtype"):
        xielu(x.to(torch.int32), alpha_p, alpha_n)
    with pytest.raises(TypeError, match="alpha_p must be a torch.Tensor"):
        xielu(x, 0.5, alpha_n)
    with pytest.raises(ValueError, match="alpha_n must hold exactly one element"):
        xielu(x, alpha_p, torch.zeros(2))
    with pytest.raises(ValueError, match="alpha_p is on meta"):
        xielu(x, alpha_p.to("meta"), alpha_n)
    with pytest.raises(ValueError, match="eps must be <= 0"):
        xielu(x, alpha_p, alpha_n, eps=0.1)


# The Triton kernels themselves: in the interpreter on the CPU, natively on a GPU.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(0,), (1,), (2049,), (3, 7, 11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernels(shape, dtype):
    kernels = pytest.importorskip("fastllm.triton_kernels.xielu")
    x, alpha_p, alpha_n, grad = make_inputs(shape, dtype, KERNEL_DEVICE)
    alpha_p, alpha_n = alpha_p.float(), alpha_n.float()  # fp32 parameters under mixed precision
    y = kernels.xielu_forward(x, alpha_p, alpha_n, BETA, EPS, out=poison_(torch.empty_like(x)))
    dx = poison_(torch.empty_like(x))
    _, d_alpha_p, d_alpha_n = kernels.xielu_backward(grad, x, alpha_p, alpha_n, BETA, EPS, dx=dx)
    assert d_alpha_p.dtype == torch.float32 and d_alpha_p.shape == (1,)
    y_ref, grads_ref = oracle(x, alpha_p, alpha_n, grad)
    y_base, grads_base = baseline(x, alpha_p.to(dtype), alpha_n.to(dtype), grad)
    assert_error_ratio("y", y, y_ref, y_base)
    for name, value, ref, base in zip(("dx", "d_alpha_p", "d_alpha_n"), (dx, d_alpha_p, d_alpha_n), grads_ref,
                                      grads_base):
        # The baseline's parameter gradients come out in the inputs' precision.
        assert_error_ratio(name, value, ref, base, factor=BACKWARD_FACTOR,
                           floor=torch.finfo(base.dtype).eps * max(ref.abs().amax().item() if ref.numel() else 0.0, 1.0))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_op_cuda_matches_fp64(dtype):
    x, alpha_p, alpha_n, grad = make_inputs((4, 1000, 3), dtype, "cuda")
    leaves = [t.clone().requires_grad_() for t in (x, alpha_p, alpha_n)]
    y = xielu(*leaves, BETA, EPS)
    y.backward(grad)
    check_against_oracle(y.detach(), [leaf.grad for leaf in leaves], x, alpha_p, alpha_n, grad)


@requires_cuda
def test_cuda_compile_fullgraph_inductor():
    x, alpha_p, alpha_n, grad = make_inputs((8, 257), torch.bfloat16, "cuda")
    f = torch.compile(lambda x, a, b: xielu(x, a, b), fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, alpha_p, alpha_n)]
    f(*leaves).backward(grad)
    eager = [t.clone().requires_grad_() for t in (x, alpha_p, alpha_n)]
    xielu(*eager).backward(grad)
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("name", ["beta", "eps"])
@pytest.mark.parametrize("value", ["0.5", None, 1j])
def test_scalar_arguments_must_be_real_numbers(name, value):
    """A string, None or complex beta or eps used to fail in float() or a comparison, naming neither."""
    x, alpha_p, alpha_n, _ = make_inputs((8,), torch.float32)
    with pytest.raises(TypeError, match=f"{name} must be a real number"):
        xielu(x, alpha_p, alpha_n, **{name: value})


@pytest.mark.parametrize("raw_alphas", [(-10.0, -10.0), (-15.0, 0.3)])
def test_triton_kernels_negative_raw_parameters(raw_alphas):
    """Raw parameters far below 0: softplus(a) ~ e^a, which log(1 + e^a) in float32 used to round to a
    relative error of ~1e-3 (a = -10; 0 below a = -17), hundreds of times the fp32 reference's."""
    kernels = pytest.importorskip("fastllm.triton_kernels.xielu")
    x, _, _, grad = make_inputs((3001,), torch.float32, KERNEL_DEVICE)
    x = x * 50  # large |x|, so alpha_p's error shows in alpha_p x^2
    alpha_p, alpha_n = (torch.tensor([a], device=KERNEL_DEVICE) for a in raw_alphas)
    y = kernels.xielu_forward(x, alpha_p, alpha_n, BETA, EPS, out=poison_(torch.empty_like(x)))
    dx = poison_(torch.empty_like(x))
    _, d_alpha_p, d_alpha_n = kernels.xielu_backward(grad, x, alpha_p, alpha_n, BETA, EPS, dx=dx)
    y_ref, grads_ref = oracle(x, alpha_p, alpha_n, grad)
    y_base, grads_base = baseline(x, alpha_p, alpha_n, grad)
    assert_error_ratio("y", y, y_ref, y_base)
    for name, value, ref, base in zip(("dx", "d_alpha_p", "d_alpha_n"), (dx, d_alpha_p, d_alpha_n), grads_ref,
                                      grads_base):
        assert_error_ratio(name, value, ref, base, factor=BACKWARD_FACTOR)
