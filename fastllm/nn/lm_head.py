"""The language-model output: logits, or the training loss straight from the hidden states."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastllm.ops.linear_cross_entropy import linear_cross_entropy


def logits_or_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, vocab) of the final hidden states x (B, T, D) and the output embedding ``weight``
    (vocab, D); with ``labels`` (B, T), the summed cross-entropy over the tokens whose label is not
    -100, computed chunk by chunk by the fused linear cross-entropy, so the logits never exist in full.
    """
    if labels is None:
        return F.linear(x, weight)
    # Custom ops are opaque to autocast: cast as F.linear would under it.
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
    elif x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    return linear_cross_entropy(x.flatten(0, 1), weight, labels.flatten(), reduction="sum")
