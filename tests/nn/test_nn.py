import math

import pytest
import torch
import torch.nn.functional as F

from fastllm.nn import (Attention, DecoderBlock, RMSNorm, RotaryEmbedding, apply_rotary, get_attention,
                        positions_from_doc_ids, register_attention)
from fastllm.nn.attention import attention_names
from fastllm.nn.rope import rope_inv_freq
from fastllm.testing import requires_cuda


def naive_attention(q, k, v, allowed):
    """Softmax attention with an explicit boolean mask (B or 1, 1, Tq, Tk), heads repeated for GQA, in fp64."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v.double()).to(q.dtype)


def test_rmsnorm_matches_formula():
    norm = RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24))
    x = torch.randn(3, 5, 24)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.float32  # fp32 gain promotes, as in Hugging Face's Llama


def test_positions_restart_per_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))])
    torch.testing.assert_close(positions_from_doc_ids(doc_ids), expected)


def test_rope_tables_are_one_opaque_op():
    rope = RotaryEmbedding(16, theta=500.0)
    positions = torch.tensor([[0, 1, 2, 9], [3, 4, 0, 1]])
    cos, sin = rope(positions)
    angles = positions.double()[..., None] / 500.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    angles = torch.cat((angles, angles), dim=-1)
    assert cos.shape == sin.shape == (2, 4, 16) and cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos, angles.cos().float())
    torch.testing.assert_close(sin, angles.sin().float())
    # Opaque to torch.compile, so that compiled models compute the tables once, not per element of q and k.
    from fastllm.nn.rope import _rotary_cos_sin

    torch.library.opcheck(_rotary_cos_sin, (positions, torch.rand(8)))
    tables = torch.compile(rope, backend="aot_eager", fullgraph=True)(positions)
    torch.testing.assert_close(tables, (cos, sin))


def test_rope_is_a_relative_rotation():
    # <rot(q, m), rot(k, n)> depends only on m - n.
    rope = RotaryEmbedding(16, theta=500.0)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(m, n):
        cos_m, sin_m = rope(torch.tensor([m]))
        cos_n, sin_n = rope(torch.tensor([n]))
        return (apply_rotary(q, cos_m.double(), sin_m.double()) * apply_rotary(k, cos_n.double(), sin_n.double())).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_rope_scaling():
    base = rope_inv_freq(64, 10000.0)
    torch.testing.assert_close(rope_inv_freq(64, 10000.0, {"rope_type": "linear", "factor": 4.0}), base / 4)
    llama3 = rope_inv_freq(64, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    wavelen = 2 * math.pi / base
    torch.testing.assert_close(llama3[wavelen < 64], base[wavelen < 64])  # short wavelengths kept
    torch.testing.assert_close(llama3[wavelen > 256], base[wavelen > 256] / 8)  # long ones interpolated
    with pytest.raises(ValueError, match="needs the keys"):
        RotaryEmbedding(64, scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="rope_type"):
        RotaryEmbedding(64, scaling={"rope_type": "yarn", "factor": 8.0})


@pytest.mark.parametrize("key,value", [("factor", "8"), ("factor", float("nan")), ("low_freq_factor", 0.0),
                                       ("high_freq_factor", -4.0), ("original_max_position_embeddings", 0),
                                       ("high_freq_factor", 1.0), ("low_freq_factor", True), ("factor", float("inf"))])
def test_rope_scaling_rejects_bad_values_naming_the_key(key, value):
    # A bad value fails when the config is built, naming its key, not as a TypeError or a
    # ZeroDivisionError in the first forward (nor as silently wrong frequencies).
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256, key: value}
    with pytest.raises(ValueError, match=key):
        RotaryEmbedding(64, scaling=scaling)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_sdpa_causal_gqa_and_documents(n_heads, n_kv_heads):
    sdpa = get_attention("sdpa")
    B, T, D = 2, 11, 8
    q = torch.randn(B, n_heads, T, D)
    k, v = torch.randn(B, n_kv_heads, T, D), torch.randn(B, n_kv_heads, T, D)
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(sdpa(q, k, v), naive_attention(q, k, v, causal), atol=1e-5, rtol=1e-5)
    doc_ids = torch.tensor([[0] * 4 + [1] * 7, [3] * 2 + [4] * 5 + [9] * 4])
    allowed = causal & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    torch.testing.assert_close(sdpa(q, k, v, doc_ids=doc_ids), naive_attention(q, k, v, allowed),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")  # flex_attention runs unfused outside torch.compile
@pytest.mark.parametrize("causal", [True, False])
def test_flex_matches_sdpa(causal):
    q, k, v = torch.randn(2, 4, 37, 8), torch.randn(2, 2, 37, 8), torch.randn(2, 2, 37, 8)
    doc_ids = torch.cumsum(torch.rand(2, 37) < 0.15, dim=1)
    sdpa, flex = get_attention("sdpa"), get_attention("flex")
    for docs in (None, doc_ids):
        torch.testing.assert_close(flex(q, k, v, causal=causal, doc_ids=docs),
                                   sdpa(q, k, v, causal=causal, doc_ids=docs), atol=1e-5, rtol=1e-5)


def test_sdpa_queries_at_the_end_of_the_keys():
    # KV-cache decoding: 3 new queries against 10 keys see keys up to their own position.
    sdpa = get_attention("sdpa")
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    allowed = (torch.arange(10)[None, :] <= torch.arange(7, 10)[:, None])[None, None]
    torch.testing.assert_close(sdpa(q, k, v), naive_attention(q, k, v, allowed), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa(q[:, :, -1:], k, v), naive_attention(q[:, :, -1:], k, v, allowed[..., -1:, :]),
                               atol=1e-5, rtol=1e-5)


def test_attention_registry():
    calls = []

    def recording(q, k, v, *, causal=True, doc_ids=None, softmax_scale=None):
        calls.append(q.shape)
        return get_attention("sdpa")(q, k, v, causal=causal, doc_ids=doc_ids, softmax_scale=softmax_scale)

    register_attention("test-recording", recording)
    assert "test-recording" in attention_names()
    layer = Attention(32, 4, 2, 8, attention="test-recording")
    rope = RotaryEmbedding(8)
    cos, sin = rope(torch.arange(5))
    layer(torch.randn(2, 5, 32), cos, sin)
    assert calls == [(2, 4, 5, 8)]
    with pytest.raises(ValueError, match="unknown attention 'nope'; registered: .*sdpa"):
        get_attention("nope")
    with pytest.raises(TypeError, match="must be callable"):
        register_attention("bad", 3)


@pytest.mark.parametrize("mlp", ["swiglu", "xielu"])
def test_block_gradients_reach_every_parameter(mlp):
    block = DecoderBlock(32, 4, 2, 8, 48, mlp=mlp, qk_norm=True)
    cos, sin = RotaryEmbedding(8)(torch.arange(6))
    block(torch.randn(2, 6, 32), cos, sin).square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {name for name, _ in block.named_parameters() if "act" in name} == (
        {"mlp.act.alpha_p", "mlp.act.alpha_n"} if mlp == "xielu" else set())


def test_xielu_mlp_initialisation():
    block = DecoderBlock(16, 2, 2, 8, 32, mlp="xielu")
    torch.testing.assert_close(F.softplus(block.mlp.act.alpha_p), torch.tensor([0.8]))
    torch.testing.assert_close(0.5 + F.softplus(block.mlp.act.alpha_n), torch.tensor([0.8]))
    with pytest.raises(ValueError, match="mlp must be one of"):
        DecoderBlock(16, 2, 2, 8, 32, mlp="gelu")
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        Attention(16, 3, 2, 8)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_flex_matches_sdpa_with_gradients(dtype):
    q = torch.randn(2, 8, 300, 64, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 300, 64, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 300, 64, device="cuda", dtype=dtype, requires_grad=True)
    doc_ids = torch.cumsum(torch.rand(2, 300, device="cuda") < 0.01, dim=1)
    grad = torch.randn_like(q)
    results = []
    for name in ("flex", "sdpa"):
        out = get_attention(name)(q, k, v, doc_ids=doc_ids)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for flex, sdpa in zip(*results):
        torch.testing.assert_close(flex, sdpa, atol=tol * sdpa.abs().max().item(), rtol=tol)


@requires_cuda
def test_cuda_masked_gqa_attention_uses_a_fused_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 2, 256, 64, device="cuda", dtype=torch.bfloat16), torch.randn(2, 2, 256, 64, device="cuda",
                                                                                          dtype=torch.bfloat16)
    doc_ids = torch.cumsum(torch.rand(2, 256, device="cuda") < 0.02, dim=1)
    causal = torch.ones(256, 256, dtype=torch.bool, device="cuda").tril()[None, None]
    allowed = causal & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    # Without the math fallback SDPA raises if no fused kernel takes the call.
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = get_attention("sdpa")(q, k, v, doc_ids=doc_ids)
    torch.testing.assert_close(out.float(), naive_attention(q.float(), k.float(), v.float(), allowed).float(),
                               atol=2e-2, rtol=2e-2)


def test_flex_block_mask_is_rebuilt_for_new_documents():
    from fastllm.nn.attention import _block_mask

    doc_ids = torch.tensor([[0, 0, 1, 1]])
    first = _block_mask(doc_ids, True, 1, 4, torch.device("cpu"))
    assert _block_mask(doc_ids, True, 1, 4, torch.device("cpu")) is first  # the other layers reuse it
    doc_ids[0, 1] = 1  # changed in place: a new version
    assert _block_mask(doc_ids, True, 1, 4, torch.device("cpu")) is not first
    assert _block_mask(doc_ids.clone(), True, 1, 4, torch.device("cpu")) is not first
