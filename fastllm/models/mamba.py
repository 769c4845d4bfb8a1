"""A pure Mamba-1 language model (arch "mamba"): embeddings, pre-norm Mamba blocks, final norm, LM head.

The layout and parameter names are those of mamba_ssm's MambaLMHeadModel / Hugging Face's
MambaForCausalLM (backbone.embeddings, backbone.layers.i.{norm, mixer.*}, backbone.norm_f, lm_head),
so their checkpoints load by name. Packed sequences: like Mamba's own pretraining, the recurrence
runs through document boundaries (``doc_ids`` is accepted and not used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fastllm.models.registry import ModelConfig, register_model
from fastllm.nn.lm_head import logits_or_loss
from fastllm.nn.mamba import MambaBlock, MambaCache

_INT_FIELDS = ("vocab_size", "dim", "n_layers", "d_state", "d_conv", "expand", "dt_rank", "max_seq_len")


@dataclass
class MambaConfig(ModelConfig):
    ARCH: ClassVar[str] = "mamba"

    arch: str = "mamba"
    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # ceil(dim / 16)
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        if self.arch != self.ARCH:
            raise ValueError(f"MambaConfig is arch {self.ARCH!r}, got arch={self.arch!r}")
        if self.dt_rank is None and isinstance(self.dim, int):
            self.dt_rank = math.ceil(self.dim / 16)
        self.check_fields(ints=_INT_FIELDS, floats=("norm_eps", "init_std"), bools=("tie_embeddings",))
        if self.d_state > 256:
            raise ValueError(f"d_state must be at most 256, got {self.d_state}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.dim

    @classmethod
    def from_hf_config(cls, hf: dict) -> "MambaConfig":
        """The config of a Hugging Face MambaForCausalLM (its config.json as a dict); the weights then
        load by name. Checkpoints with projection biases or without a conv bias are refused."""
        if hf.get("model_type") != "mamba":
            raise ValueError(f"expected a Hugging Face config with model_type 'mamba', got {hf.get('model_type')!r}")
        if hf.get("use_bias", False) or not hf.get("use_conv_bias", True) or hf.get("hidden_act", "silu") != "silu":
            raise ValueError("only Mamba checkpoints without projection biases, with a conv bias and silu are supported")
        rank = hf.get("time_step_rank", "auto")
        return cls(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                   d_state=hf.get("state_size", 16), d_conv=hf.get("conv_kernel", 4), expand=hf.get("expand", 2),
                   dt_rank=None if rank == "auto" else rank, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                   tie_embeddings=hf.get("tie_word_embeddings", True),
                   init_std=hf.get("initializer_range", 0.02))

    def to_hf_config(self) -> dict:
        """The Hugging Face config.json contents for this model (MambaForCausalLM)."""
        return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "vocab_size": self.vocab_size,
                "hidden_size": self.dim, "num_hidden_layers": self.n_layers, "state_size": self.d_state,
                "conv_kernel": self.d_conv, "expand": self.expand, "intermediate_size": self.d_inner,
                "time_step_rank": self.dt_rank, "layer_norm_epsilon": self.norm_eps, "use_bias": False,
                "use_conv_bias": True, "hidden_act": "silu", "tie_word_embeddings": self.tie_embeddings,
                "initializer_range": self.init_std, "residual_in_fp32": True}


class _Backbone(nn.Module):
    def __init__(self, c: MambaConfig):
        super().__init__()
        self.embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(
            MambaBlock(c.dim, c.norm_eps, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand, dt_rank=c.dt_rank,
                       layer_idx=i) for i in range(c.n_layers))
        self.norm_f = nn.RMSNorm(c.dim, eps=c.norm_eps)


class MambaLM(nn.Module):
    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = c = config
        self.backbone = _Backbone(c)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.dim, c.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) embeddings and projections (out_proj scaled by 1/sqrt(n_layers), as
        mamba_ssm's prenorm-residual rescaling), the SSM parameters as in MambaMixer."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Embedding) or (isinstance(module, nn.Linear) and not name.endswith("dt_proj")):
                scale = 1 / math.sqrt(self.config.n_layers) if name.endswith("out_proj") else 1.0
                nn.init.normal_(module.weight, std=std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for layer in self.backbone.layers:
            layer.mixer.reset_ssm_parameters()

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                cache: MambaCache | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (B, T); ``cache`` continues from the tokens it has seen. With
        ``labels`` (B, T), the summed cross-entropy of the tokens not labelled -100 instead."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be a (batch, seq) integer tensor, got {input_ids.dtype} "
                             f"of shape {tuple(input_ids.shape)}")
        if doc_ids is not None and doc_ids.shape != input_ids.shape:
            raise ValueError(f"doc_ids must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(doc_ids.shape)}")
        if cache is not None:
            cache.check_room(*input_ids.shape)
        x = self.backbone.embeddings(input_ids)
        for layer in self.backbone.layers:
            x = layer(x, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        x = self.backbone.norm_f(x)
        weight = self.backbone.embeddings.weight if self.lm_head is None else self.lm_head.weight
        return logits_or_loss(x, weight, labels)

    def init_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None,
                   fixed_shape: bool = False) -> MambaCache:
        """Zero recurrent state for ``batch_size`` sequences (its size does not grow with max_seq_len);
        its steps always have fixed shapes, whatever ``fixed_shape`` asks."""
        weight = self.backbone.embeddings.weight
        c = self.config
        return MambaCache(c.n_layers, batch_size, c.d_inner, c.d_conv, c.d_state, max_seq_len,
                          device=weight.device if device is None else device,
                          dtype=weight.dtype if dtype is None else dtype)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.backbone.embeddings.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N for the matmul parameters (the output projection included)
        plus the scan, about 9 FLOPs per (channel, state) forward, times 3 for forward + backward."""
        c = self.config
        n = self.num_params(exclude_embeddings=True) + (c.vocab_size * c.dim if self.lm_head is None else 0)
        return 6.0 * n + 27.0 * c.n_layers * c.d_inner * c.d_state

    def no_weight_decay(self) -> set[str]:
        """Vectors (norm gains, biases, D) and A_log stay out of weight decay, as in mamba_ssm."""
        return {name for name, p in self.named_parameters() if p.dim() < 2 or name.endswith("A_log")}


register_model("mamba", MambaConfig, MambaLM)
