"""The training loop: config -> mesh -> data -> model & optimizer -> (restore) -> steps.

Re-running the same command on the same workdir resumes from the latest checkpoint.
The batch of step s is a pure function of (seed, s), so a resumed run continues with
exactly the losses an uninterrupted run would have had. A preemption notice (SIGTERM)
saves the next step and stops (`bltjax/preemption.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bltjax import checkpoint as checkpoint_lib
from bltjax import configs
from bltjax import data as data_lib
from bltjax import distributed
from bltjax import flops
from bltjax import losses
from bltjax import metrics as metrics_lib
from bltjax import objectives
from bltjax import patching
from bltjax import preemption
from bltjax import profiling
from bltjax import sharding


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf; the last good checkpoint is kept."""


class TrainingPreempted(RuntimeError):
  """A preemption notice (SIGTERM) stopped training after saving `step`: the run did not
  finish, and re-running it resumes from there."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preemption notice (SIGTERM): saved step {step} in {directory} and "
                     "stopped; re-run the same command to resume from it")
    self.step = step


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array       # int32 scalar
  params: Any
  opt_state: Any
  rng: jax.Array        # PRNG key data, uint32 [2]


SCHEDULES = ("cosine", "wsd", "constant")


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """The learning rate by step: a linear warmup from 0 over `optim.warmup_steps`, then
  - "cosine": cosine decay to `lr * min_lr_ratio` at `total_steps`;
  - "wsd" (warmup-stable-decay): `lr` until the last `decay_fraction` of the steps, then
    a linear decay to `lr * min_lr_ratio` (a run can be extended from a stable-phase
    checkpoint with the schedule unchanged until its own decay);
  - "constant": `lr`.
  """
  if optim.schedule not in SCHEDULES:
    raise configs.ConfigError(f"config.optim.schedule={optim.schedule!r} is not one of "
                              f"{list(SCHEDULES)}")
  for key in ("lr", "warmup_steps", "min_lr_ratio"):
    if not optim[key] >= 0:   # NaN fails too
      raise configs.ConfigError(f"config.optim.{key}={optim[key]} must be >= 0")
  if not 0.0 <= optim.decay_fraction <= 1.0:
    raise configs.ConfigError(f"config.optim.decay_fraction={optim.decay_fraction} must be "
                              "in [0, 1]")
  warmup, end = optim.warmup_steps, optim.lr * optim.min_lr_ratio
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=end)
  warm = optax.linear_schedule(0.0, optim.lr, max(warmup, 1))
  if optim.schedule == "constant":
    return optax.join_schedules([warm, optax.constant_schedule(optim.lr)], [warmup])
  decay_start = max(warmup, total_steps - round(optim.decay_fraction * total_steps))
  decay = optax.linear_schedule(optim.lr, end, max(total_steps - decay_start, 1))
  return optax.join_schedules([warm, optax.constant_schedule(optim.lr), decay],
                              [warmup, decay_start])


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
  """AdamW on the learning rate of `make_schedule`, with global-norm clipping.

  Weight decay applies to matrices only (not norms' scales).
  """
  schedule = make_schedule(optim, total_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay, mask=decay_mask)
  clip = optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0 else optax.identity()
  return optax.chain(clip, adamw), schedule


def abstract_batch(batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  shape = (batch_size, seq_len)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in data_lib.BATCH_KEYS}


# config.train key -> (least value, what it means): `check_train_config`.
TRAIN_MINIMUMS = {
    "steps": (1, "optimizer steps of the run"),
    "batch_size": (1, "rows per global batch"),
    "grad_accum_steps": (1, "microbatches per step; 1: none"),
    "seq_len": (2, "bytes per row"),
    "log_every": (1, "steps per logged row; the last step is always logged"),
    "save_every": (1, "steps per checkpoint; the last step is always saved"),
    "keep": (1, "checkpoints kept; the last one holds the trained model"),
    "eval_every": (0, "0: only at the end"),
    "eval_batches": (0, "0: the whole validation split"),
    "time_budget_s": (0, "seconds of training; 0: off"),
    "profile_steps": (0, "steps to profile; 0: off"),
    "profile_skip": (0, "steps before the profiled ones"),
}


def check_train_config(tcfg: ml_collections.ConfigDict,
                       keys: Sequence[str] = tuple(TRAIN_MINIMUMS)) -> None:
  """Raises ConfigError on a `config.train` value below its least (`TRAIN_MINIMUMS`), of
  `keys` (default: all)."""
  for key in keys:
    least, meaning = TRAIN_MINIMUMS[key]
    if tcfg[key] < least:
      raise configs.ConfigError(f"config.train.{key}={tcfg[key]} must be >= {least} "
                                f"({meaning})")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (or ValueError) on a config no training run can use: a
  `config.train` value out of range (`check_train_config`), a BLT-D block size its rows
  cannot hold, model shapes that do not fit (its objective is built: a head count that
  does not divide the width, a patcher without its entropy model), or optimizer
  settings. What `train` checks before anything else, and training sweeps of each run
  before the first starts; it reads no data and needs no devices."""
  check_train_config(config.train)
  objectives.check_diffusion_config(config)
  objectives.make_objective(config)
  make_optimizer(config.optim, config.train.steps)


# What a resumed run keeps from its first: the model (params and objective), how its
# bytes are cut into patches (the threshold and entropy model are pinned apart,
# `patching.pin_entropy_model`) and what the batch of each step is made of (a pure
# function of these and the step).
RESUME_KEYS = ("model", "patcher.mode", "patcher.rule", "patcher.max_patch_len",
               "patcher.patch_size", "seed", "train.batch_size", "train.seq_len",
               "data.train", "data.train_weights", "data.valid", "data.format",
               "data.text_field", "data.valid_fraction")
# Model keys that change how a step computes, not the params or the loss it minimises:
# a resume may change them (e.g. remat or kernels on another machine).
COMPUTE_KEYS = ("model.dtype", "model.remat", "model.attention", "model.ffn.impl",
                "model.ffn.backend", "model.ffn.interpret", "model.ffn.dense_threshold")


def _resume_view(config: dict) -> dict:
  """The `RESUME_KEYS` of a config as JSON, less `COMPUTE_KEYS`, as nested dicts."""
  view = {}
  for key in RESUME_KEYS:
    *parents, last = key.split(".")
    src, dst = config, view
    for name in parents:
      src, dst = src.get(name, {}), dst.setdefault(name, {})
    if last in src:
      dst[last] = copy.deepcopy(src[last])
  for key in COMPUTE_KEYS:
    *parents, last = key.split(".")
    node = view
    for name in parents:
      node = node.get(name, {})
    node.pop(last, None)
  return view


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a workdir with another model or other data: `RESUME_KEYS` (less
  `COMPUTE_KEYS`) that differ from its `config.json`. A workdir without a checkpoint (a
  first run that failed) takes any config; `write_workdir_config` then replaces its
  `config.json`."""
  bound = checkpoint_lib.bound_config(workdir)
  if bound is None:
    return
  saved = _resume_view(configs.with_defaults(bound))
  given = _resume_view(json.loads(configs.to_json(config)))   # tuples as lists, as saved
  path = os.path.join(workdir, configs.SAVED_CONFIG)
  if saved["model"] != given["model"]:
    raise configs.ConfigError(
        f"workdir {workdir} holds a run of another model "
        f"({configs.describe_differences(saved['model'], given['model'], 'model')} in "
        f"{path}); use a new --workdir, or the saved config.model to resume it")
  if saved != given:
    raise configs.ConfigError(
        f"workdir {workdir} was trained on other data, batches or patches "
        f"({configs.describe_differences(saved, given)} in {path}): its later steps would "
        f"not read the batches an uninterrupted run reads; resume with the saved values (if "
        f"the same data only moved, write its new path into {path}), or go on from its "
        f"params in a new --workdir with --config.train.init_params_from={workdir}")


def write_workdir_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes `<workdir>/config.json` (process 0)."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, configs.SAVED_CONFIG)
    os.makedirs(workdir, exist_ok=True)
    # Atomic (write + rename): other processes may be reading the previous one.
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write(configs.to_json(config))
    os.replace(path + ".tmp", path)


def mesh_and_param_shardings(config: ml_collections.ConfigDict, objective, devices=None):
  """The run's mesh over `devices` (default: all) and its params' shardings.

  Raises:
    ShardingError: a mesh the devices cannot form, a batch (or microbatch) that does not
      split over its batch shards and processes, a param dimension that does not divide
      its mesh axes.
  """
  tcfg = config.train
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch(tcfg.batch_size, mesh, tcfg.grad_accum_steps)
  with sharding.use_mesh(mesh):
    boxed = jax.eval_shape(objective.init, jax.random.PRNGKey(config.seed),
                           abstract_batch(tcfg.batch_size, tcfg.seq_len))
  return mesh, sharding.param_shardings(boxed, mesh)


def check_run(config: ml_collections.ConfigDict, devices=None) -> None:
  """`check_config`, and what needs the devices and the data: the mesh and the shardings
  (`mesh_and_param_shardings`) and the data, each split opened (paths that match files,
  readable formats, validation documents). What a training sweep checks of each run
  before the first trains; nothing is compiled or written."""
  check_config(config)
  mesh_and_param_shardings(config, objectives.make_objective(config), devices)
  data_lib.check_disjoint(config.data)
  for split in ("train", "valid"):
    data_lib.split_sources(config.data, split)


class Trainer:
  """Everything one training run needs, built from a config (no hidden state)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, devices=None, *,
               score_every_byte: bool = False):
    """`score_every_byte`: the eval step scores every target byte whatever the BLT's
    `patcher.max_patches` (`objectives.scoring_objective`; `bltjax eval`); without it,
    validation leaves out the bytes training's patch budget leaves out."""
    self.config = config
    self.workdir = workdir
    tcfg = config.train
    check_train_config(tcfg, ("steps", "batch_size", "grad_accum_steps", "seq_len"))
    # --- Mesh, model and the shardings of its params (by logical-axis rules) -----------
    self.objective = objectives.make_objective(config)
    self.mesh, self.param_shardings = mesh_and_param_shardings(config, self.objective, devices)
    self.eval_objective = (objectives.scoring_objective(self.objective, tcfg.seq_len)
                           if score_every_byte else self.objective)
    self.optimizer, self.schedule = make_optimizer(config.optim, tcfg.steps)
    self.frozen = self.objective.frozen_params(self.mesh)
    # --- Shardings of the train state -------------------------------------------------
    batch_shapes = abstract_batch(tcfg.batch_size, tcfg.seq_len)
    rng = jax.random.PRNGKey(config.seed)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = sharding.replicated(self.mesh)
    init = self._init_fn(batch_shapes)
    abstract = jax.eval_shape(init, rng)
    # Optimizer moments are sharded like their params; counters are replicated.
    opt_shardings = optax.tree_map_params(
        self.optimizer, lambda _, s: s, abstract.opt_state, self.param_shardings,
        transform_non_params=lambda _: self.replicated,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    self.state_shardings = TrainState(step=self.replicated, params=self.param_shardings,
                                      opt_state=opt_shardings, rng=self.replicated)
    self.init_state = jax.jit(init, out_shardings=self.state_shardings)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
        self.state_shardings)
    # --- Steps ------------------------------------------------------------------------
    frozen_shardings = jax.tree.map(lambda x: x.sharding, self.frozen)
    self._jit_train_step = jax.jit(
        self._train_step,
        in_shardings=(self.state_shardings, self.batch_sharding, frozen_shardings),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
    self._jit_eval_step = jax.jit(
        self.eval_objective.eval_sums,
        in_shardings=(self.state_shardings.params, self.batch_sharding, frozen_shardings),
        out_shardings=self.replicated)

  def train_step(self, state: TrainState, batch, frozen):
    """One optimizer step (jitted; traced under the mesh and the logical-axis rules)."""
    with sharding.use_mesh(self.mesh):
      return self._jit_train_step(state, batch, frozen)

  def lower_train_step(self, batch):
    """`train_step` lowered for `batch` (arrays or ShapeDtypeStructs); `.compile()` is
    the executable it runs (for measuring compilation)."""
    with sharding.use_mesh(self.mesh):
      return self._jit_train_step.trace(self.abstract_state, batch, self.frozen).lower()

  def compile_steps(self, *, train_step: bool = True) -> None:
    """Compiles the eval step (and the train step) now; with several processes, then
    waits until every process has compiled them.

    The first run of a step sets up its cross-process collectives, and gloo (CPU) gives
    peers that are still compiling only 30 s to arrive; on a loaded host compilation
    times differ by more. Calls of the steps afterwards reuse these executables.
    """
    batch = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.batch_sharding),
        abstract_batch(self.config.train.batch_size, self.config.train.seq_len))
    if train_step:
      self.lower_train_step(batch).compile()
    with sharding.use_mesh(self.mesh):
      self._jit_eval_step.trace(self.abstract_state.params, batch, self.frozen).lower().compile()
    distributed.barrier(f"bltjax/steps_compiled/{'train' if train_step else 'eval'}")

  def eval_step(self, params, batch, frozen):
    """Sums of CE nats, target bytes scored and target bytes dropped of one batch
    (jitted)."""
    with sharding.use_mesh(self.mesh):
      return self._jit_eval_step(params, batch, frozen)

  def _init_fn(self, batch_shapes) -> Callable:
    def init(rng):
      init_rng, train_rng = jax.random.split(rng)
      dummy = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch_shapes)
      params = nn.meta.unbox(self.objective.init(init_rng, dummy))
      params = jax.lax.with_sharding_constraint(params, self.param_shardings)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=self.optimizer.init(params), rng=train_rng)
    return init

  def _train_step(self, state: TrainState, batch, frozen):
    rng, step_rng = jax.random.split(state.rng)
    (loss, metrics), grads = self._loss_and_grads(state.params, batch, step_rng, frozen)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(params), lr=self.schedule(state.step))
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics

  def _loss_and_grads(self, params, batch, rng, frozen):
    """((loss, metrics), grads) of the global batch; with `train.grad_accum_steps` k > 1,
    their mean over k microbatches, which run one after another (a scan: the activations
    of one microbatch at a time), microbatch j drawing its noise from `fold_in(rng, j)`.

    Each microbatch's loss is normalised by its own counts (target bytes, MASK
    positions), so the mean equals the whole batch's loss when the microbatches hold
    equal counts (packed rows of next-byte CE), and is close to it otherwise."""
    grad_fn = jax.value_and_grad(self.objective.loss, has_aux=True)
    microbatches = self.config.train.grad_accum_steps
    if microbatches == 1:
      return grad_fn(params, batch, rng, frozen)
    split = sharding.split_microbatches(batch, microbatches, self.mesh)

    def add_microbatch(total, index_and_batch):
      index, micro = index_and_batch
      out = grad_fn(params, micro, jax.random.fold_in(rng, index), frozen)
      return jax.tree.map(lambda a, b: a + b.astype(a.dtype) / microbatches, total, out), None

    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], split), rng, frozen)
    # Means of integer metrics (counts) are fractional: float32.
    (loss, metrics), grads = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype if jnp.issubdtype(s.dtype, jnp.floating)
                            else jnp.float32), shapes)
    # The summed gradients are sharded like the params (not replicated: FSDP memory).
    grads = jax.lax.with_sharding_constraint(grads, self.param_shardings)
    zeros = ((loss, metrics), grads)
    total, _ = jax.lax.scan(add_microbatch, zeros, (jnp.arange(microbatches), split))
    return total

  def evaluate(self, params, max_batches: int | None = None, *,
               data_cfg: ml_collections.ConfigDict | None = None) -> dict[str, float]:
    """Bits per byte of the validation split (all of it, or `max_batches` batches); for
    a `data.train` mixture validated on its held-out documents, each source's
    (`source_<i>/bpb`, `max_batches` each) and overall the bytes of them all. `bytes`:
    the target bytes scored; `dropped_bytes`: those left out (a BLT's patch budget,
    unless `score_every_byte`).

    `data_cfg` replaces `config.data` (e.g. `valid` set to another file).
    """
    data_cfg = data_cfg or self.config.data
    tcfg = self.config.train

    def eval_sums(documents) -> dict[str, float]:
      total = {"nats": 0.0, "bytes": 0.0, "dropped": 0.0}
      for local in data_lib.eval_batches(
          data_cfg, seq_len=tcfg.seq_len, global_batch=tcfg.batch_size,
          process_index=jax.process_index(), process_count=jax.process_count(),
          max_batches=max_batches, documents=documents):
        sums = self.eval_step(params, sharding.make_global_batch(local, self.mesh),
                              self.frozen)
        total = {k: v + float(sums[k]) for k, v in total.items()}
      return total

    bpb = lambda sums: sums["nats"] / max(sums["bytes"], 1.0) / losses.LN2
    # A mixture validated on each source's held-out documents: one pass per source, so
    # `max_batches` reads every source (of the sources one after another, it read the first).
    per_source = [eval_sums(part) for part in data_lib.split_sources(data_cfg, "valid")]
    sums = {k: sum(part[k] for part in per_source) for k in per_source[0]}
    metrics = {"bpb": bpb(sums), "bytes": sums["bytes"], "dropped_bytes": sums["dropped"]}
    if len(per_source) > 1:
      metrics.update({f"source_{i}/bpb": bpb(part) for i, part in enumerate(per_source)})
    return metrics


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  fetched = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def _out_of_time(run_start: float, budget_s: float) -> bool:
  """Whether the time budget is spent (process 0 decides for everyone)."""
  if not budget_s:
    return False
  spent = time.perf_counter() - run_start >= budget_s
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    spent = bool(multihost_utils.broadcast_one_to_all(np.asarray(spent)))
  return spent


