"""What the flash-attention kernels cost a GPU in registers, spills and shared memory, found without one.

    python benchmarks/kernel_resources.py [--arch 90] [--kernels fwd dkdv dq] [--head-dims 64 128] [--modes 1 2]

Compiles every autotune config of the forward, dK/dV and dQ kernels (triton_kernels/flash_attention.py)
ahead of time for an sm_80 or sm_90 target, with the specialisations the JIT makes on a GPU (16-byte
aligned pointers, strides and T divisible by 16), and prints per config: its register cap ("cap", if
any), registers per thread, stack bytes per thread (cuobjdump; register spills, when there are any),
shared memory, how many loads the software pipeliner turned into asynchronous copies, and how many
copy groups its loops leave in flight while they compute ("wait": the largest count of the waits on
copies; 0 means each tile's loads are waited for as soon as they are issued, with no overlap). A
config that spills is one the autotuner is unlikely to pick; the numbers come from this machine's
Triton, which may allocate registers differently from the GPU machine's.
"""

from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastllm.triton_kernels import flash_attention as fa

KERNELS = {  # name: (kernel, tuned configs, more for narrow heads, short-sequence configs)
    "fwd": (fa._fwd_kernel, fa._FWD, fa._FWD_NARROW, fa._FWD_SHORT),
    "dkdv": (fa._bwd_dkdv_kernel, fa._DKDV, fa._DKDV_NARROW, fa._DKDV_SHORT),
    "dq": (fa._bwd_dq_kernel, fa._DQ, fa._DQ_NARROW, fa._DQ_SHORT),
}
SIZE_ARGS = {"H", "H_KV", "T"}  # upper-case like the pointers, but integers
FLOAT_ARGS = {"scale_log2", "scale"}
FLOAT32_POINTERS = {"STATS", "ROWS"}
INT32_POINTERS = {"LO", "HI", "COL_LO", "COL_HI", "QIDX", "KIDX"}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def signature(kernel, constexprs: dict) -> tuple[dict, dict, dict]:
    """The kernel's argument types as a bf16 launch on a GPU would specialise them."""
    names = list(inspect.signature(kernel.fn).parameters)
    types, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            types[name] = "constexpr"
        elif name in FLOAT_ARGS:
            types[name] = "fp32"
        elif name.isupper() and name not in SIZE_ARGS:
            types[name] = "*fp32" if name in FLOAT32_POINTERS else "*i32" if name in INT32_POINTERS else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            types[name] = "i32"
            if name.startswith("stride") or name == "T":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return types, {(names.index(k),): v for k, v in constexprs.items()}, attrs


def resources(kernel, config: triton.Config, arch: int, head_dim: int, mode: int) -> dict:
    constexprs = dict(HEAD_DIM=head_dim, MODE=mode, IEEE=False, **config.kwargs)
    types, constants, attrs = signature(kernel, constexprs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    compiled = triton.compile(ASTSource(fn=kernel, signature=types, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    regs, stack = (int(re.search(rf"{field}:(\d+)", usage).group(1)) for field in ("REG", "STACK"))
    ttgir = compiled.asm["ttgir"]
    waits = [int(n) for n in re.findall(r"ttg\.async_wait %[^{]*\{num = (\d+)", ttgir)]
    return dict(regs=regs, stack=stack, shared=compiled.metadata.shared,
                async_copies=ttgir.count("async_copy_global_to_local"), wait=max(waits, default=0))


def report(arch: int, kernels: list[str], head_dims: list[int], modes: list[int]) -> list[dict]:
    rows = []
    print(f"{'kernel':6} {'D':>4} {'mode':>4} {'BLOCK_M x N':>12} {'warps':>5} {'stages':>6} {'cap':>4} "
          f"{'regs':>5} {'stack':>6} {'smem KiB':>8} {'async':>5} {'wait':>4}")
    for name in kernels:
        kernel, tuned, narrow, short = KERNELS[name]
        configs = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.maxnreg): c
                   for c in short + tuned + narrow}
        for head_dim in head_dims:
            for mode in modes:
                for (m, n, warps, stages, cap), config in configs.items():
                    if config in narrow and head_dim > fa.NARROW_HEAD_DIM:
                        continue  # not among that head dim's configs
                    row = dict(kernel=name, head_dim=head_dim, mode=mode, block=(m, n), warps=warps, stages=stages,
                               cap=cap, **resources(kernel, config, arch, head_dim, mode))
                    rows.append(row)
                    print(f"{name:6} {head_dim:>4} {mode:>4} {f'{m} x {n}':>12} {warps:>5} {stages:>6} "
                          f"{cap or '-':>4} {row['regs']:>5} {row['stack']:>6} {row['shared'] / 1024:>8.1f} "
                          f"{row['async_copies']:>5} {row['wait']:>4}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=(80, 90), help="compute capability x 10")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], choices=fa.HEAD_DIMS)
    parser.add_argument("--modes", type=int, nargs="+", default=[fa.MODE_CAUSAL, fa.MODE_WINDOW],
                        choices=(fa.MODE_FULL, fa.MODE_CAUSAL, fa.MODE_WINDOW),
                        help="0 full, 1 causal, 2 windows (the sparse attentions)")
    args = parser.parse_args(argv)
    return report(args.arch, args.kernels, args.head_dims, args.modes)


if __name__ == "__main__":
    main()
