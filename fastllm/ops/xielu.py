"""xIELU activation (arXiv 2411.13010, Apertus) as the custom ops ``fastllm::xielu`` and ``fastllm::xielu_backward``.

``alpha_p`` and ``alpha_n`` are the raw learnable parameters a_p, a_n; the op applies the softplus
itself (alpha_p = softplus(a_p), alpha_n = beta + softplus(a_n)), as Hugging Face's Apertus stores
them. Gradients flow to x and to both raw parameters.

Kernels: Triton on CUDA (fused forward; fused backward producing dx and per-block partial sums of
the parameter gradients); on the CPU the C++ kernel of fastllm._C (csrc/xielu/, float32 and
bfloat16), else a float32 vectorised PyTorch path. All compute in float32 and store in x's dtype. ``FASTLLM_BACKEND=reference`` runs fastllm/ops/xielu_ref.py instead.
"""

from __future__ import annotations

import importlib.util

import torch

from fastllm.ops import _backend
from fastllm.ops._validate import check_real, check_same_device, check_tensor
from fastllm.ops.xielu_ref import xielu_backward_reference, xielu_reference
from fastllm.profiling import nvtx_range

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_reference(x: torch.Tensor) -> bool:
    return _backend.current_backend() == "reference" or x.dtype not in KERNEL_DTYPES


def has_cpp_kernels() -> bool:
    return _backend.has_cpu_kernels() and hasattr(_backend._C, "xielu_forward_cpu")


CPP_DTYPES = (torch.float32, torch.bfloat16)


def _forward_cpp(x, alpha_p, alpha_n, beta, eps):
    x = x.contiguous()
    y = torch.empty_like(x)
    _backend._C.xielu_forward_cpu(x.data_ptr(), y.data_ptr(), x.numel(), _backend.DTYPE_CODES[x.dtype],
                                  alpha_p.item(), alpha_n.item(), beta, eps, _backend.cpu_threads())
    return y


def _backward_cpp(grad, x, alpha_p, alpha_n, beta, eps):
    x, grad = x.contiguous(), grad.to(x.dtype).contiguous()
    dx = torch.empty_like(x)
    sum_p, sum_n = _backend._C.xielu_backward_cpu(grad.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(),
                                                  _backend.DTYPE_CODES[x.dtype], alpha_p.item(), alpha_n.item(),
                                                  beta, eps, _backend.cpu_threads())
    # Chain rule through the softplus, d softplus(a)/da = sigmoid(a), finished in float64.
    d_alpha_p = (sum_p * torch.sigmoid(alpha_p.double())).to(alpha_p.dtype).reshape(alpha_p.shape)
    d_alpha_n = (sum_n * torch.sigmoid(alpha_n.double())).to(alpha_n.dtype).reshape(alpha_n.shape)
    return dx, d_alpha_p, d_alpha_n


# Vectorised CPU path (no compiled module, or float16): float32 arithmetic, like the kernels.
def _forward_cpu(x, alpha_p, alpha_n, beta, eps):
    return xielu_reference(x.float(), alpha_p.float(), alpha_n.float(), beta, eps).to(x.dtype)


def _backward_cpu(grad, x, alpha_p, alpha_n, beta, eps):
    dx, d_alpha_p, d_alpha_n = xielu_backward_reference(grad.float(), x.float(), alpha_p, alpha_n, beta, eps)
    return dx.to(x.dtype), d_alpha_p, d_alpha_n


def _triton_or_warn(x: torch.Tensor) -> bool:
    if has_triton():
        return True
    _backend.warn_once("xielu_cuda", "fastllm.xielu: Triton is not installed (pip install triton); "
                       "using the PyTorch implementation on the GPU meanwhile")
    return False


