"""Does the diffusion objective cost next-byte quality? BLT vs BLT-D-4 vs BLT-D-8.

Trains experiments/blt_tiny.py three times for the same steps on the same data and
patcher (lambda_diff 0, and BLT-D with blocks of 4 and 8, loss = CE + masked CE / t), and
reports each run's validation bits per byte (next byte) and its masked-byte accuracy.
Appends a table to bench/RESULTS.md.

  python bench/bltd_vs_blt.py --entropy_workdir runs/demo/entropy --steps 300
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bltjax import configs  # noqa: E402
from bltjax import metrics  # noqa: E402
from bltjax import train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = (("BLT (lambda 0)", ""), ("BLT-D-4", "bltd4"), ("BLT-D-8", "bltd8"))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--entropy_workdir", default="",
                      help="patcher; empty: static patching (4 bytes)")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--workdir", default="runs/bltd_vs_blt")
  parser.add_argument("--eval_batches", type=int, default=16,
                      help="validation batches (0: the whole held-out split)")
  parser.add_argument("--no_append", action="store_true")
  args, overrides = parser.parse_known_args(argv)
  rows = []
  for label, variant in RUNS:
    patcher = "entropy" if args.entropy_workdir else "static"
    spec = os.path.join(REPO, "experiments", "blt_tiny.py:" + ",".join(
        v for v in (variant, "" if args.entropy_workdir else "static") if v))
    config = configs.load(spec, [f"--config.train.steps={args.steps}",
                                 f"--config.train.eval_batches={args.eval_batches}",
                                 *overrides])
    if args.entropy_workdir:
      config.patcher.entropy_workdir = args.entropy_workdir
    workdir = os.path.join(args.workdir, variant or "blt")
    result = train.train(config, workdir)
    last = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if "train/ce" in r][-1]
    accuracy = next((v for k, v in last.items() if k.startswith("train/masked_acc")), None)
    rows.append((label, result["bpb"], last.get("train/bpb"), accuracy, patcher))
    print(rows[-1], flush=True)
  table = ["| model | valid bpb (next byte) | train bpb (last log) | masked-byte accuracy "
           "| patcher |", "|---|---|---|---|---|"]
  for label, valid, train_bpb, accuracy, patcher in rows:
    table.append(f"| {label} | {valid:.3f} | {train_bpb:.3f} | "
                 f"{'-' if accuracy is None else f'{accuracy:.3f}'} | {patcher} |")
  text = "\n".join(table)
  print(text)
  if not args.no_append:
    batch = config.train.batch_size * config.train.seq_len
    held_out = (f"{args.eval_batches} batches ({args.eval_batches * batch} bytes)"
                if args.eval_batches else "all")
    common.append("BLT vs BLT-D at equal steps", text, argv=argv, note=(
        f"experiments/blt_tiny.py (overrides: {' '.join(overrides) or 'none'}), "
        f"{args.steps} steps each, same data order and patcher; validation: {held_out} "
        "of the default corpus' held-out split."))


if __name__ == "__main__":
  main()
