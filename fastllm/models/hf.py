"""Hugging Face interoperability: Llama, Apertus and Mamba checkpoint directories (config.json + safetensors).

``from_pretrained`` reads a directory that transformers wrote (single or sharded safetensors) into a
fastllm model; ``save_pretrained`` writes one that transformers' LlamaForCausalLM/ApertusForCausalLM load.
Only the features fastllm models have are accepted: no biases, full rotary dimension, SiLU-gated (Llama)
or xIELU (Apertus) MLPs; anything else is refused with the offending config key named.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fastllm.models.apertus import ApertusConfig
from fastllm.models.llama import LlamaConfig
from fastllm.models.mamba import MambaConfig
from fastllm.models.registry import build_model

_HF_ARCH = {"llama": ("LlamaForCausalLM", "silu", LlamaConfig), "apertus": ("ApertusForCausalLM", "xielu",
                                                                             ApertusConfig)}
# transformers' defaults where config.json leaves a key out.
_APERTUS_DEFAULT_ROPE = {"rope_type": "llama3", "rope_theta": 12000000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_XIELU_BETA, _XIELU_EPS = 0.5, -1e-6

# Per-layer module names: (Hugging Face, fastllm), applied to names under model.layers.N / layers.N.
_LAYER_NAMES = {
    "llama": [("input_layernorm.", "attn_norm."), ("post_attention_layernorm.", "mlp_norm."),
              ("self_attn.", "attn."), ("mlp.", "mlp.")],
    "apertus": [("attention_layernorm.", "attn_norm."), ("feedforward_layernorm.", "mlp_norm."),
                ("self_attn.", "attn."), ("mlp.act_fn.", "mlp.act."), ("mlp.", "mlp.")],
}
_TOP_NAMES = [("model.embed_tokens.", "embed."), ("model.norm.", "norm."), ("lm_head.", "lm_head.")]


def _rename(name: str, arch: str, to_fastllm: bool) -> str:
    src, dst = (0, 1) if to_fastllm else (1, 0)
    layers = ("model.layers.", "layers.")
    if name.startswith(layers[src]):
        index, rest = name[len(layers[src]):].split(".", 1)
        for pair in _LAYER_NAMES[arch]:
            if rest.startswith(pair[src]):
                return f"{layers[dst]}{index}.{pair[dst]}{rest[len(pair[src]):]}"
    for pair in _TOP_NAMES:
        if name.startswith(pair[src]):
            return pair[dst] + name[len(pair[src]):]
    raise ValueError(f"unexpected {arch} weight name {name!r}")


def _rope_from_hf(hf: dict, arch: str) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers >= 5 `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    params = hf.get("rope_parameters")
    if params is None:
        legacy = dict(hf.get("rope_scaling") or {})
        if "type" in legacy:
            legacy["rope_type"] = legacy.pop("type")
        if "rope_theta" in hf or legacy:
            params = {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0), **legacy}
        else:
            params = dict(_APERTUS_DEFAULT_ROPE) if arch == "apertus" else {"rope_type": "default",
                                                                           "rope_theta": 10000.0}
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    kind = params.get("rope_type", "default")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, None
    keys = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings")}
    if kind not in keys:
        raise ValueError(f"rope_type {kind!r} is not supported (supported: default, {', '.join(keys)})")
    return theta, {"rope_type": kind, **{k: params[k] for k in keys[kind]}}


def config_from_hf(hf: dict, **overrides):
    """The fastllm config of a Hugging Face config.json dict (``overrides``: extra fastllm fields, e.g. attention)."""
    arch = hf.get("model_type")
    if arch not in _HF_ARCH:
        raise ValueError(f"model_type {arch!r} is not supported (supported: {sorted(_HF_ARCH)})")
    _, act, config_cls = _HF_ARCH[arch]
    if hf.get("hidden_act", act) != act:
        raise ValueError(f"{arch} checkpoints with hidden_act={hf['hidden_act']!r} are not supported (need {act!r})")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise ValueError(f"{key}=true is not supported: fastllm models have no biases")
    theta, scaling = _rope_from_hf(hf, arch)
    fields = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        hidden_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6 if arch == "llama" else 1e-5),
        rope_theta=theta, rope_scaling=scaling, max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02))
    return config_cls(**{**fields, **overrides})


def config_to_hf(config, dtype: torch.dtype) -> dict:
    architecture, act, _ = _HF_ARCH[config.arch]
    rope = {"rope_type": "default", "rope_theta": config.rope_theta, **(config.rope_scaling or {})}
    hf = {
        "architectures": [architecture], "model_type": config.arch, "vocab_size": config.vocab_size,
        "hidden_size": config.dim, "intermediate_size": config.hidden_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "hidden_act": act, "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings, "attention_bias": False,
        "initializer_range": config.init_std, "rope_parameters": rope,
        # The same, as transformers < 5 reads it.
        "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if config.arch == "llama":
        hf["mlp_bias"] = False
    return hf


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(path / shard))
        return state
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    return load_file(single)


def from_pretrained(path, *, dtype: torch.dtype = torch.float32, device="cpu", **overrides):
    """A fastllm model with the weights of the Hugging Face Llama/Apertus/Mamba checkpoint directory ``path``.

    Weights are cast to ``dtype`` (float32 by default: master weights for training) on ``device``;
    ``overrides`` sets fastllm-only config fields such as ``attention``.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json")
    hf_config = json.loads(config_file.read_text())
    hf_state = _load_safetensors(path)
    if hf_config.get("model_type") == "mamba":
        # fastllm's Mamba LM keeps mamba_ssm's / transformers' parameter names.
        config = MambaConfig.from_dict({**MambaConfig.from_hf_config(hf_config).to_dict(), **overrides})
        return _build_loaded(config, hf_state, path, dtype, device)
    config = config_from_hf(hf_config, **overrides)

    state = {}
    for hf_name, tensor in hf_state.items():
        if hf_name.endswith(("rotary_emb.inv_freq", "mlp.act_fn.beta", "mlp.act_fn.eps")):
            if hf_name.endswith("act_fn.beta") and not math.isclose(tensor.item(), _XIELU_BETA, rel_tol=1e-2):
                raise ValueError(f"{hf_name} = {tensor.item()} but fastllm's xIELU has beta = {_XIELU_BETA}")
            continue
        state[_rename(hf_name, config.arch, to_fastllm=True)] = tensor
    return _build_loaded(config, state, path, dtype, device)


