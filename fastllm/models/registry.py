"""The model registry: architectures by name, each a (config dataclass, model class) pair."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import ClassVar

from torch import nn


class ModelConfig:
    """Base of the architectures' config dataclasses: dict and JSON round trips, unknown keys refused."""

    ARCH: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.ARCH} config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def check_fields(self, *, ints=(), floats=(), bools=()) -> None:
        """Raises ValueError naming the field unless each of ``ints`` is a positive integer, each of
        ``floats`` a positive finite number (stored as float) and each of ``bools`` true or false."""
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in floats:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
            setattr(self, name, float(value))
        for name in bools:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


_MODELS: dict[str, tuple[type, type]] = {}


def register_model(arch: str, config_cls: type, model_cls: type) -> None:
    """Makes ``arch`` buildable: ``config_from_dict({"arch": arch, ...})`` and ``build_model(config)``."""
    if not hasattr(config_cls, "from_dict") or not hasattr(config_cls, "to_dict"):
        raise TypeError(f"config class for {arch!r} needs from_dict() and to_dict()")
    _MODELS[arch] = (config_cls, model_cls)


def model_names() -> list[str]:
    return sorted(_MODELS)


def _lookup(arch) -> tuple[type, type]:
    try:
        return _MODELS[arch]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model arch {arch!r}; registered: {model_names()}") from None


def config_from_dict(d: dict):
    """The config of architecture ``d["arch"]`` built from the other keys (unknown keys are an error)."""
    if not isinstance(d, dict):
        raise TypeError(f"a model config must be a dict, got {type(d).__name__}")
    if "arch" not in d:
        raise ValueError(f"a model config needs an 'arch' key (one of {model_names()})")
    config_cls, _ = _lookup(d["arch"])
    return config_cls.from_dict(d)


def build_model(config) -> nn.Module:
    """A freshly initialised model for ``config`` (a registered config dataclass or a dict)."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    config_cls, model_cls = _lookup(getattr(config, "arch", None))
    if not isinstance(config, config_cls):
        raise TypeError(f"arch {config.arch!r} expects a {config_cls.__name__}, got {type(config).__name__}")
    return model_cls(config)
