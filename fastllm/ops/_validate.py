"""Argument checks at the op boundary. Each error names the argument and what was expected."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch


def check_tensor(name: str, tensor: object, *, dtypes: Sequence[torch.dtype] | None = None,
                 ndim: int | None = None) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {tensor.layout}")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(tensor.dtype).removeprefix('torch.')}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    return tensor


def check_same_device(names_and_tensors: Sequence[tuple[str, torch.Tensor]]) -> torch.device:
    first_name, first = names_and_tensors[0]
    for name, tensor in names_and_tensors[1:]:
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device} but {first_name} is on {first.device}")
    return first.device


def check_shape(name: str, tensor: torch.Tensor, shape: Sequence[int], like: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of {like} {tuple(shape)}, got {tuple(tensor.shape)}")


def check_same_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype, like: str) -> None:
    if tensor.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of {like} ({dtype}), got {tensor.dtype}")


def check_real(name: str, value: object) -> float:
    """A scalar argument as a Python float: a TypeError naming it for strings, complex numbers, None."""
    if not isinstance(value, (str, bytes)):
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")


def check_int(name: str, value: object) -> int:
    """An integer argument as a Python int: a TypeError naming it for floats (never silently truncated)."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
