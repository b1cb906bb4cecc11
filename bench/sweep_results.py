"""Records a finished sweep's table (its results.md) in bench/RESULTS.md.

  bltjax sweep --config experiments/sweeps/decoding.py --workdir runs/sweeps/decoding
  python bench/sweep_results.py --workdir runs/sweeps/decoding \
      --command "bltjax sweep --config experiments/sweeps/decoding.py --workdir runs/sweeps/decoding"
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a sweep directory")
  parser.add_argument("--command", required=True, help="the bltjax sweep command that made it")
  parser.add_argument("--no_append", action="store_true")
  args = parser.parse_args(argv)
  lines = common.read_output(os.path.join(args.workdir, "results.md"),
                             f"the sweep (bltjax sweep --workdir {args.workdir} ...)"
                             ).splitlines()
  title = lines[0].lstrip("# ").strip()
  body = "\n".join(line for line in lines[1:] if not line.startswith("!["))
  print(body)
  if not args.no_append:
    common.append(title, body.strip(), note=(
        f"Sweep command: `{args.command}`; plots: `{args.workdir}/*.png` (the README shows "
        "one)."), argv=argv)


if __name__ == "__main__":
  main()
