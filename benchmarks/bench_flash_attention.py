"""Causal attention, forward + backward: fastllm's dense, QK-sparse and hash-sparse Triton kernels
against torch SDPA (cuDNN and flash backends) and FlexAttention with an equivalent block mask.

GPU only (skips without CUDA). bf16, B = 4, H = 16. The default run covers the issue's targets
(dense at T = 8k and 16k, QK-sparse with 50% of queries and keys dropped and hash-sparse with 8
buckets at T = 16k, head dim 64) in about three minutes on an H100, autotuning included;
FASTLLM_BENCH_ATTENTION_FULL=1 runs the whole grid (T 2k..16k, head dims 64 and 128, drop rates
0.3/0.5/0.7, 4/8/16 buckets). Sparse times include compaction / sorting and scattering;
FlexAttention's block-mask build is timed on its own (group "... block mask build").
TFLOP/s count the visible (query, key) pairs only: 4 D flops per pair forward, 10 D backward.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from fastllm.ops import flash_attention, hash_sparse_attention, qk_sparse_attention
from fastllm.ops.flash_attention_ref import hash_sparse_attention_reference, qk_sparse_attention_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

B, H = 4, 16
FULL = os.environ.get("FASTLLM_BENCH_ATTENTION_FULL", "0") not in ("", "0")
SEQ_LENS = [2048, 4096, 8192, 16384] if FULL else [8192, 16384]
HEAD_DIMS = [64, 128] if FULL else [64]
DROP_RATES = [0.3, 0.5, 0.7] if FULL else [0.5]
BUCKETS = [4, 8, 16] if FULL else [8]
SPARSE_SEQ_LENS = SEQ_LENS if FULL else [16384]
DENSE_IMPLS = ["fastllm_flash", "sdpa_cudnn", "sdpa_flash", "flex_attention"]
SPARSE_IMPLS = ["fastllm_sparse", "sdpa_cudnn_dense", "flex_attention"]


def _qkv(T, D):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(3)]


def _fwd_bwd(attend, q, k, v, dout):
    return lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), dout)


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    def attend(q, k, v):
        with sdpa_kernel(backend):
            return scaled_dot_product_attention(q, k, v, is_causal=True)
    return attend


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def _block_mask(mask_mod, T, per_head: bool):
    """FlexAttention's block mask; a mask that differs per (batch, head) is built compiled, which
    avoids materialising the (B, H, T, T) element mask (over 100 GB at T = 16k)."""
    from torch.nn.attention.flex_attention import create_block_mask
    if per_head:
        return create_block_mask(mask_mod, B, H, T, T, device="cuda", _compile=True)
    return create_block_mask(mask_mod, None, None, T, T, device="cuda")


def _flex(mask_mod, T, per_head: bool = True):
    block_mask = _block_mask(mask_mod, T, per_head)
    return lambda q, k, v: _compiled_flex()(q, k, v, block_mask=block_mask)


def _flops(pairs: float, D: int) -> float:
    return pairs * D * (4 + 10)


def _sdpa_impl(name):
    from torch.nn.attention import SDPBackend
    backend = SDPBackend.FLASH_ATTENTION if name == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION
    return _sdpa(backend)


@pytest.mark.parametrize("impl", DENSE_IMPLS)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("T", SEQ_LENS)
def test_dense_cuda(timer, T, D, impl):
    q, k, v = _qkv(T, D)
    dout = torch.randn_like(q)
    if impl == "fastllm_flash":
        attend = flash_attention
        # Same-run sanity check against cuDNN (bf16 outputs of two exact-softmax kernels).
        with torch.no_grad():
            err = (attend(q, k, v).float() - _sdpa_impl("sdpa_cudnn")(q, k, v).float()).abs().max().item()
        assert err < 3e-2, f"fastllm flash_attention differs from SDPA cuDNN by {err}"
    elif impl == "flex_attention":
        attend = _flex(lambda b, h, qi, ki: ki <= qi, T, per_head=False)
    else:
        attend = _sdpa_impl(impl)
    timer(_fwd_bwd(attend, q, k, v, dout), group=f"attn fwd+bwd dense T={T} D={D}", name=impl, device="cuda",
          flops=_flops(B * H * T * (T + 1) / 2, D), rounds=10 if T >= 8192 else 20)


@pytest.mark.parametrize("impl", ["fastllm_flash", "sdpa_cudnn"])
@pytest.mark.parametrize("T", SEQ_LENS)
def test_dense_forward_cuda(timer, T, impl):
    """Forward alone (D = 64): with the forward + backward groups, it splits the time between the passes."""
    q, k, v = _qkv(T, 64)
    attend = flash_attention if impl == "fastllm_flash" else _sdpa_impl(impl)

    def forward():
        with torch.no_grad():
            attend(q, k, v)
    timer(forward, group=f"attn fwd dense T={T} D=64", name=impl, device="cuda",
          flops=B * H * T * (T + 1) / 2 * 64 * 4, rounds=20)


def _sparse_case(kind, T, rate_or_buckets):
    g = torch.Generator(device="cuda").manual_seed(1)
    if kind == "qk":
        q_keep = torch.rand(B, H, T, device="cuda", generator=g) >= rate_or_buckets
        k_keep = torch.rand(B, H, T, device="cuda", generator=g) >= rate_or_buckets
        pairs = (q_keep * torch.cumsum(k_keep, -1)).sum().item()

        def ours(q, k, v):
            return qk_sparse_attention(q, k, v, q_keep, k_keep)

        def mask_mod(b, h, qi, ki):
            return q_keep[b, h, qi] & k_keep[b, h, ki] & (ki <= qi)
    else:
        buckets = torch.randint(0, rate_or_buckets, (B, H, T), device="cuda", generator=g)
        one_hot = torch.nn.functional.one_hot(buckets, rate_or_buckets)
        pairs = (one_hot.cumsum(-2) * one_hot).sum().item()  # per query: earlier keys in its bucket

        def ours(q, k, v):
            return hash_sparse_attention(q, k, v, buckets, buckets)

        def mask_mod(b, h, qi, ki):
            return (buckets[b, h, qi] == buckets[b, h, ki]) & (ki <= qi)

        def reference(q, k, v, rows):
            return hash_sparse_attention_reference(q, k, v, buckets[rows], buckets[rows])
    if kind == "qk":
        def reference(q, k, v, rows):
            return qk_sparse_attention_reference(q, k, v, q_keep[rows], k_keep[rows])
    return ours, mask_mod, pairs, reference


@pytest.mark.parametrize("impl", ["causal_mode", "window_mode"])
def test_window_path_overhead_cuda(timer, impl):
    """Dense causal attention at T = 16k, D = 64 through the sparse attentions' windowed kernels (identity
    orders, windows [0, i + 1)) against the causal mode: the same tiles, so the ratio is what gathering
    the rows into the windows' order and reading the windows cost. (T = 16k shares the autotuning of the
    dense and sparse cases.)"""
    from fastllm.ops.flash_attention import _windowed

    T = 16384
    q, k, v = _qkv(T, 64)
    dout = torch.randn_like(q)
    if impl == "causal_mode":
        attend = flash_attention
    else:
        order = torch.arange(T, device="cuda", dtype=torch.int32).expand(B, H, T).contiguous()
        row_lo, row_hi = torch.zeros_like(order), order + 1

        def attend(q, k, v):
            return _windowed(q, k, v, order, order, row_lo, row_hi, q.shape[-1] ** -0.5)
        with torch.no_grad():
            err = (attend(q, k, v).float() - flash_attention(q, k, v).float()).abs().max().item()
        assert err < 1e-2, f"the windowed path differs from the causal mode by {err}"
    timer(_fwd_bwd(attend, q, k, v, dout), group=f"attn fwd+bwd causal T={T} D=64, kernel path", name=impl,
          device="cuda", flops=_flops(B * H * T * (T + 1) / 2, 64), rounds=10)


SPARSE_CASES = [("qk", rate) for rate in DROP_RATES] + [("hash", n) for n in BUCKETS]


@pytest.mark.parametrize("impl", SPARSE_IMPLS)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("T", SPARSE_SEQ_LENS)
@pytest.mark.parametrize("case", SPARSE_CASES, ids=[f"{k}{x}" for k, x in SPARSE_CASES])
def test_sparse_cuda(timer, case, T, D, impl):
    kind, param = case
    q, k, v = _qkv(T, D)
    dout = torch.randn_like(q)
    ours, mask_mod, pairs, reference = _sparse_case(kind, T, param)
    label = f"drop={param}" if kind == "qk" else f"buckets={param}"
    group = f"attn fwd+bwd {kind}-sparse {label} T={T} D={D}"
    if impl == "fastllm_sparse":
        attend = ours
        # Same-run sanity check against the fp32 reference on two heads of the first sequence.
        rows = (slice(0, 1), slice(0, 2))
        with torch.no_grad():
            expected = reference(*(t[rows].float() for t in (q, k, v)), rows)
            err = (ours(q, k, v)[rows].float() - expected).abs().max().item()
        assert err < 3e-2, f"fastllm {kind}-sparse attention differs from the reference by {err}"
    elif impl == "flex_attention":
        attend = _flex(mask_mod, T)
    else:
        attend = _sdpa_impl(impl)
    timer(_fwd_bwd(attend, q, k, v, dout), group=group, name=impl, device="cuda", flops=_flops(pairs, D))


@pytest.mark.parametrize("T", SPARSE_SEQ_LENS)
@pytest.mark.parametrize("case", SPARSE_CASES, ids=[f"{k}{x}" for k, x in SPARSE_CASES])
def test_flex_block_mask_build_cuda(timer, case, T):
    """What FlexAttention pays for every new mask (fastllm's sparse ops need no such step)."""
    kind, param = case
    _, mask_mod, _, _ = _sparse_case(kind, T, param)
    label = f"drop={param}" if kind == "qk" else f"buckets={param}"
    timer(lambda: _block_mask(mask_mod, T, per_head=True),
          group=f"{kind}-sparse {label} T={T} block mask build", name="flex_create_block_mask", device="cuda",
          rounds=5)


@pytest.mark.parametrize("impl", ["fastllm_frame_kernel", "torch_ops"])
def test_qk_sparse_frame_cuda(timer, impl):
    """QK-sparse attention's set-up at T = 16k, half of the queries and keys dropped: both orders and
    the windows of rows and columns, from one Triton launch or from the torch ops it replaced."""
    from fastllm.ops.flash_attention import _kernels, qk_sparse_windows

    T = 16384
    g = torch.Generator(device="cuda").manual_seed(1)
    q_keep, k_keep = (torch.rand(B, H, T, device="cuda", generator=g) >= 0.5 for _ in range(2))
    build = _kernels.qk_sparse_windows if impl == "fastllm_frame_kernel" else qk_sparse_windows
    timer(lambda: build(q_keep, k_keep), group=f"qk-sparse drop=0.5 T={T} frame", name=impl, device="cuda",
          bytes_moved=2 * B * H * T + 6 * 4 * B * H * T, rounds=50)
