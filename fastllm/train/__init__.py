"""Pretraining: ``TrainConfig`` (TOML/YAML + overrides) and ``train(config)``; see fastllm/train/trainer.py."""

from fastllm.train.config import ConfigError, TrainConfig, apply_overrides, load_config, parse_overrides
from fastllm.train.trainer import train

__all__ = ["ConfigError", "TrainConfig", "apply_overrides", "load_config", "parse_overrides", "train"]
