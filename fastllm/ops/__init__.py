"""fastllm.ops: drop-in custom ops (torch.library, namespace ``fastllm``).

Every op validates its inputs, dispatches by device to a CUDA, Triton or C++ CPU kernel, and keeps
a pure-PyTorch reference as the oracle. ``FASTLLM_BACKEND=reference`` (or ``use_backend``) runs the
references everywhere; ``available()`` tells what this build will run.
"""

from __future__ import annotations

import importlib.util

import torch

from fastllm.ops import _backend
from fastllm.ops._backend import build_info, current_backend, use_backend
from fastllm.ops.ademamix import ademamix_step_
from fastllm.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from fastllm.ops.selective_scan import selective_scan
from fastllm.ops.selective_state_update import selective_state_update


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> dict:
    """The compiled module's contents and the implementation each op will use per device."""
    info = build_info()
    reference = current_backend() == "reference"
    cuda_kernel = "reference" if reference else ("cuda" if _backend.has_cuda_kernels() else "reference")
    return {
        "backend": current_backend(),
        "build": info,
        "triton": _triton_installed(),
        "torch_cuda": torch.cuda.is_available(),
        "ops": {
            "ademamix_step_": {
                "cpu": "reference" if reference or not _backend.has_cpu_kernels() else "cpp",
                "cuda": cuda_kernel,
            },
            **{op: {"cpu": "reference" if reference or not _backend.has_cpu_kernels() else "cpp",
                    "cuda": "reference" if reference or not hasattr(_backend._C, launcher) else "cuda"}
               for op, launcher in (("selective_scan", "selective_scan_fwd_cuda"),
                                    ("selective_state_update", "selective_state_update_cuda"))},
        },
    }


__all__ = ["ademamix_step_", "available", "build_info", "causal_conv1d", "causal_conv1d_update", "current_backend",
           "selective_scan", "selective_state_update", "use_backend"]
