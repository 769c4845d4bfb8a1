"""Goldfish loss mask (Hans et al. 2024, arXiv 2406.10209, as used by Apertus).

A label is dropped from the loss when a seeded hash of the ``h`` labels ending at it (itself included)
falls below 1/k of the hash range. The decision depends only on those ``h`` tokens and the seed, so a
passage that repeats anywhere in the corpus loses the same tokens every time: the model never sees them
as targets and cannot reproduce the passage verbatim. As in the reference implementation, a label with
fewer than ``h`` tokens of context is never dropped; here the context also stops at its document's start
(``doc_ids``), so the decision does not depend on what happened to be packed before the document.
"""

from __future__ import annotations

import numpy as np
import torch

_U64 = np.uint64
_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose output bits each depend on all input bits."""
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _run_lengths(doc_ids: np.ndarray) -> np.ndarray:
    """For each position along the last axis: how many positions of its document end at it (itself included)."""
    n = doc_ids.shape[-1]
    index = np.broadcast_to(np.arange(n), doc_ids.shape)
    starts = np.zeros(doc_ids.shape, dtype=np.int64)
    if n:
        boundary = np.zeros(doc_ids.shape, dtype=bool)
        boundary[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
        starts = np.maximum.accumulate(np.where(boundary, index, 0), axis=-1)
    return index - starts + 1


def goldfish_mask(labels, k: int, h: int, seed: int = 0, doc_ids=None):
    """True where Goldfish drops the label. ``labels``: integer ids (numpy array or tensor), windows along
    the last axis; ``doc_ids`` (same shape) restricts each label's context to its own document.
    Returns a bool array of the same shape and kind (numpy or a tensor on the labels' device)."""
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"goldfish k must be an int >= 2 (1/k of the labels are dropped), got {k!r}")
    if not isinstance(h, int) or h < 1:
        raise ValueError(f"goldfish h (context width) must be an int >= 1, got {h!r}")
    as_tensor = isinstance(labels, torch.Tensor)
    tokens = labels.detach().cpu().numpy() if as_tensor else np.asarray(labels)
    if tokens.dtype.kind not in "iu":
        raise TypeError(f"labels must hold integer token ids, got dtype {tokens.dtype}")
    if doc_ids is not None:
        docs = doc_ids.detach().cpu().numpy() if isinstance(doc_ids, torch.Tensor) else np.asarray(doc_ids)
        if docs.shape != tokens.shape:
            raise ValueError(f"doc_ids must have the labels' shape {tokens.shape}, got {docs.shape}")
        context = _run_lengths(docs)
    else:
        context = np.broadcast_to(np.arange(1, tokens.shape[-1] + 1), tokens.shape)

    n = tokens.shape[-1]
    drop = np.zeros(tokens.shape, dtype=bool)
    if n >= h:
        drop[..., h - 1:] = (_window_hash(tokens, h, seed)[..., h - 1:] < _U64((1 << 64) // k)) \
            & (context[..., h - 1:] >= h)
    return torch.from_numpy(drop).to(labels.device) if as_tensor else drop


def _window_hash(tokens: np.ndarray, h: int, seed: int) -> np.ndarray:
    """For each position t >= h-1 along the last axis, a seeded 64-bit hash of tokens[t-h+1 : t+1].

    Each token id becomes a seeded random value v; the window's polynomial sum_j P^j v[t-j] (mod 2^64, P a
    seeded odd multiplier) comes from prefix sums of v[i] P^-i, so the cost does not grow with h; a final
    mix spreads every token's influence over all output bits. Positions t < h-1 hold no meaningful value.
    """
    n = tokens.shape[-1]
    key_value, key_base = (int(x) for x in _mix64(np.array([seed & _MASK64, (seed + 1) & _MASK64], dtype=_U64)
                                                   ^ _U64(0x9E3779B97F4A7C15)))
    base = key_base | 1  # odd, hence invertible modulo 2^64
    powers = np.cumprod(np.full(n, base, dtype=_U64)) * _U64(pow(base, -1, 1 << 64))  # P^t
    inverse_powers = np.cumprod(np.full(n, pow(base, -1, 1 << 64), dtype=_U64)) * _U64(base)  # P^-t
    values = _mix64(tokens.astype(np.int64).view(_U64) ^ _U64(key_value))
    prefix = np.zeros(tokens.shape[:-1] + (n + 1,), dtype=_U64)
    np.cumsum(values * inverse_powers, axis=-1, out=prefix[..., 1:])
    out = np.zeros(tokens.shape, dtype=_U64)
    out[..., h - 1:] = (prefix[..., h:] - prefix[..., :n + 1 - h]) * powers[h - 1:]
    return _mix64(out)
