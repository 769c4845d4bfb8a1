"""The ``fastllm`` command.

    fastllm train [config.toml|yaml] [--key=value | --section.key=value ...]
    fastllm generate --checkpoint=DIR --prompt=TEXT [--max-new-tokens=200] [--temperature=0.8] [--top-k] [--top-p]
    fastllm eval --checkpoint=DIR [--batches=N]
    fastllm data prepare SOURCE --out=DIR [--tokenizer=byte] [--val-fraction=0.01] [--seed=0]

``fastllm train`` with no arguments trains a small Llama on the embedded corpus (this interpreter's
standard library, byte tokenizer) on the CPU in a few minutes, then prints its validation loss next to
the corpus' unigram entropy. Under torchrun it trains on every process (DDP, or ``--parallel=fsdp``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from fastllm.train import load_config, parse_overrides, train

    config = load_config(args.config, parse_overrides(overrides))
    start = time.perf_counter()
    result = train(config)
    if result["status"] == "nan" or result["val_loss"] is None:
        print(f"training stopped at step {result['step']} after non-finite losses; "
              f"last good checkpoint: {result['checkpoint']}", file=sys.stderr)
        return 1
    if _is_main():
        print(f"done: {result['step']} steps in {time.perf_counter() - start:.0f} s; validation loss "
              f"{result['val_loss']:.4f} nats/token (perplexity {result['val_ppl']:.2f}); unigram entropy of the "
              f"validation text {result['unigram_entropy']:.4f} nats/token; checkpoint {result['checkpoint']}")
    return 0


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _generate(args: argparse.Namespace) -> int:
    import torch

    from fastllm.models import generate
    from fastllm.train.checkpoint import load_model
    from fastllm.train.distributed import resolve_device

    device = resolve_device(args.device)
    model, tokenizer, _ = load_model(args.checkpoint, device)
    generator = torch.Generator(device).manual_seed(args.seed)
    prompt = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(args.prompt)]], device=device)
    with torch.no_grad():
        ids = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, eos_id=tokenizer.eos_id, generator=generator)
    print(args.prompt + tokenizer.decode(ids[0, prompt.shape[1]:].tolist()))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import contextlib
    from pathlib import Path

    from fastllm.data.prepare import unigram_entropy
    from fastllm.train.checkpoint import load_model
    from fastllm.train.config import TrainConfig
    from fastllm.train.distributed import Env, resolve_device
    from fastllm.train.trainer import batch_geometry, evaluate

    if args.batches < 0:
        raise ValueError(f"--batches must be >= 0 (0 = the run's run.eval_batches), got {args.batches}")
    device = resolve_device(args.device)
    model, _, train_config = load_model(args.checkpoint, device)
    config = TrainConfig.from_dict(train_config)
    config.run.eval_batches = args.batches or config.run.eval_batches
    if args.data:
        data_dir = Path(args.data)
    elif (Path(config.data.source) / "meta.json").is_file():
        data_dir = Path(config.data.source)
    else:
        data_dir = Path(config.data.prepared_dir or Path(config.run.out) / "data")
    micro, accum = batch_geometry(config, 1)
    val = evaluate(model, data_dir, config, Env(0, 1, 0, device, owns_group=False), micro, accum,
                   contextlib.nullcontext)
    print(f"validation loss {val:.4f} nats/token (perplexity {math.exp(min(val, 700)):.2f}) over "
          f"{config.run.eval_batches} batches of {config.data.batch_size} x {config.data.seq_len} tokens; "
          f"unigram entropy {unigram_entropy(data_dir, 'val'):.4f} nats/token")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from fastllm.data import prepare_dataset

    meta = prepare_dataset(args.source, args.out, args.tokenizer, val_fraction=args.val_fraction, seed=args.seed,
                           max_bytes=args.max_bytes, overwrite=args.overwrite)
    splits = ", ".join(f"{name}: {s['num_tokens']:,} tokens in {s['num_docs']:,} documents"
                       for name, s in meta["splits"].items())
    print(f"{args.out}: {meta['tokenizer']} tokenizer (vocabulary {meta['vocab_size']}); {splits}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastllm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="pretrain a model (default: a small Llama on the embedded corpus)",
                                epilog="overrides: --section.key=value or --key=value, e.g. --steps=100 --out=runs/x "
                                       "--optim.lr=1e-3 --model.n_layers=2")
    train.add_argument("config", nargs="?", help="a TOML or YAML config (default: the built-in one)")

    gen = commands.add_parser("generate", help="sample from a checkpoint with its KV cache")
    gen.add_argument("--checkpoint", required=True, help="a checkpoint directory or a run directory (its latest)")
    gen.add_argument("--prompt", default="")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto")

    ev = commands.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", default=None, help="a prepared dataset directory (default: the run's)")
    ev.add_argument("--batches", type=int, default=0, help="global batches to evaluate (default: the run's)")
    ev.add_argument("--device", default="auto")

    data = commands.add_parser("data", help="dataset tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prep = data_commands.add_parser("prepare", help="tokenise a source into packed train/val shards")
    prep.add_argument("source", help="'default' (the embedded corpus), a directory, .jsonl/.parquet file or hf:NAME")
    prep.add_argument("--out", required=True)
    prep.add_argument("--tokenizer", default="byte", help="'byte', 'bpe:VOCAB', a tokenizer.json or a directory")
    prep.add_argument("--val-fraction", type=float, default=0.01)
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--max-bytes", type=int, default=None)
    prep.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = []
    if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv):
        # Overrides are free-form (values may hold spaces, which argparse would take for positionals).
        rest = [a for a in argv[1:] if a.startswith("--")]
        argv = [a for a in argv if not a.startswith("--")]
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(args, rest)
        if args.command == "generate":
            return _generate(args)
        if args.command == "eval":
            return _eval(args)
        return _data_prepare(args)
    except (ValueError, ImportError, OSError) as e:  # bad config, data, paths or a missing optional package
        print(f"fastllm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