def _first_non_finite(pending: list[dict[str, jax.Array]], first_step: int):
  """(step, name, value) of the first non-finite loss (computed on the params before the
  step's update) or param norm (after it) of the steps `pending` holds, or None."""
  fetched = jax.device_get([(m["loss"], m["param_norm"]) for m in pending])
  for i, (loss, param_norm) in enumerate(fetched):
    for name, value in (("loss", float(loss)), ("param_norm", float(param_norm))):
      if not math.isfinite(value):
        return first_step + i, name, value
  return None


def _non_finite_message(bad, saved_steps: list[int], directory: str) -> str:
  """What went wrong at which step, and which checkpoint to resume from."""
  step, name, value = bad
  if name == "loss":   # computed on the params the previous step's update made
    what, broken = f"the loss became {value} at step {step}", step - 1
  else:
    what, broken = f"the update of step {step} made the params {value} (param_norm)", step
  good = [s for s in saved_steps if s < broken]
  if broken in saved_steps:
    where = (f"Checkpoint {broken} holds the params that did it: move {directory}/{broken} "
             f"aside to resume from step {good[-1]}" if good else
             f"Checkpoint {broken} holds the params that did it and no earlier one exists: "
             f"start again in a new workdir")
  else:
    where = (f"The last good checkpoint is step {good[-1]} in {directory}" if good
             else "No checkpoint was saved before it")
  return (f"{what}; training stopped before saving it. {where}; lower optim.lr or check the "
          "data, then re-run")


