"""DenseFormer (arXiv 2402.02622): a transformer whose blocks read depth-weighted averages of all
earlier block outputs (and the embedding) instead of only the previous one.

``dwa_dilation`` k: a DWA after block i averages x_j for j = i (mod k) only. ``dwa_period`` p: DWAs
follow every p-th block only. The DWA weights start as the identity, so a fresh DenseFormer computes
exactly the transformer with its blocks; they are kept out of weight decay and out of init_weights().
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fastllm.models.registry import register_model
from fastllm.models.transformer import TransformerConfig, TransformerLM
from fastllm.nn import rotary_tables
from fastllm.nn.depth_weighted_average import DepthWeightedAverages


@dataclass
class DenseFormerConfig(TransformerConfig):
    ARCH: ClassVar[str] = "denseformer"

    dwa_dilation: int = 1
    dwa_period: int = 1

    def __post_init__(self):
        super().__post_init__()
        for name in ("dwa_dilation", "dwa_period"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


class DenseFormerLM(TransformerLM):
    def __init__(self, config: DenseFormerConfig):
        super().__init__(config)
        self.dwa = DepthWeightedAverages(config.n_layers, config.dwa_dilation, config.dwa_period)

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None, cache=None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        cos, sin = rotary_tables(self.rope, input_ids, doc_ids, cache)
        x = self.embed(input_ids)
        dwa = self.dwa.start(x)
        for i, layer in enumerate(self.layers, start=1):
            x = dwa.after_block(i, layer(x, cos, sin, doc_ids, cache))
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.output(x, labels)

    def flops_per_token(self, seq_len: int) -> float:
        """The transformer's training FLOPs plus 6 per state and channel for each DWA (forward and backward)."""
        states = sum(w.numel() for w in self.dwa.weights.values())
        return super().flops_per_token(seq_len) + 6.0 * states * self.config.dim

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {f"dwa.weights.{name}" for name in self.dwa.weights}


register_model("denseformer", DenseFormerConfig, DenseFormerLM)
