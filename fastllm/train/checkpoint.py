"""Checkpoints: one directory per step under ``<out>/checkpoints/step_<N>/``.

    model.safetensors   model weights (full, unsharded; tied weights stored once)
    config.json         the model config (fastllm.models.config_from_dict)
    train_config.json   the TrainConfig of the run
    train_state.pt      optimizer, scheduler, data-loader positions and RNG states of every rank, step
                        counters; plain tensors and Python data, so ``torch.load(weights_only=True)`` reads it
    tokenizer files     so that generation needs nothing else

A checkpoint is written into a hidden temporary directory and renamed into place when complete, so a
crash never leaves a partial ``step_<N>``; the latest complete one is the highest step. Only the last
``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "train_state.pt"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run directory, oldest first."""
    root = Path(out) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: neither a checkpoint (no {WEIGHTS}) nor a run directory with checkpoints")
    return found[-1]


def unique_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops names whose tensor shares memory with an earlier name (tied embeddings); safetensors refuses aliases."""
    seen, out = set(), {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def rng_state() -> dict:
    """This process' RNG states as tensors and Python data (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(x):
    # torch.save keeps tuples, but be robust to a round trip through lists
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(out: str | os.PathLike, step: int, *, weights: dict[str, torch.Tensor], model_config: dict,
                    train_config: dict, state: dict, tokenizer, keep: int) -> Path:
    """Writes ``step_<step>`` atomically, then deletes all but the newest ``keep`` checkpoints."""
    root = Path(out) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(unique_state_dict(weights), tmp / WEIGHTS, metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    (tmp / "train_config.json").write_text(json.dumps(train_config, indent=2) + "\n")
    torch.save(state, tmp / STATE)
    tokenizer.save(tmp)
    for path in [*tmp.iterdir(), tmp]:  # on disk before it counts as complete and older ones go
        _fsync(path)
    replaced = root / f".old-{checkpoint_name(step)}-{os.getpid()}"
    if final.exists():  # a rerun of the same step (resumed run) replaces it: moved aside, deleted once replaced
        os.replace(final, replaced)
    os.replace(tmp, final)
    _fsync(root)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    # What crashed saves left (partial .tmp-* folders, .old-* ones moved aside) once a complete one is in place.
    for leftover in [*root.glob(".tmp-step_*"), *root.glob(".old-step_*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / WEIGHTS)


def load_state(path: str | os.PathLike) -> dict:
    return torch.load(Path(path) / STATE, weights_only=True, map_location="cpu")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, tokenizer, train config dict) from a checkpoint or run directory, model in eval mode."""
    from fastllm.data import load_tokenizer
    from fastllm.models import build_model, config_from_dict

    path = resolve_checkpoint(path)
    config = config_from_dict(json.loads((path / "config.json").read_text()))
    model = build_model(config)
    fill_missing_aliases(model, weights := load_weights(path))
    model.load_state_dict(weights, strict=True)
    train_config = json.loads((path / "train_config.json").read_text())
    return model.to(device).eval(), load_tokenizer(path), train_config


def fill_missing_aliases(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Adds the names ``unique_state_dict`` dropped (tied weights) back to ``weights``, in place."""
    by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name)
    for names in by_param.values():
        present = [n for n in names if n in weights]
        for name in names:
            if name not in weights and present:
                weights[name] = weights[present[0]]
