"""One Mamba decoding step as the custom op ``fastllm::selective_state_update_``.

``selective_state_update`` has mamba_ssm's signature: the state (batch, dim, N) is updated in place
and the step's output (batch, dim) returned. The kernels (C++ CPU, CUDA) use the selective scan's
per-position math (csrc/selective_scan/selective_scan.h), so stepping through a sequence reproduces
``selective_scan``. x, dt, z, B, C share one dtype (float32, float16, bfloat16); A, D, dt_bias and
the state are float32 (half-precision A, D, dt_bias are cast). float64 (and FASTLLM_BACKEND=reference)
runs the pure-PyTorch reference.
Inference only: not differentiable. Eager calls with no autograd to record skip the dispatcher
(``_backend.may_skip_dispatcher``), whose Python costs about as much as a small step's kernel.
"""

from __future__ import annotations

import torch

from fastllm.ops import _backend
from fastllm.ops._validate import check_same_device, check_same_dtype, check_shape, check_tensor
from fastllm.ops.selective_scan import INPUT_DTYPES, KERNEL_DTYPES, MAX_STATES, PARAM_DTYPES, as_float32_param
from fastllm.ops.selective_state_update_ref import selective_state_update_reference
from fastllm.profiling import nvtx_range


def _kernel_ok(state, x, A, D, dt_bias) -> bool:
    return (_backend.current_backend() == "auto" and x.dtype in KERNEL_DTYPES and state.dtype == torch.float32
            and state.is_contiguous()
            and all(t is None or t.dtype == torch.float32 for t in (A, D, dt_bias)))


def _launch(launch, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    inputs = [None if t is None else t.contiguous() for t in (x, dt, A, B, C, D, z, dt_bias)]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    pointers = [state.data_ptr()] + [0 if t is None else t.data_ptr() for t in inputs] + [out.data_ptr()]
    sizes = [x.shape[0], x.shape[1], A.shape[1], B.shape[1]]
    launch(sizes, pointers, dt_softplus, _backend.DTYPE_CODES[x.dtype])
    return out


def _update_impl(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """The op: the compiled kernel of the inputs' device, else the reference."""
    if _kernel_ok(state, x, A, D, dt_bias):
        if x.device.type == "cpu" and _backend.has_cpu_kernels():
            launch = lambda *a: _backend._C.selective_state_update_cpu(*a, _backend.cpu_threads())  # noqa: E731
            return _launch(launch, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        if x.device.type == "cuda":
            if _backend._C is not None and hasattr(_backend._C, "selective_state_update_cuda"):
                stream = _backend.cuda_stream(x.device)
                launch = lambda *a: _backend._C.selective_state_update_cuda(*a, x.device.index, stream)  # noqa: E731
                return _launch(launch, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
            _backend.warn_once("selective_state_update_cuda",
                               _backend.missing_kernel_message("selective_state_update", x.device)
                               + "; using the PyTorch implementation on the GPU meanwhile")
    return selective_state_update_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


@torch.library.custom_op("fastllm::selective_state_update_", mutates_args=("state",))
def _state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
                  dt_softplus: bool) -> torch.Tensor:
    return _update_impl(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


@_state_update.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _validate(state, x, dt, A, B, C, D, z, dt_bias):
    check_tensor("x", x, dtypes=INPUT_DTYPES, ndim=2)
    batch, dim = x.shape
    check_tensor("A", A, dtypes=PARAM_DTYPES, ndim=2)
    if A.shape[0] != dim or not 1 <= A.shape[1] <= MAX_STATES:
        raise ValueError(f"A must have shape (dim={dim}, N) with 1 <= N <= {MAX_STATES}, got {tuple(A.shape)}")
    nstate = A.shape[1]
    check_tensor("state", state, dtypes=(torch.float32, torch.float64))
    check_shape("state", state, (batch, dim, nstate), "(batch, dim, N)")
    check_tensor("dt", dt)
    named = [("x", x), ("state", state), ("A", A)]
    for name, t in (("dt", dt), ("z", z)):
        if t is not None:
            check_tensor(name, t)
            check_shape(name, t, x.shape, "x")
            check_same_dtype(name, t, x.dtype, "x")
            named.append((name, t))
    for name, t in (("B", B), ("C", C)):
        check_tensor(name, t)
        check_same_dtype(name, t, x.dtype, "x")
        if t.dim() == 2:
            check_shape(name, t, (batch, nstate), "(batch, N)")
        elif t.dim() == 3 and t.shape[1] >= 1 and dim % t.shape[1] == 0:
            check_shape(name, t, (batch, t.shape[1], nstate), "(batch, groups, N)")
        else:
            raise ValueError(f"{name} must have shape (batch, N) or (batch, groups, N) with groups dividing dim, "
                             f"got {tuple(t.shape)}")
        named.append((name, t))
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            check_tensor(name, t, dtypes=PARAM_DTYPES)
            check_shape(name, t, (dim,), "(dim,)")
            named.append((name, t))
    check_same_device(named)


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                           z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                           dt_softplus: bool = False) -> torch.Tensor:
    """One decoding step of the selective scan: updates ``state`` in place, returns out (batch, dim).

    state: (batch, dim, N) float32; x, dt, z: (batch, dim); A: (dim, N); B, C: (batch, N) or
    (batch, groups, N); D, dt_bias: (dim,).
    """
    _validate(state, x, dt, A, B, C, D, z, dt_bias)
    A, D, dt_bias = map(as_float32_param, (A, D, dt_bias))
    if B.dim() == 2:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    args = (state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))
    with nvtx_range("fastllm.selective_state_update"):
        if _backend.may_skip_dispatcher(*(t for t in args[:-1] if t is not None)):
            out = _update_impl(*args)
            # As the dispatcher does for a mutated argument: autograd then rejects stale saved copies of it.
            torch.autograd.graph.increment_version(state)
            return out
        return _state_update(*args)
