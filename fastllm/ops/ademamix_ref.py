"""Pure-PyTorch AdEMAMix step: the oracle for the fused kernels, and the path for any other device.

Arithmetic is fp32 (fp64 for fp64 tensors) in the same order as csrc/ademamix/ademamix.h, so the
fp32 CPU kernel matches it to rounding.
"""

from __future__ import annotations

import torch


def ademamix_step_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs_fast: list[torch.Tensor],
    exp_avgs_slow: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    bias_correction1: float,
    bias_correction2: float,
) -> None:
    """Updates params and the three moment buffers in place (round-to-nearest on store)."""
    for param, grad, m1, m2, nu in zip(params, grads, exp_avgs_fast, exp_avgs_slow, exp_avg_sqs):
        compute = torch.float64 if param.dtype == torch.float64 else torch.float32
        p, g = param.to(compute), grad.to(compute)
        m1_new = m1.to(compute) * beta1 + g * (1 - beta1)
        m2_new = m2.to(compute) * beta3 + g * (1 - beta3)
        nu_new = nu.to(compute) * beta2 + (g * g) * (1 - beta2)
        denom = (nu_new / bias_correction2).sqrt() + eps
        update = (m1_new / bias_correction1 + m2_new * alpha) / denom
        p = p - (update + p * weight_decay) * lr
        param.copy_(p)
        m1.copy_(m1_new)
        m2.copy_(m2_new)
        nu.copy_(nu_new)
