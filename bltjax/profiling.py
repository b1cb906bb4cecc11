"""A `jax.profiler` trace of a few training steps, for TensorBoard's profile tab or Perfetto.

`train.profile_steps=N` traces N steps of a run, after `train.profile_skip` steps (the
first step of a run compiles and sets up collectives: not what a trace should show).
Each process writes `<workdir>/profile/plugins/profile/<time>/<host>.xplane.pb`; view it
with `tensorboard --logdir <workdir>/profile`.
"""

from __future__ import annotations

import os

import jax


class StepProfiler:
  """Starts a trace before step `first` (0-based step index) and stops it after
  `count` steps; `close()` stops one still running (a run that ended early)."""

  def __init__(self, workdir: str, first: int, count: int):
    self.directory = os.path.join(workdir, "profile")
    self.first = first
    self.count = count
    self.running = False

  def before_step(self, step: int) -> None:
    if self.count and step == self.first:
      jax.profiler.start_trace(self.directory)
      self.running = True

  def after_step(self, done: int, outputs) -> str | None:
    """Stops the trace after its last step (waiting for `outputs`); returns a line to
    print then, else None."""
    if self.running and done == self.first + self.count:
      jax.block_until_ready(outputs)
      self.close()
      return (f"profile of steps {self.first + 1}..{done} written to {self.directory} "
              f"(tensorboard --logdir {self.directory})")
    return None

  def close(self) -> None:
    if self.running:
      jax.profiler.stop_trace()
      self.running = False
