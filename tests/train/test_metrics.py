import sys

import pytest
import torch

from fastllm.train.metrics import MetricsLogger, peak_flops, plot_losses, read_metrics


def _logger(out, resume_step=0, **kwargs):
    return MetricsLogger(out, enabled=True, resume_step=resume_step, tensorboard=kwargs.get("tensorboard", False),
                         wandb=kwargs.get("wandb", False), wandb_project="test", config={})


def test_jsonl_and_resume_truncation(tmp_path):
    log = _logger(tmp_path)
    for step in range(1, 5):
        log.log(step, loss=4.0 - step, lr=1e-3, mfu=None)
    log.log(4, val_loss=1.5, val_ppl=4.48)
    log.close()
    assert read_metrics(tmp_path)[0] == {"step": 1, "loss": 3.0, "lr": 1e-3}  # None values are left out
    # resuming from step 2 drops what the interrupted run logged after its checkpoint
    _logger(tmp_path, resume_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_resume_after_a_torn_last_line(tmp_path):
    """A crash in the middle of a write leaves half a record at the end: resuming drops it, not the run."""
    log = _logger(tmp_path)
    for step in range(1, 4):
        log.log(step, loss=1.0 / step)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    _logger(tmp_path, resume_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):  # corruption inside the file is not hidden
        read_metrics(tmp_path)


def test_missing_tensorboard_and_wandb_are_notes(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "wandb", None)
    log = _logger(tmp_path, tensorboard=True, wandb=True)
    log.log(1, loss=1.0)
    log.close()
    assert log.notes == ["TensorBoard logging skipped: pip install tensorboard",
                         "W&B logging skipped: pip install wandb"]


def test_plot(tmp_path, monkeypatch):
    log = _logger(tmp_path)
    for step in range(1, 11):
        log.log(step, loss=5.0 / step)
    log.log(10, val_loss=0.7)
    log.close()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert "matplotlib is not installed" in plot_losses(tmp_path)
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert plot_losses(tmp_path).endswith("loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name,tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                         ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("Some GPU", None)])
def test_peak_flops_by_device_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == (None if tflops is None else tflops * 1e12)
    assert peak_flops(torch.device("cpu"), override_tflops=100) == 100e12
