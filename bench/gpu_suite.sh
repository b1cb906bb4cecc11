#!/usr/bin/env bash
# Every GPU benchmark of bltjax, in under 8 minutes; each appends its rows to
# bench/RESULTS.md (device, date, command, commit, jax version, XLA flags). Run it whole
# on the GPU machine:
#
#   bash ../shared/gpu/fetch_wheels.sh tensorboardX      # once, here: wheels for grain etc.
#   bash bench/fetch_hf_wheels.sh                        # once, here: transformers (hf_peer)
#   python bench/compile_check.py        # here, no GPU needed (jax[cuda12]): every Pallas
#                                        # kernel and decoding program compiles for an H200
#   (device) export GIT_COMMIT=<git rev-parse --short HEAD, read here: the copy there
#            may have no .git, or a stale one>; source .whl/activate.sh &&
#            bash bench/gpu_suite.sh
#   (device) ... bash bench/gpu_suite.sh gen_train generation   # only these steps
#
# Steps, most wanted first: gen_train generation diffusion_kernels sparse_ffn hf_peer
# sparse_ffn_train (budgets: 475 s in all). Only when named: generation_all (every
# generation setting, ~6 min), generation_kernels (the quick table with and without the
# Pallas decoding kernels, ~5 min), decode_layers (scanned vs unrolled decoding, ~4 min),
# fused_projections (q/k/v and gate/up fused vs apart in decoding, ~4 min), bltd8_400m
# (its init compile alone outran 60 s on an H200, 2026-11-27) and entropy_100m (recorded
# on an H200 on 2026-11-27): the 8 minutes cannot hold them. Each step has its own time budget;
# one that fails or runs out of time is reported (a timed-out step prints every thread's
# Python stack, so the log says where the time went) and the suite goes on. DRY_RUN=1
# prints the commands only.
#
# Compilation is most of each step's budget: on an H200 (jax 0.11.2) the unrolled init of
# a 185M BLT compiled in 79 s. Every model here scans its global / entropy layers
# (model.scan_layers: one compiled block, ~8x fewer fusions; on CPU it costs 25-30% step
# time, see bench/compile_time.py, whose --step_iters measures that on a GPU too), XLA's
# GPU autotuning is off (--xla_gpu_autotune_level=0: cuBLAS's heuristics pick the GEMM
# algorithms) and so are Triton GEMM fusions (cuBLAS runs every GEMM: each Triton fusion
# compiles through Triton, which is slow); set XLA_FLAGS= (empty) for XLA's defaults.
# LOG_COMPILES=1 logs every compilation and its duration.
set -uo pipefail
cd "$(dirname "$0")/.."
export GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export XLA_FLAGS=${XLA_FLAGS---xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false}
[ "${LOG_COMPILES:-0}" = 1 ] && export JAX_LOG_COMPILES=1
PY=${PYTHON:-python3}
STEPS=${*:-gen_train generation diffusion_kernels sparse_ffn hf_peer sparse_ffn_train}
GEN_DIR=${GEN_DIR:-/tmp/bltjax_gpu_gen}
STATUS=0

run() {
  local budget=$1; shift
  echo "== [$budget s] $PY $*"
  [ "${DRY_RUN:-0}" = 1 ] && return 0
  local start=$SECONDS
  # SIGABRT makes faulthandler print every thread's stack before the process dies.
  if ! timeout -s ABRT -k 10 "$budget" "$PY" -X faulthandler "$@"; then
    echo "!! failed or out of time after $((SECONDS - start)) s: $*"
    STATUS=1
  fi
}

