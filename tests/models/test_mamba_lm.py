import pytest
import torch

from fastllm.models.mamba import MambaConfig, MambaLM
from fastllm.ops import use_backend
from fastllm.testing import requires_cuda


def tiny(**overrides) -> MambaLM:
    config = MambaConfig(**{"vocab_size": 61, "dim": 16, "n_layers": 2, "d_state": 8, "max_seq_len": 64, **overrides})
    return MambaLM(config)


@pytest.mark.parametrize("tie", [True, False])
def test_decoding_equals_full_forward(tie, device="cpu", dtype=torch.float32, tol=1e-4):
    torch.manual_seed(0)
    model = tiny(tie_embeddings=tie).to(device, dtype)
    ids = torch.randint(0, 61, (3, 11), device=device)
    full = model(ids)
    cache = model.init_cache(3, 11)
    # Prefill 4 tokens, a chunk of 3, then one token at a time.
    pieces = [model(ids[:, :4], cache=cache), model(ids[:, 4:7], cache=cache)]
    pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(7, 11)]
    assert cache.pos == 11
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=tol, atol=tol)


def test_kernels_match_reference_backend_with_gradients():
    torch.manual_seed(0)
    model = tiny()
    ids = torch.randint(0, 61, (2, 300), device="cpu")  # crosses a scan chunk
    loss = model(ids).logsumexp(-1).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with use_backend("reference"):
        ref_loss = model(ids).logsumexp(-1).mean()
        ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5, msg=name)


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = tiny()
    ids = torch.randint(0, 61, (4, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 61), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_config_and_model_interface():
    config = MambaConfig(vocab_size=61, dim=16, n_layers=2)
    assert config.dt_rank == 1 and config.d_inner == 32
    assert MambaConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown mamba config keys"):
        MambaConfig.from_dict({**config.to_dict(), "n_heads": 4})
    with pytest.raises(ValueError, match="d_state"):
        MambaConfig(d_state=0)
    with pytest.raises(ValueError, match="arch"):
        MambaConfig(arch="llama")
    model = MambaLM(config)
    names = dict(model.named_parameters())
    assert "backbone.layers.1.mixer.A_log" in names and "backbone.norm_f.weight" in names
    decay_free = model.no_weight_decay()
    assert "backbone.layers.0.mixer.A_log" in decay_free and "backbone.layers.0.mixer.D" in decay_free
    assert "backbone.layers.0.mixer.in_proj.weight" not in decay_free
    assert model.num_params() - model.num_params(exclude_embeddings=True) == 61 * 16
    assert model.flops_per_token(128) > 6 * model.num_params(exclude_embeddings=True)
    ids = torch.randint(0, 61, (2, 5))
    assert model(ids, doc_ids=torch.zeros_like(ids)).shape == (2, 5, 61)
    with pytest.raises(ValueError, match="input_ids"):
        model(ids.float())
    cache = model.init_cache(2, 4)
    with pytest.raises(ValueError, match="cache full"):
        model(ids, cache=cache)


def test_hugging_face_config_round_trip():
    config = MambaConfig(vocab_size=61, dim=48, n_layers=3, d_state=8, tie_embeddings=False)
    hf = config.to_hf_config()
    assert hf["time_step_rank"] == 3 and hf["intermediate_size"] == 96
    assert MambaConfig.from_hf_config(hf) == config
    assert MambaConfig.from_hf_config({**hf, "time_step_rank": "auto"}).dt_rank == 3
    for bad in ({"model_type": "llama"}, {"use_bias": True}, {"use_conv_bias": False}):
        with pytest.raises(ValueError):
            MambaConfig.from_hf_config({**hf, **bad})


@requires_cuda
def test_cuda_decoding_equals_full_forward():
    test_decoding_equals_full_forward(True, device="cuda", dtype=torch.float32, tol=2e-3)
