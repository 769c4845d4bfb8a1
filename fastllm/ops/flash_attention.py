"""Dense and dynamically sparse causal attention (FlashAttention-2 in Triton, arXiv 2306.01160).

Tensors are (batch, heads, seq, head_dim) as in ``torch.nn.functional.scaled_dot_product_attention``.

* ``flash_attention``: dense, causal or not.
* ``qk_sparse_attention``: query i sees key j iff q_keep[i] and k_keep[j] and j <= i.
* ``hash_sparse_attention``: query i sees key j iff q_buckets[i] == k_buckets[j] and j <= i.

The sparse ops order queries and keys on the device, without a host synchronisation (a stable
compaction of the kept tokens by prefix sums, or a stable sort by bucket that keeps time order
inside a bucket). In that order every query sees one contiguous run of keys [lo, hi), and every key
is seen by one contiguous run of queries: QK-sparse builds its orders and both sides' runs in one
Triton launch, hash-sparse with ``searchsorted``. The kernels visit only the key blocks (backward:
also only the query blocks) that these windows touch. The tensors the kernels' loops read are first
copied into that order (one gather pass each, so the loops load contiguous tiles that pipeline like
dense attention's; the backward reuses the forward's copies of k and v, saved in their place);
queries, outputs and gradients are read and written through the orders, so they stay in the
original order. Rows that see no key are exactly 0. The kernels never read dropped
tokens, queries that see no key or keys that no query sees.

Dispatch: CUDA tensors run the Triton kernels (float16, bfloat16, float32; head dims 16, 32, 64,
128). CPU tensors run the Triton kernels only under the Triton interpreter (``TRITON_INTERPRET=1``,
set by the test suite), otherwise the math reference of ``fastllm.ops.flash_attention_ref``:
Triton has no compiled CPU backend, and the reference is faster than the interpreter. float64
inputs, other head dims and ``FASTLLM_BACKEND=reference`` also use the reference (on the tensors'
own device). Forward and backward are ``torch.library.triton_op`` custom ops with autograd, so
``torch.compile(fullgraph=True)`` sees the kernels.
"""

from __future__ import annotations

import math

import torch

from fastllm.ops import _backend
from fastllm.ops._validate import check_real, check_same_device, check_shape, check_tensor
from fastllm.ops.flash_attention_ref import (
    attention_backward_reference,
    attention_with_stats_reference,
    causal_mask,
    flash_attention_reference,
    hash_sparse_attention_reference,
    qk_sparse_attention_reference,
    window_mask,
)
from fastllm.profiling import nvtx_range

try:
    from fastllm.triton_kernels import flash_attention as _kernels
except ImportError:  # Triton is an optional dependency
    _kernels = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOG2E = 1.4426950408889634
BUCKET_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def triton_path(q: torch.Tensor) -> bool:
    """Whether the Triton kernels take ``q`` (see the module docstring for the rule)."""
    if _kernels is None or q.dtype not in _kernels.KERNEL_DTYPES or q.shape[-1] not in _kernels.HEAD_DIMS:
        if q.device.type == "cuda":
            _backend.warn_once(f"flash_attention_{q.dtype}_{q.shape[-1]}", (
                "fastllm.flash_attention: no Triton kernel for "
                + ("this machine (install triton>=3.6)" if _kernels is None
                   else f"dtype {q.dtype} with head dim {q.shape[-1]} (kernels: {_kernels.HEAD_DIMS})")
                + "; using the math reference on the GPU (O(T^2) memory)"))
        return False
    return _backend.triton_runs_on(q, _kernels.INTERPRET)


def attention_implementation(device_type: str) -> str:
    """What the attention ops run on ``device_type`` ('cpu' or 'cuda') in float16/bfloat16/float32."""
    if _backend.current_backend() == "reference" or _kernels is None:
        return "reference"
    if device_type == "cuda":
        return "triton"
    return "triton-interpreter" if device_type == "cpu" and _kernels.INTERPRET else "reference"


def _visible(q: torch.Tensor, windows: torch.Tensor | None, causal: bool):
    if windows is not None:
        return window_mask(windows[0], windows[1])
    return causal_mask(q.shape[-2], q.device) if causal else None


