"""DenseFormer: identity DWAs give the plain transformer; trained DWAs match a stacked-states reference."""

from __future__ import annotations

import importlib

import pytest
import torch

from fastllm.models import DenseFormerConfig, build_model, config_from_dict
from fastllm.nn.depth_weighted_average import DepthWeightedAverages

TINY = {"vocab_size": 97, "dim": 48, "n_layers": 5, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 80}
LAYOUTS = [(1, 1), (2, 1), (1, 2), (3, 2), (2, 3), (4, 5)]


def denseformer(dilation=1, period=1, **overrides):
    torch.manual_seed(0)
    return build_model(config_from_dict({"arch": "denseformer", **TINY, "dwa_dilation": dilation,
                                         "dwa_period": period, **overrides}))


def randomize_dwa(model):
    with torch.no_grad():
        for w in model.dwa.weights.values():
            w.copy_(torch.randn_like(w) * 0.5)


def stacked_reference_forward(model, ids, doc_ids=None):
    """DenseFormer as the paper writes it: torch.stack of the selected states, then tensordot."""
    from fastllm.nn import positions_from_doc_ids

    positions = positions_from_doc_ids(doc_ids) if doc_ids is not None else torch.arange(ids.shape[1])
    cos, sin = model.rope(positions)
    k, p = model.config.dwa_dilation, model.config.dwa_period
    xs = [model.embed(ids)]
    y = xs[0]
    for i, layer in enumerate(model.layers, start=1):
        xs.append(layer(y, cos, sin, doc_ids))
        y = xs[-1]
        if i % p == 0:
            y = torch.tensordot(model.dwa.weights[str(i)], torch.stack(xs[i % k::k]), dims=1)
    return model.lm_head(model.norm(y))


@pytest.mark.parametrize("dilation,period", LAYOUTS)
def test_identity_dwa_is_the_plain_transformer(dilation, period):
    model = denseformer(dilation, period)
    torch.manual_seed(1)
    llama = build_model(config_from_dict({"arch": "llama", **TINY}))
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    assert all(name.startswith("dwa.") for name in missing) and not unexpected
    ids = torch.randint(0, 97, (2, 11))
    doc_ids = torch.tensor([[0] * 4 + [1] * 7, [0] * 11])
    for docs in (None, doc_ids):
        out, ref = model(ids, docs), llama(ids, docs)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    model(ids).square().mean().backward()
    llama(ids).square().mean().backward()
    shared = dict(llama.named_parameters())
    for name, param in model.named_parameters():
        if name in shared:
            torch.testing.assert_close(param.grad, shared[name].grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dilation,period", LAYOUTS)
def test_matches_stacked_reference_forward_and_gradients(dilation, period):
    model = denseformer(dilation, period)
    randomize_dwa(model)
    ids = torch.randint(0, 97, (2, 9))
    doc_ids = torch.tensor([[0] * 5 + [1] * 4, [0] * 9])
    out = model(ids, doc_ids)
    out.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    ref = stacked_reference_forward(model, ids, doc_ids)
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Gradients here are ~1e-3..1e-2 and agree to ~1e-6 relative: looser tolerances let a gradient
    # routed 0.1% wrong through a DWA pass.
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-8, msg=name)
    assert all(grads[f"dwa.weights.{i}"].abs().sum() > 0 for i in model.dwa.weights)


@pytest.mark.parametrize("fixed_shape", [False, True])
def test_kv_cache_matches_full_forward(fixed_shape):
    model = denseformer(2, 2).eval()
    randomize_dwa(model)
    ids = torch.randint(0, 97, (2, 10))
    full = model(ids)
    cache = model.init_cache(2, 12, fixed_shape=fixed_shape)
    assert cache.fixed_shape == fixed_shape
    pieces = [model(ids[:, :6], cache=cache), model(ids[:, 6:7], cache=cache), model(ids[:, 7:], cache=cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_dwa_weights_skip_weight_decay_and_reinitialisation():
    model = denseformer(2, 1)
    randomize_dwa(model)
    before = {name: w.detach().clone() for name, w in model.dwa.weights.items()}
    model.init_weights()
    for name, w in model.dwa.weights.items():
        assert torch.equal(w, before[name])
    assert {f"dwa.weights.{name}" for name in model.dwa.weights} <= model.no_weight_decay()
    model.dwa.reset_parameters()
    assert all(torch.equal(w, torch.eye(w.numel())[-1]) for w in model.dwa.weights.values())


def test_buffers_hold_each_residue_once():
    dwa = DepthWeightedAverages(n_layers=7, dilation=3, period=2)
    assert dwa.positions == [2, 4, 6]
    assert {name: w.numel() for name, w in dwa.weights.items()} == {"2": 1, "4": 2, "6": 3}
    x0 = torch.randn(2, 3, 4)
    run = dwa.start(x0)
    # Residue 2 serves the DWA after block 2 (x_2), residue 1 after block 4 (x_1, x_4), residue 0 after
    # block 6 (x_0, x_3, x_6): one slot per block output ever read.
    assert {r: tuple(b.shape) for r, b in run.buffers.items()} == {2: (1, 2, 3, 4), 1: (2, 2, 3, 4), 0: (3, 2, 3, 4)}
    xs = [x0] + [torch.randn(2, 3, 4) for _ in range(7)]
    outs = [run.after_block(i, xs[i]) for i in range(1, 8)]
    torch.testing.assert_close(outs[5], torch.tensordot(dwa.weights["6"].detach(), torch.stack(xs[0::3]), dims=1))
    assert outs[4] is xs[5]


def test_bfloat16_model_keeps_fp32_dwa_arithmetic():
    model = denseformer(2, 1).to(torch.bfloat16)
    out = model(torch.randint(0, 97, (2, 7)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().mean().backward()
    assert all(w.grad is not None for w in model.dwa.weights.values())


def test_config_round_trip_and_validation():
    config = DenseFormerConfig(**TINY, dwa_dilation=4, dwa_period=5)
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="dwa_dilation"):
        DenseFormerConfig(**TINY, dwa_dilation=0)
    with pytest.raises(ValueError, match="dwa_period"):
        DenseFormerConfig(**TINY, dwa_period=True)
    model = build_model(config)
    transformer_flops = build_model(config_from_dict({"arch": "llama", **TINY})).flops_per_token(64)
    assert model.flops_per_token(64) > transformer_flops


def test_torch_compile_fullgraph_matches_eager():
    model = denseformer(2, 2)
    randomize_dwa(model)
    ids = torch.randint(0, 97, (2, 9))
    model(ids).square().mean().backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(ids).square().mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager[name], rtol=1e-5, atol=1e-7, msg=name)


def test_eager_step_runs_the_dwa_kernels_without_the_dispatcher(monkeypatch):
    """The DWA Function calls the kernels directly in eager mode: the dispatcher would cost more than
    small DWAs do (benchmarks/bench_depth_weighted_average.py, test_cpu_train_step_dispatch)."""
    model = denseformer(2, 1)
    randomize_dwa(model)

    def unreachable(*args):
        raise AssertionError("went through the dispatcher")

    dwa_ops = importlib.import_module("fastllm.ops.depth_weighted_average")
    monkeypatch.setattr(dwa_ops, "_forward", unreachable)
    monkeypatch.setattr(dwa_ops, "_backward", unreachable)
    model(torch.randint(0, 97, (2, 7))).square().mean().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in model.dwa.weights.values())
