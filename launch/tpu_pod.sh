#!/usr/bin/env bash
# Runs a bltjax command on every worker of a Cloud TPU VM slice (creates or reuses it).
#
# Steps: (1) describe the TPU VM, create it if it does not exist; (2) copy this
# repository to every worker and `pip install -e .[tpu]` there; (3) run the command on
# all workers at once (`--worker=all`: a job on fewer hosts deadlocks, jax#22436), each
# worker teeing its output to ~/bltjax_logs/<hostname>.log; (4) copy those logs back.
#
# Usage:
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [options] [COMMAND] [ARGS...]
#
#   launch/tpu_pod.sh --tpu=blt-v5e --zone=us-west4-a --accelerator_type=v5litepod-16 \
#       --config experiments/entropy_tiny.py --workdir /mnt/shared/runs/entropy
#
# Arguments:
#   COMMAND                a bltjax command (default: train); ARGS go to it unchanged.
#                          The workdir must be a path every worker shares (NFS, Filestore
#                          or a gcsfuse mount): Orbax writes one checkpoint from all hosts.
# Options (`--opt=value` or `--opt value`):
#   --tpu=NAME             TPU VM name (default: $TPU_NAME)
#   --zone=ZONE            its zone (default: $TPU_ZONE)
#   --project=PROJECT      GCP project (default: gcloud's configured project)
#   --accelerator_type=T   when creating (default: v5litepod-16)
#   --runtime_version=V    when creating (default: v2-alpha-tpuv5-lite)
#   --spot                 create a Spot VM
#   --coordinator_port=P   jax.distributed coordinator port (default: 8476). jax >= 0.8.1
#                          picks 8482, which the TPU VM's default firewall rule does not
#                          open, so multislice starts hang (jax#35905); 8476 is open.
#   --python=PY            interpreter on the workers (default: python3; needs >= 3.11)
#   --log_dir=DIR          where the worker logs land (default: tpu_logs/<NAME>)
#   --skip_install         do not copy and install the package (reuse the last install)
#   --dry_run              print the commands and exit
#                          (after `sweep`: the sweep's own --dry_run, which lists its runs)
#   -h, --help             this usage (after COMMAND: the command's help)
# Environment:
#   GCLOUD                 the gcloud binary (default: gcloud)
#   BLTJAX_INIT_TIMEOUT    jax.distributed rendezvous timeout on the workers (default 900)
set -euo pipefail

