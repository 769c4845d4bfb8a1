"""Fused Mamba-1 selective scan as the custom ops ``fastllm::selective_scan_fwd`` / ``_bwd``.

``selective_scan`` has the signature and semantics of mamba_ssm's ``selective_scan_fn`` (plus an
``initial_state``), see fastllm/ops/selective_scan_ref.py for the math and shapes. The kernels (C++
CPU, CUDA) walk L in chunks (SCAN_CHUNK positions on the CPU, SCAN_CHUNK_CUDA on CUDA devices) with
the state carried across chunks, save the state at every chunk end, and the backward recomputes each
chunk from the saved state before it, so memory stays O(batch dim N L / chunk). u, delta, z, B, C
share one dtype (float32, float16, bfloat16; arithmetic in float32); A, D, delta_bias, initial_state
are float32 (half-precision ones are cast). float64 inputs (and FASTLLM_BACKEND=reference) run the
pure-PyTorch reference.
"""

from __future__ import annotations

import torch

from fastllm.ops import _backend
from fastllm.ops._validate import check_same_device, check_same_dtype, check_shape, check_tensor
from fastllm.ops.selective_scan_ref import (compute_dtype, selective_scan_backward_reference,
                                             selective_scan_reference)
from fastllm.profiling import nvtx_range

SCAN_CHUNK = 256  # kScanChunk in csrc/selective_scan/selective_scan.h
SCAN_CHUNK_CUDA = 64  # kCudaScanChunk
MAX_STATES = 256
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # half ones are cast to float32
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def chunk_length(device: torch.device) -> int:
    """Positions per saved state: the chunk of the kernels that run on ``device``."""
    return SCAN_CHUNK_CUDA if device.type == "cuda" else SCAN_CHUNK


def num_chunks(length: int, chunk: int) -> int:
    """Saved states of a sequence of ``length`` positions, one every ``chunk`` (the last may be short)."""
    return (length + chunk - 1) // chunk


# ---- reference path (also the default for devices without kernels) --------------------------------

