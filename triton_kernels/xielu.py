"""Fused xIELU forward and backward (arXiv 2411.13010) in Triton.

Elementwise and memory bound: the forward reads x and writes y; the backward reads (grad, x) and
writes dx plus one float64 partial sum per program for each parameter gradient (summed by the
caller, so the result is deterministic). The raw parameters a_p, a_n are read from device memory
and passed through softplus in the kernel, so no host synchronisation is needed. Math in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _softplus(a):
    # log1p(e^a) without overflow, matching torch's threshold of 20. For small u = e^a, log(1 + u)
    # loses u's digits to the rounding of 1 + u (relative error ~1e-3 at a = -10, 0 below a = -17):
    # there log(w) * u / (w - 1), w = 1 + u, cancels that rounding (Goldberg), and is u where w
    # rounds to 1.
    u = tl.exp(tl.minimum(a, 20.0))
    w = 1.0 + u
    w_minus_1 = tl.where(w == 1.0, 1.0, w - 1.0)  # no 0 / 0 in the branch not taken
    log1p_small = tl.where(w == 1.0, u, tl.log(w) * (u / w_minus_1))
    return tl.where(a > 20.0, a, tl.where(u < 0.25, log1p_small, tl.log(w)))


@triton.jit
def _expm1_nonpositive(x):
    # expm1 for x <= 0: exp(x) - 1 cancels badly near 0, so a degree-10 Taylor polynomial covers
    # (-0.5, 0] (truncation error < 3e-10 relative); below that exp(x) - 1 is accurate.
    p = 1.0 / 3628800.0
    p = p * x + 1.0 / 362880.0
    p = p * x + 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    p = p * x + 1.0
    return tl.where(x > -0.5, p * x, tl.exp(x) - 1.0)


@triton.jit
def _xielu_forward_kernel(x_ptr, y_ptr, alpha_p_ptr, alpha_n_ptr, n, beta, eps, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    alpha_p = _softplus(tl.load(alpha_p_ptr).to(tl.float32))
    alpha_n = beta + _softplus(tl.load(alpha_n_ptr).to(tl.float32))
    positive = alpha_p * x * x + beta * x
    negative = alpha_n * (_expm1_nonpositive(tl.minimum(x, eps)) - x) + beta * x
    y = tl.where(x > 0.0, positive, negative)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _xielu_backward_kernel(grad_ptr, x_ptr, dx_ptr, d_alpha_p_partial_ptr, d_alpha_n_partial_ptr, alpha_p_ptr,
                           alpha_n_ptr, n, beta, eps, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    alpha_p = _softplus(tl.load(alpha_p_ptr).to(tl.float32))
    alpha_n = beta + _softplus(tl.load(alpha_n_ptr).to(tl.float32))
    positive = x > 0.0
    x_clamped = tl.minimum(x, eps)
    dx_positive = 2.0 * alpha_p * x + beta
    dx_negative = alpha_n * (tl.where(x <= eps, tl.exp(x_clamped), 0.0) - 1.0) + beta
    dx = g * tl.where(positive, dx_positive, dx_negative)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    # Masked lanes have g = 0 and contribute nothing. The parameter gradients are sums over the
    # whole tensor: products and sums in float64 keep them accurate (this kernel is memory bound,
    # so the float64 arithmetic costs no time).
    g64 = g.to(tl.float64)
    x64 = x.to(tl.float64)
    d_alpha_p = tl.where(positive, g64 * x64 * x64, 0.0)
    d_alpha_n = tl.where(positive, 0.0, g64 * (_expm1_nonpositive(x_clamped) - x).to(tl.float64))
    tl.store(d_alpha_p_partial_ptr + pid, tl.sum(d_alpha_p, axis=0))
    tl.store(d_alpha_n_partial_ptr + pid, tl.sum(d_alpha_n, axis=0))


def xielu_forward(x: torch.Tensor, alpha_p: torch.Tensor, alpha_n: torch.Tensor, beta: float,
                  eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = xielu(x) for a contiguous x; alpha_p and alpha_n hold one raw parameter each."""
    y = torch.empty_like(x) if out is None else out
    n = x.numel()
    if n:
        _xielu_forward_kernel[(triton.cdiv(n, BLOCK),)](x, y, alpha_p, alpha_n, n, float(beta), float(eps),
                                                        BLOCK=BLOCK)
    return y


def xielu_backward(grad: torch.Tensor, x: torch.Tensor, alpha_p: torch.Tensor, alpha_n: torch.Tensor,
                   beta: float, eps: float, dx: torch.Tensor | None = None):
    """(dx, d alpha_p, d alpha_n) for contiguous grad and x; the alphas' gradients in their dtype."""
    dx = torch.empty_like(x) if dx is None else dx
    n = x.numel()
    programs = triton.cdiv(n, BLOCK)
    partials = torch.empty((2, programs), device=x.device, dtype=torch.float64)
    if n:
        _xielu_backward_kernel[(programs,)](grad, x, dx, partials[0], partials[1], alpha_p, alpha_n, n,
                                            float(beta), float(eps), BLOCK=BLOCK)
    sums = partials.sum(dim=1)
    d_alpha_p = (sums[0] * torch.sigmoid(alpha_p.double())).to(alpha_p.dtype).reshape(alpha_p.shape)
    d_alpha_n = (sums[1] * torch.sigmoid(alpha_n.double())).to(alpha_n.dtype).reshape(alpha_n.shape)
    return dx, d_alpha_p, d_alpha_n
