"""Document sources: the embedded default corpus, text-file directories, JSONL, Parquet, Hugging Face datasets.

``iter_documents(source)`` yields the documents (strings) of any of them in a deterministic order.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

# Standard-library directories that are not hand-written library code: installed packages, test suites
# (~17 MB of mostly generated or repetitive data), codec tables and pydoc's topic dump (generated data).
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                     "encodings", "pydoc_data"}
# Cap of the default corpus in UTF-8 bytes (files in path order until the cap): CPython 3.11's library outside
# the skipped folders is ~10 MB; 8 MB keeps preparation under a second with the byte tokenizer and around
# 10 s with BPE training on 2 cores, and is still more text than a 10-minute CPU run reads.
DEFAULT_CORPUS_MAX_BYTES = 8_000_000
# Suffixes read as one document per file when walking a directory; .jsonl/.parquet hold many documents each.
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".tex", ".html", ".c", ".h", ".cpp", ".json"}


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library .py files (no site-packages, no test suites), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("."))
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def default_corpus(max_bytes: int | None = DEFAULT_CORPUS_MAX_BYTES) -> Iterator[str]:
    """The embedded corpus: stdlib .py files in path order, stopping before ``max_bytes`` UTF-8 bytes."""
    total = 0
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total > max_bytes:
            return
        yield text


def default_corpus_fingerprint(max_bytes: int | None = DEFAULT_CORPUS_MAX_BYTES) -> str:
    """Names the default corpus' contents: the interpreter version and library path, and the cap."""
    return f"python-stdlib:{sys.version.split()[0]}:{sysconfig.get_paths()['stdlib']}:{max_bytes}"


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{line_no}: expected an object with a string field {text_field!r}")
            yield record[text_field]


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from e
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's error does not name the file
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names})")
    for batch in parquet.iter_batches(columns=[text_field]):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl_documents(path, text_field)
    elif name.endswith(".parquet"):
        yield from _parquet_documents(path, text_field)
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def _is_document_file(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and (name.endswith((".jsonl", ".jsonl.gz", ".parquet"))
                                         or path.suffix.lower() in TEXT_SUFFIXES)


def document_files(path: Path) -> list[Path]:
    """The files a path source reads, in order: the path itself, or a directory's document files."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"data source {str(path)!r} does not exist")
    files = sorted((p for p in path.rglob("*") if p.is_file() and _is_document_file(p)),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise ValueError(f"{path}: no document files (.jsonl, .parquet or {sorted(TEXT_SUFFIXES)})")
    return files


def _hf_documents(spec: str, text_field: str, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"source {spec!r} needs the Hugging Face `datasets` package: pip install datasets") from e
    name, _, config = spec.removeprefix("hf:").partition(":")
    dataset = datasets.load_dataset(name, config or None, split=split, streaming=True)
    yield from _record_documents(dataset, text_field)


def _record_documents(records: Iterable, text_field: str) -> Iterator[str]:
    for i, record in enumerate(records):
        text = record if isinstance(record, str) else record[text_field] if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"document {i}: expected a string or a mapping with a string field {text_field!r}, "
                             f"got {type(record).__name__}")
        yield text


def iter_documents(source, *, text_field: str = "text", hf_split: str = "train") -> Iterator[str]:
    """Documents of ``source``, in a deterministic order:

    - ``"default"``: the embedded corpus (``default_corpus()``);
    - a directory: its files in sorted path order, recursively; text files (``TEXT_SUFFIXES``) are one
      document each, ``.jsonl``/``.jsonl.gz`` and ``.parquet`` files one per record (field ``text_field``);
    - a ``.jsonl``/``.jsonl.gz``/``.parquet`` file, or any other file as one text document;
    - ``"hf:NAME"`` or ``"hf:NAME:CONFIG"``: a Hugging Face dataset (streamed, split ``hf_split``);
    - an iterable of strings or of mappings with ``text_field`` (e.g. a ``datasets.Dataset``).
    """
    if isinstance(source, str) and source == "default":
        yield from default_corpus()
    elif isinstance(source, str) and source.startswith("hf:"):
        yield from _hf_documents(source, text_field, hf_split)
    elif isinstance(source, (str, os.PathLike)):
        for file in document_files(Path(source)):
            yield from _file_documents(file, text_field)
    elif isinstance(source, Iterable):
        yield from _record_documents(source, text_field)
    else:
        raise TypeError(f"source must be 'default', 'hf:NAME', a path or an iterable of documents, "
                        f"got {type(source).__name__}")
