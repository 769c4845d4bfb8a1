"""Decoding caches: position bookkeeping, and a static key/value cache (one preallocated buffer per layer)."""

from __future__ import annotations

import torch


class SequenceCache:
    """Position bookkeeping shared by decoding caches; subclasses provide ``batch_size`` and ``max_seq_len``."""

    kind = "cache"  # how errors name it
    pos: int
    fixed_shape = False  # whether attention layers take the fixed-shape step (see KVCache)
    span: int | None = None  # the key slots a fixed-shape step attends over; None: no keys (see KVCache)

    def check_room(self, batch_size: int, new_tokens: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(f"input batch size {batch_size} differs from the cache's {self.batch_size}")
        if self.pos + new_tokens > self.max_seq_len:
            raise ValueError(f"{self.kind} full: {self.pos} cached + {new_tokens} new tokens exceed "
                             f"max_seq_len={self.max_seq_len}")

    def positions(self, new_tokens: int, device=None) -> torch.Tensor:
        """The sequence positions of the next ``new_tokens`` tokens, int64."""
        return torch.arange(self.pos, self.pos + new_tokens, device=device)

    def advance(self, new_tokens: int) -> None:
        self.pos += new_tokens

    def step_state(self) -> tuple[torch.Tensor, ...] | None:
        """The tensors a step reads and rewrites in place, when every step of T tokens has the same shapes
        and buffers (so a one-token step can be replayed as a CUDA graph); None otherwise. Saving these
        and restoring them undoes a step."""
        return None


class KVCache(SequenceCache):
    """Keys and values of the tokens seen so far, (n_layers, B, n_kv_heads, max_seq_len, head_dim).

    Every layer writes its new keys/values at ``pos`` during a forward pass; the model then calls
    ``advance`` with the number of new tokens.

    With ``fixed_shape``, the position also lives on the device (``position``): a step writes its
    keys/values there by index and attends over the first ``span`` slots (the whole buffer unless set
    lower) under ``visible_keys``, so every step of T tokens has the same shapes and buffers. Slots
    past the position hold nothing a step reads, so ``position`` alone is the state that undoes a step.
    Decoding replays one graph per span, the smallest that holds the position, so that early tokens
    do not pay for attention over the whole buffer.
    """

    kind = "KV cache"

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 device=None, dtype=torch.float32, fixed_shape: bool = False):
        shape = (n_layers, batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.position = torch.zeros((), dtype=torch.int64, device=device) if fixed_shape else None
        self.span = max_seq_len if fixed_shape else None
        self._step: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's positions and mask

    @property
    def fixed_shape(self) -> bool:
        return self.position is not None

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    def positions(self, new_tokens: int, device=None) -> torch.Tensor:
        if not self.fixed_shape:
            return super().positions(new_tokens, device)
        # A fixed-shape step makes its positions and visibility mask once, when its forward asks for
        # the positions (rotary_tables), and every layer reuses them until advance().
        slots = self.position + torch.arange(new_tokens, device=self.position.device)
        self._step = slots, torch.arange(self.span, device=slots.device) <= slots[:, None]
        return slots

    def _step_tables(self, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + new_tokens > self.span:
            raise ValueError(f"{self.kind}: {self.pos} cached + {new_tokens} new tokens exceed the span of "
                             f"{self.span} slots a fixed-shape step attends over")
        if self._step is None or self._step[0].shape[0] != new_tokens or self._step[1].shape[1] != self.span:
            self.positions(new_tokens)
        return self._step

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores this layer's new keys/values and returns all of them up to the new tokens (with
        ``fixed_shape``: the first ``span`` slots, to be read under ``visible_keys``)."""
        if self.fixed_shape:
            slots = self._step_tables(k.shape[2])[0]
            self.k[layer].index_copy_(2, slots, k.to(self.k.dtype))  # as the slice assignment below casts
            self.v[layer].index_copy_(2, slots, v.to(self.v.dtype))
            return self.k[layer, :, :, :self.span], self.v[layer, :, :, :self.span]
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def visible_keys(self, new_tokens: int) -> torch.Tensor:
        """(new_tokens, span) booleans of a fixed-shape step: new token i sees the slots up to its own
        position."""
        return self._step_tables(new_tokens)[1]

    def advance(self, new_tokens: int) -> None:
        super().advance(new_tokens)
        self._step = None
        # A step being recorded into a CUDA graph leaves the device position alone: each replay is
        # followed by an advance() outside the graph, which must not find the increment done twice.
        if self.fixed_shape and not (self.position.is_cuda and torch.cuda.is_current_stream_capturing()):
            self.position += new_tokens

    def step_state(self) -> tuple[torch.Tensor, ...] | None:
        return (self.position,) if self.fixed_shape else None

    def reset(self) -> None:
        self.pos, self._step = 0, None
        if self.fixed_shape:
            self.position.zero_()
