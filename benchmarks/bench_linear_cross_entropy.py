"""LM loss, forward + backward: fastllm's fused linear cross-entropy against logits + torch's
cross-entropy on their float32 copy (what a plain training loop does), eager and torch.compile'd.

GPU: bf16, 16 x 1024 tokens, width 768, vocabulary 50304 (the 124M model's head). CPU: a small case.
Bytes: the minimum traffic, reading hidden and weight and writing their gradients.
"""

from __future__ import annotations

import pytest
import torch

from fastllm.ops import linear_cross_entropy
from fastllm.ops.linear_cross_entropy_ref import linear_cross_entropy_reference

CASES = [
    pytest.param("cuda", torch.bfloat16, (16 * 1024, 768, 50304), marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")),
    pytest.param("cpu", torch.float32, (2048, 192, 4096)),
]


def implementations(device: str) -> dict:
    impls = {"fastllm": linear_cross_entropy, "logits_then_cross_entropy": linear_cross_entropy_reference}
    if device == "cuda":
        impls["compiled_logits_then_cross_entropy"] = torch.compile(linear_cross_entropy_reference)
    return impls


@pytest.mark.parametrize("device,dtype,shape", CASES)
@pytest.mark.parametrize("impl", ["fastllm", "logits_then_cross_entropy", "compiled_logits_then_cross_entropy"])
def test_linear_cross_entropy(timer, device, dtype, shape, impl):
    fns = implementations(device)
    if impl not in fns:
        pytest.skip(f"{impl} is only benchmarked on the GPU")
    n, d, v = shape
    hidden = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, d, device=device, dtype=dtype) * d**-0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device)
    fn = fns[impl]
    timer(lambda: torch.autograd.grad(fn(hidden, weight, labels), (hidden, weight)),
          group=f"linear cross-entropy fwd+bwd {device} {dtype} N={n} D={d} V={v}", name=impl, device=device,
          flops=6 * n * d * v, bytes_moved=2 * (n * d + v * d) * hidden.element_size())
