"""The Mamba-1 mixer (Gu & Dao 2023, arXiv 2312.00752) on fastllm's fused ops, and its decoding state.

    x, z = in_proj(h);  x = silu(causal_conv1d(x));  dt, B, C = x_proj(x);  dt = dt_proj.weight dt
    y = selective_scan(x, dt, -exp(A_log), B, C, D, z, delta_bias=dt_proj.bias, softplus);  out_proj(y)

Parameter names follow mamba_ssm / Hugging Face's MambaMixer (in_proj, conv1d, x_proj, dt_proj,
A_log, D, out_proj) so checkpoints map one to one. Generation keeps, per layer, the last d_conv
inputs of the convolution and the SSM state (float32): constant cost per token.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastllm.nn.cache import SequenceCache
from fastllm.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from fastllm.ops.selective_scan import selective_scan
from fastllm.ops.selective_state_update import selective_state_update


class MambaCache(SequenceCache):
    """Recurrent state of every Mamba layer: conv_state (n_layers, B, d_inner, d_conv), the last
    d_conv convolution inputs, and ssm_state (n_layers, B, d_inner, d_state) in float32."""

    def __init__(self, n_layers: int, batch_size: int, d_inner: int, d_conv: int, d_state: int,
                 max_seq_len: int, device=None, dtype=torch.float32):
        self.conv_state = torch.zeros(n_layers, batch_size, d_inner, d_conv, device=device, dtype=dtype)
        self.ssm_state = torch.zeros(n_layers, batch_size, d_inner, d_state, device=device, dtype=torch.float32)
        self.max_seq_len = max_seq_len
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.ssm_state.shape[1]

    def reset(self) -> None:
        self.conv_state.zero_()
        self.ssm_state.zero_()
        self.pos = 0

    def step_state(self) -> tuple[torch.Tensor, ...]:
        return self.conv_state, self.ssm_state


class MambaMixer(nn.Module):
    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 conv_bias: bool = True, bias: bool = False, layer_idx: int = 0):
        super().__init__()
        self.d_inner = expand * dim
        self.d_state, self.d_conv, self.layer_idx = d_state, d_conv, layer_idx
        self.dt_rank = math.ceil(dim / 16) if dt_rank is None else dt_rank
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, dim, bias=bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                             dt_scale: float = 1.0) -> None:
        """mamba_ssm's initialisation: A = -(1..N) per channel (S4D-real), D = 1, dt_proj's bias the
        inverse softplus of dt ~ log-uniform[dt_min, dt_max], its weight uniform(+-dt_rank^-0.5)."""
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        std = self.dt_rank ** -0.5 * dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, hidden: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        """hidden (B, T, dim) -> (B, T, dim); with ``cache``, continues from its state and updates it."""
        if cache is not None and hidden.shape[1] == 1:
            return self._step(hidden, cache)
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, T) each
        conv_weight = self.conv1d.weight.squeeze(1)
        if cache is None:
            x = causal_conv1d(x, conv_weight, self.conv1d.bias, "silu")
        else:  # prefill after earlier tokens: the convolution sees the d_conv - 1 inputs before these
            conv_state = cache.conv_state[self.layer_idx]
            x_full = torch.cat([conv_state[..., 1:].to(x.dtype), x], dim=-1)
            conv_state.copy_(x_full[..., -self.d_conv:])
            x = causal_conv1d(x_full, conv_weight, self.conv1d.bias, "silu")[..., self.d_conv - 1:]
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # the bias enters the scan as delta_bias
        A = -torch.exp(self.A_log.float())
        scan_args = (x, dt, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z, self.dt_proj.bias.float())
        if cache is None:
            y = selective_scan(*scan_args, delta_softplus=True)
        else:
            y, last = selective_scan(*scan_args, delta_softplus=True, return_last_state=True,
                                     initial_state=cache.ssm_state[self.layer_idx])
            cache.ssm_state[self.layer_idx].copy_(last)
        return self.out_proj(y.transpose(1, 2))

    def _step(self, hidden: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """One token: the convolution's and the SSM's single-step forms, states updated in place."""
        x, z = self.in_proj(hidden[:, 0]).chunk(2, dim=-1)  # (B, d_inner)
        x = causal_conv1d_update(x, cache.conv_state[self.layer_idx], self.conv1d.weight.squeeze(1),
                                 self.conv1d.bias, "silu")
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt @ self.dt_proj.weight.t()
        y = selective_state_update(cache.ssm_state[self.layer_idx], x, dt, -torch.exp(self.A_log.float()), B, C,
                                   self.D.float(), z, self.dt_proj.bias.float(), dt_softplus=True)
        return self.out_proj(y)[:, None]


class MambaBlock(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h))."""

    def __init__(self, dim: int, norm_eps: float = 1e-5, **mixer_kwargs):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.mixer = MambaMixer(dim, **mixer_kwargs)

    def forward(self, hidden: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        return hidden + self.mixer(self.norm(hidden), cache)
