import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

# Triton kernels run in the interpreter on machines without a GPU; this must be set before Triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _build_emulated(entry: str) -> ctypes.CDLL:
    """tests/cuda_emulator/<entry>, CUDA kernels of csrc/ run by the CPU emulator, built with g++ (cached
    by the hash of the sources) and loaded."""
    here, csrc = Path(__file__).parent / "cuda_emulator", Path(__file__).parents[1] / "csrc"
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is needed to build the CUDA emulator")
    sources = [here / "cuda_emulator.h", here / entry, *sorted(csrc.rglob("*.h")), *sorted(csrc.rglob("*.cuh"))]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / "fastllm-cuda-emulator" / f"{Path(entry).stem}-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        subprocess.run([compiler, "-std=c++20", "-O2", "-pthread", "-shared", "-fPIC", f"-I{csrc}",
                        "-include", str(here / "cuda_emulator.h"), str(here / entry), "-o", str(partial)],
                       check=True)
        partial.replace(target)  # atomic: a concurrent test worker never loads a half-written library
    return ctypes.CDLL(str(target))


@pytest.fixture(scope="session")
def cuda_emulator():
    """cuda_emulator("selective_scan.cpp"): CUDA kernels run on the CPU (tests/cuda_emulator)."""
    return _build_emulated
