"""Generation throughput (tokens/s) of a Mamba LM against a Transformer (Llama) LM of the same size:
batch 1 and 64, 1024 generated tokens after a 16-token prompt, bf16, greedy, on GPU. Both replay
their decoding step as a CUDA graph (``generate``'s default). The Mamba LM keeps a constant-size
state per layer; the Transformer's step writes its KV cache at a device-side position and attends
under a mask over the smallest span of the preallocated cache (64, 128, ... slots, or all of it)
that holds the position.

Same size: a Mamba layer (expand 2) holds about 6 dim^2 parameters, a Llama layer (SwiGLU) about
12 dim^2, so the Mamba LM has twice the layers.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastllm.models.llama", reason="needs the stack branch's Transformer LM")
from fastllm.models import generate  # noqa: E402
from fastllm.models.llama import LlamaConfig, LlamaLM  # noqa: E402
from fastllm.models.mamba import MambaConfig, MambaLM  # noqa: E402

DIM, TRANSFORMER_LAYERS, VOCAB, PROMPT, NEW_TOKENS = 1024, 12, 32000, 16, 1024


def build(kind: str) -> torch.nn.Module:
    if kind == "fastllm_mamba":
        config = MambaConfig(vocab_size=VOCAB, dim=DIM, n_layers=2 * TRANSFORMER_LAYERS,
                             max_seq_len=PROMPT + NEW_TOKENS)
        return MambaLM(config)
    config = LlamaConfig(vocab_size=VOCAB, dim=DIM, n_layers=TRANSFORMER_LAYERS, n_heads=16,
                         max_seq_len=PROMPT + NEW_TOKENS)
    return LlamaLM(config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("kind", ["fastllm_mamba", "llama"])
def test_cuda_generation(timer, benchmark, kind, batch):
    torch.manual_seed(0)
    model = build(kind).to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, VOCAB, (batch, PROMPT), device="cuda")
    seconds = timer(lambda: generate(model, prompt, max_new_tokens=NEW_TOKENS, temperature=0),
                    group=f"generation cuda bf16 batch {batch}, {NEW_TOKENS} tokens, ~150M non-embedding params",
                    name=kind, device="cuda", rounds=2, warmup=1)
    benchmark.extra_info["tokens_per_s"] = batch * NEW_TOKENS / seconds
    benchmark.extra_info["non_embedding_params"] = model.num_params(exclude_embeddings=True)
