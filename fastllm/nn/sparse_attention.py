"""Dynamically sparse causal attention layers for the model zoo (arXiv 2306.01160).

Both take (batch, heads, seq, head_dim) q, k, v and follow the attention-registry signature
``fn(q, k, v, *, causal=True, doc_ids=None, softmax_scale=None) -> out`` of fastllm.nn.attention:

* ``HashSparseAttention``: angular LSH (Andoni et al. 2015; as in Reformer). Per head, a fixed
  random rotation R (head_dim x n_buckets/2) maps a vector x to argmax([xR, -xR]). Separate
  hashing buckets queries by q and keys by k (query i sees key j iff their buckets match and
  j <= i); shared hashing gives each token one bucket, from its key, for both roles, so that
  every query sees at least itself.
* ``QKDropAttention``: query i sees key j iff both are kept and j <= i; dropped queries output 0
  (the residual stream carries them). ``learned=False`` keeps each query and key with probability
  1 - drop_rate, drawn anew at every call; ``learned=True`` keeps a token when a per-head linear
  score of its query (key) vector is positive. The hard decision passes gradients straight
  through a sigmoid of the score (the output of a kept query and the value of a kept key are
  multiplied by sigmoid(s) / sigmoid(s).detach(), which is 1), so the scores of kept tokens learn;
  dropped tokens get no gradient. The bias starts at Phi^-1(1 - drop_rate), which keeps about that
  share at initialisation for unit-variance q and k.

Conventions of the registry: k and v may have fewer heads than q (grouped-query attention; each
query head then gets a copy of its group's keys). With ``doc_ids`` (batch, keys) no query sees a
key of another document (the document id is folded into the buckets). Decoding with a KV cache
(fewer queries than keys: the queries are the last positions) uses masked math attention,
O(queries x keys), with the same visibility rule; the buckets and learned decisions of cached keys
are recomputed from the keys, so they agree with the full-sequence pass (random dropping draws
anew). Both layers are causal; ``causal=False`` is an error.

Wiring into the attention registry: ``register_sparse_attentions(register_attention)`` registers
the stateless variants "hash_sparse" (8 buckets, separate hashing), "hash_sparse_shared_qk" and
"qk_drop" (random, 50%), and "fastllm_flash", dense attention on the same kernels. The hashing
variants draw their rotations once, from a fixed seed, so every layer and every call hashes
alike. The learned QK-dropping layer has parameters: a model owns a
``QKDropAttention(..., learned=True)`` module per layer and calls it like the registry functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fastllm.ops import flash_attention, hash_sparse_attention, qk_sparse_attention
from fastllm.ops.flash_attention_ref import attention_with_stats_reference


def random_rotations(n_heads: int, head_dim: int, n_buckets: int, seed: int = 0,
                     device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(heads, head_dim, n_buckets // 2) Gaussian rotations for ``angular_lsh``, fixed by ``seed``."""
    if n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"n_buckets must be an even number >= 2, got {n_buckets}")
    generator = torch.Generator().manual_seed(seed)
    rotations = torch.randn(n_heads, head_dim, n_buckets // 2, generator=generator)
    return rotations.to(device=device, dtype=dtype)


def angular_lsh(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Bucket (int64 (B, H, T)) of each (B, H, T, D) vector: argmax over [xR, -xR] per head.

    Vectors at a small angle share a bucket with high probability; the norm does not matter.
    """
    projected = torch.einsum("bhtd,hdr->bhtr", x, rotations.to(x.dtype))
    return torch.cat([projected, -projected], dim=-1).argmax(dim=-1)


def _with_documents(buckets: torch.Tensor, doc_ids: torch.Tensor | None, n_buckets: int) -> torch.Tensor:
    """Buckets that never match across documents: (document, bucket) numbered as one integer."""
    if doc_ids is None:
        return buckets
    return doc_ids[:, None, :].to(buckets.dtype) * n_buckets + buckets


def _check_causal(causal: bool, layer: str) -> None:
    if not causal:
        raise ValueError(f"{layer} is causal attention only; got causal=False")


def _expand_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: each query head gets its own copy of its group's keys and values
    (the sparse orders differ per query head, so the kernels read per-head keys anyway)."""
    if k.shape[1] == q.shape[1]:
        return k, v
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k has {k.shape[1]} heads, which must divide q's {q.shape[1]}")
    group = q.shape[1] // k.shape[1]
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def _masked_attention(q, k, v, visible_qk: torch.Tensor | None, doc_ids, causal: bool, softmax_scale) -> torch.Tensor:
    """Math attention of the last Tq of Tk positions (a KV-cache step) under the given masks."""
    Tq, Tk = q.shape[2], k.shape[2]
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device) if visible_qk is None else visible_qk
    if causal:
        visible = visible & (torch.arange(Tk, device=q.device) <= torch.arange(Tk - Tq, Tk, device=q.device)[:, None])
    if doc_ids is not None:
        visible = visible & (doc_ids[:, None, Tk - Tq:, None] == doc_ids[:, None, None, :])
    return attention_with_stats_reference(q, k, v, visible, softmax_scale)[0]


def hash_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, *,
                shared_qk: bool = False, doc_ids: torch.Tensor | None = None,
                softmax_scale: float | None = None) -> torch.Tensor:
    """Hash-sparse causal attention with buckets from ``angular_lsh`` (see the module docstring)."""
    k, v = _expand_kv_heads(q, k, v)
    k_hash = angular_lsh(k, rotations)
    q_hash = k_hash[..., k.shape[2] - q.shape[2]:] if shared_qk else angular_lsh(q, rotations)
    if q.shape[2] != k.shape[2]:
        return _masked_attention(q, k, v, q_hash[..., :, None] == k_hash[..., None, :], doc_ids, True, softmax_scale)
    n_buckets = 2 * rotations.shape[-1]
    k_buckets = _with_documents(k_hash, doc_ids, n_buckets)
    # Shared-QK hashing passes one tensor for both sides, which the op sorts once.
    q_buckets = k_buckets if shared_qk else _with_documents(q_hash, doc_ids, n_buckets)
    return hash_sparse_attention(q, k, v, q_buckets, k_buckets, softmax_scale=softmax_scale)


