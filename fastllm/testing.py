"""Helpers shared by tests and benchmarks: poisoned outputs, the error-ratio acceptance rule, a recorder of
dispatched ops.

The rule: a kernel is accepted when its error against an fp64 (or fp32) reference is at most
``factor`` times the error of the same-precision PyTorch implementation (2x forward, 3x backward),
plus a small absolute floor so that exact baselines do not demand exact kernels.
"""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

def requires_cuda(test):
    """Marks a test that needs a CUDA device: skipped (and reported as skipped) without one."""
    import pytest

    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(pytest.mark.gpu(test))


FORWARD_FACTOR = 2.0
BACKWARD_FACTOR = 3.0


def poison_(tensor: torch.Tensor) -> torch.Tensor:
    """Fills a floating-point buffer with NaN (integers with their max) so unwritten elements show."""
    if tensor.is_floating_point():
        return tensor.fill_(math.nan)
    return tensor.fill_(torch.iinfo(tensor.dtype).max)


def misaligned(tensor: torch.Tensor) -> torch.Tensor:
    """tensor's values in a contiguous tensor one element past an aligned address (where kernels that
    load 16-byte vectors must take their scalar path)."""
    return torch.empty(tensor.numel() + 1, dtype=tensor.dtype, device=tensor.device)[1:].view_as(tensor).copy_(tensor)


def max_abs_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |value - reference| in fp64; inf when either has a NaN where the other has none."""
    if value.shape != reference.shape:
        raise AssertionError(f"shape {tuple(value.shape)} != reference shape {tuple(reference.shape)}")
    if value.numel() == 0:
        return 0.0
    diff = (value.double() - reference.double()).abs()
    if torch.isnan(diff).any():
        return math.inf
    return diff.max().item()


def assert_error_ratio(name: str, value: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor,
                       factor: float = FORWARD_FACTOR, floor: float | None = None) -> None:
    """Asserts err(value) <= factor * err(baseline) + floor, errors measured against ``reference``.

    ``floor`` defaults to one unit of ``value``'s precision at the reference's scale.
    """
    err = max_abs_error(value, reference)
    base = max_abs_error(baseline, reference)
    if floor is None:
        scale = reference.abs().max().item() if reference.numel() else 1.0
        floor = torch.finfo(value.dtype).eps * max(scale, 1.0)
    if not err <= factor * base + floor:
        raise AssertionError(f"{name}: error {err:.3e} exceeds {factor} x baseline error {base:.3e} "
                             f"+ floor {floor:.1e}")


class DispatchedOps(TorchDispatchMode):
    """Inside ``with DispatchedOps() as seen:``, ``seen.ops`` lists the name of every op that reaches the
    dispatcher ("fastllm.depth_weighted_average", "aten.add", ...), in order."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
