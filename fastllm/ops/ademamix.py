"""Fused AdEMAMix step (arXiv 2409.03137) as the custom op ``fastllm::ademamix_step_``.

One call updates many tensors: CUDA tensors in one multi-tensor launch per (dtype, 64 tensors),
CPU tensors in one OpenMP loop. Schedules (alpha_t, beta3_t, bias corrections) are evaluated by the
caller, see fastllm.optim.AdEMAMix.

Inputs: lists of equal length; params and grads share dtype (float32, bfloat16, float16 or float64)
and shape; the three state lists share one dtype (float32 or bfloat16) and the params' shapes; every
tensor is on one device. The compiled kernels cover float32/bfloat16 params with float32/bfloat16
states in contiguous memory; any other combination (and non-contiguous tensors) is updated by the
reference implementation, which gives the same result more slowly.
"""

from __future__ import annotations

import torch

from fastllm.ops import _backend
from fastllm.ops._validate import check_real, check_same_device, check_same_dtype, check_shape, check_tensor
from fastllm.ops.ademamix_ref import ademamix_step_reference
from fastllm.profiling import nvtx_range

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)

_MUTATED = ("params", "exp_avgs_fast", "exp_avgs_slow", "exp_avg_sqs")


def _validate(params, grads, exp_avgs_fast, exp_avgs_slow, exp_avg_sqs, bias_correction1, bias_correction2):
    lists = {"params": params, "grads": grads, "exp_avgs_fast": exp_avgs_fast,
             "exp_avgs_slow": exp_avgs_slow, "exp_avg_sqs": exp_avg_sqs}
    for name, tensors in lists.items():
        if len(tensors) != len(params):
            raise ValueError(f"{name} has {len(tensors)} tensors but params has {len(params)}")
    if not params:
        return
    if not (0.0 < bias_correction1 <= 1.0 and 0.0 < bias_correction2 <= 1.0):
        raise ValueError("bias_correction1 and bias_correction2 must lie in (0, 1], "
                         f"got {bias_correction1} and {bias_correction2}")
    param_dtype = check_tensor("params[0]", params[0], dtypes=PARAM_DTYPES).dtype
    state_dtype = check_tensor("exp_avgs_fast[0]", exp_avgs_fast[0], dtypes=STATE_DTYPES).dtype
    named = []
    for i in range(len(params)):
        p = check_tensor(f"params[{i}]", params[i], dtypes=PARAM_DTYPES)
        check_same_dtype(f"params[{i}]", p, param_dtype, "params[0]")
        g = check_tensor(f"grads[{i}]", grads[i])
        check_same_dtype(f"grads[{i}]", g, param_dtype, "params")
        check_shape(f"grads[{i}]", g, p.shape, f"params[{i}]")
        named += [(f"params[{i}]", p), (f"grads[{i}]", g)]
        for name in ("exp_avgs_fast", "exp_avgs_slow", "exp_avg_sqs"):
            s = check_tensor(f"{name}[{i}]", lists[name][i], dtypes=STATE_DTYPES)
            check_same_dtype(f"{name}[{i}]", s, state_dtype, "exp_avgs_fast[0]")
            check_shape(f"{name}[{i}]", s, p.shape, f"params[{i}]")
            named.append((f"{name}[{i}]", s))
    check_same_device(named)


_HYPER_NAMES = ("lr", "beta1", "beta2", "beta3", "alpha", "eps", "weight_decay", "bias_correction1",
                "bias_correction2")


@torch.library.custom_op("fastllm::ademamix_step_", mutates_args=_MUTATED)
def _ademamix_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs_fast: list[torch.Tensor],
    exp_avgs_slow: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    bias_correction1: float,
    bias_correction2: float,
    stochastic_rounding: bool,
    seed: int,
) -> None:
    # Devices without compiled kernels run the reference.
    hyper = (lr, beta1, beta2, beta3, alpha, eps, weight_decay, bias_correction1, bias_correction2)
    _dispatch(None, (params, grads, exp_avgs_fast, exp_avgs_slow, exp_avg_sqs), hyper, stochastic_rounding, seed)


@_ademamix_step.register_fake
def _(params, grads, exp_avgs_fast, exp_avgs_slow, exp_avg_sqs, *scalars) -> None:
    return None


