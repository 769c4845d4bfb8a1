"""Pure-PyTorch reference (oracle) for the causal depthwise conv1d: a direct sum over taps."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            activation: str | None = None) -> torch.Tensor:
    """act(bias + sum_k weight[:, k] x_{t - width + 1 + k}) over x (batch, dim, L), in x's dtype."""
    width, length = weight.shape[1], x.shape[2]
    padded = F.pad(x, (width - 1, 0))
    y = sum(weight.to(x.dtype)[:, k, None] * padded[..., k:k + length] for k in range(width))
    if bias is not None:
        y = y + bias.to(x.dtype)[:, None]
    return F.silu(y) if activation == "silu" else y
