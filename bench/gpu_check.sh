#!/usr/bin/env bash
# One-shot hardware check, run ONCE on a GPU machine from the repository root with the
# machine's own python3 (nothing is installed). Writes at most 5 files under $OUT:
#   validate.json   python -m fastadagrad validate --quick --json (0 ulp, launch path)
#   checks.log      every step's output and exit code, in order
#   pytest.log      junit XML of the real-GPU tests/cuda run (no simulator), CUDA-graph
#                   capture test included (their text output is in checks.log); a
#                   shorter run through Numba's dispatcher path follows
#   bench.json      pytest-benchmark JSON of bench/test_bench_gpu.py (short rounds)
#   overhead.txt    bench/gpu_overhead.py (host time per step, 100-tensor model)
# Every step has its own timeout; the whole script stays under ~5 minutes on an H100.
# --dry-run prints the steps without running them. Exit status: the number of failed
# steps.
set -u
OUT="${OUT:-/tmp/gpu_check_out}"
PY="${PYTHON:-python3}"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT"
LOG="$OUT/checks.log"
: > "$LOG"
FAILED=0
unset NUMBA_ENABLE_CUDASIM

step() {  # step NAME TIMEOUT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
  if [ "$DRY" = 1 ]; then return 0; fi
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "=== $name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$LOG"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
}

step env 30 "$PY" -c "import numba, numba_cuda, numpy, torch; import cuda.core as cc; \
print('numba', numba.__version__, 'numba-cuda', numba_cuda.__version__, 'numpy', \
numpy.__version__, 'torch', torch.__version__, 'cuda.core', cc.__version__); \
from numba import cuda; print(cuda.get_current_device().name, torch.cuda.device_count(), 'GPUs')"
step validate 120 "$PY" -m fastadagrad validate --quick --json "$OUT/validate.json"
step pytest-gpu 150 "$PY" -m pytest tests/cuda -q -p no:cacheprovider -rs \
  -o addopts="" --junitxml="$OUT/pytest.xml"
[ -f "$OUT/pytest.xml" ] && mv "$OUT/pytest.xml" "$OUT/pytest.log"
FASTADAGRAD_CUDA_LAUNCHER=dispatcher step pytest-dispatcher 90 "$PY" -m pytest \
  tests/cuda/test_cuda_kernels.py -q -p no:cacheprovider -x -o addopts="" \
  -k "separate or capturable or launch_path or known_values"
step pytest-ptx 60 "$PY" -m pytest tests/test_cuda_ptx.py -q -p no:cacheprovider -x -k sm_90
FASTADAGRAD_GPU_BENCH_ROUNDS=10 step bench 150 "$PY" -m pytest bench/test_bench_gpu.py \
  -q -p no:cacheprovider --benchmark-only --benchmark-json="$OUT/bench.json" \
  --benchmark-columns=min,median,mean,rounds --benchmark-sort=name
step overhead 90 bash -c "'$PY' bench/gpu_overhead.py > '$OUT/overhead.txt'"
echo "failed steps: $FAILED" | tee -a "$LOG"
exit "$FAILED"