def _reference_forward(chunk, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    """Output and the state after every ``chunk`` positions."""
    states, outs, h = [], [], initial_state
    for start in range(0, u.shape[2], chunk):
        piece = slice(start, start + chunk)
        out, h = selective_scan_reference(
            u[..., piece], delta[..., piece], A, B[..., piece], C[..., piece], D,
            None if z is None else z[..., piece], delta_bias, delta_softplus, True, h)
        outs.append(out)
        states.append(h)
    return torch.cat(outs, dim=-1), torch.stack(states, dim=2)


def _reference_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    grads = selective_scan_backward_reference(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                                              delta_softplus, initial_state)
    return _pack_grads(u, A, B, C, grads)


def _pack_grads(u, A, B, C, grads):
    """Grads in the op's output form: absent optional inputs give empty tensors."""
    du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = grads
    dim = u.shape[1]
    empty = u.new_empty(0)
    # Contiguous, as the fake says: the reference's elementwise ops may follow a strided input's layout.
    return (du.contiguous(), ddelta.contiguous(), dA.contiguous(), dB.contiguous(), dC.contiguous(),
            dD if dD is not None else A.new_zeros(dim),
            dz.contiguous() if dz is not None else empty,
            dbias if dbias is not None else A.new_zeros(dim),
            dinit.contiguous())


# ---- compiled kernels -------------------------------------------------------------------------------

def _kernel_ok(u, delta, A, B, C, D, z, delta_bias, initial_state) -> bool:
    if _backend.current_backend() != "auto" or u.dtype not in KERNEL_DTYPES:
        return False
    return all(t is None or t.dtype == torch.float32 for t in (A, D, delta_bias, initial_state))


def _launch_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Contiguous tensors (kept alive by the caller) and the (sizes, pointers) the launchers take."""
    tensors = [None if t is None else t.contiguous() for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
    batch, dim, length = u.shape
    sizes = [batch, dim, length, A.shape[1], B.shape[1]]
    pointers = [0 if t is None else t.data_ptr() for t in tensors]
    return tensors, sizes, pointers


def _kernel_forward(launch, chunk, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    """Runs ``launch`` (a module binding's form), saving the state every ``chunk`` positions."""
    tensors, sizes, pointers = _launch_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, length = u.shape
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    chunk_states = u.new_empty(batch, dim, num_chunks(length, chunk), A.shape[1], dtype=torch.float32)
    launch(sizes, pointers, delta_softplus, out.data_ptr(), chunk_states.data_ptr(), _backend.DTYPE_CODES[u.dtype])
    return out, chunk_states


def _kernel_backward(launch, tiles_per_group, dout, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                     initial_state, chunk_states, delta_softplus):
    """Runs ``launch``; the kernel writes dB and dC as ``tiles_per_group`` partial sums, summed here."""
    tensors, sizes, pointers = _launch_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, length = u.shape
    groups, nstate = B.shape[1], A.shape[1]
    f32 = dict(dtype=torch.float32, device=u.device)
    dout = dout.contiguous()
    dlast_state = dlast_state.contiguous()
    chunk_states = chunk_states.contiguous()
    like_u = lambda: torch.empty_like(u, memory_format=torch.contiguous_format)  # noqa: E731
    du, ddelta = like_u(), like_u()
    dz = like_u() if z is not None else u.new_empty(0)
    dA = torch.empty(batch, dim, nstate, **f32)
    dD = torch.empty(batch, dim, **f32)
    dbias = torch.empty(batch, dim, **f32)
    dinit = torch.empty(batch, dim, nstate, **f32)
    dB = torch.empty(batch, groups, tiles_per_group, nstate, length, **f32)
    dC = torch.empty_like(dB)
    grads = [dout, dlast_state, chunk_states, du, ddelta, dz, dA, dD, dbias, dinit, dB, dC]
    launch(sizes, pointers, delta_softplus, [0 if t.numel() == 0 else t.data_ptr() for t in grads],
           _backend.DTYPE_CODES[u.dtype])
    return (du, ddelta, dA.sum(0), dB.sum(2).to(B.dtype), dC.sum(2).to(C.dtype), dD.sum(0), dz, dbias.sum(0), dinit)


# ---- custom ops -------------------------------------------------------------------------------------

@torch.library.custom_op("fastllm::selective_scan_fwd", mutates_args=())
def _scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
              initial_state: torch.Tensor | None, delta_softplus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _reference_forward(chunk_length(u.device), u, delta, A, B, C, D, z, delta_bias, initial_state,
                              delta_softplus)


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    batch, dim, length = u.shape
    states = u.new_empty(batch, dim, num_chunks(length, chunk_length(u.device)), A.shape[1],
                         dtype=compute_dtype(u, delta, A, B, C, D))
    return torch.empty_like(u, memory_format=torch.contiguous_format), states


@_scan_fwd.register_kernel("cpu")
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if _kernel_ok(*args):
        if _backend.has_cpu_kernels():
            launch = lambda *a: _backend._C.selective_scan_fwd_cpu(*a, _backend.cpu_threads())  # noqa: E731
            return _kernel_forward(launch, SCAN_CHUNK, *args, delta_softplus)
        _backend.warn_once("selective_scan_cpu", _backend.missing_kernel_message("selective_scan", u.device))
    return _reference_forward(chunk_length(u.device), *args, delta_softplus)


def _has_cuda_scan() -> bool:
    return _backend._C is not None and hasattr(_backend._C, "selective_scan_fwd_cuda")


@_scan_fwd.register_kernel("cuda")
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if _kernel_ok(*args):
        if _has_cuda_scan():
            stream = _backend.cuda_stream(u.device)
            launch = lambda *a: _backend._C.selective_scan_fwd_cuda(*a, u.device.index, stream)  # noqa: E731
            return _kernel_forward(launch, SCAN_CHUNK_CUDA, *args, delta_softplus)
        # The next fastest GPU path: PyTorch ops on the same device, never a copy to the CPU.
        _backend.warn_once("selective_scan_cuda", _backend.missing_kernel_message("selective_scan", u.device)
                           + "; using the PyTorch implementation on the GPU meanwhile")
    return _reference_forward(chunk_length(u.device), *args, delta_softplus)


@torch.library.custom_op("fastllm::selective_scan_bwd", mutates_args=())
def _scan_bwd(dout: torch.Tensor, dlast_state: torch.Tensor, u: torch.Tensor, delta: torch.Tensor,
              A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
              delta_bias: torch.Tensor | None, initial_state: torch.Tensor | None, chunk_states: torch.Tensor,
              delta_softplus: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _reference_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state,
                               delta_softplus)


@_scan_bwd.register_fake
def _(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_states, delta_softplus):
    batch, dim, _ = u.shape
    like_u = lambda: torch.empty_like(u, memory_format=torch.contiguous_format)  # noqa: E731
    state_dtype = compute_dtype(u, delta, A, B, C, D)
    # Every gradient contiguous, in its input's dtype (A's for absent D, delta_bias): parameters of
    # mixed dtypes are allowed and run the reference, which returns each in its own dtype.
    return (like_u(), like_u(), torch.empty_like(A, memory_format=torch.contiguous_format),
            torch.empty_like(B, memory_format=torch.contiguous_format),
            torch.empty_like(C, memory_format=torch.contiguous_format), (A if D is None else D).new_empty(dim),
            like_u() if z is not None else u.new_empty(0), (A if delta_bias is None else delta_bias).new_empty(dim),
            u.new_empty(batch, dim, A.shape[1], dtype=state_dtype))


@_scan_bwd.register_kernel("cpu")
def _(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_states, delta_softplus):
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if _kernel_ok(*args) and _backend.has_cpu_kernels():
        launch = lambda *a: _backend._C.selective_scan_bwd_cpu(*a, _backend.cpu_threads())  # noqa: E731
        tiles = _backend._C.selective_scan_cpu_tiles(u.shape[1], B.shape[1])
        return _kernel_backward(launch, tiles, dout, dlast_state, *args, chunk_states, delta_softplus)
    return _reference_backward(dout, dlast_state, *args, delta_softplus)


@_scan_bwd.register_kernel("cuda")
def _(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_states, delta_softplus):
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if _kernel_ok(*args) and _has_cuda_scan():
        stream = _backend.cuda_stream(u.device)
        launch = lambda *a: _backend._C.selective_scan_bwd_cuda(*a, u.device.index, stream)  # noqa: E731
        tiles = _backend._C.selective_scan_cuda_tiles(u.shape[1] // B.shape[1], A.shape[1])
        return _kernel_backward(launch, tiles, dout, dlast_state, *args, chunk_states, delta_softplus)
    return _reference_backward(dout, dlast_state, *args, delta_softplus)


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, output[1])
    ctx.delta_softplus = delta_softplus
    # An unused output's gradient stays None rather than a zero-filled tensor: the chunk states (all
    # but the last never get one) are 16x the size of the last state.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dchunk_states):
    u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_states = ctx.saved_tensors
    if dout is None:  # only last_state reached the loss
        dout = torch.zeros_like(u, memory_format=torch.contiguous_format)
    # Only the last chunk's state is exposed (as last_state); the others never get a gradient.
    dlast_state = (chunk_states.new_zeros(chunk_states[:, :, -1].shape) if dchunk_states is None
                   else dchunk_states[:, :, -1])
    du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = torch.ops.fastllm.selective_scan_bwd(
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_states, ctx.delta_softplus)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, dinit if initial_state is not None else None, None)


torch.library.register_autograd("fastllm::selective_scan_fwd", _backward, setup_context=_setup_context)


# ---- public API -------------------------------------------------------------------------------------

def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state):
    check_tensor("u", u, dtypes=INPUT_DTYPES, ndim=3)
    batch, dim, length = u.shape
    if length < 1:
        raise ValueError(f"u must have at least one position (L >= 1), got shape {tuple(u.shape)}")
    check_tensor("delta", delta)
    check_shape("delta", delta, u.shape, "u")
    check_same_dtype("delta", delta, u.dtype, "u")
    check_tensor("A", A, dtypes=PARAM_DTYPES, ndim=2)
    if A.shape[0] != dim or not 1 <= A.shape[1] <= MAX_STATES:
        raise ValueError(f"A must have shape (dim={dim}, N) with 1 <= N <= {MAX_STATES}, got {tuple(A.shape)}")
    nstate = A.shape[1]
    named = [("u", u), ("delta", delta), ("A", A)]
    for name, x in (("B", B), ("C", C)):
        check_tensor(name, x)
        check_same_dtype(name, x, u.dtype, "u")
        if x.dim() == 3:
            check_shape(name, x, (batch, nstate, length), "(batch, N, L)")
        elif x.dim() == 4:
            if x.shape[1] < 1 or dim % x.shape[1] != 0:
                raise ValueError(f"{name}'s groups ({x.shape[1]}) must divide dim ({dim})")
            check_shape(name, x, (batch, x.shape[1], nstate, length), "(batch, groups, N, L)")
        else:
            raise ValueError(f"{name} must have shape (batch, N, L) or (batch, groups, N, L), got {tuple(x.shape)}")
        named.append((name, x))
    if B.dim() != C.dim() or B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    if z is not None:
        check_tensor("z", z)
        check_shape("z", z, u.shape, "u")
        check_same_dtype("z", z, u.dtype, "u")
        named.append(("z", z))
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None:
            check_tensor(name, x, dtypes=PARAM_DTYPES)
            check_shape(name, x, (dim,), "(dim,)")
            named.append((name, x))
    if initial_state is not None:
        check_tensor("initial_state", initial_state, dtypes=PARAM_DTYPES)
        check_shape("initial_state", initial_state, (batch, dim, nstate), "(batch, dim, N)")
        named.append(("initial_state", initial_state))
    check_same_device(named)


