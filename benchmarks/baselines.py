"""Baseline implementations that benchmarks time against fastllm (not part of the library)."""

from __future__ import annotations

import torch


def foreach_ademamix_step(params, grads, m1, m2, nu, *, lr, beta1, beta2, beta3, alpha, eps, weight_decay,
                          bias_correction1, bias_correction2, **_):
    """Unfused AdEMAMix step with torch._foreach ops (one kernel per op per tensor group)."""
    torch._foreach_lerp_(m1, grads, 1 - beta1)
    torch._foreach_lerp_(m2, grads, 1 - beta3)
    torch._foreach_mul_(nu, beta2)
    torch._foreach_addcmul_(nu, grads, grads, 1 - beta2)
    denom = torch._foreach_div(nu, bias_correction2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(m1, bias_correction1)
    torch._foreach_add_(update, m2, alpha=alpha)
    torch._foreach_div_(update, denom)
    torch._foreach_add_(update, params, alpha=weight_decay)
    torch._foreach_add_(params, update, alpha=-lr)
