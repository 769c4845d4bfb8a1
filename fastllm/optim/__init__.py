"""Optimizers with fused kernels."""

from fastllm.optim.ademamix import AdEMAMix, alpha_schedule, beta3_schedule

__all__ = ["AdEMAMix", "alpha_schedule", "beta3_schedule"]
