"""Training throughput: bytes/s, step time and MFU of one train step, on synthetic bytes.

  python bench/train_throughput.py --model entropy_100m        # ~100M entropy model, bf16
  python bench/train_throughput.py --model blt_400m            # BLT-400M (paper shape), bf16
  python bench/train_throughput.py --model blt_400m --small    # a CPU-sized smoke run
  python bench/train_throughput.py --model bltd8_tiny --iters 3  # the demo's BLT-D on CPU

For the BLT it also times the global transformer alone (forward + backward on the same
batch's patch vectors) to report the global and local parts' share of the step. MFU
counts model FLOPs (bltjax/flops.py) over the device's dense bf16 peak. Appends a row to
bench/RESULTS.md (device, date, command, commit) unless --no_append.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bltjax import configs  # noqa: E402
from bltjax import flops  # noqa: E402
from bltjax import sharding  # noqa: E402
from bltjax import train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "entropy_100m": ("entropy_100m.py", []),
    "blt_400m": ("blt_paper.py:400m", ["--config.patcher.mode=static",
                                       "--config.patcher.patch_size=4"]),
    "bltd8_400m": ("blt_paper.py:400m,bltd8", ["--config.patcher.mode=static",
                                               "--config.patcher.patch_size=4"]),
    # The CPU demo's models as they train (float32).
    "entropy_tiny": ("entropy_tiny.py", []),
    "blt_tiny": ("blt_tiny.py:static", []),
    "bltd8_tiny": ("blt_tiny.py:bltd8,static", []),
}
SMALL = ["--config.train.seq_len=256", "--config.train.batch_size=2",
         "--config.model.dtype=float32", "--config.patcher.max_patches=96"]


def timed(fn, *args, iters: int):
  out = fn(*args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / iters


def synthetic_batch(trainer: train.Trainer) -> dict:
  """Random bytes after BOS, one document per row, `[batch, seq_len]` on the mesh."""
  tcfg = trainer.config.train
  tokens = np.random.default_rng(0).integers(4, 260, (tcfg.batch_size, tcfg.seq_len + 1))
  tokens = tokens.astype(np.int32)
  tokens[:, 0] = 1
  return sharding.make_global_batch(
      {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
       "segment_ids": np.ones((tcfg.batch_size, tcfg.seq_len), np.int32)}, trainer.mesh)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=sorted(MODELS), default="entropy_100m")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--small", action="store_true", help="CPU-sized shapes (smoke run)")
  parser.add_argument("--no_append", action="store_true")
  args, overrides = parser.parse_known_args(argv)
  experiment, preset = MODELS[args.model]
  overrides = preset + (SMALL if args.small else []) + overrides
  if args.small and "blt" in args.model:   # a CPU-sized BLT of the same proportions
    overrides += ["--config.model.blt.global_model.n_layers=2",
                  "--config.model.blt.decoder.n_layers=2",
                  "--config.model.blt.hash_table_size=4099"]
  elif args.small:
    overrides += ["--config.model.entropy.n_layers=2"]
  config = configs.load(os.path.join(REPO, "experiments", experiment), overrides)
  clock = time.perf_counter()
  trainer = train.Trainer(config, "/tmp/bltjax_throughput")
  print(f"trainer built in {time.perf_counter() - clock:.1f} s", flush=True)
  tcfg = config.train
  batch = synthetic_batch(trainer)
  clock = time.perf_counter()
  state = trainer.init_state(jax.random.PRNGKey(0))
  jax.block_until_ready(state)
  print(f"state initialised in {time.perf_counter() - clock:.1f} s", flush=True)

  clock = time.perf_counter()
  state = trainer.train_step(state, batch, trainer.frozen)[0]   # compile (state is donated)
  jax.block_until_ready(state)
  print(f"first step (compile) in {time.perf_counter() - clock:.1f} s", flush=True)
  start = time.perf_counter()
  for _ in range(args.iters):
    state = trainer.train_step(state, batch, trainer.frozen)[0]
  jax.block_until_ready(state)
  step_time = (time.perf_counter() - start) / args.iters
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  bytes_per_s = tcfg.batch_size * tcfg.seq_len / step_time
  peak = flops.peak_flops(jax.devices()[0].device_kind)
  model_flops = trainer.objective.train_flops(tcfg.batch_size, tcfg.seq_len)
  mfu = model_flops / step_time / (peak * trainer.mesh.size) if peak else float("nan")
  share = ""
  if config.model.kind == "blt":
    share = _global_share(trainer, state, step_time, iters=args.iters)
  line = (f"| {args.model}{' (small)' if args.small else ''} | {n_params / 1e6:.1f}M | "
          f"{config.model.dtype} | {tcfg.batch_size} x {tcfg.seq_len} | "
          f"{step_time * 1e3:.1f} ms | {bytes_per_s:,.0f} | "
          f"{model_flops / step_time / 1e12:.2f} | "
          f"{'-' if np.isnan(mfu) else f'{100 * mfu:.1f}%'} | {share or '-'} |")
  print(line)
  if not args.no_append:
    common.append("Train-step throughput", "| model | params | dtype | batch | step | "
                  "bytes/s | model TFLOP/s | MFU | global share |\n|---|---|---|---|---|---|"
                  "---|---|---|\n" + line, argv=argv, note=(
                      "Synthetic bytes; BLT with static patching (the patcher's cost is not "
                      "included)."))


def _global_share(trainer, state, step_time: float, *, iters: int) -> str:
  """Times forward + backward of the global transformer alone on this batch's shapes."""
  objective = trainer.objective
  cfg = objective.model_config
  tcfg = trainer.config.train
  n_patches = objective.max_patches
  k_d = cfg.cross_attn_k * cfg.d_local
  bound_params = state.params["global_model"]
  vectors = jnp.zeros((tcfg.batch_size, n_patches, k_d), cfg.global_model.compute_dtype)
  segments = jnp.ones((tcfg.batch_size, n_patches), jnp.int32)
  module = objective.module

  def loss(params, vectors):
    out, _ = module.apply({"params": {**state.params, "global_model": params}}, vectors,
                          segments, method=lambda m, v, s: m.global_model(v, s))
    return jnp.mean(out.astype(jnp.float32) ** 2)

  grad = jax.jit(jax.grad(loss))
  with sharding.use_mesh(trainer.mesh):
    global_time = timed(grad, bound_params, vectors, iters=iters)
  share = min(global_time / step_time, 1.0)
  return f"{100 * share:.0f}% global / {100 * (1 - share):.0f}% local+rest"


if __name__ == "__main__":
  main()
