"""Depth-weighted average (DenseFormer, arXiv 2402.02622) as the custom op ``fastllm::depth_weighted_average``.

``depth_weighted_average(states, weights)`` returns sum_k weights[k] * states[k] for states
(N, *S) and weights (K,) with K <= N: only the first K rows of ``states`` are read, so a
preallocated buffer of N rows can be passed as it fills up (DenseFormer writes block outputs into
such buffers in place). The result has shape *S and the states' dtype; sums are accumulated in fp32.

Backward gives every state gradient and the weight gradient in one pass over the output gradient
and the states (``fastllm::depth_weighted_average_backward``). On CUDA the weight gradient is summed
per block into a workspace and then per state in a fixed order: no atomics, bitwise reproducible.

Kernels: CUDA and C++ (OpenMP) for float32, bfloat16 and float16 states with float32 weights;
float64 (the tests' oracle) and float64 weights run the reference. In eager mode with no autograd to
record, the public functions run them without the dispatcher (``_backend.may_skip_dispatcher``):
DenseFormer makes 18 such calls per training step.
"""

from __future__ import annotations

import torch

from fastllm.ops import _backend
from fastllm.ops._validate import check_same_device, check_tensor
from fastllm.ops.depth_weighted_average_ref import (
    depth_weighted_average_backward_reference,
    depth_weighted_average_reference,
)
from fastllm.profiling import nvtx_range

STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
WEIGHT_DTYPES = (torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_applies(states: torch.Tensor, weights: torch.Tensor) -> bool:
    return (_backend.current_backend() == "auto" and states.dtype in KERNEL_DTYPES
            and weights.dtype == torch.float32 and states.is_contiguous())


def has_cuda_kernel() -> bool:
    return _backend._C is not None and hasattr(_backend._C, "depth_weighted_average_forward_cuda")


def _warn_no_cuda_kernel(device: torch.device) -> None:
    # The next fastest GPU path: PyTorch ops on the same device, never a copy to the CPU.
    _backend.warn_once("depth_weighted_average_cuda",
                       _backend.missing_kernel_message("depth_weighted_average", device)
                       + "; using the PyTorch implementation on the GPU meanwhile")


def _check(states: object, weights: object) -> None:
    check_tensor("states", states, dtypes=STATE_DTYPES)
    check_tensor("weights", weights, dtypes=WEIGHT_DTYPES, ndim=1)
    if states.dim() == 0:
        raise ValueError("states must have a leading depth dimension (K, *S), got a 0-dimensional tensor")
    if weights.shape[0] > states.shape[0]:
        raise ValueError(f"weights has {weights.shape[0]} entries but states holds only {states.shape[0]} "
                         "states (dimension 0)")
    if not states.is_contiguous():
        raise ValueError(f"states must be contiguous, got strides {states.stride()} for shape "
                         f"{tuple(states.shape)}")
    check_same_device([("states", states), ("weights", weights)])


def _check_backward(grad_out: object, states: torch.Tensor, weights: torch.Tensor) -> None:
    """The backward op's inputs beyond ``_check`` (run first): grad_states has the states' shape, so
    they are exactly the K weighed."""
    if states.shape[0] != weights.shape[0]:
        raise ValueError(f"states must hold exactly the {weights.shape[0]} weighed states (dimension 0), "
                         f"got {states.shape[0]}")
    check_tensor("grad_out", grad_out, dtypes=(states.dtype,))
    if tuple(grad_out.shape) != tuple(states.shape[1:]):
        raise ValueError(f"grad_out must have shape {tuple(states.shape[1:])}, got {tuple(grad_out.shape)}")
    check_same_device([("states", states), ("grad_out", grad_out)])


def _kernel_device(states: torch.Tensor, weights: torch.Tensor) -> str | None:
    """'cpu' or 'cuda' where a compiled kernel runs the op on these inputs; None for the reference."""
    if not _kernel_applies(states, weights):
        return None
    if states.device.type == "cpu" and _backend.has_cpu_kernels():
        return "cpu"
    if states.device.type == "cuda":
        if has_cuda_kernel():
            return "cuda"
        _warn_no_cuda_kernel(states.device)
    return None


def _forward_impl(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The op on checked inputs."""
    device = _kernel_device(states, weights)
    if device is None:
        return depth_weighted_average_reference(states, weights)
    weights = weights.contiguous()
    out = states.new_empty(states.shape[1:])
    args = (states.data_ptr(), weights.data_ptr(), out.data_ptr(), out.numel(), weights.shape[0],
            _backend.DTYPE_CODES[states.dtype])
    if device == "cpu":
        _backend._C.depth_weighted_average_forward_cpu(*args, _backend.cpu_threads())
    else:
        _backend._C.depth_weighted_average_forward_cuda(*args, states.device.index, _backend.cuda_stream(states.device))
    return out


def _backward_impl(grad_out: torch.Tensor, states: torch.Tensor,
                   weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward op on checked inputs."""
    device = _kernel_device(states, weights) if grad_out.dtype == states.dtype else None
    if device is None:
        return depth_weighted_average_backward_reference(grad_out, states, weights)
    grad_out, weights = grad_out.contiguous(), weights.contiguous()
    grad_states, grad_weights = torch.empty_like(states), torch.empty_like(weights)
    numel, num_states, code = grad_out.numel(), weights.shape[0], _backend.DTYPE_CODES[states.dtype]
    pointers = (grad_out.data_ptr(), states.data_ptr(), weights.data_ptr(), grad_states.data_ptr(),
                grad_weights.data_ptr())
    if device == "cpu":
        _backend._C.depth_weighted_average_backward_cpu(*pointers, numel, num_states, code, _backend.cpu_threads())
    else:
        workspace = torch.empty(_backend._C.depth_weighted_average_cuda_workspace(numel, num_states, code),
                                dtype=torch.float32, device=states.device)
        _backend._C.depth_weighted_average_backward_cuda(*pointers, workspace.data_ptr(), numel, num_states, code,
                                                         states.device.index, _backend.cuda_stream(states.device))
    return grad_states, grad_weights


# The registered ops check their own inputs (the fake implementations too): their kernels index raw
# pointers by these shapes, and torch.ops.fastllm.* can be called by anyone.
@torch.library.custom_op("fastllm::depth_weighted_average", mutates_args=())
def _forward(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    _check(states, weights)
    return _forward_impl(states, weights)


@_forward.register_fake
def _(states, weights):
    _check(states, weights)
    return states.new_empty(states.shape[1:])


@torch.library.custom_op("fastllm::depth_weighted_average_backward", mutates_args=())
def _backward(grad_out: torch.Tensor, states: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(states, weights)
    _check_backward(grad_out, states, weights)
    return _backward_impl(grad_out, states, weights)


@_backward.register_fake
def _(grad_out, states, weights):
    _check(states, weights)
    _check_backward(grad_out, states, weights)
    return torch.empty_like(states), torch.empty_like(weights)


def _setup_context(ctx, inputs, output):
    states, weights = inputs
    ctx.save_for_backward(states, weights)


def _autograd_backward(ctx, grad_out):
    states, weights = ctx.saved_tensors
    return _backward(grad_out, states, weights)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _used_rows(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # Slice only a partly used buffer: autograd's slice backward copies the whole state gradient.
    k = weights.shape[0]
    return states if k == states.shape[0] else states[:k]


def depth_weighted_average(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[k] * states[k] over the first K = len(weights) rows of ``states``.

    states: (N, *S) contiguous, float32/bfloat16/float16 (float64 for oracles), N >= K; a stacked
    tensor or a preallocated buffer whose later rows are not yet written (they are never read).
    weights: (K,) float32 (or float64). Returns (*S) in the states' dtype, fp32-accumulated.
    Differentiable in both arguments.
    """
    if torch.compiler.is_compiling():
        # The op's fake implementation checks the inputs. Here the checks would read their layouts,
        # which tracing an autograd.Function's backward (DenseFormer's) forbids.
        return _forward(_used_rows(states, weights), weights)
    _check(states, weights)
    with nvtx_range("fastllm.depth_weighted_average"):
        if _backend.may_skip_dispatcher(states, weights):
            return _forward_impl(states, weights)
        return _forward(_used_rows(states, weights), weights)


def depth_weighted_average_backward(grad_out: torch.Tensor, states: torch.Tensor,
                                    weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_states (K, *S), grad_weights (K,)) for the first K = len(weights) rows of ``states``.

    The single-pass backward on its own, for callers (DenseFormer's in-place buffers) that route the
    state gradients themselves.
    """
    if torch.compiler.is_compiling():  # checked by the op's fake implementation, as above
        return _backward(grad_out, _used_rows(states, weights), weights)
    _check(states, weights)
    used = _used_rows(states, weights)
    _check_backward(grad_out, used, weights)
    with nvtx_range("fastllm.depth_weighted_average_backward"):
        if _backend.may_skip_dispatcher(grad_out, used, weights):
            return _backward_impl(grad_out, used, weights)
        return _backward(grad_out, used, weights)
