import importlib
import json
import warnings

import pytest
import torch

from fastllm.models import (ApertusConfig, LlamaConfig, build_model, config_from_dict, generate, model_names,
                            register_model)
from fastllm.models.generate import attention_spans
from fastllm.nn import KVCache
from fastllm.testing import requires_cuda

generate_module = importlib.import_module("fastllm.models.generate")  # `generate` is also the function

TINY = {"vocab_size": 97, "dim": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 80}


def tiny(arch, **overrides):
    torch.manual_seed(0)
    return build_model(config_from_dict({"arch": arch, **TINY, **overrides})).eval()


ARCHES = [("llama", {}), ("llama", {"tie_embeddings": True, "n_kv_heads": 4}), ("apertus", {}),
          ("apertus", {"rope_theta": 12e6, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                             "original_max_position_embeddings": 16}})]


@pytest.mark.parametrize("fixed_shape", [False, True])
@pytest.mark.parametrize("arch,overrides", ARCHES)
def test_kv_cache_matches_full_forward(arch, overrides, fixed_shape):
    model = tiny(arch, **overrides)
    ids = torch.randint(0, 97, (3, 13))
    full = model(ids)
    cache = model.init_cache(3, 16, fixed_shape=fixed_shape)
    assert cache.fixed_shape == fixed_shape
    if fixed_shape:  # garbage past the position must stay invisible
        cache.k.normal_(), cache.v.normal_()
    pieces = [model(ids[:, :5], cache=cache), model(ids[:, 5:6], cache=cache), model(ids[:, 6:], cache=cache)]
    assert cache.pos == 13
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache full"):
        model(ids[:, :4], cache=cache)


def test_fixed_shape_step_is_undone_by_its_step_state():
    model = tiny("llama")
    ids = torch.randint(0, 97, (2, 9))
    full = model(ids)
    cache = model.init_cache(2, 12, fixed_shape=True)
    model(ids[:, :7], cache=cache)
    (position,) = cache.step_state()
    saved, pos = position.clone(), cache.pos
    model(torch.randint(0, 97, (2, 1)), cache=cache)  # a trial step, as CUDA-graph capture makes
    position.copy_(saved)
    cache.pos = pos
    steps = [model(ids[:, t:t + 1], cache=cache) for t in (7, 8)]
    assert int(position) == cache.pos == 9
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 7:], atol=1e-5, rtol=1e-5)


