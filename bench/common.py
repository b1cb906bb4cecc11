"""What every benchmark script records with its numbers: device, date, command, commit.

jax is imported where it is used: bench/hf_peer.py's torch steps import this module in a
virtualenv without jax.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "RESULTS.md")


def fastest(fn, *args, repeats: int) -> float:
  """Seconds of the fastest of `repeats` calls `fn(*args)` (jax results awaited), after one
  untimed call (compile and warm-up)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def git_commit() -> str:
  """$GIT_COMMIT when set, else the checkout's short commit, `-dirty` when tracked files
  other than bench/RESULTS.md differ from it (the numbers then come from code no commit
  holds).

  The variable wins: the GPU machine's copy of the tree may carry a `.git` that is not at
  the commit of the files it runs.
  """
  if os.environ.get("GIT_COMMIT"):
    return os.environ["GIT_COMMIT"]
  git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO)
  try:
    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
      return "unknown"
    # bench/RESULTS.md is what the benchmarks append to: a run after another is not dirty.
    dirty = git("diff", "--quiet", "HEAD", "--", ".",
                ":(exclude)bench/RESULTS.md").returncode == 1
  except OSError:
    return "unknown"
  return head.stdout.strip() + ("-dirty" if dirty else "")


def device_name() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
  return device.device_kind


def float_list(text: str) -> list[float]:
  """An argparse type: "0,0.3" -> [0.0, 0.3]."""
  try:
    return [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers") from None


def batch_sizes(text: str) -> list[int]:
  """The argparse type of `--batch_sizes`: "1,8" -> [1, 8]."""
  try:
    batches = [int(b) for b in text.split(",") if b.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers") from None
  if not batches or min(batches) < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: positive integers")
  return batches


def command(argv=None) -> str:
  script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
  return " ".join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def append(title: str, body: str, *, argv=None, note: str = "", path: str = RESULTS) -> None:
  """Appends a section `## title (device, date, commit)` with the command and `body`."""
  import jax  # pylint: disable=g-import-not-at-top
  flags = f", XLA_FLAGS `{os.environ['XLA_FLAGS']}`" if os.environ.get("XLA_FLAGS") else ""
  header = (f"\n## {title} ({device_name()}, {datetime.date.today().isoformat()}, commit "
            f"{git_commit()}, jax {jax.__version__}{flags})\n\nCommand: `{command(argv)}`. "
            f"{note}\n\n")
  with open(path, "a", encoding="utf-8") as f:
    f.write(header + body.rstrip() + "\n")


def read_output(path: str, made_by: str) -> str:
  """The text of a file another command writes; a missing one stops the script with the
  command that makes it (`made_by`)."""
  if not os.path.isfile(path):
    raise SystemExit(f"{path} not found: run {made_by} first")
  with open(path, encoding="utf-8") as f:
    return f.read()


def markdown_table(columns, rows) -> str:
  """A markdown table: `columns` names, `rows` lists of cell strings."""
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cells) + " |" for cells in rows]
  return "\n".join(lines)