def _build_loaded(config, state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype, device):
    if config.tie_embeddings:
        state = {name: tensor for name, tensor in state.items() if name != "lm_head.weight"}
    # Built without memory on the meta device, then allocated once in the target dtype and device.
    with torch.device("meta"):
        model = build_model(config).to(dtype)
    model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config: missing {missing}, unexpected {unexpected}")
    return model


def save_pretrained(model, path, *, dtype: torch.dtype | None = None) -> None:
    """Writes ``model`` as a Hugging Face checkpoint directory (config.json + model.safetensors).

    ``dtype`` casts the saved weights (default: the model's own dtype).
    """
    config = model.config
    if config.arch not in (*_HF_ARCH, "mamba"):
        raise ValueError(f"save_pretrained supports {sorted((*_HF_ARCH, 'mamba'))} models, got arch {config.arch!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(model.parameters()).dtype
    weights = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()}
    if config.arch == "mamba":  # fastllm's Mamba LM keeps transformers' parameter names
        state = weights
        hf_config = {**config.to_hf_config(), "torch_dtype": str(dtype).removeprefix("torch.")}
    else:
        state = {_rename(name, config.arch, to_fastllm=False): t for name, t in weights.items()}
        if config.arch == "apertus":
            # transformers keeps xIELU's constants as buffers of every layer.
            for i in range(config.n_layers):
                state[f"model.layers.{i}.mlp.act_fn.beta"] = torch.tensor(_XIELU_BETA, dtype=dtype)
                state[f"model.layers.{i}.mlp.act_fn.eps"] = torch.tensor(_XIELU_EPS, dtype=dtype)
        hf_config = config_to_hf(config, dtype)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
