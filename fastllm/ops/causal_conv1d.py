"""Causal depthwise conv1d of Mamba blocks, with its single-step decoding form.

    x: (batch, dim, L); weight: (dim, width); out_t = act(bias + sum_k weight[:, k] x_{t - width + 1 + k})

``causal_conv1d`` is the custom op ``fastllm::causal_conv1d`` (backward ``fastllm::causal_conv1d_backward``),
computing in float32 with any floating dtypes of x and the weights (fp32 weights under bf16 autocast
included), output in x's dtype, weight gradients in the weights' dtypes. Dispatch:

* CUDA: the Triton kernels of fastllm/triton_kernels/causal_conv1d.py (one pass forward, two
  backward), reading a Mamba block's channel-contiguous x in place. Torch's grouped convolution is
  slow for this shape (depthwise, width 4, thousands of channels: pytorch/pytorch#192902);
  benchmarks/bench_selective_scan.py times both.
* CPU: the C++ kernels of csrc/causal_conv1d (float32 and bfloat16 x; OpenMP over tiles of channels
  and positions, each tile read once along x's contiguous axis). Float16 and float64 x, and graphs
  under tracing (opcheck, torch.compile), take torch's grouped convolution with left padding
  (weights cast to x's dtype, as autocast does). The op tests also run the Triton kernels on CPU
  tensors under the Triton interpreter (``TRITON_INTERPRET=1``).

``FASTLLM_BACKEND=reference`` runs fastllm/ops/causal_conv1d_ref.py (a direct sum over taps) instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastllm.ops import _backend
from fastllm.ops._validate import check_same_device, check_shape, check_tensor
from fastllm.ops.causal_conv1d_ref import causal_conv1d_reference
from fastllm.profiling import nvtx_range

try:
    from fastllm.triton_kernels import causal_conv1d as _kernels
except ImportError:  # Triton is an optional dependency
    _kernels = None

ACTIVATIONS = (None, "silu")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CPP_DTYPES = (torch.float32, torch.bfloat16)


def _check(x_name, x, weight, bias, activation, ndim):
    check_tensor(x_name, x, ndim=ndim)
    if not x.is_floating_point():
        raise TypeError(f"{x_name} must be a floating-point tensor, got {x.dtype}")
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    if weight.shape[0] != x.shape[1] or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape (dim={x.shape[1]}, width >= 1), got {tuple(weight.shape)}")
    named = [(x_name, x), ("weight", weight)]
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES)
        check_shape("bias", bias, (x.shape[1],), "(dim,)")
        named.append(("bias", bias))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_same_device(named)


# The op tests set this under the Triton interpreter, to run the kernels on CPU tensors; elsewhere
# (model tests on the CPU) the interpreter would take seconds per call.
TRITON_ON_CPU = False


def _path(x: torch.Tensor) -> str:
    """Which implementation runs on x: 'triton', 'cpp' or 'torch'."""
    if _kernels is not None and x.dtype in _kernels.KERNEL_DTYPES and _backend.triton_runs_on(
            x, TRITON_ON_CPU and _kernels.INTERPRET):
        return "triton"
    if (x.device.type == "cpu" and x.dtype in CPP_DTYPES and _backend.has_cpu_kernels()
            and _backend.holds_data(x)):
        return "cpp"
    return "torch"


def _empty_cpu(shape, dtype: torch.dtype) -> torch.Tensor:
    """The C++ kernels' outputs (the op tests fill them with NaN first, so unwritten elements show)."""
    return torch.empty(shape, dtype=dtype)


def _fp32_parameters(weight, bias):
    """The weights as the C++ kernels take them: contiguous float32, bias None for none."""
    return weight.float().contiguous(), None if bias is None else bias.float().contiguous()