def test_fixed_shape_steps_over_shorter_spans():
    # Graphed decoding attends over the first `span` slots only, switching to longer spans as it goes.
    model = tiny("llama")
    ids = torch.randint(0, 97, (2, 11))
    full = model(ids)
    cache = model.init_cache(2, 16, fixed_shape=True)
    cache.k.normal_(), cache.v.normal_()
    pieces = []
    for start, end, span in ((0, 4, 4), (4, 5, 8), (5, 8, 8), (8, 11, 16)):
        cache.span = span
        pieces.append(model(ids[:, start:end], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    cache.span = 12
    with pytest.raises(ValueError, match="exceed the span of 12 slots"):
        model(ids[:, :2], cache=cache)
    kv = KVCache(1, 2, 2, 16, 4, fixed_shape=True)
    kv.span = 8
    keys, values = kv.update(0, torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4))
    assert keys.shape == values.shape == (2, 2, 8, 4) and kv.visible_keys(3).shape == (3, 8)


def test_attention_spans():
    assert attention_spans(1, 1000) == [64, 128, 256, 512, 1000]
    assert attention_spans(100, 1000) == [128, 256, 512, 1000]
    assert attention_spans(5, 64) == [64]
    assert attention_spans(5, 30) == [30]


def test_fixed_shape_cache_takes_keys_of_another_dtype():
    # Under autocast the keys and values come in bfloat16 while the cache keeps the weights' float32.
    model = tiny("llama")
    ids = torch.randint(0, 97, (2, 6))
    caches = [model.init_cache(2, 8, fixed_shape=fixed) for fixed in (False, True)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = [torch.cat([model(ids[:, :4], cache=c), model(ids[:, 4:], cache=c)], dim=1) for c in caches]
    assert caches[1].k.dtype == torch.float32
    torch.testing.assert_close(logits[1], logits[0], atol=2e-2, rtol=2e-2)


def test_fixed_shape_cache_needs_dense_attention():
    model = tiny("llama", attention="hash_sparse")
    cache = model.init_cache(2, 8, fixed_shape=True)
    assert not cache.fixed_shape and cache.step_state() is None
    fixed = KVCache(2, 2, 2, 8, 12, fixed_shape=True)
    with pytest.raises(ValueError, match="'hash_sparse' is not dense"):
        model(torch.randint(0, 97, (2, 3)), cache=fixed)


@pytest.mark.parametrize("arch,overrides", ARCHES[1:3])
def test_greedy_generation_matches_full_forward(arch, overrides):
    model = tiny(arch, **overrides)
    prompt = torch.randint(0, 97, (2, 4))
    # The logits generate() samples from (the prefill's last, then each cached step's). Tokens alone show
    # little: the tied tiny Llama just repeats the last prompt token, whatever the cache holds.
    sampled = []
    handle = model.register_forward_hook(lambda module, args, out: sampled.append(out[:, -1]))
    out = generate(model, prompt, max_new_tokens=7, temperature=0.0)
    handle.remove()
    assert out.shape == (2, 11) and torch.equal(out[:, :4], prompt)
    # Each generated token is the argmax of a full (cache-free) forward over everything before it.
    logits = model(out)
    torch.testing.assert_close(out[:, 4:], logits[:, 3:-1].argmax(-1), rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(sampled, dim=1), logits[:, 3:-1], atol=1e-5, rtol=1e-5)


GRAPH_MODELS = {
    "llama": {"arch": "llama", **TINY},
    "denseformer": {"arch": "denseformer", **TINY, "dwa_dilation": 2},
    "hybrid": {"arch": "hybrid", **TINY, "n_layers": 3, "attention_layers": [1], "d_state": 8},
    "mamba": {"arch": "mamba", "vocab_size": 97, "dim": 16, "n_layers": 2, "d_state": 8},
}


@requires_cuda
@pytest.mark.parametrize("name", GRAPH_MODELS)
def test_cuda_graph_generation_equals_eager(name, monkeypatch):
    monkeypatch.setattr(generate_module, "SMALLEST_SPAN", 8)  # graphs over spans 8, 16 and 25 slots
    torch.manual_seed(0)
    model = build_model(config_from_dict(GRAPH_MODELS[name])).to("cuda")
    prompt = torch.randint(0, 97, (2, 5), device="cuda")
    for temperature in (0.0, 0.8):
        runs = []
        for cuda_graph in (False, True):
            generator = torch.Generator("cuda").manual_seed(3)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a failed capture (eager fallback) fails the test
                runs.append(generate(model, prompt, 20, temperature=temperature, generator=generator,
                                     cuda_graph=cuda_graph))
        assert torch.equal(runs[0], runs[1])


def test_sampling_options():
    model = tiny("llama")
    prompt = torch.randint(0, 97, (4, 3))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = generate(model, prompt, 6, temperature=1.3, top_k=5, top_p=0.9, generator=g1)
    b = generate(model, prompt, 6, temperature=1.3, top_k=5, top_p=0.9, generator=g2)
    assert torch.equal(a, b)
    # top_k=1 and a tiny top_p are both greedy.
    greedy = generate(model, prompt, 6, temperature=0.0)
    assert torch.equal(generate(model, prompt, 6, top_k=1), greedy)
    assert torch.equal(generate(model, prompt, 6, top_p=1e-6), greedy)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, 2, top_p=1.5)
    assert model.training is False


@pytest.mark.parametrize("kwargs,name", [({"temperature": float("nan")}, "temperature"),
                                         ({"temperature": "hot"}, "temperature"), ({"top_k": 2.5}, "top_k"),
                                         ({"top_k": True}, "top_k"), ({"max_new_tokens": 2.5}, "max_new_tokens"),
                                         ({"top_p": "0.9"}, "top_p")])
def test_generate_rejects_bad_sampling_arguments(kwargs, name):
    model = tiny("llama")
    with pytest.raises(ValueError, match=name):
        generate(model, torch.randint(0, 97, (2, 3)), **{"max_new_tokens": 3, **kwargs})


def test_tiny_temperature_is_near_greedy():
    # logits / 1e-40 overflow float32: sampling must still work (and pick the argmax) instead of crashing.
    from fastllm.models import sample_next

    logits = torch.tensor([[1.0, 3.0, 2.0], [-5.0, -4.0, -4.5]])
    assert sample_next(logits, temperature=1e-40, top_p=0.9).tolist() == [1, 1]
    assert sample_next(logits, temperature=1e-40).tolist() == [1, 1]


def test_top_k_and_top_p_support():
    from fastllm.models import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    counts = torch.bincount(sample_next(logits, top_k=2, generator=torch.Generator().manual_seed(0)), minlength=4)
    assert counts[2:].sum() == 0 and counts[0] > counts[1] > 0
    counts = torch.bincount(sample_next(logits, top_p=0.85, generator=torch.Generator().manual_seed(0)), minlength=4)
    assert counts[3] == 0 and counts[2] > 0  # 0.5 + 0.3 < 0.85 needs the third token


def test_generation_stops_at_eos():
    model = tiny("llama")
    prompt = torch.randint(0, 97, (2, 3))
    greedy = generate(model, prompt, 8, temperature=0.0)
    eos = int(greedy[0, 5])
    out = generate(model, prompt, 8, temperature=0.0, eos_id=eos)
    first = (out[0, 3:] == eos).nonzero()[0].item() + 3
    assert torch.all(out[0, first:] == eos)


@pytest.mark.filterwarnings("ignore::UserWarning")  # flex_attention runs unfused outside torch.compile
@pytest.mark.parametrize("arch,attention", [("llama", "sdpa"), ("apertus", "sdpa"), ("apertus", "flex")])
@torch.no_grad()
def test_document_masking(arch, attention):
    # A packed row of two documents gives each document the logits it gets alone.
    model = tiny(arch, attention=attention)
    a, b = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 7))
    packed = model(torch.cat([a, b], dim=1), doc_ids=torch.tensor([[0] * 5 + [1] * 7]))
    torch.testing.assert_close(packed[:, :5], model(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 5:], model(b), atol=1e-5, rtol=1e-5)
    # Without doc_ids the second document sees the first.
    assert not torch.allclose(model(torch.cat([a, b], dim=1))[:, 5:], model(b), atol=1e-3)


