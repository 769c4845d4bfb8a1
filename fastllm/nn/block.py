"""The pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

import torch
from torch import nn

from fastllm.nn.attention import Attention
from fastllm.nn.mlp import SwiGLU, XieluMLP
from fastllm.nn.norm import RMSNorm

MLPS = ("swiglu", "xielu")


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, hidden_dim: int, *,
                 mlp: str = "swiglu", qk_norm: bool = False, norm_eps: float = 1e-5, attention: str = "sdpa",
                 layer_idx: int = 0):
        super().__init__()
        if mlp not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS}, got {mlp!r}")
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = Attention(dim, n_heads, n_kv_heads, head_dim, qk_norm=qk_norm, norm_eps=norm_eps,
                              attention=attention, layer_idx=layer_idx)
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, hidden_dim) if mlp == "swiglu" else XieluMLP(dim, hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc_ids: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, doc_ids, cache)
        return x + self.mlp(self.mlp_norm(x))
