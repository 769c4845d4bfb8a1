"""Pure-PyTorch reference of xIELU (arXiv 2411.13010), the oracle of fastllm.ops.xielu.

alpha_p and alpha_n are the raw learnable parameters a_p, a_n (one element each); the activation uses
    ap = softplus(a_p),  an = beta + softplus(a_n)
    y  = ap x^2 + beta x                                   if x > 0
    y  = an (expm1(min(x, eps)) - x) + beta x              otherwise
computed in x's dtype (the parameters cast to it), as Hugging Face's Apertus does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _alphas(x: torch.Tensor, alpha_p: torch.Tensor, alpha_n: torch.Tensor, beta: float):
    ap = F.softplus(alpha_p.to(x.dtype)).reshape(())
    an = (beta + F.softplus(alpha_n.to(x.dtype))).reshape(())
    return ap, an


def xielu_reference(x: torch.Tensor, alpha_p: torch.Tensor, alpha_n: torch.Tensor, beta: float = 0.5,
                    eps: float = -1e-6) -> torch.Tensor:
    """xIELU forward; differentiable through torch autograd."""
    ap, an = _alphas(x, alpha_p, alpha_n, beta)
    positive = ap * x * x + beta * x
    negative = an * (torch.expm1(torch.clamp(x, max=eps)) - x) + beta * x
    return torch.where(x > 0, positive, negative)


def xielu_backward_reference(grad: torch.Tensor, x: torch.Tensor, alpha_p: torch.Tensor, alpha_n: torch.Tensor,
                             beta: float = 0.5, eps: float = -1e-6):
    """Gradients (dx, d alpha_p, d alpha_n) of sum(grad * xielu(x)), the alphas' in their own dtype.

    d min(x, eps)/dx is 1 where x <= eps (torch.clamp's convention). Parameter gradients are
    accumulated in float32 (float64 for float64 inputs).
    """
    ap, an = _alphas(x, alpha_p, alpha_n, beta)
    positive = x > 0
    dx_positive = 2 * ap * x + beta
    dx_negative = an * (torch.where(x <= eps, torch.exp(x), torch.zeros_like(x)) - 1) + beta
    dx = grad * torch.where(positive, dx_positive, dx_negative)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    g, xa = grad.to(acc), x.to(acc)
    d_ap = torch.where(positive, g * xa * xa, torch.zeros_like(g)).sum()
    d_an = torch.where(positive, torch.zeros_like(g), g * (torch.expm1(torch.clamp(xa, max=eps)) - xa)).sum()
    # Chain rule through the softplus: d softplus(a)/da = sigmoid(a).
    d_alpha_p = (d_ap * torch.sigmoid(alpha_p.to(acc))).to(alpha_p.dtype).reshape(alpha_p.shape)
    d_alpha_n = (d_an * torch.sigmoid(alpha_n.to(acc))).to(alpha_n.dtype).reshape(alpha_n.shape)
    return dx, d_alpha_p, d_alpha_n
