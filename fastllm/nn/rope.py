"""Rotary position embeddings (RoFormer, arXiv 2104.09864) with configurable theta and long-context scaling.

Rotation convention: the head dimension is split into two halves (x1, x2) rotated as pairs
(x1[i], x2[i]), the layout of Llama and Apertus checkpoints in Hugging Face format.

Scaling (``scaling`` dict, as Hugging Face's ``rope_parameters`` writes it):
  {"rope_type": "linear", "factor": f}: positions divided by f (position interpolation).
  {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
   "original_max_position_embeddings"}: Llama 3.1 / Apertus frequency-dependent interpolation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCALING_KEYS = {
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


def check_rope_scaling(scaling: dict | None) -> None:
    """Raises ValueError unless ``scaling`` is None or a complete dict of a known rope_type."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(scaling).__name__}")
    kind = scaling.get("rope_type")
    if kind not in SCALING_KEYS:
        raise ValueError(f"rope_scaling['rope_type'] must be one of {sorted(SCALING_KEYS)}, got {kind!r}")
    missing = SCALING_KEYS[kind] - scaling.keys()
    if missing:
        raise ValueError(f"rope_scaling of type {kind!r} needs the keys {sorted(missing)}")
    for key in sorted(SCALING_KEYS[kind]):
        value = scaling[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"rope_scaling[{key!r}] must be a positive finite number, got {value!r}")
    if not scaling["factor"] >= 1.0:
        raise ValueError(f"rope_scaling['factor'] must be >= 1, got {scaling['factor']}")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(f"rope_scaling['high_freq_factor'] ({scaling['high_freq_factor']}) must exceed "
                         f"rope_scaling['low_freq_factor'] ({scaling['low_freq_factor']})")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """The head_dim / 2 angular frequencies (float32), scaled for long contexts when asked."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are interpolated by `factor`, short ones kept, the band between blended.
    old_context = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, blended, scaled)


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document: (B, T) doc ids -> (B, T) int64, 0 at each document start."""
    T = doc_ids.shape[-1]
    index = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.zeros_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    start_of_doc = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - start_of_doc


@torch.library.custom_op("fastllm::rotary_cos_sin", mutates_args=())
def _rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float()[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


@_rotary_cos_sin.register_fake
def _(positions, inv_freq):
    shape = (*positions.shape, 2 * inv_freq.shape[0])
    return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for given positions. The frequencies are recomputed on each call (head_dim / 2
    values, free next to the model) rather than kept as a buffer, so they stay float32 when the model is
    cast to bfloat16 and need no re-initialisation after building on the meta device.

    The tables come from an opaque custom op. Traced inline, torch.compile fuses pow, cos and sin into
    the kernels that rotate q and k (and into their backward), which then evaluate them for every
    element of q and k, about a hundred instructions each time, instead of once per position and
    frequency."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        check_rope_scaling(scaling)
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape positions.shape + (head_dim,), float32."""
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling, device=positions.device)
        return _rotary_cos_sin(positions, inv_freq)


def rotary_tables(rope: RotaryEmbedding, input_ids: torch.Tensor, doc_ids: torch.Tensor | None,
                  cache=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks a language model's inputs and returns the RoPE tables (cos, sin) of their positions.

    Positions restart at each document with ``doc_ids`` (B, T), continue after the tokens a ``cache``
    holds (a ``SequenceCache``: ``check_room(B, T)``, ``positions(T)``), and count from 0 otherwise.
    """
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be a (batch, seq) integer tensor, got {input_ids.dtype} "
                         f"of shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if doc_ids is not None:
        if cache is not None:
            raise ValueError("doc_ids cannot be combined with a cache")
        if doc_ids.shape != input_ids.shape:
            raise ValueError(f"doc_ids must have input_ids' shape {(B, T)}, got {tuple(doc_ids.shape)}")
        positions = positions_from_doc_ids(doc_ids)
    elif cache is not None:
        cache.check_room(B, T)
        positions = cache.positions(T, device=input_ids.device)
    else:
        positions = torch.arange(T, device=input_ids.device)
    return rope(positions)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x (B, H, T, D) by the angles of cos/sin (B, T, D) or (T, D), in float32."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)
