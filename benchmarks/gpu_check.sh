#!/usr/bin/env bash
# One command on a GPU machine (no network needed): build in place, run the test
# suite on the GPU (triton and cuda against reference), then two benchmark sweeps (the
# logits op past 2**31 elements, the linear path at Llama-3-8B's head), writing
# everything under $OUT and printing short tables last.
#   run: bash benchmarks/gpu_check.sh        (OUT defaults to ./out/gpu)
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null || true
  date -u
} | tee "$OUT/device.txt"

$PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3 | tee "$OUT/build.log"
$PY -m pytest -q -x tests 2>&1 | tee "$OUT/tests.log" | tail -5

# The heavy op at N=16, T=2048 (N*T*V > 2**31, past 32-bit element offsets), bf16, Llama-3's and Qwen2's
# vocabularies.
$PY -m pyfastpo.bench --device cuda --dtype bfloat16 --path logits --no-progress \
  --sizes 16x2048x128256,16x2048x151936 --out "$OUT/logits" 2>&1 | tail -3
# The linear path at Llama-3-8B's head (H=4096, V=128256), 4 pairs x T=1024 (the bench's labels: a
# quarter of each row prompt, up to a quarter padding; with half of each row prompt there would be
# ~0.6x as many valid tokens).
$PY -m pyfastpo.bench --device cuda --dtype bfloat16 --path linear --no-progress \
  --sizes 8x1024x128256x4096 --out "$OUT/linear" 2>&1 | tail -3

for f in "$OUT"/logits/results.md "$OUT"/linear/results.md; do
  [ -f "$f" ] && { echo; echo "== $f"; grep '^|' "$f" | head -30; }
done
