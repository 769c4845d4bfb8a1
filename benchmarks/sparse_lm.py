"""Sparse-attention language models beside a dense one of the same size (issue 4's LM check).

    python benchmarks/sparse_lm.py [--out DIR] [--key=value ...]

Trains one Llama three times with the pretraining stack on the embedded default corpus, changing
only its attention: dense (fastllm's flash kernel), hash-sparse (angular LSH, 8 buckets) and
QK-dropping (random, half of the queries and keys), then prints each run's validation loss and
training tokens/s. The defaults size a GPU run at sequence length 2048 (about a minute per model on
an H100); ``--key=value`` overrides any training option, as with ``fastllm train``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from fastllm.train.config import load_config, parse_overrides
from fastllm.train.metrics import METRICS_FILE
from fastllm.train.trainer import train

ATTENTIONS = ("fastllm_flash", "hash_sparse", "qk_drop")
GPU_DEFAULTS = {
    "model.dim": 512, "model.n_layers": 8, "model.n_heads": 8, "model.n_kv_heads": 8,
    "data.seq_len": 2048, "data.batch_size": 16, "run.steps": 300, "run.eval_interval": 0,
    "run.ckpt_interval": 0, "run.log_interval": 20, "run.plot": False, "run.progress": False, "run.resume": False,
}


def compare(out: Path, overrides: dict) -> list[dict]:
    rows = []
    for attention in ATTENTIONS:
        run_dir = out / attention
        cfg = load_config(None, {**GPU_DEFAULTS, **overrides, "model.attention": attention, "run.out": str(run_dir)})
        result = train(cfg)
        records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
        rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
        rows.append({"attention": attention, "seq_len": cfg.data.seq_len, "steps": result["step"],
                     "val_loss": result["val_loss"],
                     # the first interval holds compilation and autotuning
                     "tokens_per_s": statistics.median(rates[1:] or rates) if rates else None})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="run folders go here (default: a temporary folder)")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)
    with tempfile.TemporaryDirectory() as tmp:
        rows = compare(Path(args.out or tmp), overrides)
    dense = rows[0]["tokens_per_s"]
    print(f"\n{'attention':<16} {'seq_len':>7} {'steps':>6} {'val loss':>9} {'tokens/s':>11} {'vs dense':>8}")
    for r in rows:
        speed = f"{r['tokens_per_s'] / dense:.2f}x" if dense and r["tokens_per_s"] else "-"
        rate = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        print(f"{r['attention']:<16} {r['seq_len']:>7} {r['steps']:>6} {r['val_loss']:>9.4f} {rate:>11} {speed:>8}")
    return rows


if __name__ == "__main__":
    main()
