"""Records what `make demo` measured (runs/demo/summary.json) in bench/RESULTS.md.

  make demo && python bench/demo_results.py --workdir runs/demo

The entropy model's validation bits per byte, the calibrated threshold and its mean
patch length, the BLT-D-8's validation bits per byte, and the demo's one-prompt
generation speed per method (a single timed call each: indicative; bench/generation.py
measures speed properly).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402


def table(summary: dict) -> str:
  lines = ["| quantity | value |", "|---|---|",
           f"| entropy model (entropy_tiny), valid bpb | {summary['entropy_valid_bpb']:.4f} |",
           f"| calibrated threshold (nats) | {summary['threshold']:.4f} |",
           f"| mean patch length at that threshold (bytes) | {summary['mean_patch_len']:.2f} |",
           f"| BLT-D-8 (blt_tiny:bltd8), valid bpb | {summary['bltd8_valid_bpb']:.4f} |"]
  generation = summary.get("generation", {})
  ar = generation.get("ar", {}).get("bytes_per_s")
  for method, row in generation.items():
    ratio = f" ({row['bytes_per_s'] / ar:.2f}x AR)" if ar else ""
    lines.append(f"| generation `{method}` {row['options'] or ''}, bytes/s | "
                 f"{row['bytes_per_s']:.0f}{ratio} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument("--no_append", action="store_true")
  args = parser.parse_args(argv)
  summary = json.loads(common.read_output(
      os.path.join(args.workdir, "summary.json"),
      f"`make demo` (or `bltjax demo --workdir {args.workdir}`)"))
  text = table(summary)
  print(text)
  if not args.no_append:
    common.append("Demo (`make demo`): entropy model, patcher, BLT-D-8", text, argv=argv,
                  note="300 training steps of each model on the default corpus (the Python "
                       "standard library), float32; generation: 96 bytes after one prompt, "
                       "batch 1, greedy, one timed call per method after a warm-up.")


if __name__ == "__main__":
  main()
