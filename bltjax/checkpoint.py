"""Orbax checkpoints of the train state and the data iterator (the only orbax user).

Layout: `<workdir>/checkpoints/<step>/{state,data}`. Saves are asynchronous; the last
`keep` checkpoints are kept. Restores go into abstract arrays built for the *current*
mesh, so a run can resume on another device or process count. The data iterator's
position equals the step (the batch of step s is a pure function of the seed and s),
so when the grain state of this process layout is missing (another process count),
the iterator is positioned by the step instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


@contextlib.contextmanager
def _quiet_absl(quiet: bool):
  logger = logging.getLogger("absl")
  level = logger.level
  if quiet:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


class Checkpointer:
  """Save / restore `{state, data}` under `directory` (a thin orbax wrapper)."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    # The PyTree handler reads what StandardSave writes and can restore a subtree.
    with _quiet_absl(read_only):   # orbax warns about read-only managers, which we want
      options = ocp.CheckpointManagerOptions(
          max_to_keep=None if read_only else keep, enable_async_checkpointing=async_save,
          cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only)
      self._manager = ocp.CheckpointManager(
          self.directory, item_names=("state", "data"), options=options,
          item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                         "data": grain.checkpoint.CheckpointHandler()})

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator) -> None:
    """Starts an (async) save of step `step`. Call `wait()` before reading it back."""
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iterator))
    self._manager.save(step, args=args, force=True)

  def save_state(self, step: int, state: Any) -> None:
    """Saves the state item alone, without a data iterator (e.g. `{"params": ...}` of a
    converted model, which `restore_params` reads)."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)),
                       force=True)

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """Restores the train state into `abstract_state` (ShapeDtypeStructs with shardings)."""
    return self._restore_tree(step, abstract_state, partial=False)

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Restores only the params of a saved train state (no optimizer state)."""
    return self._restore_tree(step, {"params": abstract_params}, partial=True)["params"]

  def _restore_tree(self, step: int, abstract: Any, *, partial: bool) -> Any:
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract)
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract, restore_args=restore_args, partial_restore=partial))
    return self._manager.restore(step, args=args)["state"]

  def has_data_state(self, step: int) -> bool:
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return os.path.exists(os.path.join(self.directory, str(step), "data", name))

  def restore_data(self, step: int, data_iterator: grain.DatasetIterator) -> None:
    """Restores the iterator's position in place (same process count only)."""
    args = ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator))
    self._manager.restore(step, args=args)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _step_folders(ckpt_dir: str) -> list[int]:
  """The steps named by the folders of `ckpt_dir`, sorted; [] for none (or no such
  directory). Read from the directory names, without orbax: a save writes into a
  temporary directory that is renamed to its step when it is complete, so a folder named
  by a step lacks its state only when something else made or emptied it."""
  try:
    names = os.listdir(ckpt_dir)
  except (FileNotFoundError, NotADirectoryError):
    return []
  return sorted(int(name) for name in names
                if name.isdigit() and os.path.isdir(os.path.join(ckpt_dir, name)))


def _holds_state(ckpt_dir: str, step: int) -> bool:
  state = os.path.join(ckpt_dir, str(step), "state")
  return os.path.isdir(state) and bool(os.listdir(state))


def saved_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints in `<workdir>/checkpoints` (a folder holding a
  saved state), sorted; [] for none."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  return [s for s in _step_folders(ckpt_dir) if _holds_state(ckpt_dir, s)]


def require_checkpoints(workdir: str) -> list[int]:
  """The step folders of `<workdir>/checkpoints`, sorted; a FileNotFoundError naming the
  fix when there is none (the workdir was never trained)."""
  steps = _step_folders(os.path.join(workdir, "checkpoints"))
  if not steps:
    raise FileNotFoundError(f"{workdir} has no checkpoints yet; train it first (bltjax train "
                            f"--workdir {workdir} ...)")
  return steps


