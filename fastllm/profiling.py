"""NVTX ranges for Nsight Systems profiles of ops and model blocks.

Off by default (a range costs a few microseconds); switch on with FASTLLM_NVTX=1 or
``with fastllm.profiling.nvtx_enabled():``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

try:
    import nvtx as _nvtx
except ImportError:  # the package is a dependency, but a range is never worth a crash
    _nvtx = None

_enabled = os.environ.get("FASTLLM_NVTX", "0") not in ("", "0", "false", "False")


def nvtx_is_enabled() -> bool:
    return _enabled and _nvtx is not None


@contextlib.contextmanager
def nvtx_enabled(enabled: bool = True) -> Iterator[None]:
    """Turns NVTX ranges on (or off) inside the block."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range named ``name`` around the block, when ranges are enabled."""
    if not nvtx_is_enabled():
        yield
        return
    _nvtx.push_range(name, domain="fastllm")
    try:
        yield
    finally:
        _nvtx.pop_range(domain="fastllm")
