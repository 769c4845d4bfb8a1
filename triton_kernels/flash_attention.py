"""FlashAttention-2 in Triton, dense or with per-row key windows (the sparse attentions' kernel).

Every query row ``i`` of one (batch, head) attends the keys ``j`` with ``lo[i] <= j < hi[i]``:

* MODE_FULL: ``[0, T)``;  MODE_CAUSAL: ``[0, i + 1)``;
* MODE_WINDOW: ``lo``, ``hi`` read from int32 tensors (B*H, T). The sparse attentions reorder
  queries and keys (a stable compaction of kept tokens, or a stable sort by bucket) so that every
  query sees one contiguous run of keys, and both ``lo`` and ``hi`` are non-decreasing in ``i``.
  The key columns get the transposed windows, ``col_lo[j] <= i < col_hi[j]``.
  Inputs, outputs and gradients keep the original order: the launchers copy the rows that the
  kernels' loops read into the reordered frame (one gather pass per tensor), and the kernels load
  or store the rows each program owns (forward queries, outputs, gradients) through the two orders
  (int32 (B*H, T)). Loads through an order inside a loop would wait on their index loads, which
  Triton's software pipeliner schedules without overlap (every tile waited for before the next).
  Rows whose window is empty (dropped tokens, queries that see no key, keys no query sees) are
  never read: their frame rows are zeros, which the kernels load only under masks. So the traffic
  scales with the kept tokens, and NaN in a dropped token cannot leak into the others.

A program skips every key block outside its rows' windows (and, in the dK/dV pass, every query
block outside its columns' windows), and builds the element mask only for tiles that some row
sees partly. Rows that see no key get exactly zero output and a row maximum of +inf, which makes
their probabilities (and so their gradients) exactly zero in the backward.

Forward: online softmax in base 2; saves each row's maximum and log2 of its sum (fp32), from
which the backward recomputes the probabilities with the forward's own roundings. Backward: a
preprocess for each query row's terms (``delta = rowsum(dO * O)``, and the sum of the forward's two
statistics), one pass over key blocks for dK and dV and a separate pass over query blocks for dQ
(no atomics). Accumulation is fp32; fp32 inputs use IEEE products (no TF32), summed over the head
dim in four runs added pairwise, so they can serve as tests against torch's fp32 error. Head dims
are powers of two from 16 to 128. Scaled scores (s * scale * log2(e)) must stay below 2^31 in
magnitude: each exponent is one fma against the row maximum rounded apart, and above that the
rounding's residual (half an ulp of the maximum) overflows exp2, giving NaN or wrong rows; a model whose
attention logits reach 1e9 has diverged anyway, and a second rounding per score would cost the loop.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

MODE_FULL, MODE_CAUSAL, MODE_WINDOW = 0, 1, 2
HEAD_DIMS = (16, 32, 64, 128)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Under the interpreter (CPU tests) one small tile keeps runs fast and still crosses blocks.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRETED = tl.constexpr(INTERPRET)
LOG2E = 1.4426950408889634


def _configs(shapes: list[tuple[int, ...]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, warps, stages[, register cap per thread]) each."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, maxnreg=cap[0] if cap else None)
            for m, n, w, s, *cap in shapes]


# (BLOCK_M, BLOCK_N, warps, stages) for sm_80 / sm_90; BLOCK_M tiles queries, BLOCK_N keys. The dK/dV
# pass holds two (BLOCK_N, head dim) float32 accumulators beside its keys and values: with 4 warps
# every 128-key tile spills registers on sm_90 (benchmarks/kernel_resources.py, Triton 3.9), with 8 warps
# over 32 x 128 tiles none does up to head dim 64; at head dim 128, 16 x 128 tiles spill least.
# Five stages for dQ's thin tiles follow Triton's fused-attention tutorial.
_FWD = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4)])
_DKDV = _configs([(32, 128, 8, 3), (32, 128, 8, 4), (16, 128, 8, 3), (32, 128, 4, 3), (64, 128, 8, 3),
                  (32, 64, 4, 4)])
_DQ = _configs([(128, 32, 4, 3), (128, 32, 4, 5), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)])
# More configs for head dims up to NARROW_HEAD_DIM, where they fit in fewer registers: several programs
# share an SM, so one's softmax can run while another's matrix products do. The 8-warp forward and
# dQ capped at 128 registers (maxnreg) run two programs per SM (64K registers) where uncapped they
# take 154-172 (Triton 3.6-3.9), one program; capped, the forward spills 16-24 bytes per thread and
# dQ none. The 4-warp 16 x 64 dK/dV tile takes 158 registers with windows (the sparse attentions):
# three programs per SM, where the 8-warp 32 x 128 tile (194) runs one and the 4-warp 32 x 64 (190)
# two; causal, 237 and no spill. dQ's 4-warp 64 x 64 tile takes 251 registers with windows uncapped,
# 168 capped and no spill: three programs per SM instead of two. At head dim 128 the capped tiles spill
# 80-232 bytes, the dK/dV one 208.
# Empty under the interpreter, whose one config the other lists hold.
NARROW_HEAD_DIM = 64
_FWD_NARROW = [] if INTERPRET else _configs([(128, 64, 8, 3, 128)])
_DKDV_NARROW = [] if INTERPRET else _configs([(16, 64, 4, 3)])
_DQ_NARROW = [] if INTERPRET else _configs([(128, 32, 8, 3, 128), (64, 64, 4, 3, 168)])
# Sequences up to SHORT_T use one config per kernel (tuning would cost more than it saves); float32
# (IEEE products on CUDA cores, for tests) uses one small-tile config: larger tiles spill registers
# at head dim 128 and take ptxas tens of seconds.
SHORT_T = 1024
_FWD_SHORT = _DQ_SHORT = _configs([(64, 64, 4, 3)])
_DKDV_SHORT = _configs([(32, 128, 8, 3)])
_FP32_ROWS = _configs([(32, 32, 4, 2)])
_FP32_COLS = _configs([(16, 32, 4, 2)])
# Tiles that do not fit shared memory (128-dim heads on sm_80) are dropped by the autotuner.
_TUNE_KEY = ["T", "HEAD_DIM", "MODE"]


def _variants(kernel, configs, narrow_configs, short_configs, fp32_configs):
    return {name: triton.autotune(configs=c, key=_TUNE_KEY)(kernel)
            for name, c in (("tuned", configs), ("tuned_narrow", configs + narrow_configs),
                            ("short", short_configs), ("fp32", fp32_configs))}


def _pick(variants, q: torch.Tensor):
    if q.dtype == torch.float32:
        return variants["fp32"]
    if q.shape[2] <= SHORT_T:
        return variants["short"]
    return variants["tuned_narrow"] if q.shape[3] <= NARROW_HEAD_DIM else variants["tuned"]


@triton.jit
def _halves(a, b):
    """a (M, K) and b (K, N) split along K into their first and second halves."""
    M: tl.constexpr = a.shape[0]
    K: tl.constexpr = a.shape[1]
    N: tl.constexpr = b.shape[1]
    a0, a1 = tl.split(tl.permute(tl.reshape(a, [M, 2, K // 2]), [0, 2, 1]))
    b0, b1 = tl.split(tl.permute(tl.reshape(b, [2, K // 2, N]), [1, 2, 0]))
    return a0, a1, b0, b1


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE and _INTERPRETED:
        # numpy's matmul rounds a @ b and (b^T @ a^T)^T differently, so the backward's recomputed
        # scores would not match the forward's; GPUs sum both in one order. Summing in float64 and
        # rounding once makes the interpreter as consistent.
        return tl.dot(a.to(tl.float64), b.to(tl.float64)).to(tl.float32)
    elif IEEE:
        # The fp32 path: products over the head dim summed in four sequential runs, added
        # pairwise (one run of 128 would have twice torch's rounding error).
        if a.shape[1] >= 64:
            a0, a1, b0, b1 = _halves(a, b)
            a00, a01, b00, b01 = _halves(a0, b0)
            a10, a11, b10, b11 = _halves(a1, b1)
            return ((tl.dot(a00, b00, input_precision="ieee") + tl.dot(a01, b01, input_precision="ieee"))
                    + (tl.dot(a10, b10, input_precision="ieee") + tl.dot(a11, b11, input_precision="ieee")))
        else:
            return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _windows(LO, HI, offs, T, MODE: tl.constexpr, COLUMNS: tl.constexpr):
    """[lo, hi) of the keys each query row ``offs`` sees or, with COLUMNS, of the query rows that see
    each key column ``offs`` (from the column tables LO, HI in MODE_WINDOW); empty past T."""
    valid = offs < T
    if MODE == 2:
        lo = tl.load(LO + offs, mask=valid, other=T)
        hi = tl.load(HI + offs, mask=valid, other=0)
    elif MODE == 1:
        if COLUMNS:
            lo = tl.where(valid, offs, T)
            hi = tl.where(valid, T, 0)
        else:
            lo = tl.where(valid, 0, T)
            hi = tl.where(valid, offs + 1, 0)
    else:
        lo = tl.where(valid, 0, T)
        hi = tl.where(valid, T, 0)
    return lo, hi


@triton.jit
def _rows(IDX, offs, T, MODE: tl.constexpr):
    """Memory rows of the reordered indices ``offs``: IDX[offs] with windows, else ``offs`` itself."""
    if MODE == 2:
        return tl.load(IDX + offs, mask=offs < T, other=0)
    else:
        return offs


@triton.jit
def _row_terms(STATS, ROWS, rows, n_rows, mask, IEEE: tl.constexpr):
    """(shift, log2_l, delta) of the query rows ``rows`` (fp32): the backward's recomputed
    probabilities are 2^(s * scale_log2 - m - log2(l)), see ``_scaled_minus_stats``.

    Half-precision inputs subtract shift = m + log2(l) at once, one operation per score fewer (its
    rounding is far below theirs; log2_l is then unused): the preprocess stores it beside delta, and
    both come in as one (rows, 2) tile. Triton 3.6 copies each separate per-row vector in the MMA
    fragment's layout, one small copy per element a thread uses; the pair cut the dK/dV pass's
    unmasked loop by 11% of its instructions on sm_90. The fp32 (test) path reads the forward's
    shift = m and log2(l) apart, to subtract them in turn, m exactly as the forward did."""
    pair = tl.load(ROWS + rows[:, None] * 2 + tl.arange(0, 2)[None, :], mask=mask[:, None], other=0.0)
    sum_of_stats, delta = tl.split(pair)
    if IEEE:
        m = tl.load(STATS + rows, mask=mask, other=float("inf"))
        log2_l = tl.load(STATS + n_rows + rows, mask=mask, other=0.0)
        return m, log2_l, delta
    else:
        return sum_of_stats, tl.zeros_like(sum_of_stats), delta


@triton.jit
def _scaled_minus_stats(s, scale_log2, shift, log2_l, IEEE: tl.constexpr):
    """s * scale_log2 - m - log2(l) from the terms of ``_row_terms``."""
    if IEEE:
        return tl.fma(s, scale_log2, -shift) - log2_l
    else:
        return tl.fma(s, scale_log2, -shift)


@triton.jit
def _tile_ranges(lo, hi, valid, BLOCK: tl.constexpr):
    """Splits the tiles that the windows [lo, hi) of one block reach into three runs,
    [first, full_lo) partly seen, [full_lo, full_hi) seen whole by every valid index, [full_hi, end)
    partly seen: only the partly seen tiles build an element mask, and the loop over whole tiles
    carries no branch, so it software-pipelines. Empty windows (dropped tokens, indices past T) do
    not widen the range, wherever they sit: a block of them does no work. A valid index with an
    empty window leaves no whole run (its row would see the unmasked tiles); indices past T are
    never stored, so they do not narrow the whole run."""
    seen = hi > lo
    end = tl.max(tl.where(seen, hi, 0), 0)
    first = (tl.min(tl.where(seen, lo, end), 0) // BLOCK) * BLOCK
    lo_max = tl.max(tl.where(valid, lo, 0), 0)
    hi_min = tl.min(tl.where(valid, hi, end), 0)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(lo_max, BLOCK) * BLOCK, first), end)
    full_hi = tl.maximum(tl.minimum((hi_min // BLOCK) * BLOCK, end), full_lo)
    return first, full_lo, full_hi, end


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, K, V, lo, hi, tile_start, tile_end, scale_log2, stride_kt, stride_vt, T,
               HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in tl.range(tile_start, tile_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            kt = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None], mask=offs_n[None, :] < T, other=0.0)
            v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
            s = _dot(q, kt, IEEE)
            visible = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
            s = tl.where(visible, s, float("-inf"))
        else:
            kt = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None])
            v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :])
            s = _dot(q, kt, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        # A row that has seen no key yet keeps m = -inf; subtracting 0 keeps its p and alpha at 0.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        # One rounding for scale and shift: the exponent's error sets the probabilities' error.
        p = tl.math.exp2(tl.fma(s, scale_log2, -m_sub[:, None]))
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, STATS, LO, HI, QIDX, scale_log2,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                H, H_KV, T, HEAD_DIM: tl.constexpr, MODE: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    scale_log2 = tl.cast(scale_log2, tl.float32)  # torch.compile passes Python floats as float64
    # Heaviest (last, under a causal mask) query blocks first: a shorter tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // (H // H_KV)  # grouped-query attention: the key/value head of this query head
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    O += bh.to(tl.int64) * T * HEAD_DIM
    n_rows = tl.num_programs(1).to(tl.int64) * T
    STATS += bh.to(tl.int64) * T
    LO += bh.to(tl.int64) * T
    HI += bh.to(tl.int64) * T
    QIDX += bh.to(tl.int64) * T

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < T
    lo, hi = _windows(LO, HI, offs_m, T, MODE, False)
    q_rows = _rows(QIDX, offs_m, T, MODE)
    q = tl.load(Q + q_rows[:, None] * stride_qt + offs_d[None, :], mask=row_valid[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first, full_lo, full_hi, end = _tile_ranges(lo, hi, row_valid, BLOCK_N)
    args = (q, K, V, lo, hi)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, *args, first, full_lo, scale_log2, stride_kt, stride_vt, T,
                               HEAD_DIM, IEEE, True, BLOCK_N)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, *args, full_lo, full_hi, scale_log2, stride_kt, stride_vt, T,
                               HEAD_DIM, IEEE, False, BLOCK_N)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, *args, full_hi, end, scale_log2, stride_kt, stride_vt, T,
                               HEAD_DIM, IEEE, True, BLOCK_N)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    if IEEE:  # the test path: a correctly rounded division (plain "/" is approximate on GPUs)
        out = tl.math.div_rn(acc, l_safe[:, None])
    else:
        out = acc / l_safe[:, None]
    # p = 2^(s * scale_log2 - m - log2(l)); the backward recomputes the first subtraction with
    # the very m used here, so its rounding cancels against l.
    m_i = tl.where(seen, m_i, float("inf"))
    log2_l = tl.math.log2(l_safe)
    tl.store(O + q_rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_valid[:, None])
    tl.store(STATS + offs_m, m_i, mask=row_valid)
    tl.store(STATS + n_rows + offs_m, log2_l, mask=row_valid)


@triton.jit
def _bwd_preprocess_kernel(O, DO, DO_FRAME, STATS, ROWS, LO, HI, QIDX, stride_dob, stride_doh, stride_dot, H, T,
                           HEAD_DIM: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per reordered query row, ROWS = (m + log2(l), delta = rowsum(dO * O)); with windows also dO's
    rows in the frame (DO_FRAME). Rows that see no key are not read: their delta and frame row are 0."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    row_base = bh.to(tl.int64) * T
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < T
    lo, hi = _windows(LO + row_base, HI + row_base, offs_m, T, MODE, False)
    seen = lo < hi
    q_rows = _rows(QIDX + row_base, offs_m, T, MODE)
    o = tl.load(O + row_base * HEAD_DIM + q_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=seen[:, None],
                other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + q_rows[:, None] * stride_dot + offs_d[None, :],
                 mask=seen[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    n_rows = tl.num_programs(1).to(tl.int64) * T
    sum_of_stats = (tl.load(STATS + row_base + offs_m, mask=row_valid, other=0.0)
                    + tl.load(STATS + n_rows + row_base + offs_m, mask=row_valid, other=0.0))
    rows = row_base + offs_m
    tl.store(ROWS + rows * 2, sum_of_stats, mask=row_valid)
    tl.store(ROWS + rows * 2 + 1, delta, mask=row_valid)
    if MODE == 2:
        tl.store(DO_FRAME + row_base * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], do,
                 mask=row_valid[:, None])


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_head, do_head, STATS, ROWS, LO, HI, row_base, n_rows, start_n, offs_n,
                tile_start, tile_end, scale_log2, stride_qt, stride_dot, T, HEAD_DIM: tl.constexpr,
                MODE: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in tl.range(tile_start, tile_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if MASKED:
            row_valid = offs_m < T
            qt = tl.load(q_head + offs_m[None, :] * stride_qt + offs_d[:, None], mask=row_valid[None, :], other=0.0)
            do = tl.load(do_head + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_valid[:, None],
                         other=0.0)
        else:
            row_valid = tl.full([BLOCK_M], True, tl.int1)
            qt = tl.load(q_head + offs_m[None, :] * stride_qt + offs_d[:, None])
            do = tl.load(do_head + offs_m[:, None] * stride_dot + offs_d[None, :])
        shift, log2_l, delta = _row_terms(STATS, ROWS, row_base + offs_m, n_rows, row_valid, IEEE)
        pt = tl.math.exp2(_scaled_minus_stats(_dot(k, qt, IEEE), scale_log2, shift[None, :], log2_l[None, :], IEEE))
        if MASKED:
            lo, hi = _windows(LO + row_base, HI + row_base, offs_m, T, MODE, False)
            visible = (offs_n[:, None] >= lo[None, :]) & (offs_n[:, None] < hi[None, :])
            pt = tl.where(visible, pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, IEEE)
        dst = pt * (_dot(v, tl.trans(do), IEEE) - delta[None, :])
        dk += _dot(dst.to(qt.dtype), tl.trans(qt), IEEE)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, STATS, ROWS, DK, DV, LO, HI, COL_LO, COL_HI, KIDX, scale_log2, scale,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                     H, H_KV, T, HEAD_DIM: tl.constexpr, MODE: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    scale_log2 = tl.cast(scale_log2, tl.float32)  # torch.compile passes Python floats as float64
    scale = tl.cast(scale, tl.float32)
    # One program per key block of one key/value head; it sums over the query heads of its group.
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    group = H // H_KV
    b = (bhk // H_KV).to(tl.int64)
    hk = (bhk % H_KV).to(tl.int64)
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    DK += bhk.to(tl.int64) * T * HEAD_DIM
    DV += bhk.to(tl.int64) * T * HEAD_DIM
    n_rows = tl.num_programs(1).to(tl.int64) * group * T

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_valid = offs_n < T
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=col_valid[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_valid[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(group):
        h = hk * group + g
        row_base = (b * H + h) * T
        q_head = Q + b * stride_qb + h * stride_qh
        do_head = DO + b * stride_dob + h * stride_doh
        # The query rows that can see this key block.
        q_lo, q_hi = _windows(COL_LO + row_base, COL_HI + row_base, offs_n, T, MODE, True)
        first, full_lo, full_hi, end = _tile_ranges(q_lo, q_hi, col_valid, BLOCK_M)
        args = (k, v, q_head, do_head, STATS, ROWS, LO, HI, row_base, n_rows, start_n, offs_n)
        dk, dv = _dkdv_tiles(dk, dv, *args, first, full_lo, scale_log2, stride_qt, stride_dot, T, HEAD_DIM, MODE,
                             IEEE, True, BLOCK_M, BLOCK_N)
        dk, dv = _dkdv_tiles(dk, dv, *args, full_lo, full_hi, scale_log2, stride_qt, stride_dot, T, HEAD_DIM, MODE,
                             IEEE, False, BLOCK_M, BLOCK_N)
        dk, dv = _dkdv_tiles(dk, dv, *args, full_hi, end, scale_log2, stride_qt, stride_dot, T, HEAD_DIM, MODE,
                             IEEE, True, BLOCK_M, BLOCK_N)

    out_mask = col_valid[:, None]
    k_rows = _rows(KIDX + bhk.to(tl.int64) * T, offs_n, T, MODE)
    tl.store(DK + k_rows[:, None] * HEAD_DIM + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + k_rows[:, None] * HEAD_DIM + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_tiles(dq, q, do, shift, log2_l, delta, K, V, lo, hi, tile_start, tile_end, scale_log2, stride_kt, stride_vt,
              T, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in tl.range(tile_start, tile_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            key_valid = offs_n[None, :] < T
            kt = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None], mask=key_valid, other=0.0)
            vt = tl.load(V + offs_n[None, :] * stride_vt + offs_d[:, None], mask=key_valid, other=0.0)
        else:
            kt = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None])
            vt = tl.load(V + offs_n[None, :] * stride_vt + offs_d[:, None])
        p = tl.math.exp2(_scaled_minus_stats(_dot(q, kt, IEEE), scale_log2, shift[:, None], log2_l[:, None], IEEE))
        if MASKED:
            visible = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
            p = tl.where(visible, p, 0.0)
        ds = p * (_dot(do, vt, IEEE) - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), IEEE)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, STATS, ROWS, DQ, LO, HI, QIDX, scale_log2, scale,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   H, H_KV, T, HEAD_DIM: tl.constexpr, MODE: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    scale_log2 = tl.cast(scale_log2, tl.float32)  # torch.compile passes Python floats as float64
    scale = tl.cast(scale, tl.float32)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // (H // H_KV)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    DO += b * stride_dob + h * stride_doh
    row_base = bh.to(tl.int64) * T
    n_rows = tl.num_programs(1).to(tl.int64) * T
    LO += row_base
    HI += row_base
    DQ += row_base * HEAD_DIM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < T
    lo, hi = _windows(LO, HI, offs_m, T, MODE, False)
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_valid[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_valid[:, None], other=0.0)
    shift, log2_l, delta = _row_terms(STATS, ROWS, row_base + offs_m, n_rows, row_valid, IEEE)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first, full_lo, full_hi, end = _tile_ranges(lo, hi, row_valid, BLOCK_N)
    args = (q, do, shift, log2_l, delta, K, V, lo, hi)
    dq = _dq_tiles(dq, *args, first, full_lo, scale_log2, stride_kt, stride_vt, T, HEAD_DIM, IEEE, True, BLOCK_N)
    dq = _dq_tiles(dq, *args, full_lo, full_hi, scale_log2, stride_kt, stride_vt, T, HEAD_DIM, IEEE, False, BLOCK_N)
    dq = _dq_tiles(dq, *args, full_hi, end, scale_log2, stride_kt, stride_vt, T, HEAD_DIM, IEEE, True, BLOCK_N)

    q_rows = _rows(QIDX + row_base, offs_m, T, MODE)
    tl.store(DQ + q_rows[:, None] * HEAD_DIM + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_valid[:, None])


@triton.jit
def _gather_rows_kernel(SRC, IDX, LO, HI, DST, stride_b, stride_h, stride_t, H, T, HEAD_DIM: tl.constexpr,
                        BLOCK: tl.constexpr):
    """DST's row r of head bh = SRC's row IDX[r] if its window [LO[r], HI[r]) is non-empty, else 0."""
    bh = tl.program_id(1)
    row_base = bh.to(tl.int64) * T
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    lo, hi = _windows(LO + row_base, HI + row_base, offs, T, 2, False)
    seen = lo < hi
    rows = tl.load(IDX + row_base + offs, mask=seen, other=0)
    SRC += (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    x = tl.load(SRC + rows[:, None] * stride_t + offs_d[None, :], mask=seen[:, None], other=0.0)
    tl.store(DST + row_base * HEAD_DIM + offs[:, None] * HEAD_DIM + offs_d[None, :], x, mask=(offs < T)[:, None])


@triton.jit
def _qk_sparse_windows_kernel(Q_KEEP, K_KEEP, Q_ORDER, K_ORDER, WINDOWS, T, n_rows, BLOCK: tl.constexpr):
    """The frame of QK-sparse attention at positions [chunk * BLOCK, (chunk + 1) * BLOCK) of one
    (batch, head); see ``qk_sparse_windows``. Every program counts the whole row's kept tokens itself
    (the totals place the dropped ones; the counts before its chunk are its prefix), so the chunks of
    a row run in parallel in one launch."""
    chunk_start = tl.program_id(0) * BLOCK
    base = tl.program_id(1).to(tl.int64) * T
    offs = tl.arange(0, BLOCK)
    n_q = tl.full([], 0, tl.int32)
    n_k = tl.full([], 0, tl.int32)
    q_before = tl.full([], 0, tl.int32)
    k_before = tl.full([], 0, tl.int32)
    for start in tl.range(0, T, BLOCK):
        valid = start + offs < T
        q_count = tl.sum(tl.load(Q_KEEP + base + start + offs, mask=valid, other=0).to(tl.int32), 0)
        k_count = tl.sum(tl.load(K_KEEP + base + start + offs, mask=valid, other=0).to(tl.int32), 0)
        n_q += q_count
        n_k += k_count
        q_before += tl.where(start < chunk_start, q_count, 0)
        k_before += tl.where(start < chunk_start, k_count, 0)
    pos = chunk_start + offs
    valid = pos < T
    q_kept = tl.load(Q_KEEP + base + pos, mask=valid, other=0).to(tl.int32)
    k_kept = tl.load(K_KEEP + base + pos, mask=valid, other=0).to(tl.int32)
    q_upto = q_before + tl.cumsum(q_kept, 0)  # kept queries at positions <= pos
    k_upto = k_before + tl.cumsum(k_kept, 0)
    # Kept tokens first, then the dropped ones, each in time order.
    q_rank = base + tl.where(q_kept > 0, q_upto - 1, n_q + pos - q_upto)
    k_rank = base + tl.where(k_kept > 0, k_upto - 1, n_k + pos - k_upto)
    tl.store(Q_ORDER + q_rank, pos, mask=valid)
    tl.store(K_ORDER + k_rank, pos, mask=valid)
    # A kept query sees the kept keys up to its position; a dropped one nothing, at the kept keys' end.
    tl.store(WINDOWS + q_rank, tl.where(q_kept > 0, 0, n_k), mask=valid)
    tl.store(WINDOWS + n_rows + q_rank, tl.where(q_kept > 0, k_upto, n_k), mask=valid)
    # A kept key is seen by the kept queries from its position on; a dropped one by none.
    tl.store(WINDOWS + 2 * n_rows + k_rank, tl.where(k_kept > 0, q_upto - q_kept, T), mask=valid)
    tl.store(WINDOWS + 3 * n_rows + k_rank, tl.where(k_kept > 0, n_q, T), mask=valid)


_FWD_KERNELS = _variants(_fwd_kernel, _FWD, _FWD_NARROW, _FWD_SHORT, _FP32_ROWS)
_DKDV_KERNELS = _variants(_bwd_dkdv_kernel, _DKDV, _DKDV_NARROW, _DKDV_SHORT, _FP32_COLS)
_DQ_KERNELS = _variants(_bwd_dq_kernel, _DQ, _DQ_NARROW, _DQ_SHORT, _FP32_ROWS)


def _mode(windows: torch.Tensor | None, causal: bool) -> int:
    if windows is not None:
        return MODE_WINDOW
    return MODE_CAUSAL if causal else MODE_FULL


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _in_frame(x: torch.Tensor, order: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """x's rows in the windows' frame, contiguous: row r of head (b, h) is x[b, h, order[b, h, r]], or
    zeros where the window [lo, hi) of row r is empty (such rows are read only under masks)."""
    B, H, T, D = x.shape
    framed = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    block = 16 if INTERPRET else 64
    wrap_triton(_gather_rows_kernel)[(triton.cdiv(T, block), B * H)](
        x, order, lo, hi, framed, *_strides(x), H, T, HEAD_DIM=D, BLOCK=block)
    return framed


def qk_sparse_windows(q_keep: torch.Tensor, k_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q_order, k_order, windows) of QK-sparse attention for bool keep masks (B, H, T), in one launch:
    the orders (int32 (B, H, T)) put the kept tokens first and the dropped ones after, each in time
    order; ``windows`` (int32 (4, B, H, T)) are row_lo, row_hi, col_lo, col_hi in that frame (see
    ``attention_forward``): a kept query sees the kept keys up to its position, a dropped one none
    (the window [n_k, n_k)); a kept key is seen by the kept queries from its position on, a dropped
    one by none ([T, T))."""
    B, H, T = q_keep.shape
    q_order, k_order = (torch.empty((B, H, T), dtype=torch.int32, device=q_keep.device) for _ in range(2))
    windows = torch.empty((4, B, H, T), dtype=torch.int32, device=q_keep.device)
    # One program per 2048 positions of a row (8 warps): one per (batch, head) walking the row left
    # most of an H100 idle (64 programs at B = 4, H = 16) and took 0.475 ms at T = 16k.
    block = 64 if INTERPRET else 2048
    wrap_triton(_qk_sparse_windows_kernel)[(triton.cdiv(T, block), B * H)](
        q_keep.contiguous().view(torch.uint8), k_keep.contiguous().view(torch.uint8), q_order, k_order, windows, T,
        B * H * T, BLOCK=block, num_warps=8)
    return q_order, k_order, windows


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: torch.Tensor | None,
                      q_order: torch.Tensor | None, k_order: torch.Tensor | None, causal: bool,
                      softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the forward on q (B, H, T, D) and k, v (B, H_KV, T, D), H_KV dividing H (grouped-query
    attention); returns (out contiguous, stats fp32 (2, B, H, T), k_read, v_read): k_read and v_read
    are what the kernels read, k and v themselves or, with windows, their frames, which the backward
    takes in their place.

    Row i's probabilities are 2^(s_ij * scale * log2(e) - stats[0, i] - stats[1, i]) (row maximum
    and log2 of the row sum; +inf and 0 for rows that see no key).

    With ``windows`` (int32, contiguous (4, B, H, T): row_lo, row_hi, col_lo, col_hi) and the orders
    (int32, contiguous (B, H, T): ``q_order``, ``k_order``) the kernels work in the reordered frame:
    its row r is query q_order[r], its column c is key k_order[c], row r sees the columns
    [row_lo[r], row_hi[r]), column c is seen by the rows [col_lo[c], col_hi[c]), and ``causal`` is
    ignored. Inputs and outputs stay in the original order; ``stats`` are per reordered row.
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, T, D = q.shape
    out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    stats = torch.empty((2, B, H, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, stats, torch.empty_like(k), torch.empty_like(v)
    mode = _mode(windows, causal)
    if mode == MODE_WINDOW:
        row_lo, row_hi, col_lo, col_hi = windows
        k, v = _in_frame(k, k_order, col_lo, col_hi), _in_frame(v, k_order, col_lo, col_hi)
    else:  # MODE_FULL/MODE_CAUSAL read no windows
        row_lo = row_hi = q_order = torch.empty(1, dtype=torch.int32, device=q.device)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]), B * H)

    wrap_triton(_pick(_FWD_KERNELS, q))[grid](
        q, k, v, out, stats, row_lo, row_hi, q_order, softmax_scale * LOG2E, *_strides(q), *_strides(k),
        *_strides(v), H, k.shape[1], T, HEAD_DIM=D, MODE=mode, IEEE=q.dtype == torch.float32)
    return out, stats, k, v


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       stats: torch.Tensor, windows: torch.Tensor | None, q_order: torch.Tensor | None,
                       k_order: torch.Tensor | None, causal: bool,
                       softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the backward; returns contiguous (dq, dk, dv). ``out`` is the forward's (contiguous);
    with windows, k and v are the frames the forward read (its k_read, v_read), so they are not
    gathered twice."""
    q, k, v, dout = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(dout)
    out = out.contiguous()
    B, H, T, D = q.shape
    H_KV = k.shape[1]
    dq = torch.empty_like(out)
    dk, dv = [torch.empty((B, H_KV, T, D), dtype=k.dtype, device=k.device) for _ in range(2)]
    if out.numel() == 0:
        return dq, dk, dv
    mode = _mode(windows, causal)
    rows = torch.empty((B, H, T, 2), dtype=torch.float32, device=q.device)  # see _row_terms
    if mode == MODE_WINDOW:
        row_lo, row_hi, col_lo, col_hi = windows
        q = _in_frame(q, q_order, row_lo, row_hi)
        dout_read = torch.empty_like(q)  # dO in the frame, written by the preprocess
    else:  # MODE_FULL/MODE_CAUSAL read no windows
        row_lo = row_hi = col_lo = col_hi = q_order = k_order = torch.empty(1, dtype=torch.int32, device=q.device)
        dout_read = dout
    block = 16 if INTERPRET else 64
    wrap_triton(_bwd_preprocess_kernel)[(triton.cdiv(T, block), B * H)](
        out, dout, dout_read, stats, rows, row_lo, row_hi, q_order, *_strides(dout), H, T, HEAD_DIM=D, MODE=mode,
        BLOCK_M=block)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout_read))
    ieee = q.dtype == torch.float32

    def grid_n(meta):
        return (triton.cdiv(T, meta["BLOCK_N"]), B * H_KV)

    def grid_m(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]), B * H)

    wrap_triton(_pick(_DKDV_KERNELS, q))[grid_n](
        q, k, v, dout_read, stats, rows, dk, dv, row_lo, row_hi, col_lo, col_hi, k_order,
        softmax_scale * LOG2E, softmax_scale,
        *strides, H, H_KV, T, HEAD_DIM=D, MODE=mode, IEEE=ieee)
    wrap_triton(_pick(_DQ_KERNELS, q))[grid_m](
        q, k, v, dout_read, stats, rows, dq, row_lo, row_hi, q_order, softmax_scale * LOG2E, softmax_scale,
        *strides, H, H_KV, T, HEAD_DIM=D, MODE=mode, IEEE=ieee)
    return dq, dk, dv

