"""Hash-sparse and QK-dropping attention layers: bucketing, masks, documents, gradients, registry.

The layers' math runs on the reference backend (fast on the CPU); one test runs the Triton path
(the interpreter on a CPU-only machine) end to end.
"""

from __future__ import annotations

import pytest
import torch

from fastllm.nn.sparse_attention import (
    HashSparseAttention,
    QKDropAttention,
    angular_lsh,
    qk_drop,
    random_rotations,
    register_sparse_attentions,
)
from fastllm.ops import use_backend
from fastllm.ops.flash_attention_ref import hash_sparse_attention_reference, qk_sparse_attention_reference


@pytest.fixture(autouse=True)
def _reference_backend(request):
    if request.function is test_layers_on_the_kernel_path:
        yield
        return
    with use_backend("reference"):
        yield


def _qkv(B=2, H=3, T=40, D=16):
    return [torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3)]


def test_angular_lsh_buckets():
    x = torch.randn(2, 3, 50, 16)
    rotations = random_rotations(3, 16, 8, seed=1)
    buckets = angular_lsh(x, rotations)
    assert buckets.shape == (2, 3, 50) and buckets.min() >= 0 and buckets.max() < 8
    assert torch.equal(angular_lsh(3.5 * x, rotations), buckets)  # the angle, not the norm
    assert ((angular_lsh(-x, rotations) - buckets) % 8 == 4).all()  # opposite vectors: opposite buckets
    assert len(buckets.unique()) == 8
    assert torch.equal(random_rotations(3, 16, 8, seed=1), rotations)
    with pytest.raises(ValueError, match="n_buckets"):
        random_rotations(3, 16, 5)


@pytest.mark.parametrize("shared_qk", [False, True])
def test_hash_sparse_layer_matches_reference(shared_qk):
    q, k, v = _qkv()
    layer = HashSparseAttention(3, 16, n_buckets=4, shared_qk=shared_qk).double()
    k_buckets = angular_lsh(k, layer.rotations)
    q_buckets = k_buckets if shared_qk else angular_lsh(q, layer.rotations)
    out = layer(q, k, v)
    torch.testing.assert_close(out, hash_sparse_attention_reference(q, k, v, q_buckets, k_buckets))
    if shared_qk:  # every query sees at least itself
        assert (out.abs().sum(-1) > 0).all()


def _per_document(layer, q, k, v, doc_lengths):
    outs, start = [], 0
    for n in doc_lengths:
        outs.append(layer(q[:, :, start:start + n], k[:, :, start:start + n], v[:, :, start:start + n]))
        start += n
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("layer", [HashSparseAttention(3, 16, n_buckets=2), QKDropAttention(3, 16, 0.3, learned=True)],
                         ids=["hash", "qk_learned"])
def test_documents_never_see_each_other(layer):
    q, k, v = _qkv(B=1)
    layer = layer.double()
    doc_lengths = [13, 1, 26]
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(doc_lengths))[None]
    torch.testing.assert_close(layer(q, k, v, doc_ids=doc_ids), _per_document(layer, q, k, v, doc_lengths))


@pytest.mark.parametrize("layer", [HashSparseAttention(3, 16, n_buckets=4), HashSparseAttention(3, 16, shared_qk=True),
                                   QKDropAttention(3, 16, 0.3, learned=True)],
                         ids=["hash", "hash_shared", "qk_learned"])
def test_kv_cache_steps_match_the_full_sequence(layer):
    q, k, v = _qkv(B=2)
    layer = layer.double()
    doc_ids = (torch.arange(40) >= 29).long().expand(2, 40)
    for docs in (None, doc_ids):
        full = layer(q, k, v, doc_ids=docs)
        for Tq in (1, 3):  # the last Tq positions against every key, as a KV-cache step computes them
            torch.testing.assert_close(layer(q[:, :, -Tq:], k, v, doc_ids=docs), full[:, :, -Tq:])


@pytest.mark.parametrize("layer", [HashSparseAttention(4, 16), QKDropAttention(4, 16, 0.3, learned=True)],
                         ids=["hash", "qk_learned"])
def test_grouped_query_heads(layer):
    q = torch.randn(2, 4, 30, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 30, 16, dtype=torch.float64), torch.randn(2, 2, 30, 16, dtype=torch.float64)
    layer = layer.double()
    expanded = [t.repeat_interleave(2, dim=1) for t in (k, v)]
    torch.testing.assert_close(layer(q, k, v), layer(q, *expanded))
    with pytest.raises(ValueError, match="divide"):
        layer(q, k[:, :1].expand(2, 3, 30, 16), v[:, :1].expand(2, 3, 30, 16))


