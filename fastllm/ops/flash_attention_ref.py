"""Math attention in PyTorch: the oracle of the dense and sparse flash attentions.

Computes in the inputs' dtype (float64 inputs give the fp64 reference of the tests) and materialises
the (T, T) scores, so it is for tests, CPUs and small problems. Rows that see no key give 0.
"""

from __future__ import annotations

import math

import torch


def attention_with_stats_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None,
                                    softmax_scale: float | None = None
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v over the ``visible`` (bool, broadcast to (B, H, T, T)) keys of each row.

    Returns (out, row_max, lse): the maximum and the natural log-sum-exp of each row's visible
    scaled scores, in fp32 (+inf for rows that see no key, whose output is exactly 0).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    k, v = expand_kv_heads(q, k), expand_kv_heads(q, v)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if scores.shape[-1] == 0:  # no keys (T = 0): a maximum over nothing has no value; no row sees a key
        unseen = torch.full(scores.shape[:-1], float("inf"), device=q.device)
        return torch.matmul(scores, v), unseen, unseen
    if visible is None:
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, v), scores.amax(-1).float(), torch.logsumexp(scores.float(), dim=-1)
    scores = scores.masked_fill(~visible, float("-inf"))
    seen = visible.any(dim=-1, keepdim=True).expand(scores.shape[:-1] + (1,))
    lse = torch.logsumexp(scores.float(), dim=-1).masked_fill(~seen[..., 0], float("inf"))
    row_max = scores.amax(-1).float().masked_fill(~seen[..., 0], float("inf"))
    # Rows without keys: a finite softmax (so no NaN reaches the gradients), then zeroed.
    probs = torch.softmax(scores.masked_fill(~seen, 0.0), dim=-1).masked_fill(~seen, 0.0)
    return torch.matmul(probs, v), row_max, lse


def expand_kv_heads(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention: k or v with H_KV heads repeated to q's H heads (H_KV divides H)."""
    return kv if kv.shape[1] == q.shape[1] else kv.repeat_interleave(q.shape[1] // kv.shape[1], dim=1)


def causal_mask(T: int, device: torch.device | str) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def window_mask(row_lo: torch.Tensor, row_hi: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) bool: row i sees keys row_lo[i] <= j < row_hi[i]."""
    keys = torch.arange(row_lo.shape[-1], device=row_lo.device)
    return (keys >= row_lo[..., :, None]) & (keys < row_hi[..., :, None])


def flash_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                              softmax_scale: float | None = None) -> torch.Tensor:
    visible = causal_mask(q.shape[-2], q.device) if causal else None
    return attention_with_stats_reference(q, k, v, visible, softmax_scale)[0]


def qk_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_keep: torch.Tensor,
                                  k_keep: torch.Tensor, softmax_scale: float | None = None) -> torch.Tensor:
    """Query i sees key j iff q_keep[i] and k_keep[j] and j <= i."""
    visible = q_keep[..., :, None] & k_keep[..., None, :] & causal_mask(q.shape[-2], q.device)
    return attention_with_stats_reference(q, k, v, visible, softmax_scale)[0]


def hash_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_buckets: torch.Tensor,
                                    k_buckets: torch.Tensor, softmax_scale: float | None = None) -> torch.Tensor:
    """Query i sees key j iff q_buckets[i] == k_buckets[j] and j <= i."""
    visible = (q_buckets[..., :, None] == k_buckets[..., None, :]) & causal_mask(q.shape[-2], q.device)
    return attention_with_stats_reference(q, k, v, visible, softmax_scale)[0]


def attention_backward_reference(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, visible: torch.Tensor | None,
                                 softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the forward's out and lse, written out (the backward op's CPU path)."""
    kv_heads = k.shape[1]
    k, v = expand_kv_heads(q, k), expand_kv_heads(q, v)
    scores = torch.matmul(q, k.transpose(-2, -1)).float() * softmax_scale
    probs = torch.exp(scores - lse[..., None])  # lse = +inf: rows without keys get 0
    if visible is not None:
        probs = probs.masked_fill(~visible, 0.0)
    probs = probs.to(q.dtype)
    delta = (dout.float() * out.float()).sum(-1, keepdim=True)
    dscores = (probs.float() * (torch.matmul(dout, v.transpose(-2, -1)).float() - delta)).to(q.dtype)
    dq = torch.matmul(dscores, k) * softmax_scale
    dk = torch.matmul(dscores.transpose(-2, -1), q) * softmax_scale
    dv = torch.matmul(probs.transpose(-2, -1), dout)
    if kv_heads != q.shape[1]:  # each key/value head sums the gradients of its query heads
        dk, dv = [t.unflatten(1, (kv_heads, -1)).sum(2) for t in (dk, dv)]
    return dq, dk, dv