@pytest.mark.parametrize("arch,overrides", ARCHES)
def test_config_json_round_trip(arch, overrides):
    config = config_from_dict({"arch": arch, **TINY, **overrides})
    again = config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and type(again) is type(config)
    assert isinstance(config, {"llama": LlamaConfig, "apertus": ApertusConfig}[arch])


def test_arch_defaults():
    assert LlamaConfig().mlp == "swiglu" and not LlamaConfig().qk_norm
    assert ApertusConfig().mlp == "xielu" and ApertusConfig().qk_norm
    assert LlamaConfig(dim=768, n_heads=12).hidden_dim == 2048
    assert {"llama", "apertus"} <= set(model_names())


@pytest.mark.parametrize("d,error,match", [
    ({"vocab_size": 10}, ValueError, "needs an 'arch' key"),
    ({"arch": "gpt9"}, ValueError, "unknown model arch 'gpt9'; registered: .*llama"),
    ({"arch": "llama", "dimm": 64}, ValueError, r"unknown llama config keys \['dimm'\]"),
    ({"arch": "llama", "dim": 100, "n_heads": 3}, ValueError, "dim .100. must be divisible by n_heads"),
    ({"arch": "llama", "n_heads": 8, "n_kv_heads": 3}, ValueError, "multiple of n_kv_heads"),
    ({"arch": "llama", "n_layers": 0}, ValueError, "n_layers must be a positive integer"),
    ({"arch": "llama", "vocab_size": "big"}, ValueError, "vocab_size must be a positive integer"),
    ({"arch": "llama", "norm_eps": -1.0}, ValueError, "norm_eps must be a positive number"),
    ({"arch": "llama", "rope_theta": float("inf")}, ValueError, "rope_theta must be a positive number"),
    ({"arch": "llama", "init_std": float("inf")}, ValueError, "init_std must be a positive number"),
    ({"arch": "llama", "tie_embeddings": "yes"}, ValueError, "tie_embeddings must be true or false"),
    ({"arch": "llama", "mlp": "relu"}, ValueError, "mlp must be one of"),
    ({"arch": "llama", "head_dim": 7}, ValueError, "head_dim must be even"),
    ({"arch": "llama", "rope_scaling": {"rope_type": "linear"}}, ValueError, "needs the keys"),
    ({"arch": "llama", "attention": "flash9"}, ValueError, "unknown attention 'flash9'; registered: .*sdpa"),
    ("llama", TypeError, "must be a dict"),
])
def test_bad_configs(d, error, match):
    with pytest.raises(error, match=match):
        config_from_dict(d)