def test_qk_drop_with_documents_matches_reference():
    q, k, v = _qkv(B=1)
    q_keep, k_keep = torch.rand(1, 3, 40) < 0.6, torch.rand(1, 3, 40) < 0.6
    doc_ids = (torch.arange(40) >= 17).long()[None]
    same_doc = doc_ids[0][:, None] == doc_ids[0][None, :]
    out = qk_drop(q, k, v, q_keep, k_keep, doc_ids=doc_ids)
    # Reference: masked math attention with the document mask added.
    visible = q_keep[..., :, None] & k_keep[..., None, :] & same_doc & torch.ones(40, 40, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-2, -1) / 4).masked_fill(~visible, float("-inf"))
    want = torch.softmax(scores, -1).nan_to_num(0.0) @ v
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(qk_drop(q, k, v, q_keep, k_keep), qk_sparse_attention_reference(q, k, v, q_keep, k_keep))


def test_random_qk_drop_rate_and_zero_rows():
    q, k, v = _qkv(B=4, H=4, T=128)
    out = QKDropAttention(4, 16, drop_rate=0.3)(q, k, v)
    zero_rows = (out == 0).all(-1).double().mean().item()
    # Dropped queries (30%) plus kept queries whose earlier keys were all dropped (few).
    assert 0.25 < zero_rows < 0.36


def test_learned_qk_drop_keeps_its_rate_and_learns():
    torch.manual_seed(1)
    q, k, v = [t.requires_grad_() for t in _qkv(B=2, H=4, T=128)]
    layer = QKDropAttention(4, 16, drop_rate=0.4, learned=True).double()
    out = layer(q, k, v)
    zero_rows = (out == 0).all(-1).double().mean().item()
    assert 0.33 < zero_rows < 0.5
    out.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # The forward is exactly QK-sparse attention with the score > 0 decisions.
    with torch.no_grad():
        q_keep = torch.einsum("bhtd,hd->bht", q, layer.q_gate) + layer.q_bias[:, None] > 0
        k_keep = torch.einsum("bhtd,hd->bht", k, layer.k_gate) + layer.k_bias[:, None] > 0
        torch.testing.assert_close(out, qk_sparse_attention_reference(q, k, v, q_keep, k_keep))


def test_learned_qk_drop_stays_finite_for_far_dropped_tokens():
    # A token scored far below the threshold is dropped: its output is 0 and nothing becomes NaN
    # (sigmoid(score) underflowing to 0 must not turn the straight-through factor into 0 / 0).
    torch.manual_seed(0)
    layer = QKDropAttention(2, 16, drop_rate=0.3, learned=True)
    q, k, v = [torch.randn(1, 2, 10, 16, requires_grad=True) for _ in range(3)]
    with torch.no_grad():
        q[0, 0, 4] = -1000 * layer.q_gate[0]
        k[0, 1, 2] = -1000 * layer.k_gate[1]
    out = layer(q, k, v)
    assert torch.isfinite(out).all() and (out[0, 0, 4] == 0).all()
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, *layer.parameters()))


@pytest.mark.parametrize("doc", [-1, -2, 5])
def test_qk_drop_with_any_document_ids(doc):
    # Document ids are any integers: a dropped query stays dropped whatever its document's number.
    q, k, v = _qkv(B=1, H=2, T=12)
    q_keep, k_keep = torch.rand(1, 2, 12) < 0.6, torch.rand(1, 2, 12) < 0.6
    doc_ids = torch.full((1, 12), doc)
    torch.testing.assert_close(qk_drop(q, k, v, q_keep, k_keep, doc_ids=doc_ids),
                               qk_sparse_attention_reference(q, k, v, q_keep, k_keep))


def test_non_causal_is_an_error():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="causal"):
        HashSparseAttention(3, 16)(q, k, v, causal=False)
    with pytest.raises(ValueError, match="causal"):
        QKDropAttention(3, 16)(q, k, v, causal=False)
    with pytest.raises(ValueError, match="drop_rate"):
        QKDropAttention(3, 16, drop_rate=1.0)


