"""CoTFormer: n_repeat = 1 is the plain transformer; repeats attend to earlier repeats' keys and values."""

from __future__ import annotations

import math

import pytest
import torch

from fastllm.models import CoTFormerConfig, build_model, config_from_dict
from fastllm.models.cotformer import repeat_mask
from fastllm.nn import apply_rotary

TINY = {"vocab_size": 97, "dim": 48, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 80}


def cotformer(**overrides):
    torch.manual_seed(0)
    return build_model(config_from_dict({"arch": "cotformer", **TINY, **overrides})).eval()


def test_one_repeat_is_the_plain_transformer():
    model = cotformer(n_repeat=1, n_begin=1, n_end=2)
    llama = build_model(config_from_dict({"arch": "llama", **TINY})).eval()
    llama.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (2, 11))
    doc_ids = torch.tensor([[0] * 4 + [1] * 7, [0] * 11])
    for docs in (None, doc_ids):
        torch.testing.assert_close(model(ids, docs), llama(ids, docs), rtol=0, atol=0)
    cache = model.init_cache(2, 11)
    out = torch.cat([model(ids[:, :7], cache=cache), model(ids[:, 7:], cache=cache)], dim=1)
    torch.testing.assert_close(out, llama(ids), rtol=1e-5, atol=1e-5)


def test_repeat_mask_by_definition():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    T, repeats = 5, 3
    mask = repeat_mask(T, T, repeats, doc_ids, torch.device("cpu"))
    assert mask.shape == (2, 1, T, repeats * T)
    for b in range(2):
        for t in range(T):
            for r in range(repeats):
                for s in range(T):
                    expected = s <= t and bool(doc_ids[b, s] == doc_ids[b, t])
                    assert bool(mask[b, 0, t, r * T + s]) == expected
    # Decoding: 2 new queries after 4 cached tokens see every repeat's keys up to their own position.
    mask = repeat_mask(2, 6, 2, None, torch.device("cpu"))
    expected = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool).repeat(1, 2)
    assert torch.equal(mask[0, 0], expected)