def qk_drop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_keep: torch.Tensor, k_keep: torch.Tensor, *,
            doc_ids: torch.Tensor | None = None, softmax_scale: float | None = None) -> torch.Tensor:
    """Causal attention between kept queries and kept keys, within documents when ``doc_ids`` given.

    ``k_keep`` has a decision per query head (B, H, Tk), also under grouped-query attention."""
    k, v = _expand_kv_heads(q, k, v)
    if q.shape[2] != k.shape[2]:
        return _masked_attention(q, k, v, q_keep[..., :, None] & k_keep[..., None, :], doc_ids, True, softmax_scale)
    if doc_ids is None:
        return qk_sparse_attention(q, k, v, q_keep, k_keep, softmax_scale=softmax_scale)
    # Kept tokens carry 3 x their document id as bucket; dropped queries and keys get 3 x id + 1 and
    # 3 x id + 2, which match no kept token and not each other, whatever integers the ids are.
    docs = 3 * doc_ids[:, None, :].expand(q_keep.shape).long()
    return hash_sparse_attention(q, k, v, torch.where(q_keep, docs, docs + 1), torch.where(k_keep, docs, docs + 2),
                                 softmax_scale=softmax_scale)


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
          doc_ids: torch.Tensor | None = None, softmax_scale: float | None = None) -> torch.Tensor:
    """Dense attention on fastllm's kernels with the registry's conventions (GQA, KV-cache steps,
    documents: causal attention within documents is hash-sparse attention with the document ids
    as buckets)."""
    if doc_ids is None and q.shape[2] == k.shape[2]:
        return flash_attention(q, k, v, causal, softmax_scale)  # grouped-query heads in the kernels
    k, v = _expand_kv_heads(q, k, v)
    if q.shape[2] != k.shape[2] or not causal:
        return _masked_attention(q, k, v, None, doc_ids, causal, softmax_scale)
    docs = doc_ids[:, None, :].expand(q.shape[:3])
    return hash_sparse_attention(q, k, v, docs, docs, softmax_scale=softmax_scale)


class HashSparseAttention(nn.Module):
    """Hash-sparse causal attention with per-head angular LSH (fixed random rotations, a buffer)."""

    def __init__(self, n_heads: int, head_dim: int, n_buckets: int = 8, shared_qk: bool = False, seed: int = 0):
        super().__init__()
        self.n_buckets, self.shared_qk = n_buckets, shared_qk
        self.register_buffer("rotations", random_rotations(n_heads, head_dim, n_buckets, seed))

    def forward(self, q, k, v, *, causal: bool = True, doc_ids=None, softmax_scale=None) -> torch.Tensor:
        _check_causal(causal, "HashSparseAttention")
        return hash_sparse(q, k, v, self.rotations, shared_qk=self.shared_qk, doc_ids=doc_ids,
                           softmax_scale=softmax_scale)

    def extra_repr(self) -> str:
        return f"n_buckets={self.n_buckets}, shared_qk={self.shared_qk}"


