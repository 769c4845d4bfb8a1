"""Pure-PyTorch selective scan (Mamba-1 SSM), the oracle for the fused kernels.

``selective_scan_reference`` is the sequential recurrence of mamba_ssm's ``selective_scan_ref``
(one step per position, fp32 arithmetic, fp64 for fp64 inputs); ``selective_scan_parallel`` computes
the same scan with a log-depth (Hillis-Steele) parallel scan over L, the fastest pure-PyTorch form
(used as a benchmark baseline). Shapes, with G groups of dim / G consecutive channels sharing B, C:

    u, delta, z: (batch, dim, L)      A: (dim, N)     B, C: (batch, N, L) or (batch, G, N, L)
    D, delta_bias: (dim,)             initial_state: (batch, dim, N)

    delta' = softplus(delta + delta_bias)   (bias and softplus optional)
    h_t = exp(delta'_t A) h_{t-1} + delta'_t B_t u_t ;  y_t = C_t h_t + D u_t ;  out = y * silu(z)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_channel(x: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C as (batch, dim, N, L): group g serves channels [g * dim / G, (g + 1) * dim / G)."""
    if x.dim() == 3:
        return x.unsqueeze(1).expand(-1, dim, -1, -1)
    return x.repeat_interleave(dim // x.shape[1], dim=1)


def _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus):
    dtype = compute_dtype(u, delta, A, B, C, D)
    u, delta, A = u.to(dtype), delta.to(dtype), A.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dim = u.shape[1]
    return dtype, u, delta, A, _per_channel(B.to(dtype), dim), _per_channel(C.to(dtype), dim)


def _finish(y, u, D, z, dtype, out_dtype):
    if D is not None:
        y = y + u * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(out_dtype)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False, initial_state=None):
    """Sequential scan over L; returns out (u's dtype) and, if asked, the last state (fp32/fp64)."""
    dtype, u32, delta, A, B, C = _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    decay = torch.exp(delta.unsqueeze(2) * A[:, :, None])  # (batch, dim, N, L)
    drive = (delta * u32).unsqueeze(2) * B
    h = (initial_state.to(dtype) if initial_state is not None
         else u32.new_zeros(batch, dim, A.shape[1]))
    ys = []
    for t in range(length):
        h = decay[..., t] * h + drive[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u32.new_zeros(batch, dim, 0)
    out = _finish(y, u32, D, z, dtype, u.dtype)
    return (out, h) if return_last_state else out


def selective_scan_parallel(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_last_state=False, initial_state=None):
    """The same scan in ceil(log2 L) whole-tensor steps of the associative composition
    (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2); memory O(batch dim N L)."""
    dtype, u32, delta, A, B, C = _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus)
    length = u.shape[2]
    a = torch.exp(delta.unsqueeze(2) * A[:, :, None])
    b = (delta * u32).unsqueeze(2) * B
    if initial_state is not None and length > 0:
        b = torch.cat([b[..., :1] + a[..., :1] * initial_state.to(dtype)[..., None], b[..., 1:]], dim=-1)
    step = 1
    while step < length:
        b = torch.cat([b[..., :step], a[..., step:] * b[..., :-step] + b[..., step:]], dim=-1)
        a = torch.cat([a[..., :step], a[..., step:] * a[..., :-step]], dim=-1)
        step *= 2
    y = (b * C).sum(2)
    out = _finish(y, u32, D, z, dtype, u.dtype)
    if not return_last_state:
        return out
    last = b[..., -1] if length > 0 else (initial_state.to(dtype) if initial_state is not None
                                          else u32.new_zeros(u.shape[0], u.shape[1], A.shape[1]))
    return out, last


def selective_scan_backward_reference(dout, dlast_state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                                      delta_softplus=False, initial_state=None):
    """Gradients of (out, last_state) by the reverse recurrence g_t = C_t dy_t + exp(delta'_{t+1} A) g_{t+1}
    (g = dL/dh_t), written out in PyTorch. Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias,
    dinitial_state) in the inputs' dtypes, None for absent optional inputs (dinitial_state always)."""
    dtype = compute_dtype(u, delta, A, B, C, D)
    batch, dim, length = u.shape
    u32, A32 = u.to(dtype), A.to(dtype)
    raw = delta.to(dtype) + (delta_bias.to(dtype)[:, None] if delta_bias is not None else 0)
    dt = F.softplus(raw) if delta_softplus else raw
    Bc, Cc = _per_channel(B.to(dtype), dim), _per_channel(C.to(dtype), dim)
    decay = torch.exp(dt.unsqueeze(2) * A32[:, :, None])  # (batch, dim, N, L)
    drive = (dt * u32).unsqueeze(2) * Bc
    h = initial_state.to(dtype) if initial_state is not None else u32.new_zeros(batch, dim, A.shape[1])
    states = [h]  # states[t + 1] = h_t
    for t in range(length):
        h = decay[..., t] * h + drive[..., t]
        states.append(h)
    states = torch.stack(states, dim=-1)
    y = (states[..., 1:] * Cc).sum(2)
    dout = dout.to(dtype)
    dz = None
    if z is not None:
        z32 = z.to(dtype)
        sig = torch.sigmoid(z32)
        y_gated = y + (u32 * D.to(dtype)[:, None] if D is not None else 0)
        dz = (dout * y_gated * sig * (1 + z32 * (1 - sig))).to(z.dtype)
        dout = dout * z32 * sig
    g = dlast_state.to(dtype) if dlast_state is not None else torch.zeros_like(h)
    grads_h = [None] * length
    for t in reversed(range(length)):
        g = g + Cc[..., t] * dout[:, :, None, t]
        grads_h[t] = g
        g = decay[..., t] * g
    gh = torch.stack(grads_h, dim=-1) if length else decay  # (batch, dim, N, L)
    g_log_decay = gh * decay * states[..., :-1]
    du = (gh * dt.unsqueeze(2) * Bc).sum(2) + (dout * D.to(dtype)[:, None] if D is not None else 0)
    ddt = (gh * u32.unsqueeze(2) * Bc + g_log_decay * A32[:, :, None]).sum(2)
    draw = ddt * torch.sigmoid(raw) if delta_softplus else ddt
    groups = B.shape[1] if B.dim() == 4 else 1

    def per_group(x):  # (batch, dim, N, L) -> B's shape
        x = x.reshape(batch, groups, dim // groups, *x.shape[2:]).sum(2)
        return x if B.dim() == 4 else x[:, 0]

    return (du.to(u.dtype), draw.to(delta.dtype), (g_log_decay * dt.unsqueeze(2)).sum((0, 3)).to(A.dtype),
            per_group(gh * (dt * u32).unsqueeze(2)).to(B.dtype),
            per_group(dout.unsqueeze(2) * states[..., 1:]).to(C.dtype),
            (dout * u32).sum((0, 2)).to(D.dtype) if D is not None else None, dz,
            draw.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None, g)
