import random

import pytest

from fastllm.data import prepare_dataset
from fastllm.train.config import load_config


def _documents(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["def", "return", "self", "value", "for", "in", "range", "if", "else", "print", "import", "x", "y"]
    return ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(rng.randint(2, 8)))
            for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A prepared byte-level dataset of small synthetic documents (train and val splits)."""
    out = tmp_path_factory.mktemp("data")
    prepare_dataset(_documents(), out, "byte", val_fraction=0.2, seed=0)
    return out


TINY = {
    "model.dim": "32", "model.n_layers": "2", "model.n_heads": "2", "model.n_kv_heads": "1",
    "data.seq_len": "32", "data.batch_size": "4", "optim.name": "adamw", "optim.lr": "1e-2",
    "schedule.warmup_steps": "2", "schedule.decay_fraction": "0.5", "run.steps": "6", "run.eval_interval": "3",
    "run.eval_batches": "1", "run.ckpt_interval": "3", "run.log_interval": "1", "run.progress": "false",
    "run.plot": "false", "run.device": "cpu",
}


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """A config that trains a 2-layer, width-32 Llama for 6 steps on ``tiny_data`` in about a second."""
    def make(**overrides):
        values = {**TINY, "data.source": str(tiny_data), "run.out": str(tmp_path / "run")}
        values.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
        return load_config(None, values)
    return make
