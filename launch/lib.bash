# Shared by the launchers run from a checkout (local.sh, multiprocess.sh, tpu_pod.sh):
# sourced after each sets NAME. slurm_gpu.sbatch keeps its own copy, since sbatch runs a
# copy of the script from its spool directory, where this file is not beside it.

die() { echo "$NAME: error: $*" >&2; exit 2; }
# Prints the comment block at the top of the launcher (its usage) and exits.
usage() { sed -n '2,/^set -euo pipefail/{/^set -euo/d;/^#SBATCH/d;s/^# \{0,1\}//;p;}' "$0"; exit 0; }
# Shell-quotes each argument (only where needed), so printed commands can be pasted.
quote() {
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}