class QKDropAttention(nn.Module):
    """Causal attention that drops queries and keys: at random, or by learned per-head scores."""

    def __init__(self, n_heads: int, head_dim: int, drop_rate: float = 0.5, learned: bool = False):
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must lie in [0, 1), got {drop_rate}")
        self.drop_rate, self.learned = drop_rate, learned
        if learned:
            # s = x . w + b with w ~ N(0, 1/head_dim): s ~ N(b, 1) for unit-variance x.
            bias = torch.special.ndtri(torch.tensor(1.0 - drop_rate)).item() if drop_rate > 0 else 4.0
            self.q_gate = nn.Parameter(torch.randn(n_heads, head_dim) / math.sqrt(head_dim))
            self.k_gate = nn.Parameter(torch.randn(n_heads, head_dim) / math.sqrt(head_dim))
            self.q_bias = nn.Parameter(torch.full((n_heads,), bias))
            self.k_bias = nn.Parameter(torch.full((n_heads,), bias))

    def forward(self, q, k, v, *, causal: bool = True, doc_ids=None, softmax_scale=None) -> torch.Tensor:
        _check_causal(causal, "QKDropAttention")
        k, v = _expand_kv_heads(q, k, v)
        if not self.learned:
            q_keep = torch.rand(q.shape[:3], device=q.device) >= self.drop_rate
            k_keep = torch.rand(k.shape[:3], device=k.device) >= self.drop_rate
            return qk_drop(q, k, v, q_keep, k_keep, doc_ids=doc_ids, softmax_scale=softmax_scale)
        q_score = torch.einsum("bhtd,hd->bht", q, self.q_gate.to(q.dtype)) + self.q_bias[:, None].to(q.dtype)
        k_score = torch.einsum("bhtd,hd->bht", k, self.k_gate.to(k.dtype)) + self.k_bias[:, None].to(k.dtype)
        q_pass, k_pass = _straight_through(q_score), _straight_through(k_score)
        out = qk_drop(q, k, v * k_pass[..., None], q_score > 0, k_score > 0, doc_ids=doc_ids,
                      softmax_scale=softmax_scale)
        return out * q_pass[..., None]

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, learned={self.learned}"


def _straight_through(score: torch.Tensor) -> torch.Tensor:
    """1 in value, with the gradient of sigmoid(score) / sigmoid(score) = 1 - sigmoid(score), taken as
    that of log sigmoid(score): the quotient is 0 / 0 where sigmoid(score) underflows."""
    log_gate = torch.nn.functional.logsigmoid(score)
    return 1 + (log_gate - log_gate.detach())


MAX_HEADS, MAX_HEAD_DIM = 128, 256


def hash_sparse_attention_fn(n_buckets: int = 8, shared_qk: bool = False, seed: int = 0) -> Callable:
    """A stateless registry function: hash-sparse attention with rotations fixed by ``seed``.

    The rotations of every (heads, head_dim) are leading slices of one table made here (a random
    generator cannot be created inside torch.compile'd code), for up to MAX_HEADS heads of up to
    MAX_HEAD_DIM dimensions.
    """
    table = random_rotations(MAX_HEADS, MAX_HEAD_DIM, n_buckets, seed)

    def attend(q, k, v, *, causal=True, doc_ids=None, softmax_scale=None):
        _check_causal(causal, "hash-sparse attention")
        H, D = q.shape[1], q.shape[3]
        if H > MAX_HEADS or D > MAX_HEAD_DIM:
            raise ValueError(f"hash-sparse attention supports up to {MAX_HEADS} heads of {MAX_HEAD_DIM} "
                             f"dimensions, got q of shape {tuple(q.shape)}")
        rotations = table[:H, :D].to(device=q.device, dtype=q.dtype)
        return hash_sparse(q, k, v, rotations, shared_qk=shared_qk, doc_ids=doc_ids, softmax_scale=softmax_scale)
    return attend


def qk_drop_attention_fn(drop_rate: float = 0.5) -> Callable:
    """A stateless registry function: queries and keys dropped at random with ``drop_rate``."""
    layer = QKDropAttention(1, 1, drop_rate)  # holds no parameters
    return layer.forward


def register_sparse_attentions(register_attention: Callable[..., None]) -> None:
    """Registers "fastllm_flash" (dense), "hash_sparse", "hash_sparse_shared_qk" and "qk_drop"."""
    register_attention("fastllm_flash", flash, dense=True)
    register_attention("hash_sparse", hash_sparse_attention_fn(8))
    register_attention("hash_sparse_shared_qk", hash_sparse_attention_fn(8, shared_qk=True))
    register_attention("qk_drop", qk_drop_attention_fn(0.5))
