#!/usr/bin/env bash
# One-shot hardware check, run ONCE on a GPU machine from the repository root with the
# machine's own python3 (nothing is installed). Writes at most 14 files under $OUT:
#   checks.log      every step's command, output, exit code and seconds, in order
#                   (the first step records the commit and a digest of the sources)
#   validate.json   python -m fastadagrad validate --quick --json (0 ulp, launch path)
#   pytest.log      junit XML of the real-GPU tests/cuda run (no simulator), CUDA-graph
#                   capture test included (their text output is in checks.log)
#   overhead.txt    bench/gpu_overhead.py: host time per step, 100-tensor torch model
#   profile.txt     cProfile of those host-time cases (where the host time goes)
#   bench.json      pytest-benchmark JSON of bench/test_bench_gpu.py (10 rounds each)
#   sweep.txt       bench/gpu_sweep.py: launch configurations at 2^26 against a copy,
#                   and the 4-per-pass kernel variants (config.GPU_GRID_STRIDE,
#                   config.GPU_UNROLL_CHUNKS) against the default
#   validate-variants.json   validate --quick with both variants on (bits, GB/s)
#   cpu-probe-a.json/.md, cpu-probe-b.json/.md   bench/cpu_probe.py on the machine's
#                   host CPU, in two halves so that a timeout loses only one: (a) its
#                   kernels against plain loops and the roofline kernel on all its
#                   threads, and where the serial/parallel threshold falls there; (b)
#                   the serial kernel, every option set, what bounds the update in cache
#   torch-probe.json, torch-probe.md   bench/torch_probe.py on the host CPU (the torch
#                   adapter against torch.optim.Adagrad's three CPU paths, all threads)
# BUNDLE=file.tgz also packs everything under $OUT into that one archive at the end (for
# a runner that returns only a few files: point OUT at a scratch folder).
# Steps, most important first; each has its own timeout and the whole run a budget
# (BUDGET seconds, default 540): a step that would start with under 10 s left is
# skipped and counted as failed, so the script ends within the budget and never hangs.
# --dry-run prints the steps without running them; SKIP="name ..." leaves steps out (a
# rerun of what changed, on a short device budget). Exit status: failed steps.
set -u
OUT="${OUT:-/tmp/gpu_check_out}"
PY="${PYTHON:-python3}"
BUDGET="${BUDGET:-540}"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT"
LOG="$OUT/checks.log"
: > "$LOG"
FAILED=0
START=$(date +%s)
unset NUMBA_ENABLE_CUDASIM
# numba-cuda 0.30.4 overloads np.row_stack at its first compile, which numpy 2.5 removed
# (the `cuda` extra pins numpy<2.5; a GPU image may not): alias it for this run only.
if ! "$PY" -c "import numpy; numpy.row_stack" 2>/dev/null; then
  SHIM="$(mktemp -d)"
  echo 'import numpy; numpy.row_stack = numpy.vstack' > "$SHIM/sitecustomize.py"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  echo "numpy without row_stack: aliased to vstack through $SHIM/sitecustomize.py" | tee -a "$LOG"
fi
# the image's packages may warn (DeprecationWarning) where CI's pinned ones do not
PYW=(-W ignore::DeprecationWarning)

step() {  # step NAME TIMEOUT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$left" -lt "$limit" ] && limit="$left"
  case " ${SKIP:-} " in *" $name "*)
    echo "=== $name skipped (SKIP)" | tee -a "$LOG"; return 0;; esac
  echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
  [ "$DRY" = 1 ] && return 0
  if [ "$limit" -lt 10 ]; then
    echo "=== $name SKIPPED: out of time (budget ${BUDGET}s)" | tee -a "$LOG"
    FAILED=$((FAILED + 1)); return 0
  fi
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "=== $name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$LOG"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
}

# which code ran: the commit where the tree has its .git, and always a digest of the
# package, bench and test sources (compare with the same command on a checkout)
step source 10 bash -c "date -u; git rev-parse HEAD 2>/dev/null || echo 'no .git here'; \
find fastadagrad bench tests -name '*.py' | LC_ALL=C sort | xargs sha256sum | sha256sum"
step env 30 "$PY" -c "import numba, numba_cuda, numpy, torch; import cuda.core as cc; \
print('numba', numba.__version__, 'numba-cuda', numba_cuda.__version__, 'numpy', \
numpy.__version__, 'torch', torch.__version__, 'cuda.core', cc.__version__); \
from numba import cuda; print(cuda.get_current_device().name, torch.cuda.device_count(), 'GPUs')"
step validate 130 "$PY" -m fastadagrad validate --quick --json "$OUT/validate.json"
step pytest-gpu 150 "$PY" -m pytest tests/cuda -q -p no:cacheprovider -rs \
  -o addopts="" "${PYW[@]}" --junitxml="$OUT/pytest.xml"
[ -f "$OUT/pytest.xml" ] && mv "$OUT/pytest.xml" "$OUT/pytest.log"
step overhead 60 bash -c "'$PY' bench/gpu_overhead.py --profile '$OUT/profile.txt' > '$OUT/overhead.txt'"
FASTADAGRAD_GPU_BENCH_ROUNDS=10 step bench 90 "$PY" -m pytest bench/test_bench_gpu.py \
  -q -p no:cacheprovider -o addopts="" "${PYW[@]}" --benchmark-only \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=min,median,mean,rounds \
  --benchmark-sort=name
step sweep 60 bash -c "'$PY' bench/gpu_sweep.py > '$OUT/sweep.txt'"
FASTADAGRAD_GPU_GRID_STRIDE=1 FASTADAGRAD_GPU_UNROLL_CHUNKS=1 step validate-variants 130 \
  "$PY" -m fastadagrad validate --quick --json "$OUT/validate-variants.json"
FASTADAGRAD_CUDA_LAUNCHER=dispatcher step pytest-dispatcher 60 "$PY" -m pytest \
  tests/cuda/test_cuda_kernels.py -q -p no:cacheprovider -x -o addopts="" "${PYW[@]}" \
  -k "separate or capturable or launch_path or known_values"
step pytest-ptx 40 "$PY" -m pytest tests/test_cuda_ptx.py -q -p no:cacheprovider -x \
  -o addopts="" "${PYW[@]}" -k sm_90
# (16 cores, 2026-11-28: the whole probe took over 120 s; its halves 63 s and ~35 s)
step cpu-probe-a 110 "$PY" bench/cpu_probe.py --only flat --only threshold \
  --only roofline --json "$OUT/cpu-probe-a.json"
step cpu-probe-b 80 "$PY" bench/cpu_probe.py --only serial --only options --only bound \
  --json "$OUT/cpu-probe-b.json"
step torch-probe 90 "$PY" "${PYW[@]}" bench/torch_probe.py --json "$OUT/torch-probe.json"
echo "failed steps: $FAILED; seconds: $(( $(date +%s) - START ))" | tee -a "$LOG"
[ -n "${BUNDLE:-}" ] && [ "$DRY" = 0 ] && tar -czf "$BUNDLE" -C "$OUT" .
exit "$FAILED"
