"""What every op shares: the compiled module, backend selection, dtype codes and CUDA streams."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:
    from fastllm import _C
except ImportError as error:  # a source checkout that was never built
    _C = None
    _C_IMPORT_ERROR: ImportError | None = error
else:
    _C_IMPORT_ERROR = None

BACKENDS = ("auto", "reference")
# Codes shared with csrc/common/dtypes.h.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_backend = os.environ.get("FASTLLM_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"FASTLLM_BACKEND must be one of {BACKENDS}, got {_backend!r}")


def triton_runs_on(tensor: torch.Tensor, interpret: bool) -> bool:
    """Whether a Triton kernel runs on ``tensor``'s device: CUDA, or the CPU under the interpreter
    (``interpret``). The interpreter runs kernels on real CPU tensors at once, so under tracing (fake
    or functional tensors: opcheck, torch.compile; dynamo tracing the Python around the ops, which
    cannot trace the interpreter) the CPU graph gets the torch path instead."""
    return tensor.device.type == "cuda" or (tensor.device.type == "cpu" and interpret and holds_data(tensor)
                                            and not torch.compiler.is_compiling())


def holds_data(tensor: torch.Tensor) -> bool:
    """False for the fake and functional tensors of tracing (opcheck, torch.compile), whose data a
    kernel called with raw pointers cannot read."""
    return not isinstance(tensor, (FakeTensor, FunctionalTensor))


def may_skip_dispatcher(*tensors: torch.Tensor) -> bool:
    """Whether an op may run its implementation directly instead of through ``torch.ops``: eager mode
    on plain tensors with no autograd to record, and nothing that must see the call (torch.compile,
    functorch transforms, dispatch modes). A custom op's dispatch costs tens of microseconds of
    Python, more than a small kernel: DenseFormer's 18 DWA calls per step."""
    return (not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors)
            and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and _get_current_dispatch_mode() is None)


def current_backend() -> str:
    """'auto' runs the fastest kernel for each device; 'reference' runs the pure-PyTorch oracles."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Runs every fastllm op inside the block on backend ``name`` ('auto' or 'reference')."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def build_info() -> dict:
    """What the compiled module contains; empty fields when it was not built."""
    if _C is None:
        return {"compiled": False, "error": str(_C_IMPORT_ERROR), "openmp": False, "cuda": False,
                "cuda_archs": "", "cuda_runtime_version": 0, "cuda_device_count": 0}
    return {"compiled": True, **_C.build_info()}


def has_cpu_kernels() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and hasattr(_C, "ademamix_step_cuda")


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def missing_kernel_message(op: str, device: torch.device) -> str:
    if _C is None:
        return (f"fastllm.{op}: the compiled module fastllm._C is missing ({_C_IMPORT_ERROR}); "
                "reinstall with `pip install -e .`")
    return (f"fastllm.{op}: this build has no CUDA kernels for {device}; rebuild with nvcc on PATH "
            "(FASTLLM_CUDA=1 pip install -e .)")


def cuda_stream(device: torch.device) -> int:
    """The raw handle of torch's current stream on ``device``, for the compiled launchers."""
    return torch.cuda.current_stream(device).cuda_stream


def cpu_threads() -> int:
    """CPU kernels use as many threads as torch's intra-op pool."""
    return torch.get_num_threads()
