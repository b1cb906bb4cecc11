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
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    if progress is None:
      progress = sys.stderr.isatty()
    if progress:
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, leave=False)

  def write(self, step: int, metrics: Mapping[str, float], *, prefix: str = "train") -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    row = {"step": step, "time": time.time(), **{f"{prefix}/{k}": v for k, v in clean.items()}}
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


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
