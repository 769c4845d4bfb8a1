"""``fastllm data prepare``: arguments and command body, for the ``fastllm`` CLI to mount as a subcommand."""

from __future__ import annotations

import argparse
import math
import time

from .prepare import prepare_dataset, unigram_entropy


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", default="default",
                        help="'default' (this interpreter's standard library), a directory of text/JSONL/Parquet "
                             "files, a .jsonl/.parquet file, or hf:NAME[:CONFIG] (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte', 'bpe' or 'bpe:VOCAB' (trained on the training split), or a tokenizer "
                             "directory / tokenizer.json (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split (default: %(default)s)")
    parser.add_argument("--text-field", default="text", help="JSONL/Parquet/datasets field (default: %(default)s)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="stop after this much UTF-8 text (the default corpus is capped at 8 MB unless given)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a directory prepared differently")


def run_prepare(args: argparse.Namespace) -> dict:
    """Prepares the dataset the arguments describe and prints a summary; returns its metadata."""
    start = time.perf_counter()
    meta = prepare_dataset(args.source, args.out, args.tokenizer, val_fraction=args.val_fraction, seed=args.seed,
                           text_field=args.text_field, max_bytes=args.max_bytes, shard_tokens=args.shard_tokens,
                           overwrite=args.overwrite)
    print(f"prepared {args.out} in {time.perf_counter() - start:.1f} s: tokenizer {meta['tokenizer']} "
          f"(vocab {meta['vocab_size']})")
    for split, info in meta["splits"].items():
        line = f"  {split}: {info['num_tokens']:,} tokens, {info['num_docs']:,} documents, {len(info['shards'])} shard(s)"
        if info["num_docs"]:
            entropy = unigram_entropy(args.out, split)
            line += f", unigram entropy {entropy:.3f} nats ({entropy / math.log(2):.3f} bits) per token"
        print(line)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastllm data prepare", description="Tokenise a corpus into packed shards.")
    add_prepare_arguments(parser)
    run_prepare(parser.parse_args(argv))
    return 0
