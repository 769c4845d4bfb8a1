"""Tokenise a source into packed train/validation shards: ``prepare_dataset`` (what ``fastllm data prepare`` runs).

A prepared directory holds::

    meta.json                 written last: its presence means the directory is complete
    fastllm_tokenizer.json    (+ tokenizer.json for BPE): ``load_tokenizer(out_dir)`` reads it back
    train/shard_00000.bin ... validation documents in val/shard_*.bin

Every document is stored as ``[BoD] + ids + [EoD]``. Documents go to validation by stratified sampling:
the stream is cut into consecutive blocks of 1/val_fraction documents and a seeded hash picks one document
of each block. So the split is deterministic, exact in count, spread over the whole source, and needs no
second pass over it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from .shards import Shard, ShardWriter, token_dtype
from .sources import (DEFAULT_CORPUS_MAX_BYTES, default_corpus, default_corpus_fingerprint, document_files,
                      iter_documents)
from .tokenizers import CONFIG_NAME, load_tokenizer, train_bpe

FORMAT_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_BPE_VOCAB = 4096
_ENCODE_BATCH = 256
_MASK64 = (1 << 64) - 1


class _SplitWriter:
    """Fills ``directory/shard_NNNNN.bin`` files of about ``shard_tokens`` tokens each (documents never split)."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[str] = []
        self.num_tokens = self.num_docs = 0
        self._writer: ShardWriter | None = None

    def add(self, tokens: np.ndarray) -> None:
        if self._writer is None:
            self._writer = ShardWriter(self.directory / f"shard_{len(self.shards):05d}.bin", self.dtype)
        self._writer.add(tokens)
        self.num_tokens += tokens.size
        self.num_docs += 1
        if self._writer.num_tokens >= self.shard_tokens:
            self._seal()

    def _seal(self) -> None:
        self.shards.append(self._writer.close().name)
        self._writer = None

    def close(self) -> None:
        if self._writer is not None:
            self._seal()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


