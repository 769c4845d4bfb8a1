"""``PackedLoader``: batches of packed sequences from prepared shards, deterministic and exactly resumable.

Each source's token stream is cut into windows of ``seq_len + 1`` tokens that overlap by one (inputs are a
window's first ``seq_len`` tokens, labels its last ``seq_len``), shard by shard. A source's windows are
visited in a seeded random order, a fresh permutation per epoch. Sources are mixed by weight with a
deterministic smooth schedule: global sample ``g`` goes to the source furthest behind its share
(weight x (g + 1) minus the samples it already gave), so every prefix of the stream matches the weights
as closely as whole samples allow.

The stream of samples is global: training step ``i`` uses global samples ``[i * G, (i + 1) * G)`` with
``G = batch_size * world_size``, and rank ``r`` takes the ``r``-th slice of ``batch_size`` of them. So
``world_size`` ranks together see exactly the batch a single process with ``batch_size = G`` sees (rows in
rank order), and the position (``state_dict``) is the same on every rank.

Labels are -100 where there is no loss: where the next token starts another document (across a
document boundary) and where Goldfish drops the label (``goldfish_k``/``goldfish_h``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .goldfish import goldfish_mask
from .prepare import read_meta, split_shards
from .shards import Shard

IGNORE_INDEX = -100
_STATE_VERSION = 1


class _Source:
    """One source's shards, cut into windows of ``seq_len + 1`` tokens."""

    def __init__(self, path: Path, split: str, seq_len: int, verify: bool):
        self.path = path
        if path.is_dir():
            self.meta = read_meta(path)
            files = split_shards(path, split)
        elif path.is_file():
            self.meta, files = None, [path]
        else:
            raise FileNotFoundError(f"data source {str(path)!r} does not exist")
        self.shards = [Shard(f, verify=verify) for f in files]
        windows = [max(0, (s.num_tokens - 1) // seq_len) for s in self.shards]
        self.window_ends = np.cumsum(windows)
        self.num_windows = int(self.window_ends[-1])
        if self.num_windows == 0:
            tokens = sum(s.num_tokens for s in self.shards)
            raise ValueError(f"{path} (split {split!r}) has {tokens} tokens: too few for one sequence of "
                             f"seq_len + 1 = {seq_len + 1} tokens")


class PackedLoader:
    """Iterates ``{"input_ids", "labels", "doc_ids"}``, each a (batch_size, seq_len) int64 tensor.

    ``data``: a prepared directory or a shard file, a list of them (one source each), or a mapping
    ``{source: weight}``. ``weights`` (one per source) default to the sources' sizes. ``batch_size`` is
    per rank. ``doc_ids`` number the documents within each row from 0. With ``loop=False`` iteration stops
    before any source would start its second epoch (one pass over a validation set).
    """

    def __init__(self, data, *, split: str = "train", batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, weights: Sequence[float] | None = None,
                 goldfish_k: int | None = None, goldfish_h: int | None = None, goldfish_seed: int = 0,
                 loop: bool = True, verify: bool = True):
        for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("world_size", world_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if (goldfish_k is None) != (goldfish_h is None):
            raise ValueError("goldfish_k and goldfish_h must be given together (Apertus: k = 50, h = 50)")
        if goldfish_k is not None:
            goldfish_mask(np.zeros(1, dtype=np.int64), goldfish_k, goldfish_h)  # validates k and h
        if isinstance(data, Mapping):
            if weights is not None:
                raise ValueError("give weights either as a {source: weight} mapping or as weights=, not both")
            data, weights = list(data.keys()), list(data.values())
        paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        if not paths:
            raise ValueError("data must name at least one source")
        self.sources = [_Source(Path(p), split, seq_len, verify) for p in paths]
        self._check_same_tokenizer()
        sizes = np.array([s.num_windows for s in self.sources], dtype=np.float64)
        if weights is None:
            weights = sizes
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(self.sources),) or not np.all(np.isfinite(weights)) or np.any(weights < 0) \
                or weights.sum() <= 0:
            raise ValueError(f"weights must be {len(self.sources)} non-negative finite numbers, not all zero; "
                             f"got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.rank, self.world_size, self.loop = rank, world_size, loop
        self.goldfish_k, self.goldfish_h, self.goldfish_seed = goldfish_k, goldfish_h, goldfish_seed
        self._sample_index = 0
        self._counts = np.zeros(len(self.sources), dtype=np.int64)
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}

    def _check_same_tokenizer(self) -> None:
        keys = ("tokenizer", "vocab_size", "bos_id", "eos_id")
        metas = [(s.path, {k: s.meta[k] for k in keys}) for s in self.sources if s.meta is not None]
        for path, meta in metas[1:]:
            if meta != metas[0][1]:
                raise ValueError(f"sources {metas[0][0]} and {path} were prepared with different tokenizers "
                                 f"({metas[0][1]} vs {meta}); a mixture needs one tokenizer")

    @property
    def meta(self) -> dict | None:
        """meta.json of the first source (tokenizer, vocab_size, bos_id, eos_id, token counts)."""
        return self.sources[0].meta

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    # -- position -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The position (identical on every rank): plain ints, safe for ``torch.load(weights_only=True)``."""
        return {"version": _STATE_VERSION, "sample_index": self._sample_index, "counts": self._counts.tolist(),
                "seed": self.seed, "seq_len": self.seq_len, "num_windows": [s.num_windows for s in self.sources]}

    def load_state_dict(self, state: Mapping) -> None:
        for key, mine in (("version", _STATE_VERSION), ("seed", self.seed), ("seq_len", self.seq_len),
                          ("num_windows", [s.num_windows for s in self.sources])):
            if state.get(key) != mine:
                raise ValueError(f"loader state does not match this loader: {key} is {state.get(key)!r} "
                                 f"in the state, {mine!r} here (different data, seed or seq_len)")
        self._sample_index = int(state["sample_index"])
        self._counts = np.asarray(state["counts"], dtype=np.int64).copy()

    # -- iteration -----------------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def _assign(self, count: int) -> list[tuple[int, int]]:
        """Advances the mixture schedule by ``count`` global samples: (source, that source's sample number)."""
        out = []
        for g in range(self._sample_index, self._sample_index + count):
            s = int(np.argmax(self.weights * (g + 1) - self._counts)) if len(self.sources) > 1 else 0
            out.append((s, int(self._counts[s])))
            self._counts[s] += 1
        self._sample_index += count
        return out

    def __next__(self) -> dict[str, torch.Tensor]:
        saved = (self._sample_index, self._counts.copy())
        picks = self._assign(self.global_batch_size)
        if not self.loop and any(n >= self.sources[s].num_windows for s, n in picks):
            self._sample_index, self._counts = saved
            raise StopIteration
        mine = picks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        # Goldfish hashes the h tokens ending at each label; for the first label (window position 1) they
        # begin h - 2 tokens before the window, so rows carry that much context on the left.
        context = max(0, self.goldfish_h - 2) if self.goldfish_k is not None else 0
        tokens, docs = (np.stack(a) for a in zip(*(self._segment(s, n, context) for s, n in mine)))
        window_tokens, window_docs = tokens[:, context:], docs[:, context:]
        labels = window_tokens[:, 1:].copy()
        labels[window_docs[:, 1:] != window_docs[:, :-1]] = IGNORE_INDEX
        if self.goldfish_k is not None:
            drop = goldfish_mask(tokens, self.goldfish_k, self.goldfish_h, self.goldfish_seed, doc_ids=docs)
            labels[drop[:, -self.seq_len:]] = IGNORE_INDEX
        return {"input_ids": torch.from_numpy(window_tokens[:, :-1].copy()), "labels": torch.from_numpy(labels),
                "doc_ids": torch.from_numpy(window_docs[:, :-1] - window_docs[:, :1])}

    def _window(self, s: int, n: int) -> int:
        """The window of source ``s``'s ``n``-th sample: position n mod size in a permutation seeded by
        (seed, source, epoch)."""
        epoch, index = divmod(n, self.sources[s].num_windows)
        cached = self._permutations.get(s)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, s, epoch])
            cached = (epoch, rng.permutation(self.sources[s].num_windows))
            self._permutations[s] = cached
        return int(cached[1][index])

    def _segment(self, s: int, n: int, context: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and shard-wide document numbers of source ``s``'s ``n``-th window (``seq_len + 1`` tokens)
        and the ``context`` tokens before it; before the shard's start they are padding in document -1."""
        source, T = self.sources[s], self.seq_len
        window = self._window(s, n)
        shard_index = int(np.searchsorted(source.window_ends, window, side="right"))
        shard = source.shards[shard_index]
        start = (window - (int(source.window_ends[shard_index - 1]) if shard_index else 0)) * T
        begin = start - context
        tokens = np.zeros(context + T + 1, dtype=np.int64)
        docs = np.full(context + T + 1, -1, dtype=np.int64)
        tokens[max(0, -begin):] = shard.tokens[max(0, begin):start + T + 1]
        docs[max(0, -begin):] = np.searchsorted(shard.doc_starts, np.arange(max(0, begin), start + T + 1),
                                                side="right") - 1
        return tokens, docs