def naive_middle_repeats(model, x, n_repeat, active=None):
    """The middle group (one block, no begin/end blocks) with attention written out query by query:
    query (t, r) attends to the keys (t', r') with t' <= t and r' <= r (and, when routed, t' ran repeat
    r': active[r'][b, t']); a routed token that runs repeat r adds sigmoid(router score) times its update."""
    block = model.layers[0]
    attn = block.attn
    B, T, _ = x.shape
    cos, sin = model.rope(torch.arange(T))
    group = attn.n_heads // attn.n_kv_heads
    keys, values = [], []
    for r in range(n_repeat):
        h = block.attn_norm(x)
        q = apply_rotary(attn.q_proj(h).view(B, T, attn.n_heads, -1).transpose(1, 2), cos, sin)
        keys.append(apply_rotary(attn.k_proj(h).view(B, T, attn.n_kv_heads, -1).transpose(1, 2), cos, sin))
        values.append(attn.v_proj(h).view(B, T, attn.n_kv_heads, -1).transpose(1, 2))
        out = torch.zeros_like(q)
        for b in range(B):
            for head in range(attn.n_heads):
                for t in range(T):
                    visible = [(rr, s) for rr in range(r + 1) for s in range(t + 1)
                               if active is None or active[rr][b, s]]
                    k = torch.stack([keys[rr][b, head // group, s] for rr, s in visible])
                    v = torch.stack([values[rr][b, head // group, s] for rr, s in visible])
                    weights = torch.softmax(k @ q[b, head, t] / math.sqrt(attn.head_dim), dim=0)
                    out[b, head, t] = weights @ v
        h = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        h = h + block.mlp(block.mlp_norm(h))
        if active is None or r == 0:
            x = h
        else:
            gate = torch.sigmoid(model.routers[r - 1](x))
            x = torch.where(active[r][..., None], x + gate * (h - x), x)
    return x


def test_repeats_attend_to_earlier_repeats():
    model = cotformer(n_layers=1, n_begin=0, n_end=0, n_repeat=3)
    ids = torch.randint(0, 97, (2, 6))
    expected = model.lm_head(model.norm(naive_middle_repeats(model, model.embed(ids), 3)))
    torch.testing.assert_close(model(ids), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"repeat_norm": True, "depth_embedding": True}])
def test_kv_cache_matches_full_forward(options):
    model = cotformer(n_repeat=3, **options)
    if model.depth_embed is not None:
        with torch.no_grad():
            model.depth_embed.normal_()
    ids = torch.randint(0, 97, (2, 10))
    full = model(ids)
    cache = model.init_cache(2, 12)
    pieces = [model(ids[:, :6], cache=cache), model(ids[:, 6:7], cache=cache), model(ids[:, 7:], cache=cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_documents_and_future_tokens_stay_invisible():
    model = cotformer(n_repeat=3)
    ids = torch.randint(0, 97, (1, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    packed = model(ids, doc_ids)
    torch.testing.assert_close(packed[:, 5:], model(ids[:, 5:]), rtol=1e-5, atol=1e-5)
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 97
    torch.testing.assert_close(model(changed)[:, :8], model(ids)[:, :8], rtol=1e-5, atol=1e-6)


def test_ln_cotformer_options():
    model = cotformer(n_repeat=2, repeat_norm=True, depth_embedding=True).train()
    assert torch.equal(model.depth_embed, torch.zeros(2, 48)) and len(model.repeat_norms) == 2
    model(torch.randint(0, 97, (2, 5))).square().mean().backward()
    assert model.depth_embed.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.repeat_norms.parameters())
    assert "depth_embed" in model.no_weight_decay()


def test_config_validation_and_flops():
    config = CoTFormerConfig(**TINY, n_begin=1, n_end=1, n_repeat=3)
    assert config_from_dict(config.to_dict()) == config and config.n_middle == 2
    with pytest.raises(ValueError, match="middle group"):
        CoTFormerConfig(**TINY, n_begin=2, n_end=2)
    with pytest.raises(ValueError, match="n_repeat"):
        CoTFormerConfig(**TINY, n_repeat=0)
    once, thrice = build_model(CoTFormerConfig(**TINY, n_repeat=1)), build_model(config)
    assert thrice.flops_per_token(32) > once.flops_per_token(32)


def test_adaptive_routing_keeps_the_requested_capacities():
    from fastllm.models.cotformer import capacity_sweep

    model = cotformer(n_repeat=3, adaptive=True)
    ids = torch.randint(0, 97, (3, 8))
    model.set_capacities([1.0, 0.5, 0.25])
    logits = model(ids)
    assert torch.isfinite(logits).all()
    assert [a.sum(dim=1).tolist() for a in model.last_active] == [[8] * 3, [4] * 3, [2] * 3]
    for earlier, later in zip(model.last_active, model.last_active[1:]):
        assert not (later & ~earlier).any()  # a token that stopped never comes back

    # Training draws random, non-increasing capacities; every repeat keeps at least one token.
    model.set_capacities(None)
    model.train()
    seen = set()
    for _ in range(5):
        model(ids).square().mean().backward()
        counts = [int(a[0].sum()) for a in model.last_active]
        assert counts[0] == 8 and all(8 >= a >= b >= 1 for a, b in zip(counts, counts[1:]))
        seen.add(tuple(counts))
    assert len(seen) > 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.routers.parameters())

    settings = [[1.0, 1.0, 1.0], [1.0, 0.5, 0.25], [1.0, 0.25, 0.125]]
    sweep = capacity_sweep(model, [(ids, ids.roll(-1, dims=1))], settings)
    assert [row["capacities"] for row in sweep] == settings and model.training
    macs = [row["macs_per_token"] for row in sweep]
    assert macs[0] > macs[1] > macs[2] and all(math.isfinite(row["perplexity"]) for row in sweep)


@pytest.mark.parametrize("T,capacities,counts", [(100, [1.0, 0.56, 0.07], [100, 56, 7]),
                                                  (300, [1.0, 0.34, 0.17], [300, 102, 51])])
def test_adaptive_routing_keeps_exact_capacities(T, capacities, counts):
    # capacity x T tokens when that is a whole number, though its float product lies a hair above it.
    model = cotformer(n_layers=3, dim=16, hidden_dim=16, n_repeat=3, adaptive=True)
    model.set_capacities(capacities)
    model(torch.randint(0, 97, (1, T)))
    assert [int(a[0].sum()) for a in model.last_active] == counts


def test_capacity_sweep_takes_a_one_shot_iterable():
    from fastllm.models.cotformer import capacity_sweep

    model = cotformer(n_repeat=3, adaptive=True)
    ids = torch.randint(0, 97, (2, 8))
    batches = [(ids, ids.roll(-1, dims=1))]
    settings = [[1.0, 0.5, 0.25], [1.0, 0.5, 0.25]]
    from_list = capacity_sweep(model, batches, settings)
    from_generator = capacity_sweep(model, (batch for batch in batches), settings)
    assert from_generator == from_list and from_list[0] == from_list[1]
    with pytest.raises(ValueError, match="batches"):
        capacity_sweep(model, [], settings)


def test_adaptive_routing_rejects_bad_capacities_and_caches():
    model = cotformer(n_repeat=3, adaptive=True)
    for bad in ([1.0, 0.5], [0.5, 0.5, 0.5], [1.0, 0.25, 0.5], [1.0, 0.0, 0.0]):
        with pytest.raises(ValueError, match="capacities"):
            model.set_capacities(bad)
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.randint(0, 97, (1, 4)), cache=model.init_cache(1, 8))


def test_routed_tokens_attend_only_to_repeats_they_ran():
    model = cotformer(n_layers=1, n_begin=0, n_end=0, n_repeat=3, adaptive=True)
    model.set_capacities([1.0, 0.5, 0.34])
    ids = torch.randint(0, 97, (2, 6))
    logits = model(ids)
    active = model.last_active
    assert [int(a[0].sum()) for a in active] == [6, 3, 3]
    expected = model.lm_head(model.norm(naive_middle_repeats(model, model.embed(ids), 3, active)))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_matches_eager():
    model = cotformer(n_repeat=2, repeat_norm=True).train()
    ids = torch.randint(0, 97, (2, 7))
    model(ids).square().mean().backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    torch.compile(model, fullgraph=True, backend="aot_eager")(ids).square().mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager[name], rtol=1e-5, atol=1e-7, msg=name)


def test_adaptive_repeats_compute_only_their_tokens():
    """Routed repeats gather their tokens: the middle blocks see capacity x T tokens per sequence."""
    model = cotformer(n_repeat=3, adaptive=True, n_begin=1, n_end=1)
    model.set_capacities([1.0, 0.5, 0.25])
    seen = []
    middle_mlp = model.layers[1].mlp
    handle = middle_mlp.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[:2])))
    model(torch.randint(0, 97, (3, 8)), doc_ids=torch.tensor([[0] * 3 + [1] * 5] * 3))
    handle.remove()
    assert seen == [(3, 8), (3, 4), (3, 2)]
