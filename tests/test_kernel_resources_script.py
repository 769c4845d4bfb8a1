"""benchmarks/kernel_resources.py: ahead-of-time compiles of the flash-attention configs, no GPU needed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).parents[1]

# Run apart from the test process, whose Triton kernels were configured for the interpreter.
CHECK = """
import importlib.util
spec = importlib.util.spec_from_file_location("kernel_resources", "benchmarks/kernel_resources.py")
kernel_resources = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernel_resources)
from fastllm.triton_kernels import flash_attention as fa

rows = kernel_resources.main(["--arch", "ARCH", "--kernels", "dq", "--head-dims", "16", "--modes", "1"])
expected = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.maxnreg)
            for c in fa._DQ + fa._DQ_NARROW + fa._DQ_SHORT}
assert {(*r["block"], r["warps"], r["stages"], r["cap"]) for r in rows} == expected, rows
for row in rows:
    assert 0 < row["regs"] <= (row["cap"] or 255) and row["shared"] > 0 and row["stack"] >= 0, row
    assert row["async_copies"] > 0, row  # the loop's loads are software-pipelined
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_reports_every_config_of_a_kernel(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", CHECK.replace("ARCH", str(arch))], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("\ndq ") == len(result.stdout.strip().splitlines()) - 1
