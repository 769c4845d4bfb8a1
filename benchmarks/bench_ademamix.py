"""AdEMAMix step: fastllm's fused kernels vs torch AdamW (fused, foreach), an unfused foreach
AdEMAMix and a torch.compile'd AdEMAMix, all in the same run.

GPU: 1.07e9 parameters in 8 tensors (fp32, and bf16 params + bf16 states); CPU: 50M parameters.
Bytes moved per parameter: read p, g, m1, m2, nu and write p, m1, m2, nu (36 B in fp32).
"""

from __future__ import annotations

import pytest
import torch

from baselines import foreach_ademamix_step
from fastllm.ops import ademamix_step_

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, beta3=0.9999, alpha=8.0, eps=1e-8, weight_decay=0.1,
             bias_correction1=0.1, bias_correction2=0.01)

CASES = {
    "cpu": dict(device="cpu", numel=50_000_000, tensors=8),
    "cuda": dict(device="cuda", numel=1_073_741_824, tensors=8),
}
IMPLS = ["fastllm_fused", "foreach_ademamix", "compiled_ademamix", "torch_adamw_fused", "torch_adamw_foreach"]


def make_state(device, numel, tensors, param_dtype, state_dtype):
    sizes = [numel // tensors] * tensors
    params = [torch.randn(n, device=device, dtype=param_dtype) for n in sizes]
    grads = [torch.randn(n, device=device, dtype=param_dtype) for n in sizes]
    states = [[torch.rand(n, device=device, dtype=state_dtype) for n in sizes] for _ in range(3)]
    return params, grads, states


def bytes_moved(numel, param_dtype, state_dtype):
    p, s = torch.finfo(param_dtype).bits // 8, torch.finfo(state_dtype).bits // 8
    return numel * (3 * p + 6 * s)


def step_fn(impl, params, grads, states):
    m1, m2, nu = states
    if impl == "fastllm_fused":
        return lambda: ademamix_step_(params, grads, m1, m2, nu, **HYPER)
    if impl == "foreach_ademamix":
        return lambda: foreach_ademamix_step(params, grads, m1, m2, nu, **HYPER)
    if impl == "compiled_ademamix":
        compiled = torch.compile(foreach_ademamix_step, fullgraph=True)
        return lambda: compiled(params, grads, m1, m2, nu, **HYPER)
    # AdamW touches two states instead of three: the floor of what an Adam-family step costs.
    wrapped = [torch.nn.Parameter(p) for p in params]
    for w, g in zip(wrapped, grads):
        w.grad = g
    kind = {"torch_adamw_fused": dict(fused=True), "torch_adamw_foreach": dict(foreach=True)}[impl]
    optimizer = torch.optim.AdamW(wrapped, lr=1e-3, weight_decay=0.1, **kind)
    return optimizer.step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtypes", ["fp32", "bf16_params_bf16_states"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_ademamix_step(timer, device, dtypes, impl):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if device == "cpu" and dtypes != "fp32":
        pytest.skip("the CPU target is fp32")
    if device == "cpu" and impl == "compiled_ademamix":
        pytest.skip("inductor's CPU codegen needs minutes to compile on 2 cores")
    param_dtype, state_dtype = ((torch.float32, torch.float32) if dtypes == "fp32"
                                else (torch.bfloat16, torch.bfloat16))
    if impl.startswith("torch_adamw") and state_dtype != param_dtype:
        pytest.skip("torch AdamW keeps states in the parameter dtype")
    case = CASES[device]
    params, grads, states = make_state(case["device"], case["numel"], case["tensors"], param_dtype, state_dtype)
    fn = step_fn(impl, params, grads, states)
    numel = sum(p.numel() for p in params)
    timer(fn, group=f"ademamix_step {device} {dtypes} {numel / 1e6:.0f}M", name=impl, device=device,
          bytes_moved=bytes_moved(numel, param_dtype, state_dtype), rounds=10 if device == "cuda" else 5)
