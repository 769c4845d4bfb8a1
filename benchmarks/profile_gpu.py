"""Where the GPU time goes: the top CUDA kernels of the workloads whose targets are not met yet.

    python benchmarks/profile_gpu.py [train] [attention] [mamba] [dwa] [denseformer]

train: one 124M training step, fastllm against the plain-PyTorch baseline (bench_train.py's models
and step). attention: QK-sparse (50% dropped) and hash-sparse (8 buckets) forward + backward at
T = 16k, with their compaction, sorting and window set-up. mamba: the selective scan and the causal
conv1d forward + backward at the shapes of bench_selective_scan.py. dwa: the depth-weighted average
forward + backward at bench_depth_weighted_average.py's shape. denseformer: where the 48-block
DenseFormer's training step spends more GPU time than the same transformer's, eager and with compiled
blocks. Each prints the
kernels that take the most CUDA time over a few profiled repetitions, after warm-up; under Nsight
Compute (the GPU check's ncu part) the same launches are what it measures.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))


def kernel_times(fn, repeats: int = 3) -> dict[str, tuple[float, int]]:
    """{kernel name: (ms, launches)} per repetition of ``fn``, after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    return {e.key: (e.device_time_total / repeats / 1e3, e.count // repeats)
            for e in prof.key_averages() if e.device_time_total > 0}


def top_kernels(title: str, fn, repeats: int = 3, rows: int = 14) -> None:
    times = kernel_times(fn, repeats)
    total = sum(ms for ms, _ in times.values())
    print(f"\n== {title}: {total:.3f} ms of CUDA kernels per repetition")
    for key, (ms, count) in sorted(times.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"{ms:9.3f} ms {ms / total:6.1%} x{count:<4} {key[:90]}")


def profile_train() -> None:
    from bench_train import SIZES, _baseline_model, _fastllm_model, _train_step

    from fastllm.optim.schedules import build_optimizer

    size = SIZES["llama-124m"]
    tokens = torch.randint(0, size["vocab_size"], (size["batch"], size["seq_len"] + 1), device="cuda")
    input_ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    for name in ("fastllm", "baseline"):
        torch.manual_seed(0)
        if name == "fastllm":
            model = _fastllm_model(size).cuda()
            optimizer = build_optimizer("ademamix", model, lr=1e-4, weight_decay=0.1, t_alpha=1000, t_beta3=1000)
        else:
            model = _baseline_model(size).cuda()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        model.compile()
        top_kernels(f"train step 124M, {name}",
                    lambda: _train_step(model, optimizer, input_ids, labels, True, fused_loss=name == "fastllm"))
        del model, optimizer


def profile_attention() -> None:
    from fastllm.ops import hash_sparse_attention, qk_sparse_attention

    B, H, T, D = 4, 16, 16384, 64
    q, k, v = [torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    dout = torch.randn_like(q)
    keep_q, keep_k = torch.rand(B, H, T, device="cuda") >= 0.5, torch.rand(B, H, T, device="cuda") >= 0.5
    buckets = torch.randint(0, 8, (B, H, T), device="cuda")
    cases = {"qk-sparse 50% T=16k": lambda: qk_sparse_attention(q, k, v, keep_q, keep_k),
             "hash-sparse 8 buckets T=16k": lambda: hash_sparse_attention(q, k, v, buckets, buckets)}
    for title, attend in cases.items():
        top_kernels(title, lambda: torch.autograd.grad(attend(), (q, k, v), dout))


def profile_mamba() -> None:
    from bench_selective_scan import GPU_SHAPE, conv_gpu_inputs, scan_inputs

    from fastllm.ops import causal_conv1d, selective_scan

    leaves = {k: v.detach().requires_grad_() for k, v in scan_inputs(*GPU_SHAPE, torch.bfloat16, "cuda").items()}
    top_kernels("selective scan fwd+bwd, bf16 b8 d2048 L2048 N16",
                lambda: selective_scan(**leaves, delta_softplus=True).backward(torch.ones_like(leaves["u"])))
    x, w, b, dout = conv_gpu_inputs(requires_grad=True)
    top_kernels("causal conv1d fwd+bwd, bf16 b8 d2048 L2048 w4 silu",
                lambda: torch.autograd.grad(causal_conv1d(x, w, b, "silu"), (x, w, b), dout))


def profile_dwa() -> None:
    from bench_depth_weighted_average import dwa_inputs

    from fastllm.ops import depth_weighted_average

    _, states, weights, dout, label = dwa_inputs("cuda")
    states.requires_grad_()
    weights.requires_grad_()
    top_kernels(f"depth-weighted average fwd+bwd, {label}",
                lambda: torch.autograd.grad(depth_weighted_average(states, weights), (states, weights), dout))


def profile_denseformer() -> None:
    """The kernels that the DenseFormer step spends more time in than the same-depth transformer's,
    and each step's kernel total against its wall time (the rest is the GPU waiting on the host),
    eager and with compiled blocks."""
    import time

    from bench_depth_weighted_average import train_steps

    for compile_blocks in (False, True):
        steps = train_steps(compile_blocks=compile_blocks)
        times, walls = {}, {}
        for name, step in steps.items():
            times[name] = kernel_times(step)
            start = time.perf_counter()
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            walls[name] = (time.perf_counter() - start) / 3 * 1e3
        (ours, theirs) = times.values()
        mode = "compiled blocks" if compile_blocks else "eager"
        print(f"\n== 48-block DenseFormer against the same transformer, per training step, {mode}")
        for name, kernels in times.items():
            print(f"{name}: {sum(ms for ms, _ in kernels.values()):.3f} ms of CUDA kernels, {walls[name]:.3f} ms wall")
        difference = {key: ours.get(key, (0.0, 0))[0] - theirs.get(key, (0.0, 0))[0]
                      for key in ours.keys() | theirs.keys()}
        for key, ms in sorted(difference.items(), key=lambda kv: -abs(kv[1]))[:14]:
            print(f"{ms:+9.3f} ms x{ours.get(key, (0, 0))[1]:<4} vs x{theirs.get(key, (0, 0))[1]:<4} {key[:80]}")


if __name__ == "__main__":
    parts = sys.argv[1:] or ["train", "attention"]
    for part in parts:
        {"train": profile_train, "attention": profile_attention, "mamba": profile_mamba, "dwa": profile_dwa,
         "denseformer": profile_denseformer}[part]()
