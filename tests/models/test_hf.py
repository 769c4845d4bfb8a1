"""Equivalence with Hugging Face transformers on tiny randomly initialised models built locally."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastllm.models import build_model, config_from_dict, from_pretrained, save_pretrained  # noqa: E402

SMALL = dict(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
CASES = [
    ("llama", dict(num_key_value_heads=2)),
    ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True, rms_norm_eps=1e-6)),
    ("llama", dict(num_key_value_heads=1, head_dim=24, rope_parameters=LLAMA3_ROPE)),
    ("llama", dict(num_key_value_heads=2, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})),
    ("apertus", dict(num_key_value_heads=2)),
    ("apertus", dict(num_key_value_heads=4, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
]


def hf_model(arch, extra):
    config_cls = {"llama": transformers.LlamaConfig, "apertus": transformers.ApertusConfig}[arch]
    model_cls = {"llama": transformers.LlamaForCausalLM, "apertus": transformers.ApertusForCausalLM}[arch]
    config = config_cls(**SMALL, **extra)
    if arch == "apertus":
        config.dtype = torch.float32  # xIELU's parameters follow config.dtype (bfloat16 by default)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Random norm gains and xIELU alphas too, so a misplaced one shows.
            if p.dim() < 2:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch,extra", CASES)
def test_from_pretrained_matches_transformers(tmp_path, arch, extra):
    reference = hf_model(arch, extra)
    reference.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert model.config.arch == arch and model.embed.weight.dtype == torch.float32
    ids = torch.randint(0, SMALL["vocab_size"], (2, 40))  # beyond original_max_position_embeddings
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_logits(reference, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,extra", [CASES[0], CASES[1], CASES[5]])
def test_save_pretrained_loads_in_transformers(tmp_path, arch, extra):
    reference = hf_model(arch, extra)
    reference.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    save_pretrained(model, tmp_path / "fastllm")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fastllm", dtype=torch.float32).eval()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 17))
    torch.testing.assert_close(hf_logits(loaded, ids), hf_logits(reference, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "apertus"])
def test_fastllm_model_round_trip(tmp_path, arch):
    # A model trained by fastllm (not from a hub) goes out and back with its config intact.
    model = build_model(config_from_dict({"arch": arch, "vocab_size": 50, "dim": 32, "n_layers": 1, "n_heads": 2,
                                          "hidden_dim": 40, "tie_embeddings": True, "rope_theta": 777.0}))
    save_pretrained(model, tmp_path)
    again = from_pretrained(tmp_path)
    assert again.config == model.config
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        torch.testing.assert_close(hf_logits(loaded, ids), model(ids), atol=1e-5, rtol=1e-5)


def test_bf16_checkpoint_loads_as_float32(tmp_path):
    reference = hf_model("llama", dict(num_key_value_heads=2)).to(torch.bfloat16)
    reference.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert model.embed.weight.dtype == torch.float32
    torch.testing.assert_close(model.embed.weight, reference.model.embed_tokens.weight.float(), rtol=0, atol=0)
    assert from_pretrained(tmp_path, dtype=torch.bfloat16).embed.weight.dtype == torch.bfloat16


def test_unsupported_checkpoints(tmp_path):
    reference = hf_model("llama", dict(num_key_value_heads=2))
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value, match in [("attention_bias", True, "attention_bias=true is not supported"),
                              ("hidden_act", "gelu", "hidden_act='gelu' are not supported"),
                              ("model_type", "gpt2", "model_type 'gpt2' is not supported")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=match):
            from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="does not match its config: missing .*layers.2"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path / "nowhere")


def test_sharded_checkpoint(tmp_path):
    reference = hf_model("apertus", dict(num_key_value_heads=2))
    reference.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = from_pretrained(tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_logits(reference, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_mamba_matches_transformers_both_ways(tmp_path, tied):
    config = transformers.MambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                                      conv_kernel=4, tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # beyond the initialisation, so every misplaced weight shows
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        expected = hf(ids).logits
        ours = from_pretrained(tmp_path / "hf")
        torch.testing.assert_close(ours(ids), expected, rtol=1e-4, atol=1e-4)
    save_pretrained(ours, tmp_path / "ours")
    reloaded = transformers.MambaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-4, atol=1e-4)
