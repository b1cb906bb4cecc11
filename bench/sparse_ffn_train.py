r"""Issue 4 end to end: BLTs with ReLU + L1 FFNs vs the dense SwiGLU BLT of equal size.

  python bench/sparse_ffn_train.py                   # CPU: ~10 minutes on 2 idle cores
  python bench/sparse_ffn_train.py --preset gpu --timing_rounds 5   # 124M params, bf16
  python bench/sparse_ffn_train.py --preset gpu --quick ...          # bench/gpu_suite.sh

1. Trains the runs of `experiments/blt_sparse_ffn.py` (static patching, default corpus,
   same data, steps and seed): `dense` (SwiGLU everywhere), `relu` (ReLU + L1 in the
   global FFNs, 1.5x wider: same parameters and FLOPs) and/or `relu_local` (also in the
   local encoder/decoder FFNs). Default: dense + relu_local on CPU, where the global FFNs
   hardly matter yet (the "global FFNs zeroed" column says how much they do); dense +
   relu on GPU (the issue's setting). Re-running resumes or reuses the runs in --workdir.
2. On the validation split: bpb of every run (and with its global FFN outputs zeroed),
   the fraction of zero hidden units of every ReLU FFN layer (real positions only) and
   the sparse kernel's occupancy (on CPU: the GPU kernel run in interpret mode).
3. Times train steps from the trained params: dense, and the ReLU runs with
   `ffn.impl=xla` and `ffn.impl=pallas` (interleaved rounds, median per step). On CPU
   the pallas path runs the kernel package's XLA reference (no Pallas kernel runs on
   CPU), so the CPU ratio only shows that the integration adds no cost.
4. Prints a table and appends it to bench/RESULTS.md (device, date, command, commit).

`--quick` (the GPU suite's short run): trains only the relu model, in memory, for
`--train_seconds` with l1 1e-4 (sparse within a minute), then times dense (from its
initial params: its step time does not depend on them), relu/xla and relu/pallas (from
the trained params); sparsity and occupancy come from the last training steps. No bpb.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import tempfile
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bltjax import checkpoint as checkpoint_lib  # noqa: E402
from bltjax import configs  # noqa: E402
from bltjax import data as data_lib  # noqa: E402
from bltjax import objectives  # noqa: E402
from bltjax import sharding  # noqa: E402
from bltjax import train  # noqa: E402
from bltjax.model.layers import blt_ffn_dim  # noqa: E402
from bench import common  # noqa: E402

EXPERIMENT = REPO / "experiments" / "blt_sparse_ffn.py"
TIMING_STEPS = {"cpu": 8, "gpu": 30}
DEFAULT_VARIANTS = {"cpu": "dense,relu_local", "gpu": "dense,relu"}
QUICK_L1 = 1e-4   # --quick: a coefficient that makes the FFNs sparse within a minute
GPU_SUITE_COMMAND = ("python bench/sparse_ffn_train.py --preset gpu --quick --train_seconds 45 "
                     "--timing_steps 15 --timing_rounds 2 --set train.batch_size=32")
GPU_FULL_COMMAND = "python bench/sparse_ffn_train.py --preset gpu --timing_rounds 5"


def parse_args(argv):
  ap = argparse.ArgumentParser(prog="python bench/sparse_ffn_train.py",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="cpu", choices=("cpu", "gpu"))
  ap.add_argument("--workdir", default="", help="default runs/sparse_ffn_train/<preset>")
  ap.add_argument("--steps", type=int, default=0, help="train steps (default: the preset's)")
  ap.add_argument("--l1", type=float, default=-1.0,
                  help="model.ffn.l1_coef of the relu run (default: the preset's)")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="config override for both runs, e.g. --set train.batch_size=32")
  ap.add_argument("--variants", default="",
                  help="runs to train and compare to dense, from dense, relu (global FFNs), "
                       "relu_local (global and local FFNs); default: dense,relu_local on "
                       "CPU (where the local FFNs are what matters), dense,relu on GPU")
  ap.add_argument("--timing_steps", type=int, default=0, help="steps per timing round")
  ap.add_argument("--timing_rounds", type=int, default=3, help="0: no timing")
  ap.add_argument("--eval_batches", type=int, default=0,
                  help="validation batches (default: the preset's train.eval_batches)")
  ap.add_argument("--occupancy_batches", type=int, default=2,
                  help="CPU: validation batches on which the GPU kernel runs in interpret "
                       "mode to measure its occupancy on the trained activations (0: skip)")
  ap.add_argument("--fresh", action="store_true", help="delete the runs first")
  ap.add_argument("--quick", action="store_true",
                  help="GPU suite: train only the relu model, in memory (no checkpoint, no "
                       "validation), for --train_seconds, with l1 %g unless --l1; then time "
                       "dense (from init), relu/xla and relu/pallas (from the trained "
                       "params). Sparsity and occupancy from the last training steps" % QUICK_L1)
  ap.add_argument("--train_seconds", type=float, default=60.0,
                  help="--quick: training time after compilation")
  ap.add_argument("--smoke", action="store_true", help="the tiny runlocal model (tests)")
  ap.add_argument("--results", default=common.RESULTS)
  ap.add_argument("--no_append", action="store_true")
  return ap.parse_args(argv)


# bench run name -> experiments/blt_sparse_ffn.py variants
VARIANTS = {"dense": "dense", "relu": "relu", "relu_local": "relu,local"}


def load_config(variant: str, args) -> configs.ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise SystemExit(f"unknown run {variant!r}; use {', '.join(VARIANTS)}")
  config = configs.load(f"{EXPERIMENT}:{VARIANTS[variant]},{args.preset}"
                        + (",runlocal" if args.smoke else ""))
  if args.steps:
    configs.set_value(config, "train.steps", args.steps)
    configs.set_value(config, "train.save_every", args.steps)
  if args.l1 >= 0 and variant.startswith("relu"):
    configs.set_value(config, "model.ffn.l1_coef", args.l1)
  configs.apply_overrides(config, args.set)
  if args.eval_batches:
    configs.set_value(config, "train.eval_batches", args.eval_batches)
  return config


def run_name(variant: str, config) -> str:
  if variant.startswith("relu"):
    return f"{variant}_l1{config.model.ffn.l1_coef:g}_{config.train.steps}"
  return f"{variant}_{config.train.steps}"


def restore_params(trainer: train.Trainer, workdir: str):
  params, _ = checkpoint_lib.load_params(workdir, trainer.abstract_state.params)
  return params


def validation_metrics(config, workdir: str, max_batches: int = 0, eval_sums: bool = True
                       ) -> dict[str, float]:
  """Mean of the training metrics (sparsity per layer, occupancy) over validation batches,
  and the bpb over them (from the model's eval sums)."""
  trainer = train.Trainer(config, workdir, devices=jax.devices()[:1])
  params = restore_params(trainer, workdir)
  loss_fn = jax.jit(lambda p, b, f: trainer.objective.loss(p, b, jax.random.PRNGKey(0), f)[1])
  rows, nats, n_bytes = [], 0.0, 0.0
  tcfg = config.train
  for local in data_lib.eval_batches(config.data, seq_len=tcfg.seq_len,
                                     global_batch=tcfg.batch_size,
                                     max_batches=max_batches or tcfg.eval_batches or None):
    batch = sharding.make_global_batch(local, trainer.mesh)
    with sharding.use_mesh(trainer.mesh):
      rows.append(jax.device_get(loss_fn(params, batch, trainer.frozen)))
    if eval_sums:
      sums = trainer.eval_step(params, batch, trainer.frozen)
      nats += float(sums["nats"])
      n_bytes += float(sums["bytes"])
  out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
  out["valid_bpb"] = nats / max(n_bytes, 1.0) / np.log(2.0)
  out["valid_bytes"] = n_bytes
  if eval_sums:  # how much the global FFNs matter: bpb with their outputs zeroed
    ablated = jax.tree_util.tree_map_with_path(
        lambda path, v: v * 0 if "global_model" in jax.tree_util.keystr(path)
        and "'ffn'" in jax.tree_util.keystr(path) and "'down'" in jax.tree_util.keystr(path)
        else v, params)
    nats = 0.0
    for local in data_lib.eval_batches(config.data, seq_len=tcfg.seq_len,
                                       global_batch=tcfg.batch_size,
                                       max_batches=max_batches or tcfg.eval_batches or None):
      batch = sharding.make_global_batch(local, trainer.mesh)
      nats += float(trainer.eval_step(ablated, batch, trainer.frozen)["nats"])
    out["valid_bpb_no_global_ffn"] = nats / max(n_bytes, 1.0) / np.log(2.0)
  return out


def gpu_kernel_occupancy(config, workdir: str, batches: int) -> float:
  """Occupancy the GPU kernel (default tiles, tm=64 tokens) has on the trained model's
  validation activations, from the kernel code in interpret mode (for CPU runs)."""
  c = configs.from_json(configs.to_json(config))
  for key, value in dict(impl="pallas", backend="gpu", interpret=True,
                         dense_threshold=1.0).items():
    configs.set_value(c, f"model.ffn.{key}", value)
  return validation_metrics(c, workdir, max_batches=batches, eval_sums=False)["ffn_occupancy"]


@dataclasses.dataclass
class Timed:
  name: str
  trainer: train.Trainer
  state: object
  times: list


def timed_entry(name: str, config, params=None, *, trainer=None, state=None) -> Timed:
  """A trainer and a state to time: `params` (e.g. trained) replace the initial ones."""
  if trainer is None:
    trainer = train.Trainer(config, tempfile.mkdtemp(prefix="sparse_ffn_timing_"),
                            devices=jax.devices()[:1])
  if state is None:
    state = trainer.init_state(jax.random.PRNGKey(config.seed))
    if params is not None:
      state = dataclasses.replace(state, params=params)
  return Timed(name, trainer, state, [])


def train_batches(config, mesh, n: int) -> list:
  tcfg = config.train
  it = iter(data_lib.train_dataset(config.data, seq_len=tcfg.seq_len,
                                   global_batch=tcfg.batch_size, seed=config.seed))
  return [sharding.make_global_batch(next(it), mesh) for _ in range(n)]


def time_steps(timed: list[Timed], batches: list, rounds: int) -> dict[str, float]:
  """Median seconds per train step of each entry: interleaved rounds over `batches`
  (the first call, which compiles, is not timed)."""
  for t in timed:
    t.state, metrics = t.trainer.train_step(t.state, batches[0], t.trainer.frozen)
    jax.block_until_ready((t.state, metrics))
  for _ in range(rounds):
    for t in timed:
      start = time.perf_counter()
      for batch in batches:
        t.state, metrics = t.trainer.train_step(t.state, batch, t.trainer.frozen)
      jax.block_until_ready((t.state, metrics))
      t.times.append((time.perf_counter() - start) / len(batches))
  return {t.name: statistics.median(t.times) for t in timed}


def with_impl(config, impl: str):
  c = configs.from_json(configs.to_json(config))
  configs.set_value(c, "model.ffn.impl", impl)
  return c


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.quick:
    return quick(args, argv)
  root = args.workdir or str(REPO / "runs" / "sparse_ffn_train" / args.preset)
  variants = (args.variants or DEFAULT_VARIANTS[args.preset]).split(",")
  started = time.time()
  load_start = os.getloadavg()[0]
  runs = {}
  for variant in variants:
    config = load_config(variant, args)
    workdir = os.path.join(root, run_name(variant, config))
    if args.fresh and os.path.isdir(workdir):
      shutil.rmtree(workdir)
    print(f"=== {variant}: {workdir}", flush=True)
    t0 = time.time()
    train.train(config, workdir, progress=False, devices=jax.devices()[:1])
    runs[variant] = dict(config=config, workdir=workdir, train_s=time.time() - t0,
                         **validation_metrics(config, workdir))
    if (variant.startswith("relu") and jax.default_backend() == "cpu"
        and args.occupancy_batches > 0):
      runs[variant]["gpu_occupancy"] = gpu_kernel_occupancy(config, workdir,
                                                            args.occupancy_batches)
    counts = objectives.param_counts(config)
    runs[variant]["params"] = counts["blt_without_hash"]
    runs[variant]["global_params"] = counts["global_model"]

  step_s = {}
  if args.timing_rounds > 0:
    timed = []
    for variant in variants:
      config, workdir = runs[variant]["config"], runs[variant]["workdir"]
      for name, c in ([(f"{variant}/{impl}", with_impl(config, impl))
                       for impl in ("xla", "pallas")] if variant.startswith("relu")
                      else [(variant, config)]):
        trainer = train.Trainer(c, workdir, devices=jax.devices()[:1])
        timed.append(timed_entry(name, c, restore_params(trainer, workdir), trainer=trainer))
    steps = args.timing_steps or TIMING_STEPS[args.preset]
    print(f"=== timing {[t.name for t in timed]}: {args.timing_rounds} rounds x {steps} "
          "steps", flush=True)
    step_s = time_steps(timed, train_batches(timed[0].trainer.config, timed[0].trainer.mesh,
                                             steps), args.timing_rounds)
  rows, notes = report(runs, step_s, args)
  finish(args, argv, rows, notes, started, load_start)


def finish(args, argv, rows, notes, started, load_start):
  notes = [f"jax {jax.__version__}, {time.time() - started:.0f} s in all"
           + (f"; load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at "
              "the end (shared CPUs make the wall times noisy)"
              if jax.default_backend() == "cpu" else "")] + notes
  print(f"sparse FFN training (issue 4), preset {args.preset}, {common.device_name()}")
  for r in rows:
    print(r)
  for n in notes:
    print("- " + n)
  if jax.default_backend() == "cpu":
    print(f"GPU suite command (bench/gpu_suite.sh; estimated 3-4 min, mostly compiling): "
          f"{GPU_SUITE_COMMAND}")
    print(f"GPU full comparison (dense + relu, 3000 steps each): {GPU_FULL_COMMAND}")
  if not args.no_append:
    common.append(f"Sparse FFN training, issue 4 ({args.preset} preset"
                  f"{', quick' if args.quick else ''})",
                  "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes),
                  argv=argv, path=args.results)


def quick(args, argv):
  """Train the relu model in memory for --train_seconds, then time the three steps."""
  started, load_start = time.time(), os.getloadavg()[0]
  config = load_config("relu", args)
  if args.l1 < 0:
    configs.set_value(config, "model.ffn.l1_coef", QUICK_L1)
  configs.set_value(config, "optim.warmup_steps", min(config.optim.warmup_steps, 50))
  relu = timed_entry("relu/pallas", with_impl(config, "pallas"))
  trainer, tcfg = relu.trainer, config.train
  it = iter(data_lib.train_dataset(config.data, seq_len=tcfg.seq_len,
                                   global_batch=tcfg.batch_size, seed=config.seed))
  history, step, t0 = [], 0, None
  while step < tcfg.steps:
    batch = sharding.make_global_batch(next(it), trainer.mesh)
    relu.state, metrics = trainer.train_step(relu.state, batch, trainer.frozen)
    history = (history + [metrics])[-10:]
    step += 1
    if t0 is None:
      jax.block_until_ready(metrics)
      t0 = time.perf_counter()   # compilation is not part of the budget
    elif time.perf_counter() - t0 > args.train_seconds:
      break
    if step % tcfg.log_every == 0:
      m = jax.device_get(metrics)
      print(f"[relu {step}] ce={m['ce']:.4f} ffn_sparsity={m['ffn_sparsity']:.4f} "
            f"min={m['ffn_sparsity_min']:.4f} occupancy={m['ffn_occupancy']:.3f}", flush=True)
  train_s = time.perf_counter() - t0
  fetched = jax.device_get(history)
  final = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  params = jax.tree.map(jnp.copy, relu.state.params)
  dense_config = load_config("dense", args)
  timed = [timed_entry("dense", dense_config),
           timed_entry("relu/xla", with_impl(config, "xla"), params), relu]
  n = args.timing_steps or TIMING_STEPS[args.preset]
  print(f"=== timing {[t.name for t in timed]}: {args.timing_rounds} rounds x {n} steps",
        flush=True)
  step_s = time_steps(timed, train_batches(config, trainer.mesh, n), max(args.timing_rounds, 1))
  base = step_s["dense"]
  cols = ["run", "FFNs (global; local)", "steps (s)", "train ce", "FFN zeros per layer "
          "(train, last 10 steps)", "global min", "occupancy", "step ms (ratio to dense)"]
  rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
          "| " + " | ".join([
              "relu", ffn_text(config), f"{step} ({train_s:.0f})", f"{final['ce']:.4f}",
              " ".join(f"{k.split('/', 1)[1]} {final[k]:.3f}" for k in sorted(final)
                       if k.startswith("ffn_sparsity/")),
              f"{global_min(final):.3f}", f"{final['ffn_occupancy']:.3f}",
              ", ".join(f"{name} {1e3 * sec:.1f} ({sec / base:.2f}x)"
                        for name, sec in step_s.items())]) + " |"]
  t = config.train
  notes = [f"relu trained in memory for {step} steps ({t.batch_size} x {t.seq_len} bytes, "
           f"dtype {config.model.dtype}, l1 {config.model.ffn.l1_coef:g}, warmup "
           f"{config.optim.warmup_steps}); dense timed from its initial params (its step "
           "time does not depend on them), relu/xla and relu/pallas from the trained ones",
           "occupancy: fraction of (64-token tile, hidden unit) pairs the kernel's down "
           "projection computes (mean over the global layers and the last 10 steps)"]
  finish(args, argv, rows, notes, started, load_start)


