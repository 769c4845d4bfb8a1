"""Packed token shards: one binary file holds many documents' tokens, read back memory-mapped.

Layout (little-endian)::

    header   64 bytes: magic b"FLLMTOKS", version u32, itemsize u32 (2: uint16, 4: uint32),
             num_tokens u64, num_docs u64, crc32 u32 of everything after the header, zero padding
    tokens   num_tokens x itemsize
    padding  zeros up to the next multiple of 8
    starts   num_docs x int64: the offset of each document's first token (document i ends where i+1 starts)

A shard is written to a temporary file in the same directory and renamed into place when complete, so a
reader never sees half a shard under the final name.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

MAGIC = b"FLLMTOKS"
VERSION = 1
HEADER = struct.Struct("<8sIIQQI")
HEADER_SIZE = 64
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


class ShardError(ValueError):
    """A shard file that is truncated, corrupt or not a shard; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest shard dtype holding ids below ``vocab_size``."""
    return _DTYPES[2] if vocab_size <= 1 << 16 else _DTYPES[4]


def _starts_offset(num_tokens: int, itemsize: int) -> int:
    return HEADER_SIZE + -(-num_tokens * itemsize // 8) * 8


class ShardWriter:
    """Streams documents into one shard file; ``close`` seals it (header, checksum, atomic rename)."""

    def __init__(self, path: str | os.PathLike, dtype: np.dtype):
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype.itemsize not in _DTYPES:
            raise ValueError(f"dtype must be uint16 or uint32, got {dtype}")
        self._tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self._file = open(self._tmp, "wb")
        self._file.write(bytes(HEADER_SIZE))
        self._crc = 0
        self._starts: list[int] = []
        self.num_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        """Appends one non-empty document (its ids, BoD/EoD included)."""
        if tokens.size == 0:
            raise ValueError(f"empty document for {self.path}: documents hold at least their BoD/EoD tokens")
        if (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids out of range for {self.dtype} in {self.path}")
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._starts.append(self.num_tokens)
        self._file.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self.num_tokens += tokens.size

    def close(self) -> Path:
        pad = _starts_offset(self.num_tokens, self.dtype.itemsize) - HEADER_SIZE - self.num_tokens * self.dtype.itemsize
        tail = bytes(pad) + np.asarray(self._starts, dtype="<i8").tobytes()
        self._file.write(tail)
        crc = zlib.crc32(tail, self._crc)
        self._file.seek(0)
        self._file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.num_tokens, len(self._starts), crc))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class Shard:
    """A memory-mapped shard: ``tokens`` (num_tokens,) and ``doc_starts`` (num_docs,) int64."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise ShardError(f"{self.path}: shard file does not exist") from None
        if size < HEADER_SIZE:
            raise ShardError(f"{self.path}: truncated shard ({size} bytes, smaller than the {HEADER_SIZE}-byte header)")
        with open(self.path, "rb") as f:
            magic, version, itemsize, num_tokens, num_docs, crc = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise ShardError(f"{self.path}: not a fastllm token shard (bad magic {magic!r})")
        if version != VERSION:
            raise ShardError(f"{self.path}: shard format version {version}, this fastllm reads version {VERSION}")
        if itemsize not in _DTYPES:
            raise ShardError(f"{self.path}: corrupt header (token itemsize {itemsize})")
        starts_at = _starts_offset(num_tokens, itemsize)
        expected = starts_at + 8 * num_docs
        if size != expected:
            raise ShardError(f"{self.path}: truncated or corrupt shard: header says {num_tokens} tokens and "
                             f"{num_docs} documents ({expected} bytes) but the file has {size} bytes")
        self.crc32 = crc
        self.num_tokens, self.num_docs = num_tokens, num_docs
        self.dtype = _DTYPES[itemsize]
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        if verify and zlib.crc32(mm[HEADER_SIZE:]) != crc:
            raise ShardError(f"{self.path}: corrupt shard: checksum mismatch")
        self.tokens = mm[HEADER_SIZE:HEADER_SIZE + num_tokens * itemsize].view(self.dtype)
        self.doc_starts = mm[starts_at:].view("<i8")
        if verify and num_docs and (self.doc_starts[0] != 0 or np.any(np.diff(self.doc_starts) <= 0)
                                    or self.doc_starts[-1] >= num_tokens):
            raise ShardError(f"{self.path}: corrupt shard: document offsets are not increasing within the tokens")

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"Shard({str(self.path)!r}, tokens={self.num_tokens}, docs={self.num_docs}, dtype={self.dtype})"
