#!/usr/bin/env bash
# The GPU check: one command on a bare GPU machine (no network), under 8 minutes on an H100.
#
#   bash benchmarks/gpu_check.sh            every step below; results under $OUT (default out/gpu)
#   bash benchmarks/gpu_check.sh --dry-run  the same steps on the CPU at tiny sizes: tests this
#                                           script's logic without a GPU (tests/test_gpu_check.py)
#
# Steps, each logged to $OUT/<step>.log with its exit status and seconds in $OUT/steps.tsv; a
# failing step never stops the others, and every step has a time limit:
#   device    GPU, driver, torch/triton versions, commit
#   wheels    packages the machine lacks (trl, liger-kernel, cut-cross-entropy, peft): the
#             wheels in $WHEELS (default ./wheels), installed into $SITE, no network
#   build     the extensions in place, without build isolation
#   tests     the GPU tests: cuda and triton against reference (one case past 2^31 elements),
#             the fused, linear and autocast paths, no host sync in a step, CUDA graphs, compile
#   memcheck  compute-sanitizer memcheck on a small case (benchmarks/memcheck_case.py)
#   logits    the heavy op at N=16, T=2048, V=128256 bf16 (past 2^31 elements), against TRL's
#             way and torch.compile: time, bandwidth against the copy floor, peak memory; and
#             WPO's extra statistic (--wpo)
#   linear    the linear path at Llama-3-8B's head (H=4096, V=128256), against Liger and CCE
#   triton    a BLOCK_V x num_warps sweep of the Triton kernels (benchmarks/triton_sweep.py)
# and last, a short summary table (benchmarks/gpu_check_summary.py). With ARCHIVE=FILE set,
# everything under $OUT is also packed into that one .tar.gz (the device tool brings back only
# a few files: `ARCHIVE=$OUT/gpu.tar.gz OUT=/tmp/gpu bash benchmarks/gpu_check.sh`, the
# archive named first so that it expands with the device tool's $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-out/gpu}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
# The carried packages live outside $OUT: the device tool returns only a bounded number of files.
SITE=${SITE:-/tmp/pyfastpo-gpu-site}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: PYTHONPATH below must not depend on the working directory
: > "$OUT/steps.tsv"

# step NAME LIMIT_S COMMAND...: run with a time limit, log, record the status and seconds.
step() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >> "$OUT/steps.tsv"
  echo "[$name] exit $rc after $(($(date +%s) - start)) s"
}
skip() {  # skip NAME WHY
  echo "skipped: $2" > "$OUT/$1.log"
  printf '%s\tskip\t0\n' "$1" >> "$OUT/steps.tsv"
  echo "[$1] skipped: $2"
}

device_info() {
  if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
  git rev-parse HEAD 2> /dev/null || true
  date -u
}
export -f device_info
export PY
step device 60 bash -c device_info
cat "$OUT/device.log"

if [ "$DRY" = 0 ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  step wheels 120 $PY -m pip install --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  skip wheels "no $WHEELS/*.whl (dry run, or nothing to carry): trl, Liger and CCE run only if installed"
fi

if [ "$DRY" = 0 ]; then
  step build 180 $PY -m pip install --no-build-isolation --no-deps -e .
  step tests 200 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py tests/test_triton_kernels.py \
    tests/test_sequence_logps.py tests/test_hardening.py tests/test_fused.py tests/test_linear.py tests/test_autocast.py tests/test_no_sync.py tests/test_compile.py \
    tests/test_wpo.py tests/test_token_weights.py tests/test_linear_single_pass.py
  if command -v compute-sanitizer > /dev/null; then
    step memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 1 $PY benchmarks/memcheck_case.py
  else
    skip memcheck "compute-sanitizer not found on PATH"
  fi
  step logits 150 $PY -m pyfastpo.bench --device cuda --dtype bfloat16 --path logits --baselines trl,compile \
    --wpo --no-progress --sizes 16x2048x128256 --out "$OUT/logits"
  step linear 90 $PY -m pyfastpo.bench --device cuda --dtype bfloat16 --path linear --baselines materialized,liger,cce \
    --no-progress --sizes 8x1024x128256x4096 --out "$OUT/linear"
  step triton 90 $PY benchmarks/triton_sweep.py --size 16x2048x128256 --dtype bfloat16 --blocks 2048,4096,8192 \
    --warps 4,8,16 --repeats 5 --out "$OUT/triton.md"
else
  # The CPU stand-ins: the same commands at sizes a CPU (and Triton's interpreter) finishes in seconds.
  step build 60 $PY -c "import pyfastpo.backends._C"
  step tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py
  step memcheck 60 $PY benchmarks/memcheck_case.py
  step logits 120 $PY -m pyfastpo.bench --device cpu --dtype float32 --path logits --baselines trl \
    --no-progress --sizes 2x16x500 --repeats 1 --warmup 0 --out "$OUT/logits"
  step linear 120 $PY -m pyfastpo.bench --device cpu --dtype float32 --path linear --baselines materialized \
    --no-progress --sizes 2x16x500x32 --repeats 1 --warmup 0 --out "$OUT/linear"
  step triton 120 $PY benchmarks/triton_sweep.py --device cpu --size 1x4x100 --dtype float32 --blocks 64 \
    --warps 1,2 --repeats 1 --out "$OUT/triton.md"
fi

echo
$PY benchmarks/gpu_check_summary.py "$OUT" | tee "$OUT/summary.md"
if [ -n "${ARCHIVE:-}" ]; then
  tar czf "$ARCHIVE" -C "$OUT" . && echo "packed $OUT into $ARCHIVE"
fi
