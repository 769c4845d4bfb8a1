"""The decoder-only transformer LM shared by the Llama and Apertus architectures.

Llama: RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases. Apertus adds QK-norm and the
non-gated xIELU MLP. Everything an architecture changes is a config field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fastllm.models.registry import ModelConfig
from fastllm.nn import (DecoderBlock, KVCache, RMSNorm, RotaryEmbedding, XIELU, get_attention, is_dense_attention,
                        rotary_tables)
from fastllm.nn.lm_head import logits_or_loss
from fastllm.nn.block import MLPS
from fastllm.nn.rope import check_rope_scaling

_INT_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "max_seq_len")
_FLOAT_FIELDS = ("norm_eps", "rope_theta", "init_std")
_BOOL_FIELDS = ("qk_norm", "tie_embeddings")


@dataclass
class TransformerConfig(ModelConfig):
    """Shape and options of a decoder LM. None fields are derived in __post_init__ (n_kv_heads = n_heads,
    head_dim = dim / n_heads, hidden_dim: SwiGLU 8/3 dim rounded up to 256, xIELU 4 dim)."""

    ARCH: ClassVar[str] = ""

    arch: str = ""
    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None
    head_dim: int | None = None
    hidden_dim: int | None = None
    mlp: str = "swiglu"
    qk_norm: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    attention: str = "sdpa"
    init_std: float = 0.02

    def __post_init__(self):
        if not self.arch:
            self.arch = self.ARCH
        if self.arch != self.ARCH:
            raise ValueError(f"{type(self).__name__} is arch {self.ARCH!r}, got arch={self.arch!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and isinstance(self.dim, int) and isinstance(self.n_heads, int) and self.n_heads > 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), or set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None and isinstance(self.dim, int):
            self.hidden_dim = 256 * math.ceil(8 * self.dim / 3 / 256) if self.mlp == "swiglu" else 4 * self.dim
        self.check_fields(ints=_INT_FIELDS, floats=_FLOAT_FIELDS, bools=_BOOL_FIELDS)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS}, got {self.mlp!r}")
        if not isinstance(self.attention, str):
            raise ValueError(f"attention must be the name of a registered attention, got {self.attention!r}")
        get_attention(self.attention)  # raises, listing the registered names, for an unknown one
        check_rope_scaling(self.rope_scaling)


class TransformerLM(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(
            DecoderBlock(c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim, mlp=c.mlp, qk_norm=c.qk_norm,
                         norm_eps=c.norm_eps, attention=c.attention, layer_idx=i)
            for i in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.dim, c.vocab_size, bias=False)
        self.rope = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) matrices, residual output projections scaled by 1/sqrt(2 n_layers) (GPT-2),
        unit norm gains, xIELU at its Apertus initialisation."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                residual_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, std=std / math.sqrt(2 * self.config.n_layers) if residual_out else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, XIELU):
                module.reset_parameters()

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                cache: KVCache | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (B, T). ``doc_ids`` (B, T) keeps attention inside documents and
        restarts positions at each; ``cache`` continues from the tokens it holds and then holds these too.
        With ``labels`` (B, T) it returns the summed cross-entropy of the tokens not labelled -100
        instead, without materialising the logits (``fastllm.nn.lm_head.logits_or_loss``)."""
        cos, sin = rotary_tables(self.rope, input_ids, doc_ids, cache)
        T = input_ids.shape[1]
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, doc_ids, cache)
        if cache is not None:
            cache.advance(T)
        return self.output(x, labels)

    def output(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The final norm, then logits or, with ``labels``, the summed loss (``logits_or_loss``)."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return logits_or_loss(self.norm(x), weight, labels)

    def init_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None,
                   fixed_shape: bool = False) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_seq_len`` tokens (default: the
        model's device and dtype). ``fixed_shape`` asks for steps of fixed shapes (CUDA-graph decoding),
        granted when the model's attention is dense."""
        weight = self.embed.weight
        c = self.config
        return KVCache(c.n_layers, batch_size, c.n_kv_heads, max_seq_len, c.head_dim,
                       device=weight.device if device is None else device,
                       dtype=weight.dtype if dtype is None else dtype,
                       fixed_shape=fixed_shape and is_dense_attention(c.attention))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied matrices once); ``exclude_embeddings`` leaves out the token embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 N for the matmul parameters N (the output
        projection included, tied or not) plus 12 n_layers n_heads head_dim seq_len for attention
        scores and values (PaLM, arXiv 2204.02311, appendix B; causal masking not discounted)."""
        c = self.config
        n = self.num_params(exclude_embeddings=True) + (c.vocab_size * c.dim if self.lm_head is None else 0)
        return 6.0 * n + 12.0 * c.n_layers * c.n_heads * c.head_dim * seq_len

    def no_weight_decay(self) -> set[str]:
        """Names of parameters kept out of weight decay: vectors and scalars (norm gains, xIELU alphas)."""
        return {name for name, p in self.named_parameters() if p.dim() < 2}