def as_float32_param(t: torch.Tensor | None) -> torch.Tensor | None:
    """A, D, biases and states are float32 in the kernels; half-precision ones are cast (differentiably)."""
    return t.float() if t is not None and t.dtype in (torch.bfloat16, torch.float16) else t


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, initial_state: torch.Tensor | None = None):
    """Mamba's selective scan; drop-in for mamba_ssm's ``selective_scan_fn``.

    u, delta, z: (batch, dim, L); A: (dim, N), N <= 256; B, C: (batch, N, L) or (batch, groups, N, L);
    D, delta_bias: (dim,); initial_state: (batch, dim, N). Returns out (batch, dim, L) in u's dtype,
    and with ``return_last_state`` also the final state (batch, dim, N) in float32. Differentiable in
    every tensor argument, including the last state.
    """
    _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    A, D, delta_bias, initial_state = map(as_float32_param, (A, D, delta_bias, initial_state))
    grouped = B.dim() == 4
    with nvtx_range("fastllm.selective_scan"):
        out, chunk_states = _scan_fwd(u, delta, A, B if grouped else B.unsqueeze(1), C if grouped else C.unsqueeze(1),
                                      D, z, delta_bias, initial_state, bool(delta_softplus))
    return (out, chunk_states[:, :, -1]) if return_last_state else out