class _ValidationSplit:
    """Document ``i`` is in block ``floor(i * p / q)`` (val_fraction = p/q exactly, in integers); one seeded
    position per block is validation."""

    def __init__(self, val_fraction: float, seed: int):
        fraction = Fraction(val_fraction).limit_denominator(1 << 20)
        self.p, self.q, self.seed = fraction.numerator, fraction.denominator, seed

    def _start(self, block: int) -> int:
        return -(-block * self.q // self.p)

    def __call__(self, index: int) -> bool:
        if self.p == 0:
            return False
        block = index * self.p // self.q
        start = self._start(block)
        return index - start == _hash64(self.seed, block) % (self._start(block + 1) - start)


def _hash64(seed: int, value: int) -> int:
    """splitmix64 of (seed, value): a seeded pseudo-random 64-bit integer."""
    x = (seed * 0x9E3779B97F4A7C15 + value + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _documents(source, text_field: str, max_bytes: int | None) -> Iterator[str]:
    if isinstance(source, str) and source == "default":
        yield from default_corpus(DEFAULT_CORPUS_MAX_BYTES if max_bytes is None else max_bytes)
        return
    total = 0
    for text in iter_documents(source, text_field=text_field):
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total > max_bytes:
            return
        yield text


def _fingerprint(source, tokenizer_spec, val_fraction, seed, text_field, max_bytes, shard_tokens) -> dict | None:
    """What the output depends on, to reuse a finished directory; None for in-memory sources (never reused)."""
    if isinstance(source, str) and source == "default":
        name = default_corpus_fingerprint(DEFAULT_CORPUS_MAX_BYTES if max_bytes is None else max_bytes)
    elif isinstance(source, str) and source.startswith("hf:"):
        name = source
    elif isinstance(source, (str, os.PathLike)):
        # Path, sizes and modification times of the files read: an edited source is prepared again.
        path = Path(source).resolve()
        name = [str(path)] + [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in document_files(path)]
    else:
        return None
    if not isinstance(tokenizer_spec, str):
        return None
    return {"format": FORMAT_VERSION, "source": name, "tokenizer": _tokenizer_fingerprint(tokenizer_spec),
            "val_fraction": val_fraction,
            "seed": seed, "text_field": text_field, "max_bytes": max_bytes, "shard_tokens": shard_tokens}


def _tokenizer_fingerprint(spec: str):
    """A tokenizer name as is; a tokenizer path with the contents of the files ``load_tokenizer`` reads there,
    so a tokenizer replaced at the same path is not taken for the one the shards were made with."""
    if spec == "byte" or spec == "bpe" or spec.startswith("bpe:"):
        return spec
    path = Path(spec).resolve()
    directory = path if path.is_dir() else path.parent
    files = [directory / CONFIG_NAME, directory / "tokenizer.json"] if path.is_dir() else [path]
    files.append(directory / "tokenizer_config.json")
    return [str(path)] + [[f.name, hashlib.sha256(f.read_bytes()).hexdigest()] for f in files if f.is_file()]


def _resolve_tokenizer(tokenizer, documents, is_val):
    """A tokenizer object; ``"bpe"``/``"bpe:VOCAB"`` trains one on the training documents."""
    if not isinstance(tokenizer, str):
        return tokenizer
    if tokenizer == "bpe" or tokenizer.startswith("bpe:"):
        vocab = tokenizer.partition(":")[2] or str(DEFAULT_BPE_VOCAB)
        if not vocab.isdigit():
            raise ValueError(f"tokenizer {tokenizer!r}: expected 'bpe' or 'bpe:VOCAB_SIZE'")
        vocab = int(vocab)
        train_docs = (d for i, d in enumerate(documents()) if not is_val(i))
        return train_bpe(train_docs, vocab)
    return load_tokenizer(tokenizer)


def read_meta(data_dir: str | os.PathLike) -> dict:
    """The ``meta.json`` of a prepared directory (clear error when it is missing or incomplete)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir}: not a prepared dataset (no meta.json; run prepare_dataset / "
                                "`fastllm data prepare`, or the preparation did not finish)")
    return json.loads(path.read_text())


def prepare_dataset(source, out_dir: str | os.PathLike, tokenizer="byte", *, val_fraction: float = 0.05,
                    seed: int = 0, text_field: str = "text", max_bytes: int | None = None,
                    shard_tokens: int = 1 << 26, overwrite: bool = False) -> dict:
    """Tokenises ``source`` (see ``iter_documents``; ``"default"`` is the embedded corpus) into
    ``out_dir/{train,val}/shard_*.bin`` and saves the tokenizer there. Returns the metadata (also in meta.json).

    ``tokenizer``: a tokenizer object, ``"byte"``, ``"bpe"``/``"bpe:VOCAB"`` (train a BPE on the training
    documents; default vocabulary 4096) or a path for ``load_tokenizer``. ``max_bytes`` caps the UTF-8 text read
    (the default corpus is capped at ``DEFAULT_CORPUS_MAX_BYTES`` unless given). A directory already prepared
    with the same arguments (source and tokenizer given by name or path) is returned as it is; a directory
    holding anything else needs ``overwrite=True``. Not safe to run concurrently on one directory: under
    torchrun, prepare on rank 0, then barrier.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    out_dir = Path(out_dir)
    fingerprint = _fingerprint(source, tokenizer, val_fraction, seed, text_field, max_bytes, shard_tokens)
    meta_path = out_dir / "meta.json"
    if meta_path.is_file() and fingerprint is not None and not overwrite:
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint:
            return meta
    if out_dir.exists() and any(out_dir.iterdir()):
        # Without meta.json a directory holding only our files is an interrupted preparation: redo it.
        ours = {"train", "val", CONFIG_NAME, "tokenizer.json"}
        incomplete = not meta_path.exists() and all(p.name in ours or p.name.startswith(".")
                                                    for p in out_dir.iterdir())
        if not (overwrite or incomplete):
            raise FileExistsError(f"{out_dir} is not empty and was not prepared with these arguments; "
                                  "pass overwrite=True (fastllm data prepare --overwrite) to replace it, or, "
                                  "for fastllm train, remove it or give another data.prepared_dir")
        meta_path.unlink(missing_ok=True)  # first, so an interrupted rebuild never looks complete
        for split in SPLITS:
            shutil.rmtree(out_dir / split, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    if isinstance(source, (str, os.PathLike)):
        def documents():
            return _documents(source, text_field, max_bytes)
    else:  # a one-shot iterable: keep it, BPE training reads it twice
        kept = list(_documents(source, text_field, max_bytes))

        def documents():
            return iter(kept)
    is_val = _ValidationSplit(val_fraction, seed)
    tok = _resolve_tokenizer(tokenizer, documents, is_val)
    dtype = token_dtype(tok.vocab_size)
    writers = {split: _SplitWriter(out_dir / split, dtype, shard_tokens) for split in SPLITS}
    bos, eos = np.array([tok.bos_id]), np.array([tok.eos_id])
    try:
        stream = enumerate(documents())
        while batch := list(itertools.islice(stream, _ENCODE_BATCH)):
            for (index, _), ids in zip(batch, tok.encode_batch([text for _, text in batch])):
                split = "val" if is_val(index) else "train"
                writers[split].add(np.concatenate([bos, ids, eos]))
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for split, writer in writers.items():
        if writer.num_docs == 0 and (split == "train" or val_fraction > 0):
            raise ValueError(f"source {source!r} gave no {split} documents "
                             f"({writers['train'].num_docs + writers['val'].num_docs} documents in all, "
                             f"val_fraction={val_fraction}); it needs more documents")

    tok.save(out_dir)
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "dtype": str(dtype.newbyteorder("=")),
        "splits": {split: {"shards": w.shards, "num_tokens": w.num_tokens, "num_docs": w.num_docs}
                   for split, w in writers.items()},
    }
    tmp = meta_path.with_name(f".meta.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_path)
    return meta


def split_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The shard files of one split of a prepared directory, in order."""
    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise ValueError(f"{data_dir}: no split {split!r} (splits: {list(meta['splits'])})")
    shards = [Path(data_dir) / split / name for name in meta["splits"][split]["shards"]]
    if not shards:
        raise ValueError(f"{data_dir}: split {split!r} is empty")
    return shards


def unigram_entropy(data_dir: str | os.PathLike, split: str = "val", *, unit: str = "nats") -> float:
    """Entropy of the split's unigram token distribution over the tokens that are prediction targets
    (every token but each document's BoD): the loss of a model that ignores context and knows the token
    frequencies exactly. In nats (comparable with the cross-entropy loss) or bits."""
    if unit not in ("nats", "bits"):
        raise ValueError(f"unit must be 'nats' or 'bits', got {unit!r}")
    meta = read_meta(data_dir)
    counts = np.zeros(meta["vocab_size"], dtype=np.int64)
    for path in split_shards(data_dir, split):
        shard = Shard(path)
        counts += np.bincount(shard.tokens, minlength=counts.size)[:counts.size]
        counts[meta["bos_id"]] -= shard.num_docs
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log(p)).sum())
    return entropy if unit == "nats" else entropy / math.log(2)
