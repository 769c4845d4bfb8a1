#!/usr/bin/env bash
# GPU check: build fastllm's CUDA kernels for the present card only, run the GPU tests, run the GPU
# benchmarks, print a short ratio table. About 8 minutes on an H100/H200 with every part.
#
#   bash benchmarks/gpu_check.sh                  # all parts: build tests ops attention train smoke
#   PARTS="build tests ops" bash benchmarks/gpu_check.sh   # a subset (build is needed once per machine)
#   OUT=dir                                       # where logs and JSON go (default /tmp/fastllm-gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/fastllm-gpu-check}
PARTS=${PARTS:-"build tests ops attention train smoke"}
mkdir -p "$OUT"
status=0
start=$(date +%s)
has() { [[ " $PARTS " == *" $1 "* ]]; }
elapsed() { echo "[$(( $(date +%s) - start )) s] $*"; }
bench() {  # bench NAME TIMEOUT PYTEST_ARGS...: run benchmarks, print the ratio table
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$PY" -m pytest -q -p no:cacheprovider --benchmark-columns=median \
    --results-json "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log" | sed -n '/benchmark ratios/,/^-\{20,\}/p'
  [ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; elapsed "$name benchmarks FAILED (see $OUT/$name.log)"; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if has build; then
  FASTLLM_CUDA=1 FASTLLM_CUDA_ARCHS=native "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
    > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
  elapsed "built for $("$PY" -c 'import torch; print("sm_%d%d" % torch.cuda.get_device_capability())')"
fi
"$PY" -c "import fastllm.ops as ops, json; print(json.dumps(ops.available()['ops']))"

if has tests; then
  # Op, layer and model tests run whole (their Triton kernels run natively here); elsewhere the gpu-marked ones.
  timeout 300 "$PY" -m pytest tests/ops tests/nn tests/models -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  timeout 120 "$PY" -m pytest tests -q -m gpu -p no:cacheprovider --ignore=tests/ops --ignore=tests/nn \
    --ignore=tests/models 2>&1 | tee -a "$OUT/tests.log" | tail -5
  elapsed "tests done"
fi
has ops && bench ops 240 benchmarks -k cuda --ignore=benchmarks/bench_flash_attention.py \
  --ignore=benchmarks/bench_train.py --ignore=benchmarks/bench_mamba_generation.py
has attention && bench attention 240 benchmarks/bench_flash_attention.py
has train && bench train 240 benchmarks/bench_train.py benchmarks/bench_mamba_generation.py -k cuda

if has smoke; then  # the main job on the GPU: bf16 autocast, MFU in the log
  timeout 120 "$PY" -m fastllm.cli train --out="$OUT/smoke" --steps=50 --warmup_steps=5 --eval_interval=25 \
    > "$OUT/smoke.log" 2>&1 || status=1
  tail -c 600 "$OUT/smoke.log"; echo
fi

elapsed "gpu_check done, status $status"
exit $status
