"""AdEMAMix (Pagliardini et al., arXiv 2409.03137): Adam with a second, slow EMA of the gradient.

    m1 <- beta1 m1 + (1 - beta1) g          (bias-corrected)
    m2 <- beta3_t m2 + (1 - beta3_t) g      (not bias-corrected)
    nu <- beta2 nu + (1 - beta2) g^2        (bias-corrected)
    p  <- p - lr ((m1_hat + alpha_t m2) / (sqrt(nu_hat) + eps) + weight_decay p)

alpha_t rises linearly from 0 to alpha over t_alpha steps; beta3_t moves from beta1 to beta3 over
t_beta3 steps, linearly in half-life; both are constant when their horizon is None. The step runs
as one fused kernel call per (device, dtype) group: fastllm.ops.ademamix_step_.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor

from fastllm.ops import _backend, ademamix_step_, use_backend
from fastllm.ops.ademamix import KERNEL_DTYPES


_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters, their grads and states); the tensor otherwise.

    The update is elementwise, so stepping every rank's shard is the sharded step.
    """
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def alpha_schedule(step: int, alpha: float, t_alpha: int | None) -> float:
    """Linear warm-up of alpha from 0 over t_alpha steps."""
    if t_alpha is None:
        return alpha
    return min(step * alpha / t_alpha, alpha)


def beta3_schedule(step: int, beta_start: float, beta_end: float, t_beta3: int | None) -> float:
    """beta3_t, linear in f(beta) = ln(0.5) / ln(beta) - 1 (the EMA's half-life) from beta_start to beta_end."""
    if t_beta3 is None:
        return beta_end
    if beta_start >= beta_end:  # the paper's min(., beta_end) clamps every step to beta_end
        return beta_end
    fraction = min(step / t_beta3, 1.0)
    if beta_start == 0.0:  # f(0) = -1, the limit ln(beta_start) -> -inf: ln(beta3_t) = ln(beta_end) / fraction
        return beta_end ** (1.0 / fraction) if fraction > 0 else 0.0
    log_start, log_end = math.log(beta_start), math.log(beta_end)
    # Interpolating f linearly is interpolating 1 / ln(beta) linearly.
    return min(math.exp(log_start * log_end / ((1 - fraction) * log_end + fraction * log_start)), beta_end)


class AdEMAMix(torch.optim.Optimizer):
    """AdEMAMix with fused CPU (C++) and CUDA (multi-tensor) steps.

    Args:
        lr, betas=(beta1, beta2, beta3), alpha, eps, weight_decay: as in the paper (decoupled decay).
        t_alpha, t_beta3: warm-up horizons of alpha and beta3 in steps (None: no warm-up).
        fused: None uses the compiled kernel where one applies, True requires it, False runs the
            pure-PyTorch reference. Results agree up to rounding; states are interchangeable.
        state_dtype: dtype of the three moment buffers, torch.float32 (default) or torch.bfloat16 (halves
            their memory); kept in the param groups by name so state dicts hold no torch.dtype.
        stochastic_rounding: round bfloat16 params and states stochastically (fused kernels only).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 8.0,
        t_alpha: int | None = None,
        t_beta3: int | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fused: bool | None = None,
        state_dtype: torch.dtype | str = torch.float32,
        stochastic_rounding: bool = False,
    ):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 3 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be three values in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not alpha >= 0.0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        for name, horizon in (("t_alpha", t_alpha), ("t_beta3", t_beta3)):
            if horizon is not None and not (isinstance(horizon, int) and horizon > 0):
                raise ValueError(f"{name} must be a positive int or None, got {horizon!r}")
        state_dtype = str(state_dtype).removeprefix("torch.")
        if state_dtype not in _STATE_DTYPES:
            raise TypeError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        defaults = dict(lr=lr, betas=tuple(betas), alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                        weight_decay=weight_decay, fused=fused, state_dtype=state_dtype,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)
        if fused:
            for group in self.param_groups:
                for p in group["params"]:
                    self._check_fusable(p)

    @staticmethod
    def _check_fusable(p: torch.Tensor) -> None:
        if p.device.type not in ("cpu", "cuda"):
            raise ValueError(f"fused=True needs CPU or CUDA parameters, got one on {p.device}")
        if p.dtype not in KERNEL_DTYPES:
            raise TypeError(f"fused=True supports float32 and bfloat16 parameters, got {p.dtype}")
        compiled = _backend.has_cuda_kernels() if p.device.type == "cuda" else _backend.has_cpu_kernels()
        if not compiled:
            raise RuntimeError(_backend.missing_kernel_message("AdEMAMix(fused=True)", p.device))

    def _init_state(self, p: torch.Tensor, state_dtype: str) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            for name in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"):
                state[name] = torch.zeros_like(p, dtype=_STATE_DTYPES[state_dtype], memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # Tensors that share (device, dtypes, step) are updated by one kernel call.
            buckets: dict[tuple, list[list[torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdEMAMix does not support sparse gradients")
                state = self._init_state(p, group["state_dtype"])
                state["step"] += 1
                key = (p.device, p.dtype, state["exp_avg_fast"].dtype, int(state["step"].item()))
                lists = buckets.setdefault(key, [[], [], [], [], []])
                for column, tensor in zip(lists, (p, p.grad, state["exp_avg_fast"], state["exp_avg_slow"],
                                                  state["exp_avg_sq"])):
                    column.append(_local(tensor))
            beta1, beta2, beta3 = group["betas"]
            for (_, _, _, step), lists in buckets.items():
                hyper = dict(
                    lr=group["lr"], beta1=beta1, beta2=beta2,
                    beta3=beta3_schedule(step, beta1, beta3, group["t_beta3"]),
                    alpha=alpha_schedule(step, group["alpha"], group["t_alpha"]),
                    eps=group["eps"], weight_decay=group["weight_decay"],
                    bias_correction1=1 - beta1**step, bias_correction2=1 - beta2**step,
                    stochastic_rounding=group["stochastic_rounding"], seed=step)
                if group["fused"] is False:
                    with use_backend("reference"):
                        ademamix_step_(*lists, **hyper)
                else:
                    ademamix_step_(*lists, **hyper)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded floating-point state to each parameter's dtype; the moment buffers keep
        # their own dtype (float32 states for bfloat16 parameters), so put the originals back.
        saved_state = state_dict["state"]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for param_id, p in zip(saved_ids, params):
            for name, value in saved_state.get(param_id, {}).items():
                if name != "step" and isinstance(value, torch.Tensor):
                    self.state[p][name] = value.to(device=p.device, copy=True)
