"""`bltjax generate` run twice with a fresh disk compilation cache: compile and wall time.

The first run compiles every method's program and writes them to the cache
(`bltjax/compile_cache.py`); the second, a new process with the same model and shapes,
reads them. Appends a table to bench/RESULTS.md.

  python bench/compile_cache.py --workdir runs/bench/bltd8
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402


def run_generate(workdir: str, methods: list[str], cache_dir: str) -> tuple[float, dict]:
  """Wall seconds of one `bltjax generate` process and its compile seconds per method."""
  command = [sys.executable, "-m", "bltjax.cli", "generate", "--workdir", workdir,
             "--prompt", "def main():", "--max_bytes", "64", "--repeats", "0"]
  for method in methods:
    command += ["--method", method]
  env = dict(os.environ, BLTJAX_COMPILE_CACHE=cache_dir)
  start = time.perf_counter()
  proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=common.REPO)
  wall = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f"bltjax generate failed:\n{proc.stderr[-3000:]}")
  compiles = {m.group(1): float(m.group(2)) for m in re.finditer(
      r"^(\w+)\s+\d+ bytes .*compile ([0-9.]+) s", proc.stdout, re.MULTILINE)}
  return wall, compiles


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a trained BLT workdir")
  parser.add_argument("--methods", default="ar,blt_s,blt_d")
  parser.add_argument("--no_append", action="store_true")
  args = parser.parse_args(argv)
  methods = args.methods.split(",")
  with tempfile.TemporaryDirectory() as cache_dir:
    runs = [run_generate(args.workdir, methods, cache_dir) for _ in range(2)]
  cells = []
  for name, (wall, compiles) in zip(("first (cache empty)", "second (cache filled)"), runs):
    cells.append([name, f"{wall:.1f} s"] + [f"{compiles[m]:.2f} s" for m in methods])
  table = common.markdown_table(["process", "wall"] + [f"compile {m}" for m in methods], cells)
  print(table)
  if not args.no_append:
    common.append("Disk compilation cache: `bltjax generate` twice", table, argv=argv, note=(
        f"Model: `{args.workdir}`; `bltjax generate --prompt 'def main():' --max_bytes 64 "
        f"--repeats 0` with methods {', '.join(methods)}, run twice as new processes with "
        "one fresh `BLTJAX_COMPILE_CACHE` directory. Wall: the whole process (imports, "
        "load, compile, decode); compile: what the command reports per method."))


if __name__ == "__main__":
  main()
