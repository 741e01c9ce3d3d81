#!/usr/bin/env bash
# The whole GPU benchmark in one command (what the device call runs). Needs .bundle/ (benchmarks/make_bundle.py).
#   OUT=/some/dir PRESET=internvl3-1b BUDGET=480 bash benchmarks/run_gpu.sh
# Writes OUT/log.txt, OUT/results.json, OUT/tritonserver.log, OUT/frontend.log; the checkpoint goes to WORK.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench-out}
WORK=${WORK:-/tmp/bench-work}
mkdir -p "$OUT" "$WORK"
{
  date; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv || true
  t0=$(date +%s)
  bash benchmarks/gpu_setup.sh .bundle && {
    [ -f /tmp/vlm_libpython.env ] && . /tmp/vlm_libpython.env
    echo "setup took $(( $(date +%s) - t0 )) s"
    python3 -m benchmarks.run --preset "${PRESET:-internvl3-1b}" --out "$OUT" --work "$WORK" \
      --budget-s "${BUDGET:-480}" ${PHASES:+--phases $PHASES}
  }
} 2>&1 | tee "$OUT/log.txt"
