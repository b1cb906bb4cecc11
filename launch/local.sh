#!/usr/bin/env bash
# Runs a bltjax command as one process on this machine (all its GPUs/TPUs, or the CPU).
#
# Usage:
#   launch/local.sh [options] [COMMAND] [ARGS...]
#
#   launch/local.sh --config experiments/entropy_tiny.py --workdir runs/entropy_tiny
#   launch/local.sh --cpu_devices=8 --config experiments/entropy_tiny.py:runlocal \
#       --workdir /tmp/run --config.mesh.fsdp=2
#   launch/local.sh eval --workdir runs/entropy_tiny --data notes.txt
#
# Arguments:
#   COMMAND             a bltjax command (default: train); ARGS go to it unchanged
# Options (anywhere on the line):
#   --cpu_devices=D     fake D CPU devices (JAX_NUM_CPU_DEVICES, JAX_PLATFORMS=cpu): try a
#                       sharded mesh on a laptop
#   --dry_run           print the command and exit
#                       (after `sweep`: the sweep's own --dry_run, which lists its runs)
#   -h, --help          this usage (after COMMAND: the command's help)
# Environment:
#   PYTHON              the interpreter (default: python3)
#
# Re-running the same train command resumes from the workdir's latest checkpoint.
set -euo pipefail

NAME="local.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib.bash"   # die, usage, quote

PYTHON="${PYTHON:-python3}"
CPU_DEVICES="" DRY_RUN=0
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu_devices=*) CPU_DEVICES="${1#*=}" ;;
    --cpu_devices) CPU_DEVICES="${2:?--cpu_devices needs a value}"; shift ;;
    # After `sweep`, --dry_run is the sweep's own (list the runs); -h/--help after a
    # command is that command's.
    --dry_run) if [[ "${ARGS[0]:-}" == sweep ]]; then ARGS+=("$1"); else DRY_RUN=1; fi ;;
    -h|--help) if [[ ${#ARGS[@]} -gt 0 ]]; then ARGS+=("$1"); else usage; fi ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
[[ -z "$CPU_DEVICES" || "$CPU_DEVICES" =~ ^[1-9][0-9]*$ ]] \
  || die "--cpu_devices must be >= 1, got '$CPU_DEVICES'"
if [[ ${#ARGS[@]} -eq 0 || "${ARGS[0]}" == -* ]]; then
  ARGS=(train "${ARGS[@]}")
fi

# One process: never join a multi-host job, even inside a SLURM allocation.
CMD=(env BLTJAX_DISTRIBUTED=off)
[[ -z "$CPU_DEVICES" ]] || CMD+=("JAX_NUM_CPU_DEVICES=$CPU_DEVICES" JAX_PLATFORMS=cpu)
CMD+=("$PYTHON" -m bltjax.cli "${ARGS[@]}")

if [[ $DRY_RUN -eq 1 ]]; then
  quote "${CMD[@]}"
  exit 0
fi
command -v "$PYTHON" >/dev/null 2>&1 \
  || die "python interpreter '$PYTHON' not found; activate the venv or set PYTHON=/path/to/python"
"$PYTHON" -c "import bltjax" 2>/dev/null \
  || die "$PYTHON cannot import bltjax; run 'pip install -e .' in the repository (or set PYTHON)"
exec "${CMD[@]}"
