"""Attention: a registry of attention functions, the default SDPA one, and the attention layer.

An attention function is ``fn(q, k, v, *, causal=True, doc_ids=None, softmax_scale=None) -> out`` with
q (B, H, Tq, D), k and v (B, Hkv, Tk, D) where Hkv divides H (grouped-query attention), out (B, H, Tq, D).
When Tq < Tk (decoding with a KV cache) the queries are the last Tq positions, so ``causal`` lets
query i see keys up to Tk - Tq + i. ``doc_ids`` (B, Tk) gives each position's document; attention
never crosses documents. Register new implementations (fastllm kernels as they land) by name; model
configs select one with ``attention: str``. Functions registered as ``dense`` compute plain softmax
attention over every visible key, so a fixed-shape decoding step (``KVCache(fixed_shape=True)``) may
compute them as masked SDPA over the cache's span.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastllm.nn.norm import RMSNorm
from fastllm.nn.rope import apply_rotary

AttentionFn = Callable[..., torch.Tensor]
_REGISTRY: dict[str, AttentionFn] = {}
_DENSE: set[str] = set()


def register_attention(name: str, fn: AttentionFn, *, dense: bool = False) -> None:
    """Makes ``fn`` selectable as ``attention=name`` in model configs (replacing an earlier entry);
    ``dense``: fn is plain softmax attention over all visible keys (see the module's docstring)."""
    if not callable(fn):
        raise TypeError(f"attention {name!r} must be callable, got {type(fn).__name__}")
    _REGISTRY[name] = fn
    if dense:
        _DENSE.add(name)
    else:
        _DENSE.discard(name)


def is_dense_attention(name: str) -> bool:
    get_attention(name)  # raises for an unknown name
    return name in _DENSE


def get_attention(name: str) -> AttentionFn:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; registered: {sorted(_REGISTRY)}") from None


def attention_names() -> list[str]:
    return sorted(_REGISTRY)


def attention_mask(Tq: int, Tk: int, *, causal: bool, doc_ids: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, Tq, Tk), True where a query may attend; None when nothing is masked."""
    mask = None
    if causal and Tq > 1:
        q_pos = torch.arange(Tk - Tq, Tk, device=device)[:, None]
        mask = (torch.arange(Tk, device=device)[None, :] <= q_pos)[None, None]
    if doc_ids is not None:
        same_doc = (doc_ids[:, -Tq:, None] == doc_ids[:, None, :])[:, None]
        mask = same_doc if mask is None else mask & same_doc
    return mask


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                   doc_ids: torch.Tensor | None = None, softmax_scale: float | None = None) -> torch.Tensor:
    """torch's scaled_dot_product_attention; the plain causal case keeps its fused (flash) kernels."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if doc_ids is None and (not causal or Tq == Tk or Tq == 1):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Tq > 1, scale=softmax_scale,
                                              enable_gqa=gqa)
    return _masked_sdpa(q, k, v, attention_mask(Tq, Tk, causal=causal, doc_ids=doc_ids, device=q.device),
                        softmax_scale)


def _masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 softmax_scale: float | None) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    if gqa and q.is_cuda:
        # CUDA's kernel for masked attention (memory-efficient) has no grouped-query support; with
        # enable_gqa SDPA would fall back to the unfused math path, so the kv heads are expanded instead.
        repeats = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale, enable_gqa=gqa)


register_attention("sdpa", sdpa_attention, dense=True)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False)


# Every layer of a forward pass receives the same doc_ids tensor: its block mask is built once.
_last_block_mask: tuple | None = None


def _block_mask(doc_ids: torch.Tensor | None, causal: bool, B: int, T: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    global _last_block_mask
    key = (causal, B, T, device, None if doc_ids is None else doc_ids._version)
    if not torch.compiler.is_compiling() and _last_block_mask is not None:
        cached_doc_ids, cached_key, block_mask = _last_block_mask
        if cached_doc_ids is doc_ids and cached_key == key:
            return block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx if causal else kv_idx >= 0
        if doc_ids is not None:
            allowed = allowed & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return allowed

    block_mask = create_block_mask(mask_mod, B if doc_ids is not None else None, None, T, T, device=device)
    if not torch.compiler.is_compiling():
        _last_block_mask = (doc_ids, key, block_mask)
    return block_mask


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                   doc_ids: torch.Tensor | None = None, softmax_scale: float | None = None) -> torch.Tensor:
    """torch's FlexAttention with a block-sparse causal/document mask: fully masked tiles are skipped, so
    packed documents cost what their own lengths cost. Compiled on CUDA (inside a compiled model it is
    traced along). SDPA computes the same where FlexAttention cannot: decoding with a KV cache
    (Tq < Tk) and backward passes on the CPU."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    B, Tq, Tk = q.shape[0], q.shape[-2], k.shape[-2]
    if Tq != Tk or (not q.is_cuda and torch.is_grad_enabled() and q.requires_grad):
        return sdpa_attention(q, k, v, causal=causal, doc_ids=doc_ids, softmax_scale=softmax_scale)
    block_mask = _block_mask(doc_ids, causal, B, Tq, q.device)
    # Eager CUDA calls go through a compiled FlexAttention; a compiled model traces the plain one.
    run = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex
    return run(q, k, v, block_mask=block_mask, scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1])


register_attention("flex", flex_attention, dense=True)


class Attention(nn.Module):
    """Multi-head self-attention with grouped-query heads, RoPE, optional QK-norm and a KV cache."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, *, qk_norm: bool = False,
                 norm_eps: float = 1e-5, attention: str = "sdpa", layer_idx: int = 0):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.attention_name, self.attention = attention, get_attention(attention)
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        # QK-norm (Apertus, OLMo 2, Qwen 3): per-head RMSNorm of queries and keys before RoPE.
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc_ids: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None and cache.fixed_shape:
            out = self._fixed_shape_step(q, k, v, cache)
        else:
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)
            out = self.attention(q, k, v, causal=True, doc_ids=doc_ids)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _fixed_shape_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache) -> torch.Tensor:
        """Attention of T new tokens over the fixed-shape cache's span under its visibility mask. Query
        heads sharing a key/value head are stacked along the query axis, so the mask covers them all
        and the cache is never expanded."""
        if not is_dense_attention(self.attention_name):
            raise ValueError(f"attention {self.attention_name!r} is not dense: it cannot decode from a "
                             "fixed-shape KV cache")
        B, H, T, D = q.shape
        group = H // self.n_kv_heads
        k, v = cache.update(self.layer_idx, k, v)
        mask = cache.visible_keys(T).repeat(group, 1)
        out = _masked_sdpa(q.reshape(B, self.n_kv_heads, group * T, D), k, v, mask, None)
        return out.reshape(B, H, T, D)  # CUDA kernels may return it laid out as (B, T, H, D)


# fastllm's own attention kernels (dense flash, hash-sparse, QK-dropping) join the registry; imported
# last because they build on the helpers above.
from fastllm.nn.sparse_attention import register_sparse_attentions  # noqa: E402

register_sparse_attentions(register_attention)
