"""A hybrid Mamba / attention LM (arch "hybrid"): Llama-style pre-norm layers whose token mixer is
grouped-query attention (RoPE, KV cache) at ``attention_layers`` and a Mamba-1 mixer elsewhere, each
followed by a SwiGLU MLP. This is the layout of attention-to-Mamba distillation (the "distilled
Mamba reasoners" of arXiv 2502.20339 replace a Llama's attention layers by Mamba mixers and keep its
MLPs); ``attention_layers=[]`` gives a pure Mamba model with MLPs.

Generation keeps a KV cache for the attention layers and the recurrent state (constant size) for the
Mamba layers. With packed sequences (``doc_ids``), attention stays inside documents; the Mamba
recurrence runs through document boundaries, as in Mamba's own pretraining.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fastllm.models.registry import ModelConfig, register_model
from fastllm.nn.lm_head import logits_or_loss
from fastllm.nn.attention import Attention, get_attention, is_dense_attention
from fastllm.nn.cache import KVCache, SequenceCache
from fastllm.nn.mamba import MambaCache, MambaMixer
from fastllm.nn.mlp import SwiGLU
from fastllm.nn.norm import RMSNorm
from fastllm.nn.rope import RotaryEmbedding, rotary_tables

_INT_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "d_state",
               "d_conv", "expand", "dt_rank", "max_seq_len")


@dataclass
class HybridConfig(ModelConfig):
    ARCH: ClassVar[str] = "hybrid"

    arch: str = "hybrid"
    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    attention_layers: list[int] = field(default_factory=list)
    n_heads: int = 8
    n_kv_heads: int | None = None
    head_dim: int | None = None
    hidden_dim: int | None = None  # SwiGLU: 8/3 dim rounded up to 256
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # ceil(dim / 16)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    attention: str = "sdpa"
    init_std: float = 0.02

    def __post_init__(self):
        if self.arch != self.ARCH:
            raise ValueError(f"HybridConfig is arch {self.ARCH!r}, got arch={self.arch!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and isinstance(self.dim, int) and isinstance(self.n_heads, int) and self.n_heads > 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), or set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None and isinstance(self.dim, int):
            self.hidden_dim = 256 * math.ceil(8 * self.dim / 3 / 256)
        if self.dt_rank is None and isinstance(self.dim, int):
            self.dt_rank = math.ceil(self.dim / 16)
        self.check_fields(ints=_INT_FIELDS, floats=("norm_eps", "rope_theta", "init_std"), bools=("tie_embeddings",))
        if not isinstance(self.attention, str):
            raise ValueError(f"attention must be the name of a registered attention, got {self.attention!r}")
        get_attention(self.attention)  # raises, listing the registered names, for an unknown one
        if not isinstance(self.attention_layers, (list, tuple)):
            raise ValueError(f"attention_layers must be a list of layer indices, got {self.attention_layers!r}")
        self.attention_layers = list(self.attention_layers)
        if (any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layers
                for i in self.attention_layers) or len(set(self.attention_layers)) != len(self.attention_layers)):
            raise ValueError(f"attention_layers must be distinct layer indices in [0, {self.n_layers}), "
                             f"got {self.attention_layers!r}")
        if self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}) "
                             f"and head_dim ({self.head_dim}) even")
        if self.d_state > 256:
            raise ValueError(f"d_state must be at most 256, got {self.d_state}")


class HybridCache(SequenceCache):
    """The KV cache of the attention layers and the recurrent state of the Mamba layers, one position."""

    def __init__(self, kv: KVCache | None, ssm: MambaCache | None, max_seq_len: int, batch_size: int):
        self.kv, self.ssm, self.max_seq_len, self.batch_size = kv, ssm, max_seq_len, batch_size
        self.parts: list[SequenceCache] = [part for part in (kv, ssm) if part is not None]

    @property
    def pos(self) -> int:
        return self.parts[0].pos

    @pos.setter
    def pos(self, value: int) -> None:
        for part in self.parts:
            part.pos = value

    @property
    def span(self) -> int | None:
        return None if self.kv is None else self.kv.span

    @span.setter
    def span(self, value: int | None) -> None:
        if self.kv is not None:
            self.kv.span = value

    def positions(self, new_tokens: int, device=None) -> torch.Tensor:
        return super().positions(new_tokens, device) if self.kv is None else self.kv.positions(new_tokens, device)

    def advance(self, new_tokens: int) -> None:
        for part in self.parts:
            part.advance(new_tokens)

    def reset(self) -> None:
        """Empties the cache for reuse: no keys, zero recurrent state, position 0."""
        for part in self.parts:
            part.reset()

    def step_state(self) -> tuple[torch.Tensor, ...] | None:
        states = [part.step_state() for part in self.parts]
        return None if None in states else tuple(t for state in states for t in state)


class HybridLayer(nn.Module):
    def __init__(self, c: HybridConfig, attention: bool, mixer_idx: int):
        super().__init__()
        self.is_attention = attention
        self.mixer_norm = RMSNorm(c.dim, c.norm_eps)
        if attention:
            self.mixer = Attention(c.dim, c.n_heads, c.n_kv_heads, c.head_dim, norm_eps=c.norm_eps,
                                   attention=c.attention, layer_idx=mixer_idx)
        else:
            self.mixer = MambaMixer(c.dim, c.d_state, c.d_conv, c.expand, c.dt_rank, layer_idx=mixer_idx)
        self.mlp_norm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = SwiGLU(c.dim, c.hidden_dim)

    def forward(self, x, cos, sin, doc_ids, cache: HybridCache | None):
        h = self.mixer_norm(x)
        if self.is_attention:
            h = self.mixer(h, cos, sin, doc_ids, None if cache is None else cache.kv)
        else:
            h = self.mixer(h, None if cache is None else cache.ssm)
        x = x + h
        return x + self.mlp(self.mlp_norm(x))


class HybridLM(nn.Module):
    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        attention = set(c.attention_layers)
        # Each mixer indexes its own cache by its rank among the layers of its kind.
        ranks = {True: 0, False: 0}
        layers = []
        for i in range(c.n_layers):
            kind = i in attention
            layers.append(HybridLayer(c, kind, ranks[kind]))
            ranks[kind] += 1
        self.layers = nn.ModuleList(layers)
        self.n_attention, self.n_mamba = ranks[True], ranks[False]
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.dim, c.vocab_size, bias=False)
        self.rope = RotaryEmbedding(c.head_dim, c.rope_theta)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) matrices, residual output projections (o_proj, out_proj, down_proj)
        scaled by 1/sqrt(2 n_layers), unit norm gains, Mamba's SSM initialisation."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Embedding) or (isinstance(module, nn.Linear) and not name.endswith("dt_proj")):
                residual_out = name.endswith(("o_proj", "out_proj", "down_proj"))
                nn.init.normal_(module.weight, std=std / math.sqrt(2 * self.config.n_layers) if residual_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, MambaMixer):
                module.reset_ssm_parameters()
                module.conv1d.reset_parameters()

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                cache: HybridCache | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (B, T); ``cache`` continues from the tokens it has seen. With
        ``labels`` (B, T), the summed cross-entropy of the tokens not labelled -100 instead."""
        cos, sin = rotary_tables(self.rope, input_ids, doc_ids, cache)
        T = input_ids.shape[1]
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, doc_ids, cache)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        return logits_or_loss(x, self.embed.weight if self.lm_head is None else self.lm_head.weight, labels)

    def init_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None,
                   fixed_shape: bool = False) -> HybridCache:
        """The KV cache of the attention layers (``fixed_shape`` as ``TransformerLM.init_cache``) and the
        recurrent state of the Mamba layers."""
        weight = self.embed.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        c = self.config
        kv = (KVCache(self.n_attention, batch_size, c.n_kv_heads, max_seq_len, c.head_dim, device=device, dtype=dtype,
                      fixed_shape=fixed_shape and is_dense_attention(c.attention)) if self.n_attention else None)
        ssm = (MambaCache(self.n_mamba, batch_size, c.expand * c.dim, c.d_conv, c.d_state, max_seq_len,
                          device=device, dtype=dtype) if self.n_mamba else None)
        return HybridCache(kv, ssm, max_seq_len, batch_size)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> float:
        """6 N for the matmul parameters (output projection included) + attention scores and values
        (12 layers heads head_dim seq_len over the attention layers) + the scan (27 d_inner d_state
        per Mamba layer, as MambaLM)."""
        c = self.config
        n = self.num_params(exclude_embeddings=True) + (c.vocab_size * c.dim if self.lm_head is None else 0)
        return (6.0 * n + 12.0 * self.n_attention * c.n_heads * c.head_dim * seq_len
                + 27.0 * self.n_mamba * c.expand * c.dim * c.d_state)

    def no_weight_decay(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.dim() < 2 or name.endswith("A_log")}


register_model("hybrid", HybridConfig, HybridLM)
