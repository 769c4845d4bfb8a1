"""Cross-entropy over rows of logits, with the gradient written over the logits in place.

One program per row. The first pass keeps a running maximum and sum of exponentials per lane
(one read of the row) and gives the row's log-sum-exp and loss; the second pass, when asked,
overwrites the row with (softmax - one_hot(label)) * scale, the loss gradient. The fused linear
cross-entropy calls it on one chunk of logits at a time, so full-vocabulary logits never exist in
float32, and their gradient takes no memory of its own. Math in float32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Under the interpreter (CPU tests) a small block still crosses several blocks per row.
MAX_BLOCK = 64 if INTERPRET else 4096


@triton.jit
def _cross_entropy_rows_kernel(LOGITS, LABELS, LOSS, SCALE, V, stride_row, ignore_index,
                               COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    LOGITS += row * stride_row
    label = tl.load(LABELS + row).to(tl.int64)
    ignored = label == ignore_index
    # A label outside [0, V) poisons its row with NaN rather than reading out of bounds.
    bad = (~ignored) & ((label < 0) | (label >= V))
    offs = tl.arange(0, BLOCK)

    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(LOGITS + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that have seen only padding
        s = s * tl.exp(m - m_sub) + tl.exp(x - m_sub)
        m = m_new
    row_max = tl.max(m, 0)
    log_sum = tl.log(tl.sum(s * tl.exp(m - row_max), 0))
    lse = row_max + log_sum
    picked = tl.load(LOGITS + label, mask=(~ignored) & (~bad), other=0.0).to(tl.float32)
    loss = tl.where(ignored, 0.0, lse - picked)
    tl.store(LOSS + row, tl.where(bad, float("nan"), loss))

    if COMPUTE_GRAD:
        scale = tl.where(ignored, 0.0, tl.load(SCALE))
        scale = tl.where(bad, float("nan"), scale)
        for start in range(0, V, BLOCK):
            cols = start + offs
            x = tl.load(LOGITS + cols, mask=cols < V, other=0.0).to(tl.float32)
            # x - row_max, not x - lse: lse's rounding (half an ulp of the row maximum) would reach
            # every probability, where x - row_max is exact near the maximum (as in torch's softmax).
            grad = (tl.exp((x - row_max) - log_sum) - tl.where(cols == label, 1.0, 0.0)) * scale
            tl.store(LOGITS + cols, grad.to(LOGITS.dtype.element_ty), mask=cols < V)


def cross_entropy_rows_(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor,
                        ignore_index: int, compute_grad: bool) -> None:
    """Per-row losses of ``logits`` (N, V), unit stride along V, into ``loss`` (N,) float32; with
    ``compute_grad`` the rows become their gradients times ``scale`` (a float32 (1,) tensor)."""
    N, V = logits.shape
    if N == 0:
        return
    block = min(MAX_BLOCK, triton.next_power_of_2(V))
    _cross_entropy_rows_kernel[(N,)](logits, labels, loss, scale, V, logits.stride(0), ignore_index,
                                     COMPUTE_GRAD=compute_grad, BLOCK=block, num_warps=8 if block >= 2048 else 4)
