"""Pure-PyTorch depth-weighted average: the oracle for the kernels and the path for other devices.

Arithmetic is fp32 (fp64 for fp64 states), summed over k = 0, 1, ... in the kernels' order.
"""

from __future__ import annotations

import torch


def _compute_dtype(states: torch.Tensor) -> torch.dtype:
    return torch.float64 if states.dtype == torch.float64 else torch.float32


def depth_weighted_average_reference(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[k] * states[k] for states (K, *S), weights (K,); shape *S, dtype of states."""
    compute = _compute_dtype(states)
    out = torch.zeros(states.shape[1:], dtype=compute, device=states.device)
    w = weights.to(compute)
    for k in range(weights.shape[0]):
        out.addcmul_(states[k].to(compute), w[k])
    return out.to(states.dtype)


def depth_weighted_average_backward_reference(
    grad_out: torch.Tensor, states: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_states (K, *S) in the states' dtype, grad_weights (K,) in the weights' dtype)."""
    compute = _compute_dtype(states)
    k = weights.shape[0]
    g = grad_out.to(compute)
    grad_states = (weights.to(compute).view(k, *([1] * g.dim())) * g).to(states.dtype)
    grad_weights = states.reshape(k, g.numel()).to(compute) @ g.reshape(-1)  # not (k, -1): k may be 0
    return grad_states, grad_weights.to(weights.dtype)
