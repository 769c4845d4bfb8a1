"""A static key/value cache for incremental decoding: one preallocated buffer per layer."""

from __future__ import annotations

import torch


class SequenceCache:
    """Position bookkeeping shared by decoding caches; subclasses provide ``batch_size`` and ``max_seq_len``."""

    kind = "cache"  # how errors name it
    pos: int

    def check_room(self, batch_size: int, new_tokens: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(f"input batch size {batch_size} differs from the cache's {self.batch_size}")
        if self.pos + new_tokens > self.max_seq_len:
            raise ValueError(f"{self.kind} full: {self.pos} cached + {new_tokens} new tokens exceed "
                             f"max_seq_len={self.max_seq_len}")

    def advance(self, new_tokens: int) -> None:
        self.pos += new_tokens

    def step_state(self) -> tuple[torch.Tensor, ...] | None:
        """The tensors a one-token step reads and rewrites in place, when every step has the same shapes
        and buffers (a recurrent state: the step can be replayed as a CUDA graph); None otherwise."""
        return None


class KVCache(SequenceCache):
    """Keys and values of the tokens seen so far, (n_layers, B, n_kv_heads, max_seq_len, head_dim).

    Every layer writes its new keys/values at ``pos`` during a forward pass; the model then calls
    ``advance`` with the number of new tokens.
    """

    kind = "KV cache"

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (n_layers, batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores this layer's new keys/values and returns all of them up to the new tokens."""
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.pos = 0
