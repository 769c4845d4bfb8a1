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
from fastllm.ops.flash_attention import (attention_implementation, flash_attention, hash_sparse_attention,
                                         qk_sparse_attention)
from fastllm.ops.xielu import has_cpp_kernels as _xielu_has_cpp
from fastllm.ops.xielu import xielu


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
            "xielu": {"cpu": "reference" if reference else ("cpp" if _xielu_has_cpp() else "torch-fp32"),
                      "cuda": "reference" if reference else ("triton" if _triton_installed() else "torch-fp32")},
            **dict.fromkeys(("flash_attention", "qk_sparse_attention", "hash_sparse_attention"),
                            {"cpu": attention_implementation("cpu"), "cuda": attention_implementation("cuda")}),
        },
    }


__all__ = ["ademamix_step_", "available", "build_info", "current_backend", "flash_attention", "hash_sparse_attention",
           "qk_sparse_attention", "use_backend", "xielu"]