NAME="tpu_pod.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib.bash"   # die, usage, quote

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GCLOUD="${GCLOUD:-gcloud}"
TPU="${TPU_NAME:-}" ZONE="${TPU_ZONE:-}" PROJECT=""
ACCELERATOR="v5litepod-16" RUNTIME="v2-alpha-tpuv5-lite" SPOT=0
PORT=8476 PY=python3 LOG_DIR="" INSTALL=1 DRY_RUN=0
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --tpu) TPU="${2:?--tpu needs a value}"; shift ;;
    --zone=*) ZONE="${1#*=}" ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift ;;
    --project=*) PROJECT="${1#*=}" ;;
    --project) PROJECT="${2:?--project needs a value}"; shift ;;
    --accelerator_type=*) ACCELERATOR="${1#*=}" ;;
    --accelerator_type) ACCELERATOR="${2:?--accelerator_type needs a value}"; shift ;;
    --runtime_version=*) RUNTIME="${1#*=}" ;;
    --runtime_version) RUNTIME="${2:?--runtime_version needs a value}"; shift ;;
    --spot) SPOT=1 ;;
    --coordinator_port=*) PORT="${1#*=}" ;;
    --coordinator_port) PORT="${2:?--coordinator_port needs a value}"; shift ;;
    --python=*) PY="${1#*=}" ;;
    --python) PY="${2:?--python needs a value}"; shift ;;
    --log_dir=*) LOG_DIR="${1#*=}" ;;
    --log_dir) LOG_DIR="${2:?--log_dir needs a value}"; shift ;;
    --skip_install) INSTALL=0 ;;
    # After `sweep`, --dry_run is the sweep's own (list the runs); -h/--help after a
    # command is that command's.
    --dry_run) if [[ "${ARGS[0]:-}" == sweep ]]; then ARGS+=("$1"); else DRY_RUN=1; fi ;;
    -h|--help) if [[ ${#ARGS[@]} -gt 0 ]]; then ARGS+=("$1"); else usage; fi ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
[[ -n "$TPU" ]] || die "no TPU VM name; pass --tpu=NAME (or set TPU_NAME)"
[[ -n "$ZONE" ]] || die "no zone; pass --zone=ZONE, e.g. --zone=us-west4-a (or set TPU_ZONE)"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--coordinator_port must be a number, got '$PORT'"
if [[ ${#ARGS[@]} -eq 0 || "${ARGS[0]}" == -* ]]; then
  ARGS=(train "${ARGS[@]}")
fi
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  for flag in --workdir --out; do   # the directories a command writes (export, convert)
    if [[ "${ARGS[$i]}" == $flag=gs://* || ( "${ARGS[$i]}" == "$flag" \
          && "${ARGS[$((i + 1))]:-}" == gs://* ) ]]; then
      die "bltjax $flag directories are file paths; mount the bucket on every worker" \
          "(gcsfuse) and pass the mount path as $flag"
    fi
    # The job runs in ~/bltjax on each worker, which the next launch replaces: a relative
    # directory would be per-worker and deleted with it.
    if [[ "${ARGS[$i]}" == $flag=* && "${ARGS[$i]}" != $flag=/* ]] \
        || [[ "${ARGS[$i]}" == "$flag" && "${ARGS[$((i + 1))]:-}" != /* ]]; then
      die "$flag must be an absolute path every worker shares (NFS, Filestore, gcsfuse):" \
          "a relative one lands in ~/bltjax on each worker, which the next launch deletes"
    fi
  done
done
[[ -n "$LOG_DIR" ]] || LOG_DIR="tpu_logs/$TPU"

TPU_VM=("$GCLOUD" compute tpus tpu-vm)
WHERE=("--zone=$ZONE")
[[ -z "$PROJECT" ]] || WHERE+=("--project=$PROJECT")
TARBALL="${TMPDIR:-/tmp}/bltjax-src-$TPU.tar.gz"
INIT_TIMEOUT="${BLTJAX_INIT_TIMEOUT:-900}"

DESCRIBE=("${TPU_VM[@]}" describe "$TPU" "${WHERE[@]}")
CREATE=("${TPU_VM[@]}" create "$TPU" "${WHERE[@]}" "--accelerator-type=$ACCELERATOR"
        "--version=$RUNTIME")
[[ $SPOT -eq 0 ]] || CREATE+=(--spot)
PACK=(tar -czf "$TARBALL" -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./runs
      --exclude=./tpu_logs --exclude=__pycache__ .)
COPY=("${TPU_VM[@]}" scp "$TARBALL" "$TPU:bltjax-src.tar.gz" --worker=all "${WHERE[@]}")
INSTALL_REMOTE="rm -rf bltjax && mkdir -p bltjax && tar -xzf bltjax-src.tar.gz -C bltjax"
INSTALL_REMOTE+=" && $(quote "$PY") -m pip install -q -e \"./bltjax[tpu]\""
SETUP=("${TPU_VM[@]}" ssh "$TPU" --worker=all "${WHERE[@]}" "--command=$INSTALL_REMOTE")
# Single quotes keep $(hostname) for the worker's shell.
RUN_REMOTE="set -o pipefail; mkdir -p bltjax_logs && cd bltjax && BLTJAX_DISTRIBUTED=auto"
RUN_REMOTE+=" JAX_COORDINATOR_PORT=$PORT BLTJAX_INIT_TIMEOUT=$INIT_TIMEOUT"
RUN_REMOTE+=" $(quote "$PY" -m bltjax.cli "${ARGS[@]}") 2>&1 | tee ../bltjax_logs/"'$(hostname).log'
RUN=("${TPU_VM[@]}" ssh "$TPU" --worker=all "${WHERE[@]}" "--command=$RUN_REMOTE")
COLLECT=("${TPU_VM[@]}" scp --recurse "$TPU:bltjax_logs" "$LOG_DIR" --worker=all "${WHERE[@]}")

if [[ $DRY_RUN -eq 1 ]]; then
  echo "$(quote "${DESCRIBE[@]}") >/dev/null 2>&1 || $(quote "${CREATE[@]}")"
  if [[ $INSTALL -eq 1 ]]; then
    quote "${PACK[@]}"
    quote "${COPY[@]}"
    quote "${SETUP[@]}"
  fi
  quote "${RUN[@]}"
  echo "mkdir -p $(quote "$LOG_DIR")"
  quote "${COLLECT[@]}"
  exit 0
fi

command -v "$GCLOUD" >/dev/null 2>&1 \
  || die "'$GCLOUD' not found; install the Google Cloud SDK (https://cloud.google.com/sdk) or set GCLOUD"

say() { echo "== $NAME: $*"; }
if "${DESCRIBE[@]}" >/dev/null 2>&1; then
  say "reusing TPU VM $TPU in $ZONE"
else
  say "creating TPU VM $TPU ($ACCELERATOR, $RUNTIME) in $ZONE"
  "${CREATE[@]}"
fi
if [[ $INSTALL -eq 1 ]]; then
  say "installing the package on every worker"
  "${PACK[@]}"
  "${COPY[@]}"
  "${SETUP[@]}"
fi
say "running on every worker: ${ARGS[*]}"
STATUS=0
"${RUN[@]}" || STATUS=$?
say "collecting worker logs into $LOG_DIR"
mkdir -p "$LOG_DIR"
"${COLLECT[@]}" || echo "$NAME: warning: could not copy the worker logs" >&2
[[ $STATUS -eq 0 ]] || echo "$NAME: the job failed (exit $STATUS); see $LOG_DIR" >&2
exit "$STATUS"
