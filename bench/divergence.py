"""Where a method's greedy output parts from cached AR's, and whether that byte was a tie.

BLT-S and BLT-DV emit AR's greedy bytes exactly in float32 (tests/test_generate.py). In a
lower compute dtype the wide verification and AR's one-byte steps round differently, so
at a byte whose two best logits are nearly equal they may choose differently. For each row
whose output differs, this prints the first differing byte and the two best logits there
under a full recomputation of the model on AR's prefix: a gap within the rounding of the
compute dtype says rounding, a wide gap says a bug. Appends a table to bench/RESULTS.md.

  python bench/divergence.py --workdir runs/bench/bltd8 --method blt_s --draft_len 8
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bltjax  # noqa: E402
from bench import common  # noqa: E402
from bltjax import bytes as blt_bytes  # noqa: E402
from bltjax import continuation  # noqa: E402


def first_differences(model, prompts: list[bytes], reference: list[list[int]],
                      other: list[list[int]]) -> list[dict]:
  """Per row: equal, or the first differing position with both ids and the full
  recomputation's two best (id, logit) pairs after AR's prefix."""
  rows = []
  for prompt, ref, out in zip(prompts, reference, other):
    if ref == out:
      rows.append(dict(equal=True))
      continue
    at = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), min(len(ref), len(out)))
    prefix = prompt + bytes(t - blt_bytes.OFFSET for t in ref[:at])
    logits = model.logits([prefix])[0, -1]
    best = np.argsort(-logits)[:2]
    rows.append(dict(equal=False, at=at, ref=ref[at] if at < len(ref) else None,
                     out=out[at] if at < len(out) else None,
                     top2=[(int(i), float(logits[i])) for i in best]))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a trained BLT(-D) workdir")
  parser.add_argument("--method", default="blt_s", choices=["blt_s", "blt_dv"])
  parser.add_argument("--draft_len", type=int, default=8)
  parser.add_argument("--prompts", type=int, default=8, help="held-out prompts, one batch")
  parser.add_argument("--bytes", type=int, default=64, help="bytes generated per prompt")
  parser.add_argument("--no_append", action="store_true")
  args = parser.parse_args(argv)

  model = bltjax.load(args.workdir)
  items = continuation.make_continuations(model.config.data, count=args.prompts,
                                          prompt_bytes=64, continuation_bytes=args.bytes,
                                          seed=0)
  prompts = [bytes(p) for p in items.prompts]
  reference = model.generate(prompts, max_bytes=args.bytes, method="ar").tokens
  other = model.generate(prompts, max_bytes=args.bytes, method=args.method,
                         draft_len=args.draft_len).tokens
  cells = []
  for row, diff in enumerate(first_differences(model, prompts, reference, other)):
    if diff["equal"]:
      cells.append([str(row), "yes", "-", "-", "-"])
      continue
    (id1, logit1), (id2, logit2) = diff["top2"]
    cells.append([str(row), "no", str(diff["at"]), f"{diff['ref']} / {diff['out']}",
                  f"{id1}: {logit1:.4f}, {id2}: {logit2:.4f} (gap {logit1 - logit2:.4f})"])
  table = common.markdown_table(
      ["row", "equal", "first difference at byte", "AR id / method id",
       "two best logits there, full recomputation (id: logit)"], cells)
  print(table)
  if not args.no_append:
    common.append(f"Greedy {args.method} vs cached AR: where outputs part", table, argv=argv,
                  note=(f"Model: `{args.workdir}` (step {model.step}), compute dtype "
                        f"{model.config.model.dtype}. {args.prompts} held-out prompts in "
                        f"one batch, {args.bytes} bytes each, draft_len {args.draft_len}. "
                        "Ids are byte + 4."))


if __name__ == "__main__":
  main()
