"""Document-masked causal attention (packed sequences), forward + backward, through fastllm.nn's registry.

"fastllm-flex" (block-sparse FlexAttention) and "fastllm-sdpa" (SDPA with a dense mask) against plain
causal flash attention that ignores documents ("torch-sdpa-causal-nomask", the cost floor of a full
causal sequence). FLOPs: those of causal attention, 2 B H T^2 D forward, x 3.5 with the backward.
"""

import pytest
import torch
import torch.nn.functional as F

from fastllm.nn import get_attention

B, H, H_KV, T, D = 16, 12, 12, 1024, 64
AVERAGE_DOCUMENT = 300


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["fastllm-flex", "fastllm-sdpa", "torch-sdpa-causal-nomask"])
def test_document_masked_attention_cuda(timer, impl):
    device = "cuda"
    q = torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, H_KV, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, H_KV, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    doc_ids = torch.cumsum(torch.rand(B, T, device=device) < 1 / AVERAGE_DOCUMENT, dim=1)
    grad = torch.randn_like(q)
    if impl == "torch-sdpa-causal-nomask":
        def attend():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        fn = get_attention(impl.removeprefix("fastllm-"))

        def attend():
            return fn(q, k, v, doc_ids=doc_ids)

    def step():
        return torch.autograd.grad(attend(), (q, k, v), grad)

    timer(step, group=f"attention fwd+bwd causal+documents B{B} H{H} T{T} D{D} bf16", name=impl, device=device,
          flops=3.5 * 2 * B * H * T * T * D)