def test_bad_inputs():
    model = tiny("llama")
    with pytest.raises(ValueError, match="input_ids must be a .batch, seq. integer tensor"):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match="doc_ids must have input_ids' shape"):
        model(torch.zeros(2, 3, dtype=torch.long), doc_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch size"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=model.init_cache(1, 8))


def test_param_counts_flops_and_weight_decay():
    untied, tied = tiny("llama"), tiny("llama", tie_embeddings=True)
    V, D, L, H, hd, F = 97, 48, 2, 4, 12, 80
    per_layer = D * H * hd + 2 * D * 2 * hd + H * hd * D + 3 * D * F + 2 * D
    assert tied.num_params() == V * D + L * per_layer + D
    assert untied.num_params() == tied.num_params() + V * D
    assert untied.num_params(exclude_embeddings=True) == L * per_layer + D + V * D
    for model in (tied, untied):
        assert model.flops_per_token(64) == 6 * (L * per_layer + D + V * D) + 12 * L * H * hd * 64
    apertus = tiny("apertus")
    assert apertus.no_weight_decay() == {n for n, _ in apertus.named_parameters()
                                         if "norm" in n or n.endswith(("alpha_p", "alpha_n"))}
    assert "embed.weight" not in apertus.no_weight_decay()


def test_training_step_and_compile():
    model = tiny("apertus", n_layers=1).train()
    ids = torch.randint(0, 97, (2, 10))
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = torch.nn.functional.cross_entropy(compiled(ids, doc_ids=doc_ids).flatten(0, 1), ids.flatten())
    loss.backward()
    eager = model(ids, doc_ids=doc_ids)
    torch.testing.assert_close(compiled(ids, doc_ids=doc_ids), eager)
    assert all(p.grad is not None for p in model.parameters())


def test_register_model():
    from fastllm.models.transformer import TransformerLM

    class WideLM(TransformerLM):
        pass

    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass
    class WideConfig(LlamaConfig):
        ARCH: ClassVar[str] = "test-wide"

    register_model("test-wide", WideConfig, WideLM)
    model = build_model({"arch": "test-wide", **TINY})
    assert isinstance(model, WideLM) and model.config.arch == "test-wide"
    from types import SimpleNamespace

    with pytest.raises(TypeError, match="arch 'test-wide' expects a WideConfig, got SimpleNamespace"):
        build_model(SimpleNamespace(arch="test-wide"))


@requires_cuda
@pytest.mark.parametrize("arch,attention", [("llama", "sdpa"), ("apertus", "sdpa"), ("apertus", "flex")])
def test_cuda_bf16_autocast_compiled_training_step(arch, attention):
    # Head dim 16: compiled FlexAttention needs at least 16.
    cpu_model = tiny(arch, dim=64)
    model = tiny(arch, dim=64, attention=attention).cuda().train()
    ids = torch.randint(0, 97, (4, 64))
    doc_ids = torch.cumsum(torch.rand(4, 64) < 0.05, dim=1)
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = compiled(ids.cuda(), doc_ids=doc_ids.cuda())
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.cuda().flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        expected = cpu_model(ids, doc_ids=doc_ids)
    torch.testing.assert_close(logits.float().cpu(), expected, atol=5e-2, rtol=5e-2)


@requires_cuda
def test_cuda_generation_matches_full_forward():
    model = tiny("apertus").cuda()
    prompt = torch.randint(0, 97, (2, 5), device="cuda")
    out = generate(model, prompt, max_new_tokens=9, temperature=0.0)
    torch.testing.assert_close(out[:, 5:], model(out)[:, 4:-1].argmax(-1), rtol=0, atol=0)


@torch.no_grad()
def test_bfloat16_model_keeps_float32_rotary_angles():
    # Casting the model must not round RoPE's frequencies: angles at long positions would be off by radians.
    model = tiny("llama", n_layers=1)
    positions = torch.tensor([0, 1, 4000, 65535])
    expected = model.rope(positions)
    model.to(torch.bfloat16)
    for value, reference in zip(model.rope(positions), expected):
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, reference, rtol=0, atol=0)
    ids = torch.randint(0, 97, (2, 9))
    assert model(ids).dtype == torch.bfloat16


LOSS_ARCHES = [("llama", {}), ("apertus", {"tie_embeddings": False}), ("denseformer", {"n_layers": 4}),
               ("cotformer", {"n_layers": 4, "n_repeat": 2}),
               ("mamba", {"dim": 16, "d_state": 8, "n_heads": None, "n_kv_heads": None, "hidden_dim": None}),
               ("hybrid", {"attention_layers": [1], "d_state": 8})]


@pytest.mark.parametrize("arch,overrides", LOSS_ARCHES, ids=[a for a, _ in LOSS_ARCHES])
def test_labels_give_the_summed_loss(arch, overrides):
    """forward(..., labels=) equals the summed cross-entropy of the logits, and so do its gradients."""
    config = {k: v for k, v in {**TINY, **overrides}.items() if v is not None}
    torch.manual_seed(0)
    model = build_model(config_from_dict({"arch": arch, **config}))
    ids = torch.randint(0, 97, (2, 19))
    labels = torch.randint(0, 97, (2, 19))
    labels[0, :3] = -100
    loss = model(ids, labels=labels)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    expected = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), reduction="sum")
    expected_grads = torch.autograd.grad(expected, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, expected_grads):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