# Every implementation takes x (and grad) contiguous, so every output is contiguous, as the fakes
# say: elementwise torch ops on a transposed x would give transposed outputs, the kernels contiguous ones.
@torch.library.custom_op("fastllm::xielu", mutates_args=())
def _xielu(x: torch.Tensor, alpha_p: torch.Tensor, alpha_n: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # Devices without a kernel run the reference.
    return xielu_reference(x.contiguous(), alpha_p, alpha_n, beta, eps)


@_xielu.register_fake
def _(x, alpha_p, alpha_n, beta, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_xielu.register_kernel("cpu")
def _(x, alpha_p, alpha_n, beta, eps):
    x = x.contiguous()
    if _use_reference(x):
        return xielu_reference(x, alpha_p, alpha_n, beta, eps)
    if has_cpp_kernels() and x.dtype in CPP_DTYPES:
        return _forward_cpp(x, alpha_p, alpha_n, beta, eps)
    return _forward_cpu(x, alpha_p, alpha_n, beta, eps)


@_xielu.register_kernel("cuda")
def _(x, alpha_p, alpha_n, beta, eps):
    x = x.contiguous()
    if _use_reference(x):
        return xielu_reference(x, alpha_p, alpha_n, beta, eps)
    if not _triton_or_warn(x):
        return _forward_cpu(x, alpha_p, alpha_n, beta, eps)  # float32 PyTorch ops, on the GPU
    from fastllm.triton_kernels.xielu import xielu_forward

    return xielu_forward(x.contiguous(), alpha_p.contiguous(), alpha_n.contiguous(), beta, eps)


@torch.library.custom_op("fastllm::xielu_backward", mutates_args=())
def _xielu_backward(grad: torch.Tensor, x: torch.Tensor, alpha_p: torch.Tensor, alpha_n: torch.Tensor, beta: float,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return xielu_backward_reference(grad.contiguous(), x.contiguous(), alpha_p, alpha_n, beta, eps)


@_xielu_backward.register_fake
def _(grad, x, alpha_p, alpha_n, beta, eps):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return dx, torch.empty_like(alpha_p), torch.empty_like(alpha_n)


@_xielu_backward.register_kernel("cpu")
def _(grad, x, alpha_p, alpha_n, beta, eps):
    grad, x = grad.contiguous(), x.contiguous()
    if _use_reference(x):
        return xielu_backward_reference(grad, x, alpha_p, alpha_n, beta, eps)
    if has_cpp_kernels() and x.dtype in CPP_DTYPES:
        return _backward_cpp(grad, x, alpha_p, alpha_n, beta, eps)
    return _backward_cpu(grad, x, alpha_p, alpha_n, beta, eps)


@_xielu_backward.register_kernel("cuda")
def _(grad, x, alpha_p, alpha_n, beta, eps):
    grad, x = grad.contiguous(), x.contiguous()
    if _use_reference(x):
        return xielu_backward_reference(grad, x, alpha_p, alpha_n, beta, eps)
    if not _triton_or_warn(x):
        return _backward_cpu(grad, x, alpha_p, alpha_n, beta, eps)
    from fastllm.triton_kernels.xielu import xielu_backward

    return xielu_backward(grad.contiguous(), x.contiguous(), alpha_p.contiguous(), alpha_n.contiguous(), beta, eps)


def _setup_context(ctx, inputs, output):
    x, alpha_p, alpha_n, beta, eps = inputs
    ctx.save_for_backward(x, alpha_p, alpha_n)
    ctx.beta, ctx.eps = beta, eps


def _backward(ctx, grad):
    x, alpha_p, alpha_n = ctx.saved_tensors
    dx, d_alpha_p, d_alpha_n = _xielu_backward(grad, x, alpha_p, alpha_n, ctx.beta, ctx.eps)
    return dx, d_alpha_p, d_alpha_n, None, None


_xielu.register_autograd(_backward, setup_context=_setup_context)


def xielu(x: torch.Tensor, alpha_p: torch.Tensor, alpha_n: torch.Tensor, beta: float = 0.5,
          eps: float = -1e-6) -> torch.Tensor:
    """xIELU(x) with raw parameters ``alpha_p`` = a_p and ``alpha_n`` = a_n (one element each).

    y = softplus(a_p) x^2 + beta x                                  for x > 0
    y = (beta + softplus(a_n)) (expm1(min(x, eps)) - x) + beta x    otherwise
    """
    check_tensor("x", x, dtypes=DTYPES)
    for name, alpha in (("alpha_p", alpha_p), ("alpha_n", alpha_n)):
        check_tensor(name, alpha, dtypes=DTYPES)
        if alpha.numel() != 1:
            raise ValueError(f"{name} must hold exactly one element, got shape {tuple(alpha.shape)}")
    check_same_device([("x", x), ("alpha_p", alpha_p), ("alpha_n", alpha_n)])
    beta, eps = check_real("beta", beta), check_real("eps", eps)
    if not eps <= 0.0:
        raise ValueError(f"eps must be <= 0, got {eps}")
    with nvtx_range("fastllm.xielu"):
        return _xielu(x, alpha_p, alpha_n, beta, eps)
