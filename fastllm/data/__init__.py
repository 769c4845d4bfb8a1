"""Data path: document sources (the embedded corpus included), tokenizers, packed shards and the loader."""

from .goldfish import goldfish_mask
from .loader import IGNORE_INDEX, PackedLoader
from .prepare import prepare_dataset, read_meta, split_shards, unigram_entropy
from .shards import Shard, ShardError
from .sources import DEFAULT_CORPUS_MAX_BYTES, default_corpus, iter_documents
from .tokenizers import BPETokenizer, ByteTokenizer, load_tokenizer, train_bpe

__all__ = [
    "BPETokenizer", "ByteTokenizer", "DEFAULT_CORPUS_MAX_BYTES", "IGNORE_INDEX", "PackedLoader", "Shard",
    "ShardError", "default_corpus", "goldfish_mask", "iter_documents", "load_tokenizer", "prepare_dataset",
    "read_meta", "split_shards", "train_bpe", "unigram_entropy",
]
