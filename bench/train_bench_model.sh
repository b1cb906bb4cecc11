#!/usr/bin/env bash
# Trains the generation-benchmark model on CPU for a fixed wall-clock budget:
#   1. the tiny entropy model (experiments/entropy_tiny.py, ENTROPY_STEPS steps), then
#      calibrates its threshold
#      for 4.5 bytes per patch;
#   2. the BLT-D-8 bench model (experiments/blt_bench.py) for BUDGET seconds (default 1800).
# Usage: bench/train_bench_model.sh [RUNS_DIR=runs/bench] [BUDGET=1800] [ENTROPY_STEPS=300]
# Re-running resumes both runs. The checkpoints are not kept in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/bench}
BUDGET=${2:-1800}
ENTROPY_STEPS=${3:-300}
PY=${PYTHON:-.venv/bin/python}
"$PY" -m bltjax.cli train --config experiments/entropy_tiny.py --workdir "$RUNS/entropy" \
  --config.train.steps="$ENTROPY_STEPS"
"$PY" -m bltjax.cli calibrate --workdir "$RUNS/entropy" --target 4.5
"$PY" -m bltjax.cli train --config experiments/blt_bench.py:bltd8 --workdir "$RUNS/bltd8" \
  --config.patcher.entropy_workdir="$RUNS/entropy" --config.train.time_budget_s="$BUDGET"
