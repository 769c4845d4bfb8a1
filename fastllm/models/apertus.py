"""Apertus (Swiss AI, 2025): Llama with QK-norm and a non-gated xIELU MLP with learnable per-layer alphas.

Its long-context RoPE is Llama 3.1's scaling with a large theta, set through rope_theta/rope_scaling
(the released models: theta 12e6, {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1,
"high_freq_factor": 4, "original_max_position_embeddings": 8192}).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fastllm.models.registry import register_model
from fastllm.models.transformer import TransformerConfig, TransformerLM


@dataclass
class ApertusConfig(TransformerConfig):
    ARCH: ClassVar[str] = "apertus"

    mlp: str = "xielu"
    qk_norm: bool = True


ApertusLM = TransformerLM

register_model("apertus", ApertusConfig, TransformerLM)
