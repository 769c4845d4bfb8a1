"""Pure-PyTorch Mamba decoding step: the oracle for the fused selective_state_update kernels.

One position of the selective scan (fastllm/ops/selective_scan_ref.py) from a given state:
    state (batch, dim, N), x, dt, z: (batch, dim), A: (dim, N), B, C: (batch, N) or (batch, G, N)
    dt' = softplus(dt + dt_bias);  state <- exp(dt' A) state + dt' x B;  out = (C state + D x) silu(z)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_state_update_reference(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Updates ``state`` in place and returns out (x's dtype); arithmetic in the state's precision."""
    dtype = torch.float64 if state.dtype == torch.float64 else torch.float32
    dim = x.shape[1]
    x32, dt = x.to(dtype), dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if B.dim() == 3:  # (batch, G, N) -> (batch, dim, N)
        B, C = (t.repeat_interleave(dim // t.shape[1], dim=1) for t in (B, C))
    else:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    B, C = B.to(dtype), C.to(dtype)
    new_state = torch.exp(dt[..., None] * A.to(dtype)) * state.to(dtype) + (dt * x32)[..., None] * B
    state.copy_(new_state)
    out = (new_state * C).sum(-1)
    if D is not None:
        out = out + x32 * D.to(dtype)
    if z is not None:
        out = out * F.silu(z.to(dtype))
    return out.to(x.dtype)
