"""Training throughput: one optimizer step of a Llama, fastllm vs a plain PyTorch baseline, same run.

GPU (issue 3, section 8): the 124M Llama (12 layers, width 768, 12 heads, SwiGLU 2048, vocab 50304,
tied embeddings), batch 16 x 1024 tokens, bf16 autocast, torch.compile. The baseline is the same
model written in plain PyTorch (SDPA, torch RMSNorm, SwiGLU) with torch's fused AdamW; fastllm is
``fastllm.models`` with the trainer's default optimizer (AdEMAMix when this build has it, else AdamW)
and the trainer's loss (the model returns it from the labels, by the fused linear cross-entropy).
Reported per implementation: median step time, TFLOP/s (training FLOPs = model.flops_per_token x
tokens), tokens/s and MFU (of the device's dense bf16 peak) in the benchmark's extra_info and printed.
Target: fastllm >= 1.15x the baseline's tokens/s.

CPU: a small Llama (the size the CPU main job trains), fp32, eager, so ``make bench`` has a CPU row.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastllm.models import build_model
from fastllm.optim.schedules import ademamix_class, build_optimizer
from fastllm.train.metrics import peak_flops

SIZES = {
    "llama-124m": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, vocab_size=50304, seq_len=1024, batch=16),
    "llama-cpu-small": dict(dim=192, n_layers=4, n_heads=4, hidden_dim=512, vocab_size=258, seq_len=256, batch=16),
}


class _Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden_dim: int):
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim, eps=1e-5), nn.RMSNorm(dim, eps=1e-5)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(dim, hidden_dim, bias=False), nn.Linear(dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(B, T, self.n_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, C))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def _rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class BaselineLlama(nn.Module):
    """The same Llama in plain PyTorch: the baseline fastllm has to beat."""

    def __init__(self, dim, n_layers, n_heads, hidden_dim, vocab_size, seq_len, theta=10000.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(_Block(dim, n_heads, hidden_dim) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        head_dim = dim // n_heads
        freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(seq_len).float(), freqs)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers) if name.endswith(("o.weight", "down.weight"))
                                else 0.02)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, self.cos[:T], self.sin[:T])
        return F.linear(self.norm(x), self.embed.weight)


def _fastllm_model(size: dict) -> nn.Module:
    return build_model({"arch": "llama", "tie_embeddings": True, "max_seq_len": size["seq_len"],
                        **{k: size[k] for k in ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size")}})


def _baseline_model(size: dict) -> nn.Module:
    return BaselineLlama(**{k: size[k] for k in ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size", "seq_len")})


def _train_step(model, optimizer, input_ids, labels, use_bf16: bool, fused_loss: bool):
    """What the trainer does per optimizer step (one micro batch): forward, loss, backward, clip, step.
    ``fused_loss``: fastllm's models take the labels and return the summed loss (fused linear
    cross-entropy); the baseline computes logits, then the loss on their float32 copy."""
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        if fused_loss:
            loss = model(input_ids, labels=labels) / labels.numel()
        else:
            logits = model(input_ids)
    if not fused_loss:
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


CASES = [
    pytest.param("llama-124m", "cuda", id="llama-124m-cuda",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    pytest.param("llama-cpu-small", "cpu", id="llama-cpu-small-cpu"),
]


@pytest.mark.parametrize("size_name,device", CASES)
@pytest.mark.parametrize("impl", ["fastllm", "torch-baseline"])
def test_train_step(timer, impl, size_name, device):
    size = SIZES[size_name]
    gpu = device == "cuda"
    torch.manual_seed(0)
    fastllm_model = _fastllm_model(size)
    flops_per_token = fastllm_model.flops_per_token(size["seq_len"])
    if impl == "fastllm":
        model = fastllm_model.to(device)
        name = "ademamix" if ademamix_class() is not None else "adamw"
        optimizer = build_optimizer(name, model, lr=1e-4, weight_decay=0.1, t_alpha=1000, t_beta3=1000)
        impl = f"fastllm-{name}"
    else:
        del fastllm_model
        model = _baseline_model(size).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=gpu)
    if gpu:
        model.compile()
    batch, seq_len = size["batch"], size["seq_len"]
    tokens = torch.randint(0, size["vocab_size"], (batch, seq_len + 1), device=device)
    input_ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    group = f"train step {size_name} b{batch}x{seq_len}" + (" bf16 compiled" if gpu else " fp32 eager")
    fused_loss = impl.startswith("fastllm")
    median = timer(lambda: _train_step(model, optimizer, input_ids, labels, gpu, fused_loss), group=group, name=impl,
                   device=device, flops=flops_per_token * batch * seq_len, rounds=10 if gpu else 3,
                   warmup=5 if gpu else 1)
    tokens_per_s = batch * seq_len / median
    peak = peak_flops(torch.device(device))
    mfu = flops_per_token * tokens_per_s / peak if peak else None
    timer.benchmark.extra_info.update(tokens_per_s=tokens_per_s, mfu=mfu)
    print(f"\n{group} {impl}: {median * 1e3:.1f} ms/step, {tokens_per_s:,.0f} tokens/s"
          + (f", MFU {mfu:.1%}" if mfu else ""))
    if gpu:
        del model, optimizer
        torch.cuda.empty_cache()
