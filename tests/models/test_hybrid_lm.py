import pytest
import torch

from fastllm.models.hybrid import HybridConfig, HybridLM
from fastllm.testing import requires_cuda


def tiny(**overrides) -> HybridLM:
    config = HybridConfig(**{"vocab_size": 53, "dim": 32, "n_layers": 3, "attention_layers": [1], "n_heads": 4,
                             "n_kv_heads": 2, "hidden_dim": 64, "d_state": 8, "max_seq_len": 64, **overrides})
    return HybridLM(config)


@pytest.mark.parametrize("fixed_shape", [False, True])
@pytest.mark.parametrize("attention_layers", [[1], [], [0, 1, 2]])
def test_decoding_equals_full_forward(attention_layers, fixed_shape, device="cpu", tol=1e-4):
    torch.manual_seed(0)
    model = tiny(attention_layers=attention_layers).to(device)
    ids = torch.randint(0, 53, (2, 10), device=device)
    full = model(ids)
    cache = model.init_cache(2, 10, fixed_shape=fixed_shape)
    # Steps of fixed shapes come from the Mamba state alone, or with a KV cache that asked for them.
    assert (cache.step_state() is not None) == (fixed_shape or not attention_layers)
    pieces = [model(ids[:, :3], cache=cache), model(ids[:, 3:6], cache=cache)]
    pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="cache full"):
        model(ids[:, :1], cache=cache)


def test_layers_and_interface():
    model = tiny(attention_layers=[0, 2], n_layers=4)
    kinds = [layer.is_attention for layer in model.layers]
    assert kinds == [True, False, True, False] and model.n_attention == 2 and model.n_mamba == 2
    assert "layers.1.mixer.A_log" in model.no_weight_decay()
    assert "layers.0.mixer.q_proj.weight" not in model.no_weight_decay()
    config = model.config
    assert HybridConfig.from_dict(config.to_dict()) == config
    for bad in ({"attention_layers": [3]}, {"attention_layers": [1, 1]}, {"d_state": 300}):
        with pytest.raises(ValueError):
            HybridConfig(**{"n_layers": 3, **bad})
    ids = torch.randint(0, 53, (2, 7))
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1]] * 2)
    assert model(ids, doc_ids=doc_ids).shape == (2, 7, 53)
    assert model.flops_per_token(128) > 6 * model.num_params(exclude_embeddings=True)


@pytest.mark.parametrize("bad,key", [({"norm_eps": -1.0}, "norm_eps"), ({"rope_theta": 0.0}, "rope_theta"),
                                     ({"init_std": float("inf")}, "init_std"), ({"init_std": "big"}, "init_std"),
                                     ({"tie_embeddings": "yes"}, "tie_embeddings"),
                                     ({"attention": "flash9"}, "attention"),
                                     ({"attention_layers": 1}, "attention_layers"),
                                     ({"dim": 100, "n_heads": 6}, "n_heads")])
def test_bad_configs_name_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        HybridConfig(**{"n_layers": 3, "attention_layers": [1], **bad})


@pytest.mark.parametrize("attention_layers", [[1], [], [0, 1, 2]])
def test_cache_reset_starts_over(attention_layers):
    torch.manual_seed(0)
    model = tiny(attention_layers=attention_layers)
    ids = torch.randint(0, 53, (2, 6))
    cache = model.init_cache(2, 8)
    first = model(ids, cache=cache)
    cache.reset()
    assert cache.pos == 0
    torch.testing.assert_close(model(ids, cache=cache), first, rtol=0, atol=0)


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = tiny()
    ids = torch.randint(0, 53, (4, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, 53), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@requires_cuda
@pytest.mark.parametrize("fixed_shape", [False, True])
def test_cuda_decoding_equals_full_forward(fixed_shape):
    test_decoding_equals_full_forward([1], fixed_shape, device="cuda", tol=2e-3)
