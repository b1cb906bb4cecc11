#!/usr/bin/env bash
# Every GPU benchmark of bltjax, in under 8 minutes; each appends its rows to
# bench/RESULTS.md (device, date, command, commit). Run it whole on the GPU machine:
#
#   bash ../shared/gpu/fetch_wheels.sh                   # once, here: wheels for grain etc.
#   (device) source .whl/activate.sh && bash bench/gpu_suite.sh
#
# Each benchmark has its own time budget; one that fails or runs out of time is reported
# and the suite goes on. Set DRY_RUN=1 to print the commands only.
set -uo pipefail
cd "$(dirname "$0")/.."
export GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
PY=${PYTHON:-python3}
STATUS=0

run() {
  local budget=$1; shift
  echo "== [$budget s] $PY $*"
  [ "${DRY_RUN:-0}" = 1 ] && return 0
  local start=$SECONDS
  if ! timeout "$budget" "$PY" "$@"; then
    echo "!! failed or out of time after $((SECONDS - start)) s: $*"
    STATUS=1
  fi
}

# Issue 4: sparse FFN kernel vs dense XLA, forward and forward+backward (checks numerics).
run 110 -m pallas_kernels.sparse_ffn.bench --variants sparse,auto --iters 10
# Issue 2: ~100M entropy model train step at bf16 (MFU).
run 50 bench/train_throughput.py --model entropy_100m --iters 5 \
  --config.train.batch_size=16 --config.model.remat=true
# Issue 3: the BLT-D-8-400M train step at bf16, global vs local share.
run 80 bench/train_throughput.py --model bltd8_400m --iters 5 --config.train.batch_size=16
# Issue 4: end-to-end train step of a BLT with relu+L1 global FFNs, pallas vs xla vs dense.
run 90 bench/sparse_ffn_train.py --preset gpu --quick --train_seconds 20 --timing_steps 10 \
  --timing_rounds 1 --set train.batch_size=32
# Issue 6: generation on a larger model (global 12 x 1024), BLT-D-8 trained for 25 s at
# bf16 with static patches (no entropy model to train first), then every method's speed.
GEN_DIR=${GEN_DIR:-/tmp/bltjax_gpu_gen}
run 50 -m bltjax.cli train --config experiments/blt_bench.py:bltd8,large --workdir "$GEN_DIR" \
  --config.patcher.mode=static --config.model.dtype=bfloat16 --config.train.time_budget_s=25
run 90 bench/generation.py --workdir "$GEN_DIR" --quick --prompts 4 --batch_sizes 1 --rounds 2
exit $STATUS
