"""Causal depthwise conv1d of Mamba blocks, with its single-step decoding form.

The full-sequence form is torch's grouped convolution with left padding (cuDNN's depthwise kernels
on GPU). Measured on the 2-core CPU against shift-and-add (one multiply-add per tap, see
benchmarks/bench_selective_scan.py): the convolution's forward is as fast or up to 4x faster; its
backward is slower at batch 1-2 (its weight gradient) and faster at batch 8, so neither wins
everywhere and the convolution stays; a fused kernel is left for when a GPU profile asks for it.

    x: (batch, dim, L); weight: (dim, width); out_t = bias + sum_k weight[:, k] x_{t - width + 1 + k}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastllm.ops._validate import check_same_device, check_shape, check_tensor

ACTIVATIONS = (None, "silu")


def _check(x_name, x, weight, bias, activation, ndim):
    check_tensor(x_name, x, ndim=ndim)
    if not x.is_floating_point():
        raise TypeError(f"{x_name} must be a floating-point tensor, got {x.dtype}")
    check_tensor("weight", weight, ndim=2)
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must have shape (dim={x.shape[1]}, width), got {tuple(weight.shape)}")
    named = [(x_name, x), ("weight", weight)]
    if bias is not None:
        check_tensor("bias", bias)
        check_shape("bias", bias, (x.shape[1],), "(dim,)")
        named.append(("bias", bias))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_same_device(named)


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation == "silu" else y


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None) -> torch.Tensor:
    """Depthwise causal convolution over the last axis of x (batch, dim, L); differentiable."""
    _check("x", x, weight, bias, activation, 3)
    width = weight.shape[1]
    y = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return _activate(y, activation)


def causal_conv1d_state(x: torch.Tensor, width: int) -> torch.Tensor:
    """The decoding state after the sequence x (batch, dim, L): its last ``width`` inputs, zero-padded."""
    return F.pad(x, (max(width - x.shape[2], 0), 0))[..., -width:].contiguous()


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """One decoding step: x (batch, dim) enters ``conv_state`` (batch, dim, width), updated in place
    (oldest input dropped); returns the convolution's output for this position, (batch, dim)."""
    _check("x", x, weight, bias, activation, 2)
    check_tensor("conv_state", conv_state)
    check_shape("conv_state", conv_state, (x.shape[0], x.shape[1], weight.shape[1]), "(batch, dim, width)")
    conv_state.copy_(torch.cat([conv_state[..., 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1))
    y = (conv_state * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return _activate(y, activation).to(x.dtype)