def checked_step(workdir: str, step: int | None = None) -> int:
  """`step` (default: the latest step folder of `<workdir>/checkpoints`), if its folder
  holds a saved state; else a FileNotFoundError naming the steps that can load."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = require_checkpoints(workdir)
  loadable = ", ".join(map(str, saved_steps(workdir))) or "none"
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"{ckpt_dir} has no checkpoint of step {step}; complete steps: "
                            f"{loadable}; load one of them (step=N, or --step N)")
  if not _holds_state(ckpt_dir, step):
    raise FileNotFoundError(
        f"checkpoint {os.path.join(ckpt_dir, str(step))} is incomplete (no saved state in "
        f"it); remove that folder, or load a complete step ({loadable}) with step=N or "
        "--step N")
  return step


def resume_step(workdir: str) -> int:
  """The step a training run in `workdir` resumes from: its latest checkpoint, 0 for none.

  Raises FileNotFoundError when the latest step folder holds no saved state (a save that
  something else made or emptied): resuming from an earlier step would leave that folder
  in the way of the run's own save of its step."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = _step_folders(ckpt_dir)
  if not steps:
    return 0
  if not _holds_state(ckpt_dir, steps[-1]):
    earlier = saved_steps(workdir)
    then = f"from step {earlier[-1]}" if earlier else "at step 0"
    raise FileNotFoundError(
        f"checkpoint {os.path.join(ckpt_dir, str(steps[-1]))} is incomplete (no saved state "
        f"in it), so the run cannot resume from it; remove that folder and run again to "
        f"resume {then}")
  return steps[-1]


def bound_config(workdir: str) -> dict | None:
  """The `config.json` (as JSON) of the run in `workdir` once it holds a checkpoint, which
  binds the workdir to that run; None before (a first run that failed binds nothing)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path) or not saved_steps(workdir):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def not_a_directory(path: str) -> str | None:
  """Why `path` is not a directory ("does not exist", "is a file, ..."), or None."""
  if os.path.isdir(path):
    return None
  return "is a file, not a directory" if os.path.exists(path) else "does not exist"


def read_config(workdir: str):
  """The config a workdir was trained with (`<workdir>/config.json`).

  A relative `patcher.entropy_workdir` that names a directory inside `workdir` (a
  converted model ships its entropy model as `<workdir>/entropy`) is resolved against
  `workdir`; any other relative path stays relative to the current directory (as
  `bltjax train` wrote it).
  """
  from bltjax import configs  # pylint: disable=g-import-not-at-top
  why = not_a_directory(workdir)
  if why:
    raise FileNotFoundError(f"workdir {workdir!r} {why}; pass the --workdir of a `bltjax "
                            "train` run")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} does not exist: {workdir!r} is not a bltjax workdir; pass the --workdir of "
        "a `bltjax train` run")
  with open(path, encoding="utf-8") as f:
    config = configs.from_json(json.dumps(configs.with_defaults(json.load(f))))
  entropy_workdir = config.get("patcher", {}).get("entropy_workdir", "")
  if entropy_workdir and not os.path.isabs(entropy_workdir):
    inside = os.path.join(workdir, entropy_workdir)
    if os.path.isdir(inside):
      config.patcher.entropy_workdir = os.path.normpath(inside)
  return config


def save_params(workdir: str, params: Any, *, step: int = 0) -> str:
  """Writes params alone as `<workdir>/checkpoints/<step>/state` (no optimizer state).

  The state item is the PyTree `{"params": params}`, saved with the handler of
  `Checkpointer`, so `load_params` (a partial restore of `params`) reads it like a
  training checkpoint. Used for converted models. Returns the checkpoint directory.
  """
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
  try:
    ckpt.save_state(step, {"params": params})
    ckpt.wait()
  finally:
    ckpt.close()
  return os.path.join(workdir, "checkpoints", str(step))


def load_params(workdir: str, abstract_params: Any, *, step: int | None = None):
  """Params of the latest (or given) checkpoint in `workdir` -> (params, step).

  `abstract_params`: ShapeDtypeStructs (with shardings) of the expected params.
  """
  step = checked_step(workdir, step)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  ckpt = Checkpointer(ckpt_dir, async_save=False, read_only=True)
  try:
    where = os.path.join(ckpt_dir, str(step))
    try:
      params = ckpt.restore_params(step, abstract_params)
    except (ValueError, TypeError) as e:   # orbax: a stored shape or dtype that does not fit
      raise CheckpointMismatchError(
          f"checkpoint {where} holds another model's params ({str(e).split('. ')[0]}); "
          "load it with the config it was trained with") from None
    # A partial restore leaves the params the checkpoint lacks as their abstract shapes.
    missing = [jax.tree_util.keystr(path) for path, leaf
               in jax.tree_util.tree_leaves_with_path(params)
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
      more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
      raise CheckpointMismatchError(
          f"checkpoint {where} holds another model's params: {missing[0]}{more} not in it; "
          "load it with the config it was trained with")
    return params, step
  finally:
    ckpt.close()


class CheckpointMismatchError(ValueError):
  """A checkpoint whose params are not those of the model asked for."""
