"""Decoding speed of one checkout, to compare two commits in alternating processes.

  git worktree add /tmp/old <commit>
  for i in 1 2; do for repo in /tmp/old .; do
    python bench/generation_ab.py --repo $repo --workdir runs/bench/bltd8
  done; done

Each process imports bltjax from `--repo`, loads `--workdir` and times AR, BLT-S k=8 and
BLT-D-8 (alpha 0.5) on 8 held-out prompts x 128 bytes at batch 1 and 8 (`--batch_sizes`;
fastest of `--repeats` timed runs after a compile; the generation loop, the prompts'
prefill timed apart, and the whole decode); `--temperature` samples (every method alike,
draws keyed by row and position: BLT-S still reproduces AR). Alternating old/new
processes is how a change's effect is read on a machine whose speed drifts; the prints
are the rows to compare.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

# bench.common from this checkout; bltjax from --repo (put first on the path in main).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402  pylint: disable=g-import-not-at-top

METHODS = (("ar", {}), ("blt_s", {"draft_len": 8}), ("blt_d", {"block_size": 8, "alpha": 0.5}))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repo", required=True, help="the checkout whose bltjax is timed")
  parser.add_argument("--workdir", required=True, help="a trained BLT workdir")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  parser.add_argument("--batch_sizes", type=common.batch_sizes, default="1,8")
  args = parser.parse_args(argv)
  sampling = dict(temperature=args.temperature, seed=0) if args.temperature else {}
  sys.path.insert(0, os.path.abspath(args.repo))
  import bltjax  # pylint: disable=g-import-not-at-top
  from bltjax import continuation  # pylint: disable=g-import-not-at-top
  model = bltjax.load(args.workdir)
  items = continuation.make_continuations(model.config.data, count=8, prompt_bytes=64,
                                          continuation_bytes=128, seed=0)
  for batch in args.batch_sizes:
    for method, options in METHODS:
      runs = [continuation.run(model, items, method=method, batch_size=batch, **options,
                               **sampling)
              for _ in range(args.repeats)]
      print(f"{args.repo} batch {batch} {method}: "
            # checkouts from before the prefill was timed apart: nan
            f"{max(getattr(r, 'generation_bytes_per_s', math.nan) for r in runs):.0f} bytes/s "
            f"({max(r.bytes_per_s for r in runs):.0f} with prefill)", flush=True)


if __name__ == "__main__":
  main()