def _load_initial_params(source: str, abstract_params):
  """(params, step) of `config.train.init_params_from`; a source that is not this model's
  is a ConfigError naming it."""
  try:
    return checkpoint_lib.load_params(source, abstract_params)
  except (FileNotFoundError, checkpoint_lib.CheckpointMismatchError) as e:
    raise configs.ConfigError(f"config.train.init_params_from={source}: {e}") from None


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool | None = None,
          devices=None) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir`; returns the last validation metrics.

  Raises TrainingPreempted after saving the step a preemption notice (SIGTERM) stopped at.

  `devices`: the devices of the mesh (default: all)."""
  tcfg = config.train
  config = patching.pin_entropy_model(config, workdir)
  # Every check before the workdir is written: a run that cannot train (or would fail at
  # its first evaluation) leaves nothing behind.
  check_config(config)
  check_workdir_config(workdir, config)
  start_step = checkpoint_lib.resume_step(workdir)
  trainer = Trainer(config, workdir, devices)
  data_lib.check_disjoint(config.data)   # DataError: a file in two sources or splits
  dataset = data_lib.train_dataset(
      config.data, seq_len=tcfg.seq_len, global_batch=tcfg.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  # DataError when a split holds no document; the sizes are printed below.
  split_sizes = {split: [(len(part), int(part.lengths.sum()))
                         for part in data_lib.split_sources(config.data, split)]
                 for split in ("train", "valid")}
  initial_params = None
  if tcfg.init_params_from and not start_step:
    initial_params = _load_initial_params(tcfg.init_params_from, trainer.abstract_state.params)
  write_workdir_config(workdir, config)
  distributed.barrier("bltjax/train_start")   # before the checkpoint's first collective
  is_main = jax.process_index() == 0
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep,
                                     async_save=tcfg.async_checkpoint)

  # --- Restore or initialise -------------------------------------------------------------
  if start_step:
    state = ckpt.restore_state(start_step, trainer.abstract_state)
  else:
    state = trainer.init_state(jax.random.PRNGKey(config.seed))
    if initial_params is not None:
      params, from_step = initial_params
      state = dataclasses.replace(state, params=params)
      if jax.process_index() == 0:
        print(f"initialised params from {tcfg.init_params_from} (step {from_step})")
  data_iter = data_lib.train_iterator(dataset, start_step=start_step,
                                      prefetch=config.data.prefetch,
                                      read_threads=config.data.read_threads)
  if start_step and ckpt.has_data_state(start_step):
    ckpt.restore_data(start_step, data_iter)

  writer = metrics_lib.MetricsWriter(workdir, total_steps=tcfg.steps, start_step=start_step,
                                     enabled=is_main, progress=progress)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  writer.print(
      f"bltjax train: process {jax.process_index()}/{jax.process_count()}, "
      f"{trainer.mesh.size} devices ({jax.devices()[0].device_kind}), mesh "
      f"{dict(trainer.mesh.shape)}, {n_params / 1e6:.2f}M params, workdir {workdir}, "
      + (f"resuming at step {start_step}" if start_step else "starting at step 0"))
  writer.print("data: " + ", ".join(
      f"{sum(n for n, _ in parts):,} {split} documents ({sum(b for _, b in parts) / 1e6:.2f} MB)"
      for split, parts in split_sizes.items()))
  if mixture := data_lib.mixture_rows(config.data, tcfg.batch_size):
    writer.print(f"data mixture: {' + '.join(map(str, mixture))} rows of each "
                 f"{tcfg.batch_size}-row batch from the sources of data.train")
  trainer.compile_steps(train_step=start_step < tcfg.steps)
  peak = flops.peak_flops(jax.devices()[0].device_kind)
  step_flops = trainer.objective.train_flops(tcfg.batch_size, tcfg.seq_len)

  # --- Train loop ------------------------------------------------------------------------
  pending: list[dict[str, jax.Array]] = []
  pending_start = start_step
  window_start_time, window_steps = None, 0
  eval_metrics: dict[str, float] = {}

  def check_pending() -> None:
    bad = _first_non_finite(pending, pending_start + 1)
    if bad is not None:
      ckpt.wait()
      raise NonFiniteLossError(_non_finite_message(bad, checkpoint_lib.saved_steps(workdir),
                                                    ckpt.directory))

  # The time budget counts training from the end of the first step: not the compilation
  # (compile_steps, minutes on a GPU), nor the first run's one-time setup (collectives).
  run_start = None
  profiler = profiling.StepProfiler(workdir, start_step + tcfg.profile_skip, tcfg.profile_steps)
  try:
    with preemption.PreemptionWatch() as preemption_watch:
      for step in range(start_step, tcfg.steps):
        batch = sharding.make_global_batch(next(data_iter), trainer.mesh)
        profiler.before_step(step)
        state, step_metrics = trainer.train_step(state, batch, trainer.frozen)
        pending.append(step_metrics)
        done = step + 1
        writer.advance()
        if profiled := profiler.after_step(done, state):
          writer.print(profiled)
        if window_start_time is None:  # the first step (one-time setup): not timed
          jax.block_until_ready(state.step)
          window_start_time, window_steps = time.perf_counter(), 0
          run_start = window_start_time
        else:
          window_steps += 1
        preempted = preemption_watch.reached(done)   # every step, on every process
        is_last = (done == tcfg.steps or preempted
                   or _out_of_time(run_start, tcfg.time_budget_s))
        if done % tcfg.log_every == 0 or is_last:
          check_pending()
          row = _mean_metrics(pending)
          elapsed = time.perf_counter() - window_start_time
          if window_steps:
            step_time = elapsed / window_steps
            row["step_time"] = step_time
            row["bytes_per_s"] = tcfg.batch_size * tcfg.seq_len / step_time
            if peak:
              row["mfu"] = step_flops / step_time / (peak * trainer.mesh.size)
          writer.write(done, row)
          pending, pending_start = [], done
          window_start_time, window_steps = time.perf_counter(), 0
        # Saved before the evaluation: an evaluation that fails loses no training.
        if done % tcfg.save_every == 0 or is_last:
          check_pending()
          ckpt.save(done, state, data_iter)
        if preempted:   # the grace period is for saving (the finally waits), not evaluating
          raise TrainingPreempted(done, ckpt.directory)
        if (tcfg.eval_every and done % tcfg.eval_every == 0) or is_last:
          check_pending()
          eval_metrics = trainer.evaluate(state.params, tcfg.eval_batches or None)
          writer.write(done, eval_metrics, prefix="valid")
          window_start_time, window_steps = time.perf_counter(), 0
        if is_last:
          if done < tcfg.steps:   # stopped by train.time_budget_s
            writer.print(f"train.time_budget_s={tcfg.time_budget_s:g} spent at step {done} of "
                         f"{tcfg.steps}; step {done} is saved: re-run to train on")
          break
      if start_step >= tcfg.steps:
        writer.print(f"workdir already holds step {start_step} >= train.steps={tcfg.steps}; "
                     "raise --config.train.steps to train further (optim.schedule=wsd "
                     "or constant go on smoothly; a cosine decay is re-planned over the new "
                     "steps, so its learning rate rises again)")
        eval_metrics = trainer.evaluate(state.params, tcfg.eval_batches or None)
        # Shown, not recorded: the run's metrics already hold its last evaluation.
        writer.write(start_step, eval_metrics, prefix="valid", record=False)
  finally:
    profiler.close()
    ckpt.close()
    writer.close()
  return eval_metrics
