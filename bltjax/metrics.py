"""Training metrics: `metrics.jsonl`, TensorBoard events, a console line and a
progress bar. Only process 0 writes; the others are silent."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

import tqdm
from tensorboardX import SummaryWriter


def format_value(value: float) -> str:
  if isinstance(value, int) or (isinstance(value, float) and value.is_integer()
                                and abs(value) < 1e9):
    return str(int(value))
  if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
    return f"{value:.3e}"
  return f"{value:.4f}"


class MetricsWriter:
  """Writes `{name: float}` rows per step; shows a progress bar on a terminal."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, enabled: bool,
               progress: bool | None = None):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    self._bar = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    # A run resumed at start_step logs the steps after it again: rows and events that a
    # stopped run wrote past its last checkpoint go.
    path = os.path.join(workdir, "metrics.jsonl")
    drop_rows_after(path, start_step)
    self._jsonl = open(path, "a", encoding="utf-8")
    self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_step + 1)
    if progress is None:
      progress = sys.stderr.isatty()
    if progress:
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, leave=False)

  def write(self, step: int, metrics: Mapping[str, float], *, prefix: str = "train",
            record: bool = True) -> None:
    """Prints the row; with `record`, also writes it to metrics.jsonl and TensorBoard."""
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    if record:
      row = {"step": step, "time": time.time(),
             **{f"{prefix}/{k}": v for k, v in clean.items()}}
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
      for name, value in clean.items():
        if math.isfinite(value):
          self._tb.add_scalar(f"{prefix}/{name}", value, step)
      self._tb.flush()
    line = f"[{prefix} {step}] " + "  ".join(f"{k}={format_value(v)}" for k, v in clean.items())
    self.print(line)

  def print(self, line: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(line)
    else:
      print(line, flush=True)

  def advance(self, steps: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


def drop_rows_after(path: str, step: int) -> None:
  """Rewrites the jsonl file at `path` (if any) without its rows of steps past `step` and
  a half-written last line."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  keep = [line for line in lines
          if line.endswith("\n") and line.strip() and json.loads(line)["step"] <= step]
  if len(keep) < len(lines):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
