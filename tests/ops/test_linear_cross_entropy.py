"""Fused linear cross-entropy against the fp64 reference: loss and both gradients, chunked or not.

On a machine without a GPU the Triton row kernel runs in the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); the torch row path is checked against it.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from fastllm.ops import linear_cross_entropy
from fastllm.ops.linear_cross_entropy_ref import linear_cross_entropy_reference
from fastllm.testing import BACKWARD_FACTOR, assert_error_ratio, poison_, requires_cuda

# The module, not the function fastllm.ops.linear_cross_entropy that shadows it as an attribute.
lce = importlib.import_module("fastllm.ops.linear_cross_entropy")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n, d, v, device=DEVICE, ignored=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d) * 3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[list(ignored)] = -100
    return hidden.to(device), weight.to(device), labels.to(device)


def _check(n, d, v, dtype, reduction, chunk_rows=None, ignored=(), device=DEVICE):
    hidden, weight, labels = _inputs(n, d, v, device, ignored)
    h, w = [t.to(dtype).requires_grad_() for t in (hidden, weight)]
    hb, wb = [t.to(dtype).requires_grad_() for t in (hidden, weight)]
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, reduction=reduction, chunk_rows=chunk_rows)
    ref = linear_cross_entropy_reference(h64, w64, labels, reduction=reduction)
    base = linear_cross_entropy_reference(hb, wb, labels, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_error_ratio("loss", loss, ref, base)
    dloss = torch.tensor(1.7, dtype=torch.float64)
    for t, r in ((loss, dloss.float()), (ref, dloss), (base, dloss.float())):
        t.backward(r)
    assert_error_ratio("d hidden", h.grad, h64.grad, hb.grad, factor=BACKWARD_FACTOR)
    assert_error_ratio("d weight", w.grad, w64.grad, wb.grad, factor=BACKWARD_FACTOR)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n,d,v,chunk_rows", [(37, 24, 259, None), (37, 24, 259, 7), (1, 8, 5, None),
                                              (33, 16, 1, 4), (12, 40, 1000, 5)])
def test_matches_reference(n, d, v, chunk_rows, reduction, dtype):
    _check(n, d, v, dtype, reduction, chunk_rows, ignored=(0, n // 2) if n > 2 else ())


def test_torch_row_path_matches_the_kernel(monkeypatch):
    hidden, weight, labels = _inputs(29, 16, 203, ignored=(4,))
    results = []
    for kernels in (lce._kernels, None):
        monkeypatch.setattr(lce, "_kernels", kernels)
        h, w = [t.float().requires_grad_() for t in (hidden, weight)]
        loss = linear_cross_entropy(h, w, labels, chunk_rows=8)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ignored_tokens():
    hidden, weight, labels = _inputs(6, 8, 11)
    labels[:] = -100
    h, w = [t.float().requires_grad_() for t in (hidden, weight)]
    loss = linear_cross_entropy(h, w, labels, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()
    assert math.isnan(linear_cross_entropy(h, w, labels).item())  # a mean over no token, as torch's
    # No tokens at all.
    empty = linear_cross_entropy(h[:0], w, labels[:0], reduction="sum")
    assert empty.item() == 0.0


def test_custom_ignore_index_and_int32_labels():
    hidden, weight, labels = _inputs(10, 8, 13)
    labels[2] = 5
    got = linear_cross_entropy(hidden.float(), weight.float(), labels.int(), ignore_index=5)
    torch.testing.assert_close(got, linear_cross_entropy_reference(hidden, weight, labels, 5).float())


def test_without_gradients():
    hidden, weight, labels = _inputs(9, 8, 13)
    h, w = hidden.float(), weight.float()
    loss = linear_cross_entropy(h, w, labels)
    assert not loss.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h.requires_grad_(), w, labels), loss)
    torch.testing.assert_close(loss, linear_cross_entropy_reference(hidden, weight, labels).float())


def test_only_weight_requires_grad():
    hidden, weight, labels = _inputs(9, 8, 13)
    w = weight.float().requires_grad_()
    linear_cross_entropy(hidden.float(), w, labels).backward()
    w64 = weight.clone().requires_grad_()
    linear_cross_entropy_reference(hidden, w64, labels).backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)


def test_row_kernel_writes_every_loss():
    kernels = pytest.importorskip("fastllm.triton_kernels.cross_entropy")
    hidden, weight, labels = _inputs(21, 8, 77, ignored=(3,))
    logits = (hidden @ weight.T).float()
    loss = poison_(torch.empty(21, device=DEVICE))
    scale = torch.ones(1, device=DEVICE)
    kernels.cross_entropy_rows_(logits, labels, loss, scale, -100, compute_grad=True)
    expected = torch.nn.functional.cross_entropy((hidden @ weight.T), labels, reduction="none")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(logits).all() and not logits[3].any()


def test_opcheck():
    hidden, weight, labels = _inputs(11, 8, 19, ignored=(1,))
    h, w = [t.float().requires_grad_() for t in (hidden, weight)]
    torch.library.opcheck(lce._forward, (h, w, labels, -100, True, True, 4))
    # Without gradients (what the wrapper asks for when no input requires them).
    torch.library.opcheck(lce._forward, (h.detach(), w.detach(), labels, -100, False, False, 4))


def test_compile_fullgraph():
    hidden, weight, labels = _inputs(13, 8, 29, ignored=(2,))
    h, w = [t.float().requires_grad_() for t in (hidden, weight)]

    def loss_fn(h, w, labels):
        return linear_cross_entropy(torch.tanh(h), w, labels, reduction="sum")

    got = torch.compile(loss_fn, fullgraph=True)(h, w, labels)
    got_grads = torch.autograd.grad(got, (h, w))
    want = loss_fn(h, w, labels)
    want_grads = torch.autograd.grad(want, (h, w))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_bad_inputs_name_the_argument():
    hidden, weight, labels = _inputs(4, 8, 10, device="cpu")
    h, w = hidden.float(), weight.float()
    with pytest.raises(TypeError, match="weight must have the dtype of hidden"):
        linear_cross_entropy(h, w.half(), labels)
    with pytest.raises(ValueError, match="weight must have shape"):
        linear_cross_entropy(h, w[:, :5], labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        linear_cross_entropy(h, w, labels[:3])
    with pytest.raises(TypeError, match="labels must have dtype"):
        linear_cross_entropy(h, w, labels.float())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="hidden must have 2 dimensions"):
        linear_cross_entropy(h[None], w, labels)
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_cross_entropy(h, w, labels, reduction="none")
    with pytest.raises(ValueError, match="labels is on meta"):
        linear_cross_entropy(h, w, labels.to("meta"))
    with pytest.raises(ValueError, match="chunk_rows must be positive"):
        linear_cross_entropy(h, w, labels, chunk_rows=0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_reference(dtype):
    _check(300, 64, 5003, dtype, "mean", chunk_rows=128, ignored=(0, 7, 299), device="cuda")


@requires_cuda
def test_cuda_bad_label_gives_nan():
    hidden, weight, labels = _inputs(4, 8, 10, device="cuda")
    labels[1] = 10
    assert math.isnan(linear_cross_entropy(hidden.float(), weight.float(), labels).item())


def test_integer_arguments_are_not_truncated():
    """ignore_index=1.5 used to be truncated to 1, silently dropping label 1's tokens (torch's
    cross_entropy rejects it); a string chunk_rows failed in a comparison that named no argument."""
    hidden, weight, labels = _inputs(6, 8, 10, device="cpu")
    h, w = hidden.float(), weight.float()
    labels[:3] = 1
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        linear_cross_entropy(h, w, labels, ignore_index=1.5)
    for chunk_rows in ("4", 2.5):
        with pytest.raises(TypeError, match="chunk_rows must be an integer"):
            linear_cross_entropy(h, w, labels, chunk_rows=chunk_rows)
    torch.testing.assert_close(linear_cross_entropy(h, w, labels, ignore_index=torch.tensor(1), chunk_rows=4),
                               linear_cross_entropy_reference(h, w, labels, ignore_index=1))


@pytest.mark.parametrize("row_path", ["kernel", "torch"])
@pytest.mark.parametrize("magnitude", [10.0, 100.0])
def test_row_gradient_accuracy_with_large_logits(row_path, magnitude):
    """The rows' gradient against torch's float32 cross-entropy on the same logits. softmax as
    exp(x - lse) used to carry lse's rounding (half an ulp of the row maximum) into every probability:
    6x torch's error at logits ~10, 140x at ~100."""
    kernels = pytest.importorskip("fastllm.triton_kernels.cross_entropy")
    n, v = 24, 200
    logits = torch.randn(n, v, device=DEVICE) * magnitude
    labels = torch.randint(0, v, (n,), device=DEVICE)
    labels[::3] = logits.argmax(1)[::3]  # some rows' losses near 0
    labels[1] = -100
    logits64 = logits.double().requires_grad_()
    base = logits.clone().requires_grad_()
    ref_loss = torch.nn.functional.cross_entropy(logits64, labels, reduction="none")
    base_loss = torch.nn.functional.cross_entropy(base, labels, reduction="none")
    ref_loss.sum().backward()
    base_loss.sum().backward()
    grad = logits.clone()
    loss = poison_(torch.empty(n, device=DEVICE))
    rows = kernels.cross_entropy_rows_ if row_path == "kernel" else lce._cross_entropy_rows_torch
    rows(grad, labels, loss, torch.ones(1, device=DEVICE), -100, True)
    assert_error_ratio("loss", loss, ref_loss, base_loss)
    assert_error_ratio("grad", grad, logits64.grad, base.grad, factor=BACKWARD_FACTOR)
