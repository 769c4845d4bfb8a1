"""Dense, QK-sparse and hash-sparse flash attention against the fp64 math reference.

On a machine without a GPU the Triton kernels run in the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) on CPU tensors, in float32 and float16 at small sizes.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fastllm.ops import flash_attention, hash_sparse_attention, qk_sparse_attention, use_backend
from fastllm.ops.flash_attention_ref import (
    flash_attention_reference,
    hash_sparse_attention_reference,
    qk_sparse_attention_reference,
)
from fastllm.testing import BACKWARD_FACTOR, assert_error_ratio, requires_cuda

# The module, not the function fastllm.ops.flash_attention that shadows it as an attribute.
fa = importlib.import_module("fastllm.ops.flash_attention")

pytestmark = pytest.mark.skipif(fa._kernels is None, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_CPU = DEVICE == "cpu"


def _inputs(shape, dtype, device=DEVICE, scale=1.0):
    return [(torch.randn(shape, dtype=torch.float64, device=device) * scale) for _ in range(3)]


def _check(op, reference, shape, dtype, *extra, scale=1.0, softmax_scale=None, grad_floor=None, device=DEVICE):
    """Forward and every gradient of ``op`` in ``dtype`` against the fp64 reference, with the
    same-precision reference as the baseline of the error-ratio rule. Returns the output and grads.

    ``grad_floor``: for gradients that are exactly zero in exact arithmetic (a query that sees one
    key has dq = 0), which the kernel rounds to a few ulps of its O(1) intermediates."""
    q64, k64, v64 = [t.requires_grad_() for t in _inputs(shape, dtype, device, scale=scale)]
    qkv = [t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64)]
    base = [t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64)]
    out = op(*qkv, *extra, softmax_scale=softmax_scale)
    ref = reference(q64, k64, v64, *extra, softmax_scale=softmax_scale)
    out_base = reference(*base, *extra, softmax_scale=softmax_scale)
    assert out.dtype == dtype and out.shape == q64.shape
    assert_error_ratio("out", out, ref, out_base)
    dout = torch.randn_like(ref)
    out.backward(dout.to(dtype))
    ref.backward(dout)
    out_base.backward(dout.to(dtype))
    for name, t, t64, tb in zip(("dq", "dk", "dv"), qkv, (q64, k64, v64), base):
        assert_error_ratio(name, t.grad, t64.grad, tb.grad, factor=BACKWARD_FACTOR, floor=grad_floor)
    return out.detach(), [t.grad for t in qkv]


DTYPES = [torch.float32, torch.float16]
ULPS_OF_ONE = 16 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_dense_matches_reference(dtype, causal):
    _check(lambda q, k, v, softmax_scale: flash_attention(q, k, v, causal, softmax_scale),
           lambda q, k, v, softmax_scale: flash_attention_reference(q, k, v, causal, softmax_scale),
           (1, 2, 21, 16), dtype, scale=1.5)


# Several heads at T = 18: the maximum error over a few hundred elements is a noisy statistic.
@pytest.mark.parametrize("shape", [(1, 1, 1, 32), (2, 1, 17, 64), (2, 3, 18, 128)])
def test_dense_shapes_and_scale(shape):
    _check(lambda q, k, v, softmax_scale: flash_attention(q, k, v, True, softmax_scale),
           lambda q, k, v, softmax_scale: flash_attention_reference(q, k, v, True, softmax_scale),
           shape, torch.float32, softmax_scale=0.3, grad_floor=ULPS_OF_ONE)  # row 0 sees one key: dq = 0


def test_dense_noncontiguous_inputs():
    # (B, T, H, D) transposed to (B, H, T, D), as attention layers produce them.
    q, k, v = [t.transpose(1, 2) for t in _inputs((2, 19, 3, 16), torch.float32)]
    out = flash_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out, flash_attention_reference(q, k, v).float(), atol=1e-5, rtol=1e-5)


def _layer_layout(t):
    """t's values laid out (B, T, H, D) and viewed as (B, H, T, D), as attention layers produce them."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("op,reference,per_token", [
    (qk_sparse_attention, qk_sparse_attention_reference, lambda s: torch.rand(s, device=DEVICE) < 0.6),
    (hash_sparse_attention, hash_sparse_attention_reference, lambda s: torch.randint(0, 3, s, device=DEVICE)),
])
def test_sparse_noncontiguous_inputs(op, reference, per_token):
    # The sparse kernels gather rows into the windows' order through the inputs' strides.
    shape = (2, 3, 19, 16)
    extra = (per_token(shape[:3]), per_token(shape[:3]))
    _check(lambda q, k, v, *e, softmax_scale: op(*map(_layer_layout, (q, k, v)), *e, softmax_scale=softmax_scale),
           reference, shape, torch.float32, *extra, grad_floor=ULPS_OF_ONE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_sparse_matches_reference(dtype):
    shape = (1, 2, 27, 16)
    q_keep = torch.rand(shape[:3], device=DEVICE) < 0.6
    k_keep = torch.rand(shape[:3], device=DEVICE) < 0.5
    out, (dq, _, _) = _check(qk_sparse_attention, qk_sparse_attention_reference, shape, dtype, q_keep, k_keep)
    # Dropped queries, and kept ones that see no kept key, give exact zeros and zero gradients.
    sees_nothing = ~q_keep | (torch.cumsum(k_keep, -1) == 0)
    assert sees_nothing.any()
    assert (out[sees_nothing] == 0).all() and (dq[sees_nothing] == 0).all()


@pytest.mark.parametrize("case", ["all_queries_dropped", "all_keys_dropped", "all_kept", "T1"])
def test_qk_sparse_edge_cases(case):
    shape = (1, 2, 1 if case == "T1" else 18, 16)
    q_keep = torch.ones(shape[:3], dtype=torch.bool, device=DEVICE)
    k_keep = torch.ones_like(q_keep)
    if case == "all_queries_dropped":
        q_keep[:] = False
    elif case == "all_keys_dropped":
        k_keep[:] = False
    out, grads = _check(qk_sparse_attention, qk_sparse_attention_reference, shape, torch.float32, q_keep, k_keep,
                        grad_floor=ULPS_OF_ONE)
    if case.startswith("all_") and case != "all_kept":
        assert (out == 0).all() and all((g == 0).all() for g in grads)
    if case == "all_kept":  # equals dense causal attention
        q, k, v = _inputs(shape, torch.float32)
        torch.testing.assert_close(qk_sparse_attention(q.float(), k.float(), v.float(), q_keep, k_keep),
                                   flash_attention(q.float(), k.float(), v.float()), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hash_sparse_matches_reference(dtype):
    shape = (1, 2, 29, 16)
    q_buckets = torch.randint(0, 3, shape[:3], device=DEVICE)
    k_buckets = torch.randint(0, 3, shape[:3], device=DEVICE, dtype=torch.int32)
    _check(hash_sparse_attention, hash_sparse_attention_reference, shape, dtype, q_buckets, k_buckets)


@pytest.mark.parametrize("case", ["one_bucket", "own_buckets", "empty_buckets", "T1"])
def test_hash_sparse_edge_cases(case):
    shape = (1, 2, 1 if case == "T1" else 23, 16)
    T = shape[2]
    if case in ("one_bucket", "T1"):
        q_buckets = torch.full(shape[:3], 7, device=DEVICE)
        k_buckets = q_buckets.clone()
    elif case == "own_buckets":
        q_buckets = torch.arange(T, device=DEVICE).expand(shape[:3]).flip(-1)
        k_buckets = q_buckets.clone()
    else:  # sparse bucket ids, some of them only in the queries, some only in the keys, negatives too
        q_buckets = torch.tensor([-4, 2, 9, 40], device=DEVICE)[torch.randint(0, 4, shape[:3], device=DEVICE)]
        k_buckets = torch.tensor([-4, 9, 40, 41], device=DEVICE)[torch.randint(0, 4, shape[:3], device=DEVICE)]
    out, grads = _check(hash_sparse_attention, hash_sparse_attention_reference, shape, torch.float32,
                        q_buckets, k_buckets, grad_floor=ULPS_OF_ONE)
    q, k, v = [t.float() for t in _inputs(shape, torch.float32)]
    if case == "one_bucket":
        torch.testing.assert_close(hash_sparse_attention(q, k, v, q_buckets, k_buckets), flash_attention(q, k, v),
                                   atol=1e-6, rtol=1e-6)
    if case == "own_buckets":  # every query sees only itself
        torch.testing.assert_close(hash_sparse_attention(q, k, v, q_buckets, k_buckets), v)
    if case == "empty_buckets":
        lonely = q_buckets == 2
        assert lonely.any() and (out[lonely] == 0).all() and (grads[0][lonely] == 0).all()


def test_one_tensor_for_both_sides():
    """The same buckets (shared-QK hashing) or keep mask for queries and keys: sorted or partitioned once."""
    shape = (2, 2, 37, 16)
    buckets = torch.randint(-3, 3, shape[:3], device=DEVICE)
    _check(hash_sparse_attention, hash_sparse_attention_reference, shape, torch.float32, buckets, buckets,
           grad_floor=ULPS_OF_ONE)
    keep = torch.rand(shape[:3], device=DEVICE) < 0.6
    _check(qk_sparse_attention, qk_sparse_attention_reference, shape, torch.float32, keep, keep,
           grad_floor=ULPS_OF_ONE)


@pytest.mark.parametrize("case", ["random", "shared_mask", "all_dropped", "all_kept", "T1"])
def test_qk_sparse_frame_kernel_matches_torch(case):
    """The one-launch frame of QK-sparse attention (orders and windows) equals the torch ops' exactly,
    over several of the kernel's blocks (64 positions under the interpreter)."""
    shape = (2, 3, 1 if case == "T1" else 150)
    q_keep = torch.rand(shape, device=DEVICE) < 0.5
    k_keep = q_keep if case == "shared_mask" else torch.rand(shape, device=DEVICE) < 0.4
    if case == "all_dropped":
        q_keep, k_keep = torch.zeros_like(q_keep), torch.zeros_like(k_keep)
    elif case in ("all_kept", "T1"):
        q_keep, k_keep = torch.ones_like(q_keep), torch.ones_like(k_keep)
    kernel_frame = fa._kernels.qk_sparse_windows(q_keep, k_keep)
    for name, got, expected in zip(("q_order", "k_order", "windows"), kernel_frame,
                                   fa.qk_sparse_windows(q_keep, k_keep)):
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


@pytest.mark.parametrize("case", ["qk", "hash"])
def test_sparse_kernels_never_read_unseen_tokens(case):
    """The kernels read only the queries that see some key and the keys that some query sees (their
    memory traffic scales with the kept tokens): NaN in the others' q, k, v and in the upstream
    gradient of the queries that see nothing changes no output or gradient."""
    if fa.attention_implementation(DEVICE) == "reference":
        pytest.skip("a property of the Triton kernels")
    shape = (2, 2, 45, 16)
    if case == "qk":
        q_keep = torch.rand(shape[:3], device=DEVICE) < 0.5
        k_keep = torch.rand(shape[:3], device=DEVICE) < 0.5
        extra = (q_keep, k_keep)
        op = qk_sparse_attention
        seen = (q_keep[..., :, None] & k_keep[..., None, :]).tril()
    else:  # buckets only queries or only keys have: some keys stay unseen, some queries see nothing
        q_buckets = torch.randint(0, 4, shape[:3], device=DEVICE)
        k_buckets = torch.randint(1, 5, shape[:3], device=DEVICE)
        extra = (q_buckets, k_buckets)
        op = hash_sparse_attention
        seen = (q_buckets[..., :, None] == k_buckets[..., None, :]).tril()
    query_unseen, key_unseen = ~seen.any(-1), ~seen.any(-2)
    assert query_unseen.any() and key_unseen.any() and not query_unseen.all()

    def run(poison):
        q, k, v, dout = [torch.randn(shape, device=DEVICE) for _ in range(4)]
        if poison:
            for t, unseen in ((q, query_unseen), (k, key_unseen), (v, key_unseen), (dout, query_unseen)):
                t[unseen] = float("nan")
        q, k, v = [t.requires_grad_() for t in (q, k, v)]
        out = op(q, k, v, *extra)
        out.backward(dout)
        return [out.detach(), q.grad, k.grad, v.grad]

    torch.manual_seed(0)
    finite = run(poison=False)
    torch.manual_seed(0)
    poisoned = run(poison=True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), finite, poisoned):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_cpu_path_without_interpreter_is_the_reference(monkeypatch):
    """Without the interpreter a CPU tensor runs the math reference, whose backward is written out."""
    monkeypatch.setattr(fa._kernels, "INTERPRET", False)
    shape = (1, 2, 13, 16)
    q_buckets = torch.randint(0, 2, shape[:3])
    for dtype in DTYPES:
        _check(lambda q, k, v, softmax_scale: flash_attention(q, k, v, True, softmax_scale),
               lambda q, k, v, softmax_scale: flash_attention_reference(q, k, v, True, softmax_scale),
               shape, dtype, scale=1.5, device="cpu")
        _check(hash_sparse_attention, hash_sparse_attention_reference, shape, dtype, q_buckets, q_buckets,
               device="cpu")


@pytest.mark.parametrize("path", ["kernels", "cpu_reference", "reference_backend"])
def test_empty_sequences(path, monkeypatch):
    """T = 0: empty outputs and gradients from every op on every path (the math reference used to
    fail on a maximum over no keys)."""
    if path == "cpu_reference":
        monkeypatch.setattr(fa._kernels, "INTERPRET", False)
    device = "cpu" if path == "cpu_reference" else DEVICE
    shape = (2, 3, 0, 16)
    q, k, v = [t.float().requires_grad_() for t in _inputs(shape, torch.float32, device=device)]
    keep = torch.ones(shape[:3], dtype=torch.bool, device=device)
    buckets = torch.zeros(shape[:3], dtype=torch.int64, device=device)
    with use_backend("reference" if path == "reference_backend" else "auto"):
        for out in (flash_attention(q, k, v), flash_attention(q, k, v, causal=False),
                    qk_sparse_attention(q, k, v, keep, keep), hash_sparse_attention(q, k, v, buckets, buckets)):
            assert out.shape == shape
            out.sum().backward()
            assert q.grad.shape == k.grad.shape == v.grad.shape == shape


def test_reference_backend_switch():
    q, k, v = [t.float() for t in _inputs((1, 1, 9, 16), torch.float32)]
    with use_backend("reference"):
        assert fa.attention_implementation("cuda") == "reference"
        torch.testing.assert_close(flash_attention(q, k, v), flash_attention_reference(q, k, v), atol=0, rtol=0)


def test_opcheck():
    q, k, v = [t.float().requires_grad_() for t in _inputs((1, 2, 5, 16), torch.float32)]
    lo = torch.tensor([0, 0, 1, 1, 5], dtype=torch.int32, device=DEVICE).expand(1, 2, 5).contiguous()
    hi = torch.tensor([1, 2, 3, 3, 5], dtype=torch.int32, device=DEVICE).expand(1, 2, 5).contiguous()
    windows = torch.stack([lo, hi, *fa._column_windows(lo, hi)])
    q_order = torch.tensor([3, 0, 4, 1, 2], dtype=torch.int32, device=DEVICE).expand(1, 2, 5).contiguous()
    k_order = torch.tensor([1, 2, 0, 4, 3], dtype=torch.int32, device=DEVICE).expand(1, 2, 5).contiguous()
    # AOT dispatch (12 s here) is covered by test_compile_fullgraph, which traces the same op.
    torch.library.opcheck(fa._forward, (q, k, v, windows, q_order, k_order, True, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("sparsity", ["hash", "qk"])
def test_compile_fullgraph(sparsity):
    """QK-sparse's frame builder runs outside the custom ops, in the Python that dynamo traces: it must
    not call the Triton launch that the interpreter runs on CPU tensors (dynamo cannot trace it)."""
    shape = (1, 2, 17, 16)
    q, k, v = [t.float().requires_grad_() for t in _inputs(shape, torch.float32)]
    if sparsity == "hash":
        buckets = torch.randint(0, 3, shape[:3], device=DEVICE)
        extra, op = (buckets, buckets), hash_sparse_attention
    else:
        extra, op = tuple(torch.rand(shape[:3], device=DEVICE) > 0.3 for _ in range(2)), qk_sparse_attention

    def loss(q, k, v):
        return op(q, k, v, *extra).square().sum()

    # Inductor compiles user Triton kernels for GPUs only; on the CPU aot_eager traces the same graph.
    compiled = torch.compile(loss, fullgraph=True, backend="inductor" if not ON_CPU else "aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_bad_inputs_name_the_argument():
    q, k, v = [t.float() for t in _inputs((1, 2, 8, 16), torch.float32, device="cpu")]
    keep = torch.ones(1, 2, 8, dtype=torch.bool)
    with pytest.raises(TypeError, match="q must have dtype"):
        flash_attention(q.int(), k, v)
    with pytest.raises(TypeError, match="k must have dtype"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="v must have the shape"):
        flash_attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        flash_attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="q_keep must have dtype"):
        qk_sparse_attention(q, k, v, keep.int(), keep)
    with pytest.raises(ValueError, match="k_keep must have the shape"):
        qk_sparse_attention(q, k, v, keep, keep[:, :1])
    with pytest.raises(TypeError, match="k_buckets must have dtype"):
        hash_sparse_attention(q, k, v, keep.long(), keep.float())
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        flash_attention(q, k, None)
    with pytest.raises(ValueError, match="q: head_dim must be at least 1"):
        flash_attention(q[..., :0], k[..., :0], v[..., :0])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="k is on"):
            flash_attention(q, k.cuda(), v)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_all_ops(dtype, head_dim):
    shape = (2, 3, 1000, head_dim)
    _check(lambda q, k, v, softmax_scale: flash_attention(q, k, v, True, softmax_scale),
           lambda q, k, v, softmax_scale: flash_attention_reference(q, k, v, True, softmax_scale), shape, dtype)
    keep = torch.rand(shape[:3], device="cuda")
    _check(qk_sparse_attention, qk_sparse_attention_reference, shape, dtype, keep < 0.5, keep > 0.3)
    buckets = torch.randint(0, 8, shape[:3], device="cuda")
    _check(hash_sparse_attention, hash_sparse_attention_reference, shape, dtype, buckets, buckets.roll(1, -1))


@pytest.mark.parametrize("path", ["kernels", "cpu_reference"])
@pytest.mark.parametrize("causal", [True, False])
def test_dense_grouped_query_heads(causal, path, monkeypatch):
    """k and v with fewer heads than q: every query head of a group reads its group's key/value head."""
    device = DEVICE
    if path == "cpu_reference":
        monkeypatch.setattr(fa._kernels, "INTERPRET", False)
        device = "cpu"
    q64 = torch.randn(1, 4, 19, 16, dtype=torch.float64, device=device, requires_grad=True)
    k64, v64 = [torch.randn(1, 2, 19, 16, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2)]
    q, k, v = [t.detach().float().requires_grad_() for t in (q64, k64, v64)]
    out = flash_attention(q, k, v, causal)
    expanded = [t.repeat_interleave(2, dim=1) for t in (k64, v64)]
    ref = flash_attention_reference(q64, *expanded, causal)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    dout = torch.randn_like(ref)
    out.backward(dout.float())
    ref.backward(dout)
    for t, t64 in zip((q, k, v), (q64, k64, v64)):
        torch.testing.assert_close(t.grad.double(), t64.grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="k must have the shape"):
        flash_attention(q, k[:, :1].expand(1, 3, 19, 16), v)


@pytest.mark.parametrize("which", ["q", "k", "both"])
def test_hash_sparse_noncontiguous_buckets(which):
    """Buckets laid out (B, T, H) and viewed as (B, H, T): the kernels read the sort orders as contiguous
    int32 (B, H, T), so transposed buckets used to give garbage rows on the kernel path."""
    shape = (2, 3, 19, 16)
    laid_out = torch.randint(0, 3, (shape[0], shape[2], shape[1]), device=DEVICE).transpose(1, 2)
    plain = torch.randint(0, 3, shape[:3], device=DEVICE)
    q_buckets = laid_out if which in ("q", "both") else plain
    k_buckets = laid_out if which in ("k", "both") else plain
    assert not laid_out.is_contiguous()
    _check(hash_sparse_attention, hash_sparse_attention_reference, shape, torch.float32, q_buckets, k_buckets,
           grad_floor=ULPS_OF_ONE)


def test_hash_sparse_int64_buckets_outside_int32_are_rejected_on_cpu():
    """The ops sort 32-bit keys: int64 buckets 2^32 apart used to land silently in one bucket."""
    q, k, v = [t.float() for t in _inputs((1, 2, 8, 16), torch.float32, device="cpu")]
    buckets = torch.zeros(1, 2, 8, dtype=torch.int64)
    far = buckets.clone()
    far[..., ::2] = 1 << 32
    with pytest.raises(ValueError, match="q_buckets must hold values in the int32 range"):
        hash_sparse_attention(q, k, v, far, buckets)
    with pytest.raises(ValueError, match="k_buckets must hold values in the int32 range"):
        hash_sparse_attention(q, k, v, buckets, far - (1 << 33))
    edge = torch.tensor([-(1 << 31), (1 << 31) - 1])[torch.randint(0, 2, (1, 2, 8))]
    torch.testing.assert_close(hash_sparse_attention(q, k, v, edge, edge),
                               hash_sparse_attention_reference(q, k, v, edge, edge), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale,error", [(float("inf"), ValueError), ("0.5", TypeError), (1j, TypeError),
                                         (None, None), (torch.tensor(0.5), None)])
def test_softmax_scale_must_be_a_positive_finite_number(scale, error):
    """An infinite scale used to give NaN rows that differ from the reference's; a string or complex a
    bare comparison error that named no argument."""
    q, k, v = [t.float() for t in _inputs((1, 2, 8, 16), torch.float32, device="cpu")]
    keep = torch.ones(1, 2, 8, dtype=torch.bool)
    buckets = torch.zeros(1, 2, 8, dtype=torch.int64)
    for op, extra in ((flash_attention, ()), (qk_sparse_attention, (keep, keep)),
                      (hash_sparse_attention, (buckets, buckets))):
        if error is None:
            op(q, k, v, *extra, softmax_scale=scale)
            continue
        with pytest.raises(error, match="softmax_scale"):
            op(q, k, v, *extra, softmax_scale=scale)