def _reordered(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Rows of x in the windows' frame (row r = x[..., order[r], :])."""
    return x if order is None else torch.gather(x, 2, order.long()[..., None].expand(x.shape))


def _restored(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """The inverse of ``_reordered``."""
    if order is None:
        return x
    return torch.empty_like(x).scatter_(2, order.long()[..., None].expand(x.shape), x)


@torch.library.triton_op("fastllm::flash_attention_forward", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: torch.Tensor | None,
             q_order: torch.Tensor | None, k_order: torch.Tensor | None, causal: bool,
             softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, stats, k_frame, v_frame): stats (fp32 (2, B, H, T)) hold each row's maximum scaled
    score (in log2 units) and log2 of its softmax denominator, see ``attention_forward``.

    With windows (int32 (4, B, H, T): row_lo, row_hi, col_lo, col_hi, see ``_frame_windows``) and
    the orders q_order, k_order (int32 (B, H, T)), query q_order[r] sees the keys k_order[c] for c in
    [row_lo[r], row_hi[r]); ``causal`` is ignored. k_frame and v_frame are then k and v in key order,
    which the backward reads instead of k and v (without windows they are empty). stats and the
    frames are not differentiable.
    """
    if triton_path(q):
        out, stats, k_read, v_read = _kernels.attention_forward(q, k, v, windows, q_order, k_order, causal,
                                                                softmax_scale)
    else:
        k_read, v_read = _reordered(k, k_order), _reordered(v, k_order)
        out, row_max, lse = attention_with_stats_reference(_reordered(q, q_order), k_read, v_read,
                                                           _visible(q, windows, causal), softmax_scale)
        seen = lse < float("inf")
        stats = torch.stack([row_max * _LOG2E, torch.where(seen, (lse - row_max) * _LOG2E, 0.0)])
        out = _restored(out, q_order).contiguous()
    if windows is None:  # the backward reads k and v themselves
        return out, stats, k.new_empty(0), v.new_empty(0)
    return out, stats, k_read, v_read


@torch.library.triton_op("fastllm::flash_attention_backward", mutates_args=())
def _backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              stats: torch.Tensor, windows: torch.Tensor | None, q_order: torch.Tensor | None,
              k_order: torch.Tensor | None, causal: bool,
              softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv); with windows, k and v are the forward's k_frame and v_frame."""
    if triton_path(q):
        return _kernels.attention_backward(dout, q, k, v, out, stats, windows, q_order, k_order, causal,
                                           softmax_scale)
    lse = (stats[0] + stats[1]) / _LOG2E
    dq, dk, dv = attention_backward_reference(
        _reordered(dout, q_order), _reordered(q, q_order), k, v, _reordered(out, q_order), lse,
        _visible(q, windows, causal), softmax_scale)
    return _restored(dq, q_order), _restored(dk, k_order), _restored(dv, k_order)


def _setup_context(ctx, inputs, output):
    q, k, v, windows, q_order, k_order, causal, softmax_scale = inputs
    out, stats, k_frame, v_frame = output
    if windows is not None:  # the frames replace k and v: the backward gathers them no second time
        k, v = k_frame, v_frame
    ctx.save_for_backward(q, k, v, out, stats, windows, q_order, k_order)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale
    ctx.mark_non_differentiable(stats, k_frame, v_frame)
    # The non-differentiable outputs' gradients stay None (so the backward runs only with dout):
    # materialised, they were two zero-filled copies of k and v per sparse step.
    ctx.set_materialize_grads(False)


def _backward_rule(ctx, dout, dstats, dk_frame, dv_frame):
    q, k, v, out, stats, windows, q_order, k_order = ctx.saved_tensors
    dq, dk, dv = _backward(dout, q, k, v, out, stats, windows, q_order, k_order, ctx.causal, ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None, None


_forward.register_autograd(_backward_rule, setup_context=_setup_context)


def _validate_qkv(q, k, v, grouped: bool = False) -> None:
    """Same shapes, or with ``grouped`` k and v of H_KV heads where H_KV divides q's heads."""
    q = check_tensor("q", q, dtypes=DTYPES, ndim=4)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, dtypes=(q.dtype,), ndim=4)
        if grouped and t.shape[1] > 0 and q.shape[1] % t.shape[1] == 0:
            check_shape(name, t, (q.shape[0], t.shape[1], *q.shape[2:]), "q with fewer heads")
        else:
            check_shape(name, t, q.shape, "q" + (" (or H_KV dividing q's heads)" if grouped else ""))
    check_shape("v", v, k.shape, "k")
    check_same_device([("q", q), ("k", k), ("v", v)])
    if q.shape[-1] == 0:
        raise ValueError(f"q: head_dim must be at least 1, got shape {tuple(q.shape)}")
    if q.shape[0] * q.shape[1] > 65535:
        raise ValueError(f"q: batch * heads must be at most 65535, got shape {tuple(q.shape)}")


def _validate_per_token(name: str, t, q: torch.Tensor, dtypes) -> None:
    check_tensor(name, t, dtypes=dtypes, ndim=3)
    check_shape(name, t, q.shape[:3], "q's (batch, heads, seq)")
    check_same_device([("q", q), (name, t)])


_INT32 = torch.iinfo(torch.int32)


def _check_bucket_range(name: str, buckets: torch.Tensor) -> None:
    """int64 buckets must fit in int32 (the ops sort 32-bit keys). Checked on CPU tensors only: on
    other devices reading the range would synchronise with the host (out-of-range ids then share
    buckets modulo 2^32)."""
    if (buckets.dtype != torch.int64 or buckets.device.type != "cpu" or buckets.numel() == 0
            or torch.compiler.is_compiling() or not _backend.holds_data(buckets)):
        return
    low, high = buckets.min().item(), buckets.max().item()
    if low < _INT32.min or high > _INT32.max:
        raise ValueError(f"{name} must hold values in the int32 range [{_INT32.min}, {_INT32.max}], "
                         f"got values in [{low}, {high}]")


def _scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    scale = check_real("softmax_scale", softmax_scale)
    # Positive: the kernels track the row maximum of the unscaled scores. Finite: inf gives NaN rows.
    if not 0 < scale < math.inf:
        raise ValueError(f"softmax_scale must be positive and finite, got {softmax_scale}")
    return scale


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * softmax_scale [+ causal mask]) v; ``softmax_scale`` defaults to 1/sqrt(head_dim).

    q is (B, H, T, D); k and v are (B, H, T, D) or, for grouped-query attention, (B, H_KV, T, D)
    with H_KV dividing H (query head h uses key/value head h // (H / H_KV)).
    """
    _validate_qkv(q, k, v, grouped=True)
    scale = _scale(q, softmax_scale)
    if _backend.current_backend() == "reference":
        return flash_attention_reference(q, k, v, causal, scale)
    with nvtx_range("fastllm.flash_attention"):
        return _forward(q, k, v, None, None, None, bool(causal), scale)[0]


def _inverse(order: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def _column_windows(row_lo: torch.Tensor, row_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For non-decreasing row windows: key j is seen by exactly the rows [col_lo[j], col_hi[j])."""
    keys = torch.arange(row_lo.shape[-1], device=row_lo.device, dtype=row_lo.dtype).expand(row_lo.shape).contiguous()
    col_lo = torch.searchsorted(row_hi, keys, right=True, out_int32=True)  # first row with hi > j
    col_hi = torch.searchsorted(row_lo, keys, right=True, out_int32=True)  # rows with lo <= j
    return col_lo, col_hi


def _frame_windows(row_lo: torch.Tensor, row_hi: torch.Tensor) -> torch.Tensor:
    """The windows of both sides, (row_lo, row_hi, col_lo, col_hi) stacked, from the rows' (int32,
    non-decreasing)."""
    return torch.stack([row_lo, row_hi, *_column_windows(row_lo, row_hi)])


def _windowed(q, k, v, q_order, k_order, row_lo, row_hi, scale) -> torch.Tensor:
    """Attention where query q_order[r] sees the keys k_order[c], c in [row_lo[r], row_hi[r])."""
    return _forward(q, k, v, _frame_windows(row_lo, row_hi), q_order.int(), k_order.int(), True, scale)[0]


def _stable_partition(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept tokens first, each part in time order: (order (int64), kept count up to each position
    inclusive (int32), number kept (B, H, 1))."""
    T = keep.shape[-1]
    positions = torch.arange(T, device=keep.device, dtype=torch.int32)
    kept_upto = torch.cumsum(keep, -1, dtype=torch.int32)
    n_kept = kept_upto[..., -1:]
    rank = torch.where(keep, kept_upto - 1, n_kept + positions - kept_upto).long()
    return _inverse(rank), kept_upto, n_kept


def qk_sparse_windows(q_keep: torch.Tensor, k_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q_order, k_order, windows) of QK-sparse attention in torch ops: the frame that the Triton
    launch ``qk_sparse_windows`` builds in one pass (its oracle), for tensors the kernels do not take."""
    k_order, keys_upto, nk = _stable_partition(k_keep)
    if q_keep is k_keep:  # queries and keys kept together: one partition serves both
        q_order, nq = k_order, nk
    else:
        q_order, _, nq = _stable_partition(q_keep)
    # Kept query r sees the kept keys at positions <= its own: the first keys_upto[pos] of them.
    kept_row = torch.arange(q_keep.shape[-1], device=q_keep.device, dtype=torch.int32) < nq
    row_hi = torch.where(kept_row, torch.gather(keys_upto, -1, q_order), nk)
    row_lo = torch.where(kept_row, 0, nk)  # dropped queries: an empty window past every kept key
    return q_order.int(), k_order.int(), _frame_windows(row_lo, row_hi)


def qk_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_keep: torch.Tensor,
                        k_keep: torch.Tensor, softmax_scale: float | None = None) -> torch.Tensor:
    """Causal attention between the kept queries and the kept keys (bool (B, H, T) masks).

    Query i sees key j iff q_keep[i] and k_keep[j] and j <= i (original positions). Rows of dropped
    queries, and of kept queries that see no kept key, are exactly 0.
    """
    _validate_qkv(q, k, v)
    _validate_per_token("q_keep", q_keep, q, (torch.bool,))
    _validate_per_token("k_keep", k_keep, q, (torch.bool,))
    scale = _scale(q, softmax_scale)
    if _backend.current_backend() == "reference" or q.numel() == 0:
        return qk_sparse_attention_reference(q, k, v, q_keep, k_keep, scale)
    with nvtx_range("fastllm.qk_sparse_attention"):
        build_frame = _kernels.qk_sparse_windows if triton_path(q) else qk_sparse_windows
        q_order, k_order, windows = build_frame(q_keep, k_keep)
        return _forward(q, k, v, windows, q_order, k_order, True, scale)[0]


def _int32_rows(buckets: torch.Tensor) -> torch.Tensor:
    return buckets.to(torch.int32, memory_format=torch.contiguous_format)


def hash_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_buckets: torch.Tensor,
                          k_buckets: torch.Tensor, softmax_scale: float | None = None) -> torch.Tensor:
    """Causal attention inside buckets (integer (B, H, T), values within the int32 range: checked
    for CPU tensors).

    Query i sees key j iff q_buckets[i] == k_buckets[j] and j <= i. Rows that see no key are 0.
    """
    _validate_qkv(q, k, v)
    _validate_per_token("q_buckets", q_buckets, q, BUCKET_DTYPES)
    _validate_per_token("k_buckets", k_buckets, q, BUCKET_DTYPES)
    _check_bucket_range("q_buckets", q_buckets)
    if k_buckets is not q_buckets:
        _check_bucket_range("k_buckets", k_buckets)
    scale = _scale(q, softmax_scale)
    if _backend.current_backend() == "reference" or q.numel() == 0:
        return hash_sparse_attention_reference(q, k, v, q_buckets, k_buckets, scale)
    with nvtx_range("fastllm.hash_sparse_attention"):
        T = q.shape[2]
        # 32-bit keys sort in half the radix passes of 64-bit ones; shared buckets (shared-QK
        # hashing) sort once. Contiguous: the sort's orders keep its input's strides, and the
        # kernels read the orders as contiguous (B, H, T).
        k_sorted, k_order = torch.sort(_int32_rows(k_buckets), dim=-1, stable=True)
        if q_buckets is k_buckets:
            q_sorted, q_order = k_sorted, k_order
        else:
            q_sorted, q_order = torch.sort(_int32_rows(q_buckets), dim=-1, stable=True)
        # (bucket, position) packed into one sortable key: the keys query r sees are those from
        # (its bucket, 0) to (its bucket, its position), one contiguous run in key order.
        k_packed = k_sorted.long() * T + k_order
        q_start = q_sorted.long() * T
        row_lo = torch.searchsorted(k_packed, q_start, out_int32=True)
        row_hi = torch.searchsorted(k_packed, q_start + q_order, right=True, out_int32=True)
        return _windowed(q, k, v, q_order, k_order, row_lo, row_hi, scale)
