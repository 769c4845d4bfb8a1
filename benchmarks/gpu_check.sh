#!/usr/bin/env bash
# GPU check: build fastllm's CUDA kernels for the present card only, run the GPU tests, run the GPU
# benchmarks, print a short ratio table. Budget: about 8 minutes on an H100/H200.
# Usage (from the repository root): bash benchmarks/gpu_check.sh   [OUT=dir for logs and JSON]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/fastllm-gpu-check}
mkdir -p "$OUT"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

start=$(date +%s)
FASTLLM_CUDA=1 FASTLLM_CUDA_ARCHS=native "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
  > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
"$PY" -c "import fastllm.ops as ops, json; print(json.dumps(ops.available()))"

# GPU tests: everything marked gpu (CUDA kernels, Triton on device, bf16).
timeout 240 "$PY" -m pytest tests -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# GPU benchmarks; the ratio table (same run) is printed last.
timeout 300 "$PY" -m pytest benchmarks -q -k "cuda" -p no:cacheprovider --benchmark-columns=median \
  --results-json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | sed -n '/benchmark ratios/,/^-\{20,\}/p'
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "gpu_check total: $(( $(date +%s) - start )) s, status $status"
exit $status
