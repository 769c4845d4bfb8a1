#!/usr/bin/env bash
# GPU check: build fastllm's CUDA kernels for the present card only, run the GPU tests, run the GPU
# benchmarks, print a short ratio table per part. Every part runs under a time limit and the whole
# script under a budget (BUDGET seconds, default 480), so a slow or hung part costs its own results
# only; benchmark tables are written as each benchmark finishes.
#
#   bash benchmarks/gpu_check.sh                           # all parts but profile
#   PARTS="build tests ops" bash benchmarks/gpu_check.sh    # a subset (the build is added when missing)
#   LOGS=dir                        # logs and JSON tables (default /tmp/fastllm-gpu-check)
#   TESTS="tests/ops/test_x.py"     # what the tests part runs (default: the GPU-relevant suites)
#   BENCH_K="cuda and not compiled" # which op benchmarks run (pytest -k; default: cuda)
#   ATTN_K="not flex"               # which attention benchmarks run (pytest -k; default: all)
#   PROFILE="train attention"       # the profile part's workloads (profile_gpu.py's parts)
#   NCU="mamba:scan_forward_kernel"  # the ncu part's kernels, as profile_gpu.py part:kernel name
#
# Parts: build, tests (ops, layers and models whole, gpu-marked tests elsewhere), ops (AdEMAMix,
# xIELU, selective scan, depth-weighted average, linear cross-entropy, document-masked attention),
# attention (dense and sparse flash attention), train (124M training step, Mamba vs Transformer
# generation), lm (benchmarks/sparse_lm.py: sparse-attention LMs beside a dense one at T = 2048),
# smoke (the main job on the GPU), profile (benchmarks/profile_gpu.py: top CUDA kernels of the
# training step and the sparse attentions), ncu (Nsight Compute on single kernels: throughput,
# occupancy, stall reasons).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOGS=${LOGS:-/tmp/fastllm-gpu-check}
PARTS=${PARTS:-"build tests ops attention train lm smoke"}
BUDGET=${BUDGET:-480}
ALL_TESTS="tests/ops tests/nn tests/models"
TESTS=${TESTS:-$ALL_TESTS}
BENCH_K=${BENCH_K:-cuda}
ATTN_K=${ATTN_K:-}
PROFILE=${PROFILE:-"train attention"}
NCU=${NCU:-"mamba:scan_forward_kernel mamba:scan_backward_kernel mamba:_grad_preactivation_kernel
  mamba:_input_and_weight_grad_kernel dwa:forward_kernel dwa:backward_kernel"}
mkdir -p "$LOGS"
status=0
start=$(date +%s)
has() { [[ " $PARTS " == *" $1 "* ]]; }
elapsed() { echo "[$(( $(date +%s) - start )) s] $*"; }
# limit WANTED: seconds a part may take, cut to what is left of the budget (0 when under 20 s)
limit() { local left=$(( BUDGET - ($(date +%s) - start) - 10 )); (( left < $1 )) && echo $(( left < 20 ? 0 : left )) || echo "$1"; }
# SIGINT first, so pytest stops cleanly and still prints its summary and our ratio table.
run_limited() { local secs=$1; shift; (( secs > 0 )) || { echo "skipped: out of budget"; return 1; }
  timeout -s INT -k 15 "$secs" "$@"; }
plugins=()
"$PY" -c "import xdist" 2>/dev/null && plugins+=(-n 8)
"$PY" -c "import pytest_timeout" 2>/dev/null && plugins+=(--timeout=150)

bench() {  # bench NAME SECONDS PYTEST_ARGS...: run benchmarks, print the ratio table
  local name=$1 secs; secs=$(limit "$2"); shift 2
  run_limited "$secs" "$PY" -m pytest -q -p no:cacheprovider --benchmark-columns=median \
    --results-json "$LOGS/$name.json" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  sed -n '/benchmark ratios/,$p' "$LOGS/$name.log" | grep -v "^=\+ .* in [0-9.]*s" | head -60
  grep -E "^(FAILED|ERROR)" "$LOGS/$name.log" | head -10
  [ "$rc" -eq 0 ] || { status=1; elapsed "$name benchmarks exit $rc (see $LOGS/$name.log)"; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# A later call may land on a fresh machine (an idle one is handed back within a minute): without
# fastllm's build there, the kernels would silently fall back to the reference paths.
if ! has build && ! "$PY" -c "import sys, fastllm.triton_kernels, fastllm.ops as o
sys.exit(o.available()['ops']['selective_scan']['cuda'] != 'cuda')" 2>/dev/null; then
  echo "fastllm's kernels are not built on this machine: running the build part first"; PARTS="build $PARTS"
fi
if has build; then
  FASTLLM_CUDA=1 FASTLLM_CUDA_ARCHS=native "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
    > "$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log"; echo "BUILD FAILED"; exit 1; }
  elapsed "built for $("$PY" -c 'import torch; print("sm_%d%d" % torch.cuda.get_device_capability())')"
fi
"$PY" -c "import fastllm.ops as ops, json; print(json.dumps(ops.available()['ops']))"

if has tests; then
  # Op, layer and model tests run whole (their Triton kernels run natively here); elsewhere the gpu-marked ones.
  # shellcheck disable=SC2086
  run_limited "$(limit 200)" "$PY" -m pytest $TESTS -q -p no:cacheprovider "${plugins[@]}" -rfE --tb=short \
    --maxfail=25 > "$LOGS/tests.log" 2>&1 || status=1
  if [ "$TESTS" = "$ALL_TESTS" ]; then
    run_limited "$(limit 90)" "$PY" -m pytest tests -q -m gpu -p no:cacheprovider "${plugins[@]}" -rfE \
      --tb=short --ignore=tests/ops --ignore=tests/nn --ignore=tests/models >> "$LOGS/tests.log" 2>&1 || status=1
  fi
  grep -E "^(FAILED|ERROR)|passed|failed|skipped: out" "$LOGS/tests.log" | cut -c1-300 | head -40
  elapsed "tests done"
fi
has ops && bench ops 260 benchmarks -k "$BENCH_K" --ignore=benchmarks/bench_flash_attention.py \
  --ignore=benchmarks/bench_train.py --ignore=benchmarks/bench_mamba_generation.py
if has attention; then  # -s and TRITON_PRINT_AUTOTUNING: the log names the config each kernel's tuning chose
  export TRITON_PRINT_AUTOTUNING=1
  bench attention 300 benchmarks/bench_flash_attention.py -s ${ATTN_K:+-k "$ATTN_K"}
  unset TRITON_PRINT_AUTOTUNING
  # Not anchored at ^: pytest -q prints a test's progress mark ('.') on the line its output starts on.
  grep -A3 --no-group-separator "Triton autotuning for function" "$LOGS/attention.log" | paste -d' ' - - - - |
    sed 's/^.*Triton autotuning for function //' | cut -c1-230 | head -40
fi
has train && bench train 240 benchmarks/bench_train.py benchmarks/bench_mamba_generation.py -k cuda

if has lm; then  # dense, hash-sparse and QK-dropping LMs at T = 2048: validation loss and tokens/s
  run_limited "$(limit 240)" "$PY" benchmarks/sparse_lm.py > "$LOGS/lm.log" 2>&1 || status=1
  tail -6 "$LOGS/lm.log"
fi

if has profile; then  # the top CUDA kernels of the workloads that miss their targets
  # shellcheck disable=SC2086
  run_limited "$(limit 150)" "$PY" benchmarks/profile_gpu.py $PROFILE > "$LOGS/profile.log" 2>&1 || status=1
  grep -v "Warning\|warn" "$LOGS/profile.log" | tail -70
fi

if has ncu; then  # one launch of each kernel (the second: the first may include set-up), key figures only
  for target in $NCU; do
    part=${target%%:*} kernel=${target#*:}
    # --clock-control none: ncu would otherwise lock the card's clocks, a setting we leave alone.
    run_limited "$(limit 60)" ncu --clock-control none -k "regex:^${kernel}\$" --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      "$PY" benchmarks/profile_gpu.py "$part" > "$LOGS/ncu-$kernel.log" 2>&1 || status=1
    echo "== ncu $kernel"
    grep -E "^ +(Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Registers Per Thread|\
Achieved Occupancy|Theoretical Occupancy|Block Size|Grid Size) |stalled|cycles being" "$LOGS/ncu-$kernel.log" \
      | cut -c1-200 | head -14
  done
fi

if has smoke; then  # the main job on the GPU: bf16 autocast, MFU in the log
  rm -rf /tmp/fastllm-smoke  # a second call would resume the finished run and train nothing
  run_limited "$(limit 120)" "$PY" -m fastllm.cli train --out=/tmp/fastllm-smoke --steps=50 --warmup_steps=5 \
    --eval_interval=25 > "$LOGS/smoke.log" 2>&1 || status=1
  tail -c 600 "$LOGS/smoke.log"; echo
fi

elapsed "gpu_check done, status $status"
exit $status
