"""``fastllm`` end to end on a tiny config: data prepare, train, resume, eval, generate, errors."""

import pytest

from fastllm.cli import main
from fastllm.train.checkpoint import list_checkpoints

TINY_TOML = """
[model]
arch = "llama"
dim = 32
n_layers = 2
n_heads = 2

[data]
seq_len = 32
batch_size = 4

[optim]
name = "adamw"
lr = 1e-2

[schedule]
warmup_steps = 1

[run]
steps = 4
eval_batches = 1
log_interval = 2
progress = false
plot = false
device = "cpu"
"""


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x * {i + j}\n\n" for j in range(i % 5 + 2)))
    return src


def test_cli_end_to_end(tmp_path, corpus, capsys):
    data = tmp_path / "data"
    assert main(["data", "prepare", str(corpus), f"--out={data}", "--val-fraction=0.2"]) == 0
    assert "byte tokenizer" in capsys.readouterr().out
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    run = tmp_path / "run"
    assert main(["train", str(config), f"--data.source={data}", f"--out={run}", "--optim.betas=[0.9, 0.95, 0.99]"]) == 0
    out = capsys.readouterr().out
    assert "done: 4 steps" in out and "validation loss" in out and "unigram entropy" in out
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004"]
    # more steps in the same directory continue from the checkpoint
    assert main(["train", str(config), f"--data.source={data}", f"--out={run}", "--steps=6"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main(["eval", f"--checkpoint={run}", "--device=cpu"]) == 0
    assert "validation loss" in capsys.readouterr().out
    # a negative batch count evaluated nothing and printed "validation loss 0.0000"
    assert main(["eval", f"--checkpoint={run}", "--device=cpu", "--batches=-1"]) == 2
    assert "--batches must be >= 0" in capsys.readouterr().err
    assert main(["generate", f"--checkpoint={run}", "--prompt=def ", "--max-new-tokens=12", "--top-k=5",
                 "--top-p=0.9", "--device=cpu"]) == 0
    assert capsys.readouterr().out.startswith("def ")


@pytest.mark.parametrize("args,message", [
    (["train", "--optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
    (["train", "--lrate=1"], "unknown config key 'lrate'"),
    (["train", "missing.toml"], "config file 'missing.toml' does not exist"),
    (["generate", "--checkpoint=nowhere"], "neither a checkpoint"),
])
def test_cli_errors_are_clear(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_default_config_is_valid():
    from fastllm.train import load_config

    cfg = load_config()
    assert cfg.data.source == "default" and cfg.optim.name == "ademamix" and cfg.run.out == "runs/default"
