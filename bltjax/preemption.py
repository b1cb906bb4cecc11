"""Preemption notices: save a checkpoint at the next step and stop, instead of dying.

Cluster schedulers (Slurm `--signal`, Kubernetes, Cloud TPU maintenance events) send
SIGTERM some time before they kill a job. Inside `PreemptionWatch`, that signal makes
`reached(step)` true at a step every process agrees on; training then saves that step
and stops (`train.TrainingPreempted`; the CLI exits 143), and re-running the same
command resumes from it, instead of from the last periodic checkpoint.

- Under `jax.distributed` (one or many processes): jax's preemption service catches
  SIGTERM on any process and picks the step
  (`multihost_utils.reached_preemption_sync_point`, called at every step on every
  process).
- A single process without it: a Python handler sets a flag that the next step reads.
  After the first signal the previous handler is back, so a second SIGTERM stops the
  process at once.
- Not watched: `jax.distributed` with `jax_enable_preemption_service` off, or a watch
  entered off the main thread (signal handlers belong to it); SIGTERM acts as usual.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
  """Context manager; call `reached(step)` once per training step, in step order."""

  def __init__(self, signum: int = signal.SIGTERM):
    self.signum = signum
    self.signalled = False
    self._distributed = False
    self._installed = False
    self._previous = None

  def __enter__(self) -> "PreemptionWatch":
    distributed = jax.distributed.is_initialized()
    # With jax's preemption service turned off, no process can tell the others: unwatched.
    self._distributed = distributed and jax.config.jax_enable_preemption_service
    if not distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(self.signum, self._on_signal)
      self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    self._restore()

  def reached(self, step: int) -> bool:
    """Whether training should save `step` and stop now (the same answer on every
    process)."""
    if self._distributed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signalled

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    self.signalled = True
    self._restore()

  def _restore(self) -> None:
    if self._installed:
      # None: the previous handler was not set from Python; the default is the nearest.
      signal.signal(self.signum, signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False