def report(runs, step_s, args):
  dense = runs.get("dense")
  cols = ["run", "FFNs (global; local)", "params (no hash)", "valid bpb", "vs dense",
          "bpb, global FFNs zeroed", "FFN zeros per layer (valid)", "global min",
          "occupancy", "train s", "step ms (ratio to dense)"]
  rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  base = step_s.get("dense")
  for variant, r in runs.items():
    cfg = r["config"]
    rows.append("| " + " | ".join([
        variant, ffn_text(cfg), f"{r['params'] / 1e6:.2f}M", f"{r['valid_bpb']:.4f}",
        f"{100 * (r['valid_bpb'] / dense['valid_bpb'] - 1):+.2f}%" if dense else "-",
        f"{r['valid_bpb_no_global_ffn']:.4f} "
        f"({100 * (r['valid_bpb_no_global_ffn'] / r['valid_bpb'] - 1):+.2f}%)",
        " ".join(f"{k.split('/', 1)[1]} {r[k]:.3f}" for k in sorted(r)
                 if k.startswith("ffn_sparsity/")) or "-",
        f"{global_min(r):.3f}" if global_min(r) is not None else "-",
        occupancy_text(r), f"{r['train_s']:.0f}",
        ", ".join(f"{name.split('/')[-1] if '/' in name else 'xla'} {1e3 * sec:.1f}"
                  + (f" ({sec / base:.2f}x)" if base else "")
                  for name, sec in step_s.items() if name.split("/")[0] == variant) or "-",
    ]) + " |")
  any_cfg = next(iter(runs.values()))["config"]
  t = any_cfg.train
  notes = [
      f"data: {any_cfg.data.train or 'default corpus (stdlib)'}; {t.steps} steps x "
      f"{t.batch_size} x {t.seq_len} bytes, static patches of {any_cfg.patcher.patch_size} "
      f"(max {any_cfg.patcher.max_patches}), dtype {any_cfg.model.dtype}, lr {any_cfg.optim.lr:g}",
      f"valid: {int(next(iter(runs.values()))['valid_bytes'])} bytes "
      f"({t.eval_batches or 'all'} batches); zeros: fraction of zero hidden units over real "
      "positions; global FFNs zeroed: the same model evaluated with its global FFN outputs "
      "set to 0 (how much the global FFNs matter at this scale)",
      "occupancy: fraction of (64-token tile, hidden unit) pairs the GPU kernel's down "
      "projection computes, mean over the ReLU layers (all positions, padding included, as "
      "the kernel sees them)" + (f"; on CPU measured by the GPU kernel in interpret mode on "
                                 f"{args.occupancy_batches} validation batches"
                                 if jax.default_backend() == "cpu" else ""),
      "step ms: median of interleaved rounds from the trained params; "
      + ("on CPU `impl=pallas` runs the kernel package's XLA reference (no Pallas kernel), "
         "so relu/xla vs relu/pallas only shows the integration costs nothing"
         if jax.default_backend() == "cpu" else f"kernels: {jax.default_backend()}"),
  ]
  for variant, r in runs.items():
    if variant.startswith("relu") and dense:
      ok_sparse = (global_min(r) or 0) >= 0.9
      ok_bpb = r["valid_bpb"] <= 1.02 * dense["valid_bpb"]
      notes.append(f"issue 4 targets, {variant}: >= 90% zeros in every global FFN: "
                   f"{'yes' if ok_sparse else 'no'}; bpb within 2% of dense: "
                   f"{'yes' if ok_bpb else 'no'}")
  return rows, notes


def global_min(r):
  vals = [v for k, v in r.items() if k.startswith("ffn_sparsity/global")]
  return min(vals) if vals else None


def ffn_text(cfg) -> str:
  blt = cfg.model.blt
  width = lambda s: s.ffn_dim or blt_ffn_dim(s.d_model)  # noqa: E731
  glob = f"{blt.global_model.d_model}x{width(blt.global_model)}"
  loc = f"{blt.decoder.d_model}x{width(blt.decoder)}"
  ffn = cfg.model.ffn
  if ffn.activation == "swiglu":
    return f"swiglu {glob}; swiglu {loc}"
  local = f"relu {loc}" if blt.ffn_local else f"swiglu {loc}"
  return f"relu {glob}; {local}; l1 {ffn.l1_coef:g}, impl {ffn.impl}"


def occupancy_text(r) -> str:
  if "gpu_occupancy" in r:
    return f"{r['gpu_occupancy']:.3f} (interpret)"
  if "ffn_occupancy" in r and r["config"].model.ffn.impl == "pallas":
    return f"{r['ffn_occupancy']:.3f}"
  return "-"


if __name__ == "__main__":
  main()