def _dispatch(launch, tensors, hyper, stochastic_rounding, seed) -> None:
    """Sends the tensors the compiled ``launch`` can take to it, the others to the reference.

    ``launch`` is None where no kernel applies (other devices, FASTLLM_BACKEND=reference).
    """
    params, _, exp_avgs_fast, _, _ = tensors
    kernel_ok = (launch is not None and _backend.current_backend() == "auto"
                 and params[0].dtype in KERNEL_DTYPES and exp_avgs_fast[0].dtype in KERNEL_DTYPES)
    fused, rest = [], []
    for row in zip(*tensors):
        (fused if kernel_ok and all(t.is_contiguous() for t in row) else rest).append(row)
    if fused:
        columns = list(zip(*fused))
        launch(*[[t.data_ptr() for t in column] for column in columns], [t.numel() for t in columns[0]],
               _backend.DTYPE_CODES[params[0].dtype], _backend.DTYPE_CODES[exp_avgs_fast[0].dtype],
               *hyper, stochastic_rounding, seed)
    if rest:
        ademamix_step_reference(*[list(column) for column in zip(*rest)], **dict(zip(_HYPER_NAMES, hyper)))


@_ademamix_step.register_kernel("cpu")
def _(params, grads, exp_avgs_fast, exp_avgs_slow, exp_avg_sqs, *scalars) -> None:
    launch = None
    if _backend.has_cpu_kernels():
        launch = lambda *args: _backend._C.ademamix_step_cpu(*args, _backend.cpu_threads())  # noqa: E731
    else:
        _backend.warn_once("ademamix_cpu", _backend.missing_kernel_message("ademamix_step_", params[0].device))
    _dispatch(launch, (params, grads, exp_avgs_fast, exp_avgs_slow, exp_avg_sqs), scalars[:9], *scalars[9:])


@_ademamix_step.register_kernel("cuda")
def _(params, grads, exp_avgs_fast, exp_avgs_slow, exp_avg_sqs, *scalars) -> None:
    device = params[0].device
    launch = None
    if _backend.has_cuda_kernels():
        stream = _backend.cuda_stream(device)
        launch = lambda *args: _backend._C.ademamix_step_cuda(*args, device.index, stream)  # noqa: E731
    else:
        # The next fastest GPU path: PyTorch ops on the same device, never a copy to the CPU.
        _backend.warn_once("ademamix_cuda", _backend.missing_kernel_message("ademamix_step_", device)
                           + "; using the PyTorch implementation on the GPU meanwhile")
    _dispatch(launch, (params, grads, exp_avgs_fast, exp_avgs_slow, exp_avg_sqs), scalars[:9], *scalars[9:])


def ademamix_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs_fast: list[torch.Tensor],
    exp_avgs_slow: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    bias_correction1: float,
    bias_correction2: float,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> None:
    """One AdEMAMix step for every tensor, in place.

    m1 <- beta1 m1 + (1 - beta1) g;  m2 <- beta3 m2 + (1 - beta3) g;  nu <- beta2 nu + (1 - beta2) g^2
    p  <- p - lr ((m1 / bias_correction1 + alpha m2) / (sqrt(nu / bias_correction2) + eps) + weight_decay p)

    ``beta3`` and ``alpha`` are this step's scheduled values. ``stochastic_rounding`` rounds bfloat16
    stores stochastically (compiled kernels only), with random bits fixed by ``seed``.
    """
    params, grads = list(params), list(grads)
    exp_avgs_fast, exp_avgs_slow, exp_avg_sqs = list(exp_avgs_fast), list(exp_avgs_slow), list(exp_avg_sqs)
    hyper = [check_real(name, value) for name, value in zip(_HYPER_NAMES, (
        lr, beta1, beta2, beta3, alpha, eps, weight_decay, bias_correction1, bias_correction2))]
    _validate(params, grads, exp_avgs_fast, exp_avgs_slow, exp_avg_sqs, *hyper[-2:])
    if not params:
        return
    with nvtx_range("fastllm.ademamix_step_"):
        _ademamix_step(params, grads, exp_avgs_fast, exp_avgs_slow, exp_avg_sqs, *hyper, bool(stochastic_rounding),
                       int(seed) & 0x7FFFFFFFFFFFFFFF)