def test_registry_functions():
    registry, dense_names = {}, set()

    def register(name, fn, dense=False):
        registry[name] = fn
        if dense:
            dense_names.add(name)

    register_sparse_attentions(register)
    assert set(registry) == {"fastllm_flash", "hash_sparse", "hash_sparse_shared_qk", "qk_drop"}
    assert dense_names == {"fastllm_flash"}
    q, k, v = [t.float() for t in _qkv()]
    doc_ids = (torch.arange(40) >= 20).long().expand(2, 40)
    for name, fn in registry.items():
        out = fn(q, k, v, causal=True, doc_ids=doc_ids, softmax_scale=0.2)
        assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all(), name
    # Stateless hashing: the same rotations on every call.
    torch.testing.assert_close(registry["hash_sparse"](q, k, v), registry["hash_sparse"](q, k, v))


@pytest.mark.parametrize("causal", [True, False])
def test_dense_registry_function(causal):
    registry = {}
    register_sparse_attentions(lambda name, fn, dense=False: registry.__setitem__(name, fn))
    flash = registry["fastllm_flash"]
    q = torch.randn(2, 4, 30, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 30, 16, dtype=torch.float64), torch.randn(2, 2, 30, 16, dtype=torch.float64)
    doc_ids = (torch.arange(30) >= 11).long().expand(2, 30)
    ke, ve = [t.repeat_interleave(2, dim=1) for t in (k, v)]
    for docs in (None, doc_ids):
        visible = torch.ones(30, 30, dtype=torch.bool)
        if causal:
            visible = visible.tril()
        if docs is not None:
            visible = visible & (docs[:, None, :, None] == docs[:, None, None, :])
        want = torch.softmax((q @ ke.transpose(-2, -1) / 4).masked_fill(~visible, float("-inf")), -1) @ ve
        torch.testing.assert_close(flash(q, k, v, causal=causal, doc_ids=docs), want)
        torch.testing.assert_close(flash(q[:, :, -2:], k, v, causal=causal, doc_ids=docs), want[:, :, -2:])


def test_layers_on_the_kernel_path():
    """The Triton kernels on a GPU, or in the interpreter on CPU tensors."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = [t.float().to(device).requires_grad_() for t in _qkv(B=1, H=2, T=21)]
    layer = HashSparseAttention(2, 16, n_buckets=4).to(device)
    buckets = angular_lsh(q, layer.rotations), angular_lsh(k, layer.rotations)
    out = layer(q, k, v)
    out.sum().backward()
    want = hash_sparse_attention_reference(q.double(), k.double(), v.double(), *buckets)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_compile_fullgraph():
    """Model code compiles attention with fullgraph=True: no graph break in any variant."""
    registry = {}
    register_sparse_attentions(lambda name, fn, dense=False: registry.__setitem__(name, fn))
    layers = {**registry, "hash_module": HashSparseAttention(2, 16), "qk_learned": QKDropAttention(2, 16, learned=True)}
    q, k, v = [torch.randn(1, 2, 12, 16, requires_grad=True) for _ in range(3)]
    doc_ids = (torch.arange(12) >= 5).long()[None]
    for name, layer in layers.items():
        compiled = torch.compile(lambda q, k, v: layer(q, k, v, doc_ids=doc_ids), fullgraph=True, backend="aot_eager")
        torch.manual_seed(1)  # the same random decisions for "qk_drop"
        got = compiled(q, k, v)
        torch.manual_seed(1)
        torch.testing.assert_close(got, layer(q, k, v, doc_ids=doc_ids), msg=name)


@pytest.mark.parametrize("attention", ["fastllm_flash", "hash_sparse", "hash_sparse_shared_qk", "qk_drop"])
def test_language_models_with_the_registered_attentions(attention):
    """A tiny grouped-query Llama with each registered variant: its KV cache agrees with the full
    forward (deterministic variants), packed documents work, and a few steps lower the loss."""
    from fastllm.models import build_model, config_from_dict
    from fastllm.nn import register_attention

    register_sparse_attentions(register_attention)
    torch.manual_seed(0)
    model = build_model(config_from_dict({"arch": "llama", "vocab_size": 61, "dim": 48, "n_layers": 1, "n_heads": 4,
                                          "n_kv_heads": 2, "hidden_dim": 64, "attention": attention}))
    ids = torch.randint(0, 61, (2, 24))
    if attention != "qk_drop":
        model.eval()
        full = model(ids)
        cache = model.init_cache(2, 24)
        pieces = [model(ids[:, :10], cache=cache), model(ids[:, 10:11], cache=cache), model(ids[:, 11:], cache=cache)]
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    model.train()
    doc_ids = (torch.arange(24) >= 9).long().expand(2, 24)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(ids, doc_ids=doc_ids)[:, :-1].flatten(0, 1),
                                                 ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
