"""benchmarks/sparse_lm.py: dense, hash-sparse and QK-dropping LMs trained side by side (tiny, CPU)."""

import importlib.util
import math
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "sparse_lm.py"


def test_sparse_lm_comparison_runs_every_attention(tiny_data, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("sparse_lm", SCRIPT)
    sparse_lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sparse_lm)
    rows = sparse_lm.main(["--out", str(tmp_path), f"--data.source={tiny_data}", "--model.dim=32",
                           "--model.n_layers=1", "--model.n_heads=2", "--model.n_kv_heads=1", "--data.seq_len=32",
                           "--data.batch_size=2", "--run.steps=3", "--schedule.warmup_steps=1", "--run.log_interval=1",
                           "--run.eval_batches=1", "--run.device=cpu"])
    assert [r["attention"] for r in rows] == list(sparse_lm.ATTENTIONS)
    assert all(r["seq_len"] == 32 and r["steps"] == 3 and math.isfinite(r["val_loss"]) and r["tokens_per_s"] > 0
               for r in rows)
    assert (tmp_path / "hash_sparse" / "metrics.jsonl").exists()
    assert "qk_drop" in capsys.readouterr().out
