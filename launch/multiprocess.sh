#!/usr/bin/env bash
# Runs a bltjax command as N local CPU processes joined by jax.distributed.
#
# This is the multi-host code path on one machine: each process sees its own fake CPU
# devices and takes its rows of every global batch; process 0 writes the logs.
#
# Usage:
#   launch/multiprocess.sh N [options] [COMMAND] [ARGS...]
#
#   launch/multiprocess.sh 2 --config experiments/entropy_tiny.py --workdir runs/mp2
#   launch/multiprocess.sh 4 --devices_per_process=2 eval --workdir runs/mp2 --data notes.txt
#
# Arguments:
#   N                        number of processes (>= 1)
#   COMMAND                  a bltjax command (default: train); ARGS go to it unchanged
# Options (anywhere on the line, `--opt=value` or `--opt value`):
#   --devices_per_process=D  CPU devices per process (JAX_NUM_CPU_DEVICES; default 4)
#   --port=P                 coordinator port on 127.0.0.1 (default: a free port)
#   --log_dir=DIR            logs process_<i>.log (default: <workdir>/logs, else ./logs;
#                            the previous launch's are kept as process_<i>.log.prev)
#   --timeout=S              stop every process after S seconds (default 0: no limit)
#   --grace=S                on SIGTERM (a scheduler's preemption notice), the launcher
#                            passes it on and gives the processes S seconds to save a
#                            checkpoint and exit before it kills them (default 120)
#   --dry_run                print the N commands and exit
#                            (after `sweep`: the sweep's own --dry_run, which lists its runs)
#   -h, --help               this usage (after COMMAND: the command's help)
# Environment:
#   PYTHON                   the interpreter (default: python3)
#
# Process 0's log is echoed to stdout. Exit status: 0 when every process exits 0; else
# the status of the first one that fails (the others are stopped), 124 on --timeout,
# 143 when a preemption notice stopped the run after its checkpoint.
set -euo pipefail

