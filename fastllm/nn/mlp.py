"""Feed-forward blocks: SwiGLU (Llama) and the non-gated xIELU MLP (Apertus)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastllm.ops import xielu


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class XIELU(nn.Module):
    """xIELU (arXiv 2411.13010) with learnable raw parameters a_p, a_n (alpha = softplus(a), see fastllm.ops.xielu).

    Initialised to alpha_p = alpha_n = 0.8, as Apertus.
    """

    def __init__(self, alpha_p_init: float = 0.8, alpha_n_init: float = 0.8, beta: float = 0.5, eps: float = -1e-6):
        super().__init__()
        if not alpha_n_init > beta:
            raise ValueError(f"alpha_n_init ({alpha_n_init}) must exceed beta ({beta})")
        self.beta, self.eps = beta, eps
        self.alpha_p_init, self.alpha_n_init = alpha_p_init, alpha_n_init
        self.alpha_p = nn.Parameter(torch.empty(1))
        self.alpha_n = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Inverse softplus: a = log(expm1(alpha)).
        with torch.no_grad():
            self.alpha_p.fill_(math.log(math.expm1(self.alpha_p_init)))
            self.alpha_n.fill_(math.log(math.expm1(self.alpha_n_init - self.beta)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return xielu(x, self.alpha_p, self.alpha_n, self.beta, self.eps)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, eps={self.eps}"


class XieluMLP(nn.Module):
    """down(xielu(up(x))): non-gated, two matrices instead of SwiGLU's three."""

    def __init__(self, dim: int, hidden_dim: int, beta: float = 0.5, eps: float = -1e-6):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.act = XIELU(beta=beta, eps=eps)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))