def _forward_cpp(x, weight, bias, silu):
    out = _empty_cpu(x.shape, x.dtype)
    weight, bias = _fp32_parameters(weight, bias)
    _backend._C.causal_conv1d_forward_cpu(
        x.data_ptr(), x.stride(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(),
        (*x.shape, weight.shape[1]), silu, _backend.DTYPE_CODES[x.dtype], _backend.cpu_threads())
    return out


def _backward_cpp(dout, x, weight, bias, silu):
    dout = dout.to(x.dtype)
    dx = _empty_cpu(x.shape, x.dtype)
    weight, bias = _fp32_parameters(weight, bias)
    dweight, dbias = _empty_cpu(weight.shape, torch.float32), _empty_cpu(x.shape[1], torch.float32)
    _backend._C.causal_conv1d_backward_cpu(
        dout.data_ptr(), dout.stride(), x.data_ptr(), x.stride(), weight.data_ptr(),
        0 if bias is None else bias.data_ptr(), dx.data_ptr(), dweight.data_ptr(), dbias.data_ptr(),
        (*x.shape, weight.shape[1]), silu, _backend.DTYPE_CODES[x.dtype], _backend.cpu_threads())
    return dx, dweight, dbias


def _preactivation_torch(x, weight, bias):
    width = weight.shape[1]
    if x.numel() == 0:  # torch's convolution refuses an input shorter than its kernel, and dim = groups = 0
        return x.new_empty(x.shape)
    bias = None if bias is None else bias.to(x.dtype)
    return F.conv1d(F.pad(x, (width - 1, 0)), weight.to(x.dtype).unsqueeze(1), bias, groups=x.shape[1])


def _backward_torch(dout, x, weight, bias, silu):
    """(dx, dweight, dbias) in x's dtype from torch's convolution backward."""
    if x.numel() == 0:  # as in _preactivation_torch; the kernels' layouts (contiguous), nothing to sum
        return x.new_empty(x.shape), x.new_zeros(weight.shape), x.new_zeros(x.shape[1])
    dout = dout.to(x.dtype)
    if silu:  # silu'(a) = s (1 + a (1 - s)), s = sigmoid(a), at the recomputed preactivation
        a = _preactivation_torch(x, weight, bias)
        s = torch.sigmoid(a)
        dout = dout * s * (1 + a * (1 - s))
    width = weight.shape[1]
    dx_padded, dweight, _ = torch.ops.aten.convolution_backward(
        dout, F.pad(x, (width - 1, 0)), weight.to(x.dtype).unsqueeze(1), None, [1], [0], [1], False, [0],
        x.shape[1], [True, True, False])
    return dx_padded[..., width - 1:].contiguous(), dweight.squeeze(1), dout.sum((0, 2))


@torch.library.triton_op("fastllm::causal_conv1d", mutates_args=())
def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
    path = _path(x)
    if path == "triton":
        return _kernels.conv_forward(x, weight, bias, silu)
    if path == "cpp":
        return _forward_cpp(x, weight, bias, silu)
    out = _preactivation_torch(x, weight, bias)
    return F.silu(out) if silu else out


@torch.library.triton_op("fastllm::causal_conv1d_backward", mutates_args=())
def _backward(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias), dbias of shape (dim,) even without a bias (then unused)."""
    path = _path(x)
    if path == "triton":
        dx, dweight, dbias = _kernels.conv_backward(dout, x, weight, bias, silu)
    elif path == "cpp":
        dx, dweight, dbias = _backward_cpp(dout, x, weight, bias, silu)
    else:
        dx, dweight, dbias = _backward_torch(dout, x, weight, bias, silu)
    return dx, dweight.to(weight.dtype), dbias.to(weight.dtype if bias is None else bias.dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu = silu


def _backward_rule(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = _backward(dout, x, weight, bias, ctx.silu)
    return dx, dweight, None if bias is None else dbias, None


_forward.register_autograd(_backward_rule, setup_context=_setup_context)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None) -> torch.Tensor:
    """Depthwise causal convolution over the last axis of x (batch, dim, L); differentiable."""
    _check("x", x, weight, bias, activation, 3)
    if _backend.current_backend() == "reference":
        return causal_conv1d_reference(x, weight, bias, activation)
    with nvtx_range("fastllm.causal_conv1d"):
        return _forward(x, weight, bias, activation == "silu")


def causal_conv1d_state(x: torch.Tensor, width: int) -> torch.Tensor:
    """The decoding state after the sequence x (batch, dim, L): its last ``width`` inputs, zero-padded."""
    return F.pad(x, (max(width - x.shape[2], 0), 0))[..., -width:].contiguous()


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """One decoding step: x (batch, dim) enters ``conv_state`` (batch, dim, width), updated in place
    (oldest input dropped); returns the convolution's output for this position, (batch, dim)."""
    _check("x", x, weight, bias, activation, 2)
    check_tensor("conv_state", conv_state, dtypes=FLOAT_DTYPES)
    check_shape("conv_state", conv_state, (x.shape[0], x.shape[1], weight.shape[1]), "(batch, dim, width)")
    check_same_device([("x", x), ("conv_state", conv_state)])
    conv_state.copy_(torch.cat([conv_state[..., 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1))
    y = (conv_state * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return (F.silu(y) if activation == "silu" else y).to(x.dtype)
