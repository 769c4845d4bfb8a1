"""Learning-rate schedules as multiplier functions, and the optimizer factory.

A schedule maps the optimizer step (0-based) to a multiplier of the peak learning rate, so it works
with any torch optimizer through ``torch.optim.lr_scheduler.LambdaLR``:

- ``constant``: linear warm-up, then 1.
- ``linear`` / ``cosine``: linear warm-up, then decay from 1 to ``min_ratio`` over the remaining steps.
- ``wsd`` (warm-up, stable, decay; Hägele et al. 2024, arXiv 2405.18392): linear warm-up, a constant
  phase, then a decay to ``min_ratio`` over the last ``decay_fraction`` of the run with a
  ``linear``, ``cosine`` or ``1-sqrt`` shape.

Warm-up multiplies by (step + 1) / warmup_steps so that the first step already learns. Decays reach
the floor at step ``total_steps`` (one past the last step), so no step is spent at the floor with
a zero learning rate.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Callable

import torch

SCHEDULES = ("constant", "linear", "cosine", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
OPTIMIZERS = ("ademamix", "adamw")


def _decay_shape(shape: str, progress: float) -> float:
    """Fraction of the way from the floor to 1 remaining after ``progress`` in [0, 1] of a decay."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    raise ValueError(f"decay_shape must be one of {DECAY_SHAPES}, got {shape!r}")


def _multiplier(step: int, *, name: str, total_steps: int, warmup_steps: int, decay_fraction: float,
                decay_shape: str, min_ratio: float) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    if name in ("linear", "cosine"):
        decay_start, shape = warmup_steps, name
    else:  # wsd
        decay_start, shape = total_steps - round(decay_fraction * total_steps), decay_shape
        decay_start = max(decay_start, warmup_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return min_ratio + (1.0 - min_ratio) * _decay_shape(shape, progress)


def lr_multiplier(name: str, *, total_steps: int, warmup_steps: int = 0, decay_fraction: float = 0.2,
                  decay_shape: str = "1-sqrt", min_ratio: float = 0.0) -> Callable[[int], float]:
    """The schedule ``name`` as a function step -> multiplier of the peak learning rate."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    if decay_shape not in DECAY_SHAPES:
        raise ValueError(f"decay_shape must be one of {DECAY_SHAPES}, got {decay_shape!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must lie in [0, total_steps={total_steps}], got {warmup_steps}")
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must lie in [0, 1], got {decay_fraction}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must lie in [0, 1], got {min_ratio}")
    # A partial of a module-level function: LambdaLR.state_dict() stores only its plain-data keywords.
    return functools.partial(_multiplier, name=name, total_steps=total_steps, warmup_steps=warmup_steps,
                             decay_fraction=decay_fraction, decay_shape=decay_shape, min_ratio=min_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying ``lr_multiplier(name, **kwargs)`` to every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(name, **kwargs))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and the names in ``model.no_weight_decay()`` without decay.

    Models without ``no_weight_decay`` keep every parameter of fewer than two dimensions (norm gains,
    biases) out of weight decay.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if hasattr(model, "no_weight_decay"):
        excluded = set(model.no_weight_decay())
        # Checked against every parameter: the models name frozen vectors too, which are left out below.
        unknown = excluded - {n for n, _ in model.named_parameters()}
        if unknown:
            raise ValueError(f"no_weight_decay() names parameters the model does not have: {sorted(unknown)}")
    else:
        excluded = {n for n, p in named if p.ndim < 2}
    decay = [p for n, p in named if n not in excluded]
    no_decay = [p for n, p in named if n in excluded]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def ademamix_class():
    """``fastllm.optim.AdEMAMix`` when this build has it, else None."""
    try:
        return getattr(importlib.import_module("fastllm.optim"), "AdEMAMix", None)
    except ImportError:
        return None


def build_optimizer(name: str, model: torch.nn.Module, *, lr: float, betas=(0.9, 0.999, 0.9999),
                    alpha: float = 8.0, t_alpha: int | None = None, t_beta3: int | None = None,
                    eps: float = 1e-8, weight_decay: float = 0.0, fused: bool | None = None) -> torch.optim.Optimizer:
    """``"ademamix"`` (fastllm.optim.AdEMAMix, the default) or ``"adamw"`` (torch.optim.AdamW).

    ``betas`` holds (beta1, beta2, beta3); AdamW uses the first two. ``alpha``, ``t_alpha`` and
    ``t_beta3`` (AdEMAMix's slow-momentum weight and warm-up lengths) apply to AdEMAMix only.
    """
    betas = tuple(float(b) for b in betas)
    if len(betas) != 3 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be three numbers in [0, 1), got {betas}")
    groups = parameter_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas[:2], eps=eps, weight_decay=weight_decay, fused=fused)
    if name == "ademamix":
        cls = ademamix_class()
        if cls is None:
            raise ImportError("optimizer 'ademamix' needs fastllm.optim.AdEMAMix, which this build lacks; "
                              "use optim.name='adamw'")
        return cls(groups, lr=lr, betas=betas, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                   weight_decay=weight_decay, fused=fused)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