for step in $STEPS; do
  case $step in
    # Issue 6: generation on a larger model (global 12 x 1024), BLT-D-8 trained for 20 s
    # at bf16 with static patches (no entropy model to train first), then every method.
    gen_train) run 90 -m bltjax.cli train --config experiments/blt_bench.py:bltd8,large \
        --workdir "$GEN_DIR" --config.patcher.mode=static --config.model.dtype=bfloat16 \
        --config.model.scan_layers=true --config.train.time_budget_s=20 \
        --config.train.eval_batches=1 ;;
    # Decoding unrolls the scanned global stack (DecodeConfig.unroll_layers): on CPU that
    # compiled 1.06-1.29x longer than scanned; 103 s of compilation here when scanned.
    generation) run 175 bench/generation.py --workdir "$GEN_DIR" --quick --prompts 4 \
        --batch_sizes 1 --rounds 2 ;;
    # Issue 6, only when named (after gen_train, ~6 min): every setting of the table at
    # batch 1 (13 generate programs at 13-26 s of compilation each on an H200).
    generation_all) run 360 bench/generation.py --workdir "$GEN_DIR" --prompts 4 \
        --batch_sizes 1 --rounds 2 ;;
    # Only when named (after gen_train): the quick table with and without the Pallas
    # decoding kernels (cached attention per layer, BLT-D's fused unmasking).
    generation_kernels) run 300 bench/generation.py --workdir "$GEN_DIR" --quick \
        --prompts 4 --batch_sizes 1 --rounds 2 --kernels ;;
    # Issue 6, only when named (after gen_train): the generation model's global stack
    # decoded scanned and unrolled, compile seconds and bytes/s of each.
    decode_layers) run 300 bench/decode_layers.py --workdir "$GEN_DIR" --batch_sizes 1 \
        --prompts 4 --repeats 2 ;;
    # Issue 6, only when named (after gen_train): decoding with q/k/v and gate/up as one
    # matmul each (the default) vs apart: fewer kernel launches per layer.
    fused_projections) run 300 bench/decode_layers.py --workdir "$GEN_DIR" --batch_sizes 1 \
        --prompts 4 --repeats 2 --compare projections ;;
    # Issue 2: ~100M entropy model train step at bf16 (MFU).
    entropy_100m) run 40 bench/train_throughput.py --model entropy_100m --iters 5 \
        --config.train.batch_size=16 --config.model.remat=true --config.model.scan_layers=true ;;
    # Issue 3: the BLT-D-8-400M train step at bf16, global vs local share.
    bltd8_400m) run 120 bench/train_throughput.py --model bltd8_400m --iters 5 \
        --config.train.batch_size=16 --config.model.scan_layers=true ;;
    # Issue 4: sparse FFN kernel vs dense XLA, forward and forward+backward (checks numerics).
    # XLA's default flags here: with Triton GEMMs off the dense baseline's fwd+bwd ran 38%
    # slower on an H200 (12.5 ms vs 9.1 ms), which would flatter the kernels.
    sparse_ffn) XLA_FLAGS= run 40 -m pallas_kernels.sparse_ffn.bench --variants sparse,auto \
        --iters 10 ;;
    # The kernels of pallas_kernels/diffusion, numerics checked first: training attention
    # over BLT-D's [clean ; noisy], chunked XLA frames vs the range kernel (fwd, fwd+bwd);
    # one decoder step's unmasking, XLA ops vs the fused kernel; a decoding step's
    # attention over a KV cache, XLA vs the cached-attention kernel.
    diffusion_kernels) XLA_FLAGS= run 40 bench/diffusion_kernels.py ;;
    # Issue 4: end-to-end train step of a BLT with relu+L1 global FFNs, pallas vs xla vs dense.
    sparse_ffn_train) run 70 bench/sparse_ffn_train.py --preset gpu --quick --train_seconds 10 \
        --timing_steps 10 --timing_rounds 1 --set train.batch_size=32 \
        --set model.scan_layers=true ;;
    # Issue 8: transformers' BLT port (torch, on the GPU) vs bltjax AR on the same ~80M
    # random model, batch 1; transformers comes from .whl/hf (bench/fetch_hf_wheels.sh).
    hf_peer)
      if [ "${DRY_RUN:-0}" != 1 ] && ! "$PY" -m pip install -q --no-index --no-deps \
          --no-compile --upgrade --target /tmp/site_hf .whl/hf/*.whl; then
        echo "!! hf_peer: no transformers wheels in .whl/hf (run bench/fetch_hf_wheels.sh)"
        STATUS=1; continue
      fi
      PYTHONPATH=/tmp/site_hf${PYTHONPATH:+:$PYTHONPATH} run 60 bench/hf_peer.py all \
        --workdir /tmp/bltjax_gpu_hf_peer --hf_python "$PY" --device cuda --batch_sizes 1 \
        --batch1_prompts 2 --methods ar ;;
    *) echo "unknown step '$step' (steps: gen_train generation generation_all decode_layers" \
            "fused_projections generation_kernels entropy_100m bltd8_400m diffusion_kernels" \
            "sparse_ffn sparse_ffn_train hf_peer)"; exit 2 ;;
  esac
done
exit $STATUS
