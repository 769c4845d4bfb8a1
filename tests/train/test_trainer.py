import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastllm.optim.schedules import ademamix_class
from fastllm.testing import requires_cuda
from fastllm.train import trainer
from fastllm.train.checkpoint import list_checkpoints, load_model, load_state
from fastllm.train.metrics import read_metrics


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def test_trains_logs_evaluates_and_checkpoints(tiny_config):
    cfg = tiny_config(run__keep_checkpoints=1)
    result = trainer.train(cfg)
    assert result["status"] == "completed" and result["step"] == 6
    records = read_metrics(cfg.run.out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert all(r["tokens_per_s"] > 0 and "mfu" not in r for r in records if "loss" in r)  # no CPU peak: no MFU
    assert [r["lr"] for r in records if "loss" in r][:3] == pytest.approx([0.5e-2, 1e-2, 1e-2])  # warm-up 2
    train = losses(cfg.run.out)
    assert train[6] < train[1]
    assert math.isfinite(result["val_loss"]) and result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    assert 0 < result["unigram_entropy"] < math.log(258)
    # keep_checkpoints=1: only the last; it holds everything generation and resumption need
    (last,) = list_checkpoints(cfg.run.out)
    assert last.name == "step_00000006"
    state = torch.load(last / "train_state.pt", weights_only=True)
    assert state["step"] == 6 and state["loader"][0]["sample_index"] == 6 * 4
    model, tokenizer, train_config = load_model(cfg.run.out)
    assert tokenizer.vocab_size == 258 and train_config["run"]["steps"] == 6
    assert not any(p.name.startswith(".tmp") for p in last.parent.iterdir())


@pytest.mark.parametrize("optimizer", [
    "adamw",
    pytest.param("ademamix", marks=pytest.mark.skipif(
        ademamix_class() is None, reason="fastllm.optim.AdEMAMix is not in this build yet (lead's branch)")),
])
def test_resume_reproduces_the_uninterrupted_run(tiny_config, tmp_path, monkeypatch, optimizer):
    cfg = tiny_config(optim__name=optimizer)
    trainer.train(cfg)
    full = losses(cfg.run.out)
    full_weights = load_model(cfg.run.out)[0].state_dict()
    # Interrupt after step 3: keep only the step-3 checkpoint, as a crash during step 4..6 would.
    resumed = tmp_path / "resumed"
    shutil.copytree(cfg.run.out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    assert load_state(resumed / "checkpoints" / "step_00000003")["step"] == 3  # weights_only load
    # A run that ignored the checkpoint and trained steps 1..6 again would give the same losses and
    # weights (the CPU run is deterministic): count the training forwards.
    build, trained = trainer.build_model, []

    def build_counting(config):
        model = build(config)
        model.register_forward_hook(lambda module, args, out: trained.append(1) if module.training else None)
        return model

    monkeypatch.setattr(trainer, "build_model", build_counting)
    result = trainer.train(tiny_config(optim__name=optimizer, run__out=resumed))
    assert result["step"] == 6
    assert len(trained) == 3  # steps 4, 5, 6 (one micro batch each)
    assert losses(resumed) == full  # bit for bit, and the metrics file reads as one run
    for name, tensor in load_model(resumed)[0].state_dict().items():
        assert torch.equal(tensor, full_weights[name]), name


def test_fresh_run_refuses_a_directory_with_checkpoints(tiny_config):
    """run.resume=false in a directory that holds another run's checkpoints used to mix the two runs: the
    rotation deleted the new run's checkpoints at once (the old ones have higher steps), the result named
    the old run's checkpoint, and a later resume continued the old run. It is refused, nothing touched."""
    cfg = tiny_config(run__keep_checkpoints=1)
    trainer.train(cfg)
    metrics = open(os.path.join(cfg.run.out, "metrics.jsonl")).read()
    with pytest.raises(ValueError, match=r"run.resume=false.*already holds checkpoints"):
        trainer.train(tiny_config(run__steps=3, run__resume=False, run__keep_checkpoints=1))
    assert [p.name for p in list_checkpoints(cfg.run.out)] == ["step_00000006"]
    assert open(os.path.join(cfg.run.out, "metrics.jsonl")).read() == metrics


def test_checkpoint_is_on_disk_before_older_ones_are_deleted(tmp_path, monkeypatch):
    """Files, the checkpoint directory and its parent are fsynced before the rotation deletes the older
    checkpoint: else a power loss can leave an empty "complete" checkpoint as the only one."""
    from fastllm.data import ByteTokenizer
    from fastllm.train import checkpoint as ckpt

    events = []
    real_fsync, real_rmtree = os.fsync, shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: (events.append(("rmtree", str(path))),
                                                                  real_rmtree(path, *a, **k))[1])
    kwargs = dict(weights={"w": torch.ones(3)}, model_config={}, train_config={}, state={"step": 0},
                  tokenizer=ByteTokenizer(), keep=1)
    ckpt.save_checkpoint(tmp_path, 1, **kwargs)
    events.clear()
    final = ckpt.save_checkpoint(tmp_path, 2, **kwargs)
    synced = [path for kind, path in events if kind == "fsync"]
    deleted = next(i for i, (kind, path) in enumerate(events) if kind == "rmtree" and path.endswith("step_00000001"))
    for name in ("model.safetensors", "config.json", "train_config.json", "train_state.pt"):
        assert any(path.endswith(f"step_00000002/{name}") or path.endswith(f"-{os.getpid()}/{name}")
                   for path in synced), name
    root = os.path.realpath(final.parent)
    assert ("fsync", root) in events[:deleted], events


def test_gradient_accumulation_matches_one_big_batch(tiny_config, tmp_path):
    trainer.train(tiny_config(run__steps=3, run__out=tmp_path / "a"))
    trainer.train(tiny_config(run__steps=3, data__micro_batch_size=1, run__out=tmp_path / "b"))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert list(a) == list(b) and all(a[s] == pytest.approx(b[s], rel=1e-5) for s in a)


def test_activation_checkpointing_gives_the_same_trajectory(tiny_config, tmp_path, monkeypatch):
    # Without checkpointing applied the two runs would be the same run: count the checkpointed calls.
    real, calls = trainer.checkpoint, []
    monkeypatch.setattr(trainer, "checkpoint", lambda *args, **kwargs: (calls.append(1), real(*args, **kwargs))[1])
    trainer.train(tiny_config(run__steps=2, run__out=tmp_path / "a"))
    assert not calls
    trainer.train(tiny_config(run__steps=2, run__activation_checkpointing=True, run__out=tmp_path / "b"))
    assert calls
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert all(a[s] == pytest.approx(b[s], rel=1e-6) for s in a)


class _PoisonedForward:
    """Makes the model's n-th forward calls (1-based, training steps here) return NaN logits."""

    def __init__(self, calls: set[int]):
        self.calls, self.count = calls, 0

    def __call__(self, module, args, kwargs, output):
        self.count += 1
        return output * math.nan if self.count in self.calls else output


@pytest.mark.parametrize("bad_steps,max_skips,status", [({2}, 1, "completed"), ({2, 3}, 1, "nan")])
def test_nan_policy(tiny_config, monkeypatch, bad_steps, max_skips, status):
    build = trainer.build_model
    poison = _PoisonedForward(bad_steps)

    def build_poisoned(config):
        model = build(config)
        model.register_forward_hook(poison, with_kwargs=True)
        return model

    monkeypatch.setattr(trainer, "build_model", build_poisoned)
    cfg = tiny_config(run__steps=4, run__ckpt_interval=1, run__eval_interval=0, run__max_nan_skips=max_skips)
    result = trainer.train(cfg)
    assert result["status"] == status and result["nan_skips"] == len(bad_steps)
    records = read_metrics(cfg.run.out)
    assert sorted(r["step"] for r in records if r.get("skipped")) == sorted(bad_steps)
    steps = [int(p.name.removeprefix("step_")) for p in list_checkpoints(cfg.run.out)]
    if status == "nan":  # stopped at step 3: the last good checkpoint (step 1) is the latest
        assert result["step"] == 3 and steps[-1] == 1 and result["val_loss"] is None
    else:  # the skipped step made no update and the run finished
        assert result["step"] == 4 and steps[-1] == 4 and math.isfinite(result["val_loss"])
    for path in list_checkpoints(cfg.run.out):
        model = load_model(path)[0]
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_batch_geometry_errors(tiny_config):
    with pytest.raises(ValueError, match="data.batch_size=4 must be a multiple of data.micro_batch_size"):
        trainer.train(tiny_config(data__micro_batch_size=3))
    with pytest.raises(ValueError, match="model.vocab_size=100 is smaller than the tokenizer's vocabulary"):
        trainer.train(tiny_config(model__vocab_size=100))


def _torchrun(args: list[str], tmp_path, name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastllm.cli", "train", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_reproduce_one(tiny_config, tmp_path, parallel):
    """2 CPU processes (gloo; DDP, or FSDP2 fully_shard) at the same global batch follow the
    single-process trajectory; a distributed checkpoint resumes and loads like any other."""
    if parallel == "fsdp":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed.fsdp.fully_shard")
    # FSDP2 runs the default optimizer, AdEMAMix, on its sharded (DTensor) parameters.
    optimizer = "ademamix" if parallel == "fsdp" else "adamw"
    single = tiny_config(run__steps=4, run__out=tmp_path / "single", optim__name=optimizer)
    trainer.train(single)
    args = [f"--{key}={value}" for key, value in _flat(single.to_dict())
            if key not in ("run.out",)] + [f"--run.out={tmp_path / parallel}", f"--run.parallel={parallel}"]
    _torchrun(args, tmp_path, parallel)
    one, two = losses(tmp_path / "single"), losses(tmp_path / parallel)
    assert list(one) == list(two) == [1, 2, 3, 4]
    assert all(one[s] == pytest.approx(two[s], rel=1e-4) for s in one), (one, two)
    state = load_state(list_checkpoints(tmp_path / parallel)[-1])
    assert state["world_size"] == 2 and len(state["loader"]) == 2
    single_weights = load_model(tmp_path / "single")[0].state_dict()
    for name, tensor in load_model(tmp_path / parallel)[0].state_dict().items():
        torch.testing.assert_close(tensor, single_weights[name], rtol=1e-3, atol=1e-5)


def _flat(d: dict, prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        elif value is not None:
            yield f"{prefix}{key}", json.dumps(value, separators=(",", ":")) if isinstance(value, (list, bool)) else value


@requires_cuda
def test_gpu_bf16_compiled_run_resumes(tiny_config, tmp_path):
    """On a GPU: bf16 autocast and torch.compile; a resumed run follows the uninterrupted one."""
    cfg = tiny_config(run__device="cuda", run__compile=True, run__out=tmp_path / "full")
    result = trainer.train(cfg)
    assert result["status"] == "completed" and math.isfinite(result["val_loss"])
    full = losses(cfg.run.out)
    assert full[6] < full[1]
    shutil.copytree(cfg.run.out, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000006")
    trainer.train(tiny_config(run__device="cuda", run__compile=True, run__out=tmp_path / "resumed"))
    resumed = losses(tmp_path / "resumed")
    assert all(resumed[s] == pytest.approx(full[s], rel=1e-3) for s in full)


def test_checkpoint_save_clears_what_crashed_saves_left(tmp_path):
    """A save that crashed leaves a partial .tmp-* folder; the next complete save removes it, and a
    re-save of the same step replaces the old copy only once the new one is in place."""
    from fastllm.data import ByteTokenizer
    from fastllm.train import checkpoint as ckpt

    kwargs = dict(model_config={}, train_config={}, state={"step": 0}, tokenizer=ByteTokenizer(), keep=2)
    ckpt.save_checkpoint(tmp_path, 1, weights={"w": torch.ones(3)}, **kwargs)
    root = tmp_path / ckpt.CHECKPOINT_DIR
    (root / ".tmp-step_00000002-99999").mkdir()
    (root / ".tmp-step_00000002-99999" / "model.safetensors").write_bytes(b"partial")
    final = ckpt.save_checkpoint(tmp_path, 1, weights={"w": torch.full((3,), 2.0)}, **kwargs)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]
    assert torch.equal(ckpt.load_weights(final)["w"], torch.full((3,), 2.0))
