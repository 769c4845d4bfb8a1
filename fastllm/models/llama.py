"""Llama (arXiv 2302.13971, 2407.21783): RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fastllm.models.registry import register_model
from fastllm.models.transformer import TransformerConfig, TransformerLM


@dataclass
class LlamaConfig(TransformerConfig):
    ARCH: ClassVar[str] = "llama"

    mlp: str = "swiglu"
    qk_norm: bool = False


LlamaLM = TransformerLM

register_model("llama", LlamaConfig, TransformerLM)