NAME="multiprocess.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib.bash"   # die, usage, quote

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then usage; fi
[[ $# -ge 1 ]] || die "missing N; usage: launch/multiprocess.sh N [options] [COMMAND] [ARGS...]"
N="$1"; shift
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number of processes, got '$N'"

PYTHON="${PYTHON:-python3}"
DEVICES=4 PORT="" LOG_DIR="" TIMEOUT=0 GRACE=120 DRY_RUN=0 WORKDIR=""
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices_per_process=*) DEVICES="${1#*=}" ;;
    --devices_per_process) DEVICES="${2:?--devices_per_process needs a value}"; shift ;;
    --port=*) PORT="${1#*=}" ;;
    --port) PORT="${2:?--port needs a value}"; shift ;;
    --log_dir=*) LOG_DIR="${1#*=}" ;;
    --log_dir) LOG_DIR="${2:?--log_dir needs a value}"; shift ;;
    --timeout=*) TIMEOUT="${1#*=}" ;;
    --timeout) TIMEOUT="${2:?--timeout needs a value}"; shift ;;
    --grace=*) GRACE="${1#*=}" ;;
    --grace) GRACE="${2:?--grace needs a value}"; shift ;;
    # After `sweep`, --dry_run is the sweep's own (list the runs); -h/--help after a
    # command is that command's.
    --dry_run) if [[ "${ARGS[0]:-}" == sweep ]]; then ARGS+=("$1"); else DRY_RUN=1; fi ;;
    -h|--help) if [[ ${#ARGS[@]} -gt 0 ]]; then ARGS+=("$1"); else usage; fi ;;
    --workdir=*) WORKDIR="${1#*=}"; ARGS+=("$1") ;;
    --workdir) WORKDIR="${2:-}"; ARGS+=("$1" "${2:-}"); shift ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
[[ "$DEVICES" =~ ^[1-9][0-9]*$ ]] || die "--devices_per_process must be >= 1, got '$DEVICES'"
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds, got '$TIMEOUT'"
[[ "$GRACE" =~ ^[0-9]+$ ]] || die "--grace must be a number of seconds, got '$GRACE'"
[[ -z "$PORT" || "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
if [[ ${#ARGS[@]} -eq 0 || "${ARGS[0]}" == -* ]]; then
  ARGS=(train "${ARGS[@]}")
fi
[[ -n "$LOG_DIR" ]] || LOG_DIR="${WORKDIR:+$WORKDIR/}logs"

command -v "$PYTHON" >/dev/null 2>&1 \
  || die "python interpreter '$PYTHON' not found; activate the venv or set PYTHON=/path/to/python"
if [[ -z "$PORT" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

# The command line of process $1 (as an array in CMD).
process_command() {
  CMD=(env "BLTJAX_COORDINATOR=127.0.0.1:$PORT" "BLTJAX_NUM_PROCESSES=$N"
       "BLTJAX_PROCESS_ID=$1" "JAX_NUM_CPU_DEVICES=$DEVICES" JAX_PLATFORMS=cpu
       "$PYTHON" -m bltjax.cli "${ARGS[@]}")
}

if [[ $DRY_RUN -eq 1 ]]; then
  echo "mkdir -p $(quote "$LOG_DIR")"
  for ((i = 0; i < N; i++)); do
    process_command "$i"
    echo "$(quote "${CMD[@]}") > $(quote "$LOG_DIR/process_$i.log") 2>&1 &"
  done
  echo "wait"
  exit 0
fi

"$PYTHON" -c "import bltjax" 2>/dev/null \
  || die "$PYTHON cannot import bltjax; run 'pip install -e .' in the repository (or set PYTHON)"
mkdir -p "$LOG_DIR"

PIDS=()
TAIL_PID=""
# Sends SIGTERM to every process, waits up to $1 seconds (default 5) for them to exit,
# kills what is left. (Under jax.distributed, SIGTERM is a preemption notice: a training
# process saves a checkpoint at a step every process agrees on, then exits.)
stop_all() {
  local pid alive half_seconds=0
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  while [[ $half_seconds -lt $(( ${1:-5} * 2 )) ]]; do
    alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive -eq 0 ]] && break
    sleep 0.5
    half_seconds=$((half_seconds + 1))
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  # tail ends by itself within a second of process 0, after its last lines.
  [[ -z "$TAIL_PID" ]] || wait "$TAIL_PID" 2>/dev/null || true
}
trap 'stop_all; exit 130' INT
trap 'stop_all "$GRACE"; exit 143' TERM

echo "$NAME: $N processes x $DEVICES CPU devices, coordinator 127.0.0.1:$PORT, logs in $LOG_DIR"
for ((i = 0; i < N; i++)); do
  process_command "$i"
  # The last launch's log (a crash to read) is kept beside the new one.
  LOG="$LOG_DIR/process_$i.log"
  [[ ! -f "$LOG" ]] || mv -f "$LOG" "$LOG.prev"
  "${CMD[@]}" >"$LOG" 2>&1 &
  PIDS+=("$!")
done
if tail --pid="$$" --version >/dev/null 2>&1; then  # GNU tail: follow process 0's log.
  tail -n +1 -F --pid="${PIDS[0]}" "$LOG_DIR/process_0.log" 2>/dev/null &
  TAIL_PID=$!
fi

STATUS=0
declare -A DONE=()
while [[ ${#DONE[@]} -lt $N ]]; do
  for ((i = 0; i < N; i++)); do
    [[ -n "${DONE[$i]:-}" ]] && continue
    kill -0 "${PIDS[$i]}" 2>/dev/null && continue
    rc=0; wait "${PIDS[$i]}" || rc=$?
    DONE[$i]=$rc
    if [[ $rc -eq 143 && $STATUS -eq 0 ]]; then
      # Saved after a preemption notice; the others stop at the same step by themselves.
      STATUS=143
      echo "$NAME: process $i stopped after a preemption notice (exit 143)" >&2
    elif [[ $rc -ne 0 && $rc -ne 143 && ( $STATUS -eq 0 || $STATUS -eq 143 ) ]]; then
      STATUS=$rc
      echo "$NAME: process $i failed (exit $rc); stopping the others. Its log" \
           "($LOG_DIR/process_$i.log) ends with:" >&2
      tail -n 20 "$LOG_DIR/process_$i.log" >&2 || true
      stop_all
    fi
  done
  if [[ $TIMEOUT -gt 0 && $SECONDS -ge $TIMEOUT && ( $STATUS -eq 0 || $STATUS -eq 143 )
        && ${#DONE[@]} -lt $N ]]; then
    echo "$NAME: --timeout=$TIMEOUT s reached; stopping every process" >&2
    STATUS=124
    stop_all
  fi
  [[ ${#DONE[@]} -lt $N ]] && sleep 0.2
done
if [[ -n "$TAIL_PID" ]]; then
  wait "$TAIL_PID" 2>/dev/null || true
else
  cat "$LOG_DIR/process_0.log"
fi
exit "$STATUS"
