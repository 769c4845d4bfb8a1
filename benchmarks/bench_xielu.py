"""xIELU forward and forward+backward: fastllm's fused kernels against PyTorch eager and torch.compile.

Bytes moved (the minimum): forward reads x and writes y; backward reads grad and x and writes dx.
"""

import pytest
import torch

from fastllm.ops import xielu
from fastllm.ops.xielu_ref import xielu_reference

CASES = [
    pytest.param("cuda", torch.bfloat16, (16 * 1024, 8192), marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")),
    pytest.param("cpu", torch.float32, (64, 8192)),
]


def implementations(device):
    impls = {"fastllm": xielu, "torch-eager": xielu_reference}
    if device == "cuda":
        impls["torch-compile"] = torch.compile(xielu_reference)
    return impls


@pytest.mark.parametrize("device,dtype,shape", CASES)
@pytest.mark.parametrize("impl", ["fastllm", "torch-eager", "torch-compile"])
def test_xielu_forward(timer, device, dtype, shape, impl):
    fns = implementations(device)
    if impl not in fns:
        pytest.skip(f"{impl} is only benchmarked on the GPU")
    x = torch.randn(shape, device=device, dtype=dtype)
    alpha_p = torch.tensor([0.3], device=device)
    alpha_n = torch.tensor([-0.2], device=device)
    fn = fns[impl]
    with torch.no_grad():
        timer(lambda: fn(x, alpha_p, alpha_n), group=f"xielu forward {device} {dtype} {shape}", name=impl,
              device=device, bytes_moved=2 * x.numel() * x.element_size())


@pytest.mark.parametrize("device,dtype,shape", CASES)
@pytest.mark.parametrize("impl", ["fastllm", "torch-eager", "torch-compile"])
def test_xielu_forward_backward(timer, device, dtype, shape, impl):
    fns = implementations(device)
    if impl not in fns:
        pytest.skip(f"{impl} is only benchmarked on the GPU")
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    alpha_p = torch.tensor([0.3], device=device, requires_grad=True)
    alpha_n = torch.tensor([-0.2], device=device, requires_grad=True)
    grad = torch.randn_like(x)
    fn = fns[impl]

    def step():
        grads = torch.autograd.grad(fn(x, alpha_p, alpha_n), (x, alpha_p, alpha_n), grad)
        return grads

    timer(step, group=f"xielu forward+backward {device} {dtype} {shape}", name=impl, device=device,
          bytes_moved=5 * x.numel() * x.element_size())
