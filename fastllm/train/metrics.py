"""Run logging: JSONL metrics, optional TensorBoard / Weights & Biases, the loss-curve plot, MFU.

Every record is one JSON line in ``<out>/metrics.jsonl`` with ``step`` (optimizer steps done) and either
training metrics (``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu``...) or validation
metrics (``val_loss``, ``val_ppl``). TensorBoard and W&B receive the same scalars when enabled and
installed; when enabled but missing, a note says so and the run goes on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"

# Dense bf16 tensor-core peaks (FLOP/s) for MFU, matched in this order against torch.cuda.get_device_name():
# the PCIe and NVL H100s before the SXM one, whose name ("H100 80GB HBM3") they share the prefix of.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H100": 989e12, "GH200": 989e12,
                   "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12,
                   "RTX 4090": 165e12}


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for MFU: ``override_tflops`` when set, else known GPUs, else None."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def read_metrics(out: str | os.PathLike) -> list[dict]:
    """The records of ``<out>/metrics.jsonl``; a torn last line (a crash in the middle of a write) is left out."""
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({e.msg})") from None
    return records


class MetricsLogger:
    """Writes metrics on the main process; other ranks get a logger that does nothing."""

    def __init__(self, out: str | os.PathLike, *, enabled: bool, resume_step: int, tensorboard: bool,
                 wandb: bool, wandb_project: str, config: dict):
        self.out = Path(out)
        self.enabled = enabled
        self.notes: list[str] = []
        self._tb = self._wandb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        # A resumed run drops the records past its checkpoint, so the file reads as one uninterrupted run.
        kept = [r for r in read_metrics(self.out) if r["step"] <= resume_step]
        path = self.out / METRICS_FILE
        tmp = path.with_name(f".{METRICS_FILE}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
        self._file = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                self.notes.append("TensorBoard logging skipped: pip install tensorboard")
        if wandb:
            try:
                import wandb as wandb_module

                self._wandb = wandb_module.init(project=wandb_project, config=config, dir=str(self.out),
                                                resume="allow", id=_wandb_run_id(self.out))
            except ImportError:
                self.notes.append("W&B logging skipped: pip install wandb")

    def log(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run_id(out: Path) -> str:
    """One W&B run per run directory, so that a resumed run continues the same curves."""
    path = out / "wandb_run_id"
    if not path.is_file():
        path.write_text(os.urandom(8).hex())
    return path.read_text().strip()


def plot_losses(out: str | os.PathLike) -> str:
    """Writes ``<out>/loss.png`` (training and validation loss by step); returns a line saying what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss plot skipped: matplotlib is not installed (pip install matplotlib)"
    records = read_metrics(out)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(out) / PLOT_FILE
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"loss plot: {path}"
