"""Training configuration: five sections loaded from TOML or YAML, with command-line overrides.

    [model]     the model config, passed to fastllm.models.config_from_dict (``arch`` picks the class)
    [data]      corpus, tokenizer, sequence length, batch sizes, Goldfish loss
    [optim]     optimizer and its hyper-parameters, gradient clipping
    [schedule]  learning-rate schedule
    [run]       steps, evaluation, checkpoints, logging, device, precision, parallelism

Overrides are ``--section.key=value`` or ``--key=value`` when ``key`` names a field of exactly one
section (``--steps=100``, ``--out=runs/x``). Unknown sections or keys and values of the wrong type
raise ``ConfigError`` naming the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field

from fastllm.optim.schedules import DECAY_SHAPES, OPTIMIZERS, SCHEDULES


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def default_model() -> dict:
    """A small Llama that learns the embedded corpus byte by byte on a 2-core CPU in minutes.

    ``vocab_size`` defaults to the tokenizer's and ``max_seq_len`` to ``data.seq_len``.
    """
    return {"arch": "llama", "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "tie_embeddings": True}


@dataclass
class DataConfig:
    source: str = "default"  # "default" (the embedded corpus), text directory, JSONL/Parquet file, prepared dir
    tokenizer: str = "byte"  # "byte", a tokenizer.json / directory, or "bpe:<vocab size>" trained on the source
    prepared_dir: str = ""  # where tokenised shards go; "" = <run.out>/data
    val_fraction: float = 0.01
    seq_len: int = 256
    batch_size: int = 16  # global batch, in sequences per optimizer step
    micro_batch_size: int = 0  # sequences per forward pass and process; 0 = batch_size / world size
    seed: int = 0
    goldfish_k: int = 0  # 0 = off; Apertus uses k = 50, h = 50
    goldfish_h: int = 50
    goldfish_seed: int = 0


@dataclass
class OptimConfig:
    name: str = "ademamix"  # "ademamix" or "adamw"
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999, 0.9999])  # AdamW uses the first two
    alpha: float = 8.0  # AdEMAMix slow-momentum weight
    t_alpha: int | None = None  # AdEMAMix warm-ups of alpha and beta3; None = the run's total steps
    t_beta3: int | None = None
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping


@dataclass
class ScheduleConfig:
    name: str = "wsd"  # "constant", "linear", "cosine" or "wsd"
    warmup_steps: int = 25
    decay_fraction: float = 0.2  # wsd: fraction of the run spent decaying
    decay_shape: str = "1-sqrt"  # wsd: "linear", "cosine" or "1-sqrt"
    min_lr_ratio: float = 0.0  # floor, as a fraction of the peak learning rate


@dataclass
class RunConfig:
    out: str = "runs/default"
    steps: int = 250
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1"
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16" or "fp32"
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard)
    compile: bool = False
    activation_checkpointing: bool = False
    eval_interval: int = 125  # steps between validation passes (and at the end); 0 = only at the end
    eval_batches: int = 8
    log_interval: int = 10
    ckpt_interval: int = 125  # steps between checkpoints (and at the end); 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest checkpoint in ``out``; false refuses an ``out`` holding checkpoints
    max_nan_skips: int = 5  # steps with a NaN/inf loss or gradient skipped before the run stops
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "fastllm"
    plot: bool = True
    peak_tflops: float = 0.0  # for MFU; 0 = look the device up (known GPUs only)


@dataclass
class TrainConfig:
    model: dict = field(default_factory=default_model)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return apply_overrides(cls(), {}, base=d)

    def validate(self) -> TrainConfig:
        """Raises ConfigError on values that would fail later, naming the key."""
        checks = [
            ("data.seq_len", self.data.seq_len >= 1, "must be >= 1"),
            ("data.batch_size", self.data.batch_size >= 1, "must be >= 1"),
            ("data.micro_batch_size", self.data.micro_batch_size >= 0, "must be >= 0"),
            ("data.val_fraction", 0.0 < self.data.val_fraction < 1.0, "must lie in (0, 1)"),
            ("data.seed", self.data.seed >= 0, "must be >= 0"),
            ("data.goldfish_k", self.data.goldfish_k == 0 or self.data.goldfish_k >= 2,
             "must be 0 (off) or >= 2 (1/k of the labels are dropped)"),
            ("data.goldfish_h", self.data.goldfish_h >= 1, "must be >= 1"),
            ("optim.name", self.optim.name in OPTIMIZERS, f"must be one of {OPTIMIZERS}"),
            ("optim.lr", self.optim.lr > 0 and math.isfinite(self.optim.lr), "must be a positive number"),
            ("optim.betas", len(self.optim.betas) == 3 and all(0 <= b < 1 for b in self.optim.betas),
             "must be three numbers in [0, 1)"),
            ("optim.eps", self.optim.eps >= 0, "must be >= 0"),
            ("optim.weight_decay", self.optim.weight_decay >= 0, "must be >= 0"),
            ("optim.grad_clip", self.optim.grad_clip >= 0, "must be >= 0 (0 = off)"),
            ("optim.t_alpha", self.optim.t_alpha is None or self.optim.t_alpha >= 1, "must be >= 1 or none"),
            ("optim.t_beta3", self.optim.t_beta3 is None or self.optim.t_beta3 >= 1, "must be >= 1 or none"),
            ("schedule.name", self.schedule.name in SCHEDULES, f"must be one of {SCHEDULES}"),
            ("schedule.decay_shape", self.schedule.decay_shape in DECAY_SHAPES, f"must be one of {DECAY_SHAPES}"),
            ("schedule.warmup_steps", 0 <= self.schedule.warmup_steps <= self.run.steps,
             f"must lie in [0, run.steps={self.run.steps}]"),
            ("schedule.decay_fraction", 0 <= self.schedule.decay_fraction <= 1, "must lie in [0, 1]"),
            ("schedule.min_lr_ratio", 0 <= self.schedule.min_lr_ratio <= 1, "must lie in [0, 1]"),
            ("run.steps", self.run.steps >= 1, "must be >= 1"),
            ("run.precision", self.run.precision in ("auto", "bf16", "fp32"), "must be 'auto', 'bf16' or 'fp32'"),
            ("run.parallel", self.run.parallel in ("ddp", "fsdp"), "must be 'ddp' or 'fsdp'"),
            ("run.eval_interval", self.run.eval_interval >= 0, "must be >= 0"),
            ("run.eval_batches", self.run.eval_batches >= 1, "must be >= 1"),
            ("run.log_interval", self.run.log_interval >= 1, "must be >= 1"),
            ("run.ckpt_interval", self.run.ckpt_interval >= 0, "must be >= 0"),
            ("run.keep_checkpoints", self.run.keep_checkpoints >= 1, "must be >= 1"),
            ("run.max_nan_skips", self.run.max_nan_skips >= 0, "must be >= 0"),
            ("run.peak_tflops", self.run.peak_tflops >= 0, "must be >= 0"),
        ]
        for key, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{key} {rule}, got {_get(self, key)!r}")
        if not (self.run.device in ("auto", "cpu", "cuda") or self.run.device.startswith("cuda:")):
            raise ConfigError(f"run.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.run.device!r}")
        if not isinstance(self.model.get("arch"), str):
            raise ConfigError("model.arch must name a registered architecture, e.g. 'llama'")
        from fastllm.models import config_from_dict

        try:
            config_from_dict(self.model)
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"model: {e}") from None
        return self


SECTIONS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _get(cfg: TrainConfig, key: str):
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def _convert(key: str, value, annotation):
    """``value`` (a TOML/YAML value or an override string) as the field's type, or ConfigError."""
    hint = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if hint in (typing.Union, types.UnionType):  # only "X | None" is used
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(key, value, next(a for a in args if a is not type(None)))
    if hint is list:
        if isinstance(value, str):
            value = _parse_literal(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported field type {annotation} for {key}")


def _parse_literal(text: str):
    """An override value for the free-form model section: JSON, else true/false/none, else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    return text


def _field_types(section: str) -> dict:
    cls = SECTIONS[section].default_factory().__class__
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _resolve_key(key: str) -> tuple[str, str]:
    """``section.name`` or a bare ``name`` that belongs to exactly one section."""
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {key!r}; sections: {sorted(SECTIONS)}")
        if section != "model" and name not in _field_types(section):
            raise ConfigError(f"unknown key {key!r}; [{section}] has {sorted(_field_types(section))}")
        return section, name
    owners = [s for s in SECTIONS if s != "model" and key in _field_types(s)]
    if not owners:
        raise ConfigError(f"unknown config key {key!r}; use --section.key=value, sections: {sorted(SECTIONS)}")
    if len(owners) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous, write one of {[f'{s}.{key}' for s in owners]}")
    return owners[0], key


def apply_overrides(cfg: TrainConfig, overrides: dict[str, object], *, base: dict | None = None) -> TrainConfig:
    """A new config: ``base`` (nested dict from a file) then ``overrides`` (flat keys) applied to ``cfg``."""
    cfg = dataclasses.replace(cfg, model=dict(cfg.model), data=dataclasses.replace(cfg.data),
                              optim=dataclasses.replace(cfg.optim), schedule=dataclasses.replace(cfg.schedule),
                              run=dataclasses.replace(cfg.run))
    flat: list[tuple[str, object]] = []
    for section, values in (base or {}).items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}; sections: {sorted(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a table of key = value, got {values!r}")
        if section == "model":
            cfg.model = dict(values)  # a model section in a file replaces the default model entirely
            continue
        flat += [(f"{section}.{k}", v) for k, v in values.items()]
    flat += list(overrides.items())
    for key, value in flat:
        section, name = _resolve_key(key)
        if section == "model":
            cfg.model[name] = _parse_literal(value) if isinstance(value, str) else value
        else:
            setattr(getattr(cfg, section), name, _convert(f"{section}.{name}", value, _field_types(section)[name]))
    return cfg.validate()


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["--a.b=1", "--c=x"]`` -> ``{"a.b": "1", "c": "x"}``; anything else is a ConfigError."""
    out = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"overrides are written --key=value or --section.key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        out[key.replace("-", "_")] = value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, object] | None = None) -> TrainConfig:
    """The defaults, updated by the TOML/YAML file at ``path`` (if any), then by ``overrides``."""
    base = {}
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in (".toml", ".yaml", ".yml"):
            raise ConfigError(f"config file {path!r} must end in .toml, .yaml or .yml")
        try:
            if suffix == ".toml":
                with open(path, "rb") as f:
                    base = tomllib.load(f)
            else:
                import yaml

                with open(path) as f:
                    base = yaml.safe_load(f) or {}
        except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError
            raise ConfigError(f"cannot parse {path}: {e}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"{path} must hold sections of key = value, got {type(base).__name__}")
    return apply_overrides(TrainConfig(), overrides or {}, base=base)
