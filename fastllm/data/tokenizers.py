"""Tokenizers: byte-level (needs no files) and byte-level BPE through Hugging Face `tokenizers`.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``encode_batch(texts) -> list[np.ndarray]``
(the fast path used to prepare datasets), ``vocab_size``, ``bos_id``/``eos_id`` (the begin- and
end-of-document tokens) and ``save(directory)``; ``load_tokenizer`` reads either back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

# Written next to tokenizer.json (or alone, for the byte tokenizer) so a directory says which tokenizer it holds.
CONFIG_NAME = "fastllm_tokenizer.json"
BOD_TOKEN = "<|bod|>"
EOD_TOKEN = "<|eod|>"
# Begin/end tokens of released tokenizers, tried in order when loading a tokenizer.json without our config.
_KNOWN_BOS = (BOD_TOKEN, "<|begin_of_text|>", "<s>", "<|startoftext|>", "<|endoftext|>")
_KNOWN_EOS = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<|endoftext|>")


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 is begin-of-document, 257 end-of-document."""

    kind = "byte"
    bos_id = 256
    eos_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # Special tokens have no text; invalid UTF-8 (a sample cut inside a character) decodes to U+FFFD.
        return bytes(i for i in (int(i) for i in ids) if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(directory / CONFIG_NAME, {"type": "byte"})

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=258)"


class BPETokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` with known begin/end-of-document ids."""

    kind = "bpe"

    def __init__(self, tokenizer, bos_token: str, eos_token: str):
        self._tok = tokenizer
        # Documents are plain text: a special token's text in them ("<|eod|>") is encoded as text, never as the
        # special id (which would put a document boundary inside the document and not round-trip).
        self._tok.encode_special_tokens = True
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = self._token_id(bos_token)
        self.eos_id = self._token_id(eos_token)
        # One more than the largest id (a tokenizer.json's vocabulary may have holes), so every id fits below it.
        self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def _token_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # The Rust side encodes a batch on all cores, so callers need no process pool.
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".tokenizer.json.tmp{os.getpid()}"
        self._tok.save(str(tmp))
        os.replace(tmp, directory / "tokenizer.json")
        _write_json_atomic(directory / CONFIG_NAME,
                           {"type": "bpe", "bos_token": self.bos_token, "eos_token": self.eos_token})

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


Tokenizer = ByteTokenizer | BPETokenizer


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("BPE tokenizers need the Hugging Face `tokenizers` package: "
                          "pip install tokenizers (or: pip install 'fastllm[data]')") from e
    return tokenizers


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> BPETokenizer:
    """Trains a byte-level BPE (GPT-2 style: every string round-trips) with BoD/EoD special tokens."""
    if not isinstance(vocab_size, int) or vocab_size < 258:
        raise ValueError(f"vocab_size must be an int >= 258 (256 bytes + 2 special tokens), got {vocab_size!r}")
    tk = _import_tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                     special_tokens=[BOD_TOKEN, EOD_TOKEN], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tokenizer, BOD_TOKEN, EOD_TOKEN)


def _special_from_hf_config(directory: Path) -> tuple[str | None, str | None]:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return None, None
    config = json.loads(path.read_text())

    def content(value):
        return value.get("content") if isinstance(value, dict) else value
    return content(config.get("bos_token")), content(config.get("eos_token"))


def _load_bpe(path: Path, bos_token: str | None, eos_token: str | None) -> BPETokenizer:
    tk = _import_tokenizers()
    try:
        tokenizer = tk.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust error says what is wrong, not which file
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
    hf_bos, hf_eos = _special_from_hf_config(path.parent)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    bos_token = bos_token or hf_bos or next((t for t in _KNOWN_BOS if t in vocab), None)
    eos_token = eos_token or hf_eos or next((t for t in _KNOWN_EOS if t in vocab), None)
    if bos_token is None or eos_token is None:
        raise ValueError(f"{path}: cannot tell the begin/end-of-document tokens; "
                         "pass bos_token= and eos_token= to load_tokenizer")
    return BPETokenizer(tokenizer, bos_token, eos_token)


def load_tokenizer(path_or_name: str | os.PathLike, *, bos_token: str | None = None,
                   eos_token: str | None = None) -> Tokenizer:
    """``"byte"``; a directory written by ``save`` or ``prepare_dataset`` (or a Hugging Face model directory);
    or a tokenizer.json file."""
    if str(path_or_name) == "byte":
        return ByteTokenizer()
    path = Path(path_or_name)
    if path.is_dir():
        config_path = path / CONFIG_NAME
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            if config.get("type") == "byte":
                return ByteTokenizer()
            if config.get("type") != "bpe":
                raise ValueError(f"{config_path}: unknown tokenizer type {config.get('type')!r}")
            return _load_bpe(path / "tokenizer.json", bos_token or config["bos_token"],
                             eos_token or config["eos_token"])
        if (path / "tokenizer.json").is_file():
            return _load_bpe(path / "tokenizer.json", bos_token, eos_token)
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} or tokenizer.json in this directory")
    if path.is_file():
        return _load_bpe(path, bos_token, eos_token)
    raise FileNotFoundError(f"tokenizer {str(path_or_name)!r}: not 'byte', a directory or a tokenizer.json file")
