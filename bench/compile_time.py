"""Compile time of the train state's init and of one train step, layers unrolled vs
scanned (`model.scan_layers`), and the step time of each.

  python bench/compile_time.py --model entropy_100m --config.train.batch_size=2
  python bench/compile_time.py --model bltd8_400m --scan on          # GPU suite

XLA compiles an unrolled stack's blocks one copy per layer (every param's initializer,
too); a scanned stack compiles one block. On an H200 (jax 0.11.2) the init of a 185M BLT
took 79 s to compile unrolled, longer than the GPU suite's budget for the whole run.
Models are train_throughput.py's; extra `--config.*` flags apply to each. Prints and
appends a table to bench/RESULTS.md (unless --no_append): seconds to trace + lower +
compile, the number of fusions in the compiled program, and the median of --step_iters
timed steps (0: compile only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench import train_throughput  # noqa: E402
from bltjax import configs  # noqa: E402
from bltjax import train  # noqa: E402


def measure(config, step_iters: int) -> dict:
  trainer = train.Trainer(config, "/tmp/bltjax_compile_time")
  rng = jax.random.PRNGKey(0)
  start = time.perf_counter()
  init = trainer.init_state.trace(rng).lower().compile()
  init_s = time.perf_counter() - start
  start = time.perf_counter()
  step = trainer.lower_train_step(
      train.abstract_batch(config.train.batch_size, config.train.seq_len)).compile()
  step_s = time.perf_counter() - start
  row = dict(init_s=init_s, init_fusions=init.as_text().count(" fusion("),
             step_s=step_s, step_fusions=step.as_text().count(" fusion("), step_ms=None)
  if step_iters:
    real = train_throughput.synthetic_batch(trainer)
    state = init(rng)
    state = step(state, real, trainer.frozen)[0]    # warm-up
    times = []
    for _ in range(step_iters):
      start = time.perf_counter()
      state = jax.block_until_ready(step(state, real, trainer.frozen)[0])
      times.append(time.perf_counter() - start)
    row["step_ms"] = 1e3 * statistics.median(times)
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=sorted(train_throughput.MODELS),
                      default="entropy_100m")
  parser.add_argument("--scan", choices=("both", "on", "off"), default="both")
  parser.add_argument("--step_iters", type=int, default=0)
  parser.add_argument("--no_append", action="store_true")
  args, overrides = parser.parse_known_args(argv)
  experiment, preset = train_throughput.MODELS[args.model]
  path = os.path.join(common.REPO, "experiments", experiment)
  rows = []
  for scan in {"both": (False, True), "on": (True,), "off": (False,)}[args.scan]:
    config = configs.load(path, preset + overrides + [f"--config.model.scan_layers={scan}"])
    r = measure(config, args.step_iters)
    cells = [args.model, "scanned" if scan else "unrolled",
             f"{r['init_s']:.1f} s ({r['init_fusions']})",
             f"{r['step_s']:.1f} s ({r['step_fusions']})",
             "-" if r["step_ms"] is None else f"{r['step_ms']:.1f} ms"]
    print(" | ".join(cells), flush=True)
    rows.append(cells)
  table = common.markdown_table(
      ["model", "layers", "init compile (fusions)", "train step compile (fusions)",
       "step (median)"], rows)
  print(table)
  if not args.no_append:
    common.append("Compile time, unrolled vs scanned layers", table, argv=argv,
                  note="Seconds to trace + lower + compile (the two layouts are different "
                       "programs: neither reuses the other's compilation).")


if __name__ == "__main__":
  main()
