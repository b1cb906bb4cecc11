r"""Sweeps: run every setting a sweep file lists, resume where it stopped, tabulate, plot.

A sweep file is Python (big_vision style) with two functions:

    from bltjax import sweep

    def get_config(arg=None):   # what is swept over; `--config.key=value` overrides it
      config = sweep.decoding_config()
      config.model = "runs/demo/bltd8"
      return config

    def get_sweep(config):      # one dict per run
      return sweep.chain(
          sweep.fixed("method", "ar"),
          sweep.product(sweep.fixed("method", "blt_d"), sweep.sweep("block_size", [4, 8]),
                        sweep.sweep("alpha", [0.5, 0.9])))

    bltjax sweep --config experiments/sweeps/decoding.py --workdir runs/sweeps/decoding

Decoding sweeps (`decoding_config()`) run continuation tasks (`bltjax.continuation`) on a
trained model: config.model (its directory), config.data (files, or "" for its
validation split), config.prompts / prompt_bytes / continuation_bytes. A run's keys are
`method`, `batch_size` (default 1), `seed` (sampling; default 0) and the DecodeConfig
fields (block_size, alpha, gamma, draft_len, block_commit, gate, temperature, top_p,
prefill_chunk). Options a method does not read are dropped, so a product of methods and
options holds no duplicate runs. Agreement is measured against AR with the same
sampling, computed once and kept in `reference.json`.

Training sweeps (`training_config()`) train one run per entry with `bltjax.train`:
config.experiment (an experiment file[:arg]) and config.overrides, then the entry's
dotted keys (`optim.lr`, `model.diffusion.block_size`), into `<sweep workdir>/<run id>`.

Every entry is checked (method, option, config key, value type; a training run's config
as `train` checks it: ranges, model shapes, optimizer, and its mesh, batch split and
data paths) before any run starts.
A run's id comes from its settings; finished runs are appended to `results.jsonl` and
skipped when the sweep runs again, so a stopped sweep resumes (a stopped training run
from its last checkpoint). A training run that spends its `train.time_budget_s` is
recorded at the step it reached (a comparison at equal time), one whose loss or params
turn NaN/Inf as diverged; both are finished runs, and the sweep goes on. Outputs in the
sweep workdir: `results.jsonl`, `results.md`, and PNG plots (decoding:
`quality_vs_traffic.png`, `quality_vs_speed.png`; training: `valid_bpb.png`; they need
matplotlib: `pip install bltjax[plots]`).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import math
import os
import re
import time
from typing import Any, Iterable, Sequence

import jax
import ml_collections

from bltjax import configs
from bltjax import continuation
from bltjax import metrics

KINDS = ("decoding", "training")
RESULTS = "results.jsonl"
TABLE = "results.md"
SWEEP_CONFIG = "sweep_config.json"
REFERENCE = "reference.json"
DECODING_PLOTS = ("quality_vs_traffic.png", "quality_vs_speed.png")
TRAINING_PLOTS = ("valid_bpb.png",)
RUN_KEYS = ("method", "batch_size", "seed")   # decoding runs, besides the DecodeConfig options
# Why a training run ended before train.steps (its record's `stopped`).
OUT_OF_TIME, DIVERGED = "time budget", "diverged"
FAST_COMPILE = {"xla_backend_optimization_level": 0}


class SweepError(ValueError):
  """A bad sweep file, entry or sweep workdir. The message names the fix."""


# ------------------------------------------------------------------------------------
# Sweep configs and run lists (big_vision style: lists of dicts of dotted keys)
# ------------------------------------------------------------------------------------


def decoding_config(**values) -> ml_collections.ConfigDict:
  """Defaults of a decoding sweep's config (keyword arguments replace them)."""
  config = ml_collections.ConfigDict(dict(
      kind="decoding",
      model="",                # a BLT workdir or converted model directory
      step=0,                  # its checkpoint step; 0: the latest
      data="",                 # files, directories or globs; "": the model's validation split
      prompts=8,               # continuation items (held-out prompt + true continuation)
      prompt_bytes=64,
      continuation_bytes=64,   # bytes each run generates per prompt
      items_seed=0,            # which places of the documents the items are cut from
      fast_compile=False,      # compile at XLA's lowest optimisation (tests; slower decode)
  ))
  return _with_values(config, values, "decoding_config")


def _with_values(config, values: dict, fn: str) -> ml_collections.ConfigDict:
  unknown = sorted(set(values) - set(config))
  if unknown:
    raise SweepError(f"{fn}() has no key {unknown[0]!r}; known keys: "
                     f"{', '.join(sorted(config))} (add your own keys after it returns)")
  config.update(values)
  return config


def training_config(**values) -> ml_collections.ConfigDict:
  """Defaults of a training sweep's config (keyword arguments replace them)."""
  config = ml_collections.ConfigDict(dict(
      kind="training",
      experiment="",           # experiment file[:arg], e.g. experiments/blt_tiny.py:bltd8
      overrides=(),            # `section.key=value` strings applied to every run first
  ))
  return _with_values(config, values, "training_config")


def _as_part(part) -> list[dict]:
  if isinstance(part, dict):
    return [dict(part)]
  part = list(part)
  if not all(isinstance(d, dict) for d in part):
    raise SweepError("a sweep part must be a dict or a list of dicts (from sweep.sweep, "
                     "sweep.fixed, product, zipit or chain)")
  return [dict(d) for d in part]


def _merge(dicts: Iterable[dict], how: str) -> dict:
  out: dict = {}
  for d in dicts:
    for key, value in d.items():
      if key in out:
        raise SweepError(f"{how}: key {key!r} is set by two parts; set it in one")
      out[key] = value
  return out


def sweep(key: str, values: Iterable[Any]) -> list[dict]:
  """One run per value: `sweep("alpha", [0.5, 0.9])` -> [{alpha: 0.5}, {alpha: 0.9}]."""
  if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
    raise SweepError(f"sweep({key!r}, ...) takes a list of values, got {values!r}; use "
                     f"fixed({key!r}, value) for one value")
  return [{key: v} for v in values]


def fixed(key: str, value: Any) -> list[dict]:
  """One run with `key` set: combine it with `product` to set it in every run."""
  return [{key: value}]


def product(*parts) -> list[dict]:
  """Every combination of the parts' runs (the last part varies fastest)."""
  runs = [{}]
  for part in parts:
    runs = [_merge((a, b), "product") for a in runs for b in _as_part(part)]
  return runs


def zipit(*parts) -> list[dict]:
  """The parts' runs side by side: run i merges run i of every part (equal lengths)."""
  parts = [_as_part(p) for p in parts]
  lengths = sorted({len(p) for p in parts})
  if len(lengths) > 1:
    raise SweepError(f"zipit: parts of different lengths {lengths}; give each part as many "
                     "runs")
  return [_merge(runs, "zipit") for runs in zip(*parts)]


def chain(*parts) -> list[dict]:
  """The parts' runs one after another."""
  return [run for part in parts for run in _as_part(part)]


# ------------------------------------------------------------------------------------
# Loading and checking a sweep file
# ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  id: str          # deterministic: from the settings
  settings: dict   # normalised (decoding: method, its options, batch_size[, seed])


@dataclasses.dataclass
class Sweep:
  spec: str
  config: ml_collections.ConfigDict
  runs: list[Run]
  duplicates: int     # entries dropped because they equal an earlier run

  @property
  def kind(self) -> str:
    return self.config.kind


_SHORT = dict(continuation.ABBREVIATIONS, batch_size="bs", block_commit="commit")


def run_id(settings: dict) -> str:
  """`blt_d-B8-a0.7-bs1-<hash>`: readable, and unique by the hash of the settings."""
  canonical = json.dumps(settings, sort_keys=True, default=str)
  digest = hashlib.sha1(canonical.encode()).hexdigest()[:8]
  parts = []
  for key, value in settings.items():
    if key == "method":
      parts.append(str(value))
      continue
    short = key.rsplit(".", 1)[-1]
    parts.append(f"{_SHORT[short]}{value}" if short in _SHORT else f"{short}={value}")
  slug = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", "-".join(parts))[:64].strip("-._")
  return f"{slug}-{digest}" if slug else digest


def _import(path: str):
  if not os.path.isfile(path):
    raise SweepError(f"sweep file {path!r} does not exist; pass e.g. --config "
                     "experiments/sweeps/decoding.py")
  if not path.endswith(".py"):
    raise SweepError(f"{path} is not a sweep file: sweep files are Python files with "
                     "get_config(arg=None) and get_sweep(config); pass e.g. --config "
                     "experiments/sweeps/decoding.py")
  name = "bltjax_sweep_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for fn in ("get_config", "get_sweep"):
    if not callable(getattr(module, fn, None)):
      raise SweepError(f"{path} has no {fn}() function; a sweep file defines "
                       "get_config(arg=None) and get_sweep(config)")
  return module


def _check_config(path: str, config) -> None:
  if not isinstance(config, ml_collections.ConfigDict):
    raise SweepError(f"{path}: get_config must return an ml_collections.ConfigDict "
                     "(start from bltjax.sweep.decoding_config() or training_config())")
  kind = config.get("kind")
  if kind not in KINDS:
    raise SweepError(f"{path}: config.kind={kind!r} is not one of {list(KINDS)}; start "
                     "from bltjax.sweep.decoding_config() or training_config()")
  defaults = decoding_config() if kind == "decoding" else training_config()
  for key in defaults:
    if key not in config:
      raise SweepError(f"{path}: a {kind} sweep config needs key {key!r}; start from "
                       f"bltjax.sweep.{kind}_config()")
  if kind == "decoding" and not config.model:
    raise SweepError(f"{path}: config.model is empty; set it to a trained BLT workdir "
                     "(or pass --config.model=DIR)")
  if kind == "training" and not config.experiment:
    raise SweepError(f"{path}: config.experiment is empty; set it to an experiment file, "
                     "e.g. experiments/blt_tiny.py:bltd8")


def _option_types() -> dict[str, type]:
  from bltjax import generate as generate_lib  # pylint: disable=g-import-not-at-top
  return {f.name: float if f.default is None else type(f.default)
          for f in dataclasses.fields(generate_lib.DecodeConfig)
          if f.name not in ("method", "max_bytes")}


def _decoding_settings(entry: dict, config) -> dict:
  types = _option_types()
  unknown = [k for k in entry if k not in RUN_KEYS and k not in types]
  if unknown:
    raise SweepError(f"unknown key {unknown[0]!r}; decoding runs take "
                     f"{', '.join(RUN_KEYS + tuple(types))}")
  if "method" not in entry:
    raise SweepError("no method; set method (e.g. sweep.fixed('method', 'blt_d'))")
  options = {}
  for key, value in entry.items():
    if key in RUN_KEYS or value is None:
      continue
    want = types[key]
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if want is float
          else isinstance(value, want) and not isinstance(value, bool))
    if not ok:
      raise SweepError(f"{key}={value!r} must be a {want.__name__}")
    options[key] = want(value)
  batch_size, seed = entry.get("batch_size", 1), entry.get("seed", 0)
  for key, value in (("batch_size", batch_size), ("seed", seed)):
    if not isinstance(value, int) or isinstance(value, bool):
      raise SweepError(f"{key}={value!r} must be an int")
  method = entry["method"]
  try:
    continuation.check_request(
        [(method, options)], prompts=config.prompts, prompt_bytes=config.prompt_bytes,
        continuation_bytes=config.continuation_bytes, batch_size=batch_size)
  except ValueError as e:
    raise SweepError(str(e)) from None
  settings = {"method": method, **continuation.options_for(method, options),
              "batch_size": batch_size}
  if settings.get("temperature"):
    settings["seed"] = seed
  return settings


def _get(config, dotted: str):
  for key in dotted.split("."):
    config = config[key]
  return config


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _training_base(config) -> ml_collections.ConfigDict:
  experiment = config.experiment
  path = experiment.partition(":")[0]
  if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO, path)):
    experiment = os.path.join(REPO, experiment)   # experiments/... from any directory
  try:
    return configs.load(experiment, list(config.overrides))
  except (configs.ConfigError, ValueError) as e:
    raise SweepError(f"config.experiment / config.overrides: {e}") from None


def training_run_config(base, settings: dict) -> ml_collections.ConfigDict:
  """The experiment config of one training run: `base` with the run's settings set."""
  config = copy.deepcopy(base)
  for dotted, value in settings.items():
    configs.set_value(config, dotted, value)
  return config


def _training_settings(entry: dict, base) -> dict:
  settings = {}
  config = copy.deepcopy(base)
  strip = lambda key: key[len("config."):] if key.startswith("config.") else key
  for dotted, value in sorted((strip(k), v) for k, v in entry.items()):
    try:
      configs.set_value(config, dotted, value)
    except configs.ConfigError as e:
      raise SweepError(str(e)) from None
    value = _get(config, dotted)
    settings[dotted] = list(value) if isinstance(value, tuple) else value
  from bltjax import train  # pylint: disable=g-import-not-at-top
  try:   # a value no run can train with fails now, not when its run starts
    train.check_config(config)
  except (configs.ConfigError, ValueError) as e:
    raise SweepError(str(e)) from None
  return settings


def load_sweep(spec: str, overrides: Sequence[str] = ()) -> Sweep:
  """Loads `file.py[:arg]`, applies `--config.*` overrides and checks every entry.

  Raises:
    SweepError, ConfigError: a bad file, override or entry (no run has started).
  """
  path, _, arg = spec.partition(":")
  module = _import(path)
  config = module.get_config(arg or None)
  _check_config(path, config)
  config.lock()
  configs.apply_overrides(config, overrides)
  _check_config(path, config)
  entries = module.get_sweep(config)
  if isinstance(entries, dict) or not isinstance(entries, (list, tuple)):
    raise SweepError(f"{path}: get_sweep must return a list of dicts, got "
                     f"{type(entries).__name__}")
  if not entries:
    raise SweepError(f"{path}: get_sweep returned no runs")
  base = _training_base(config) if config.kind == "training" else None
  runs, seen = [], set()
  for i, entry in enumerate(entries):
    if not isinstance(entry, dict):
      raise SweepError(f"{path}: sweep entry {i} is a {type(entry).__name__}, not a dict")
    try:
      settings = (_decoding_settings(entry, config) if base is None
                  else _training_settings(entry, base))
    except SweepError as e:
      raise SweepError(f"{path}: sweep entry {i} {entry}: {e}") from None
    run = Run(run_id(settings), settings)
    if run.id not in seen:
      seen.add(run.id)
      runs.append(run)
  return Sweep(spec, config, runs, duplicates=len(entries) - len(runs))


# ------------------------------------------------------------------------------------
# The sweep workdir
# ------------------------------------------------------------------------------------


def read_results(workdir: str) -> dict[str, dict]:
  """Finished runs of a sweep workdir: id -> record (a cut-off last line is ignored)."""
  path = os.path.join(workdir, RESULTS)
  records = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(record, dict) and "id" in record:
          records[record["id"]] = record
  return records


def _is_main() -> bool:
  return jax.process_index() == 0


def _append(workdir: str, record: dict) -> None:
  if not _is_main():
    return
  path = os.path.join(workdir, RESULTS)
  prefix = ""
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      prefix = "" if f.read(1) == b"\n" else "\n"   # after a cut-off line
  with open(path, "a", encoding="utf-8") as f:
    f.write(prefix + json.dumps(record, default=str) + "\n")
    f.flush()


def _write_text(path: str, text: str) -> None:
  if not _is_main():
    return
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def _has_results(workdir: str) -> bool:
  """Whether a sweep workdir holds results: a finished run, or a training run's checkpoint."""
  from bltjax import checkpoint  # pylint: disable=g-import-not-at-top
  if read_results(workdir):
    return True
  runs = os.listdir(workdir) if os.path.isdir(workdir) else []
  return any(checkpoint.saved_steps(os.path.join(workdir, run)) for run in runs)


def _check_workdir(workdir: str, config) -> None:
  """Writes `sweep_config.json`, or refuses a workdir that holds results of another sweep.

  A workdir without results (its first runs failed) takes a new config: the saved one is
  replaced, and the AR references of the old one (`reference.json`) are dropped."""
  path = os.path.join(workdir, SWEEP_CONFIG)
  wanted = json.loads(configs.to_json(config))
  saved = None
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  if saved == wanted:
    return
  if saved is not None and _has_results(workdir):
    raise SweepError(f"{workdir} holds a sweep with another config "
                     f"({configs.describe_differences(saved, wanted)}; see {path}); use a new "
                     "--workdir, or the config it was made with to resume it")
  if _is_main():
    reference = os.path.join(workdir, REFERENCE)
    if os.path.exists(reference):
      os.remove(reference)
  _write_text(path, json.dumps(wanted, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------


@dataclasses.dataclass
class SweepReport:
  sweep: Sweep
  workdir: str
  executed: list[str]     # ids run by this call
  skipped: list[str]      # ids already in results.jsonl
  rows: list[dict]        # the records of the sweep's finished runs, in sweep order
  files: list[str]        # results.jsonl, results.md and the plots written


def _progress(runs, enabled: bool, name: str):
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(runs, desc=f"sweep {name}", unit="run", disable=not enabled, dynamic_ncols=True)


def _model_sampling(settings: dict) -> tuple[str, dict, int, tuple]:
  method = settings["method"]
  options = {k: v for k, v in settings.items() if k not in RUN_KEYS}
  seed = settings.get("seed", 0)
  return method, options, seed, continuation.sampling_key(options, seed,
                                                         settings.get("batch_size", 1))


def _references(workdir: str, step: int) -> dict[str, list[bytes]]:
  path = os.path.join(workdir, REFERENCE)
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  if saved.get("model_step") != step:
    return {}
  return {k: [bytes.fromhex(o) for o in v] for k, v in saved["outputs"].items()}


def _run_decoding(sw: Sweep, workdir: str, pending: list[Run], finished: dict, *, model,
                  progress: bool) -> list[str]:
  import bltjax  # pylint: disable=g-import-not-at-top
  cfg = sw.config
  if model is None:
    model = bltjax.load(cfg.model, step=cfg.step or None,
                        compiler_options=FAST_COMPILE if cfg.fast_compile else None)
  if model.kind != "blt":
    raise SweepError(f"config.model={cfg.model!r} holds an entropy model, which cannot "
                     "generate; pass a BLT workdir")
  steps = {r.get("model_step") for r in finished.values()} - {None, model.step}
  if steps:
    raise SweepError(f"{workdir} holds results of step {steps.pop()} of {cfg.model}, which "
                     f"is now at step {model.step}; use a new --workdir (or set "
                     "--config.step to the old step)")
  items = continuation.make_continuations(
      continuation.data_config(model.config.data, cfg.data or None), count=cfg.prompts,
      prompt_bytes=cfg.prompt_bytes, continuation_bytes=cfg.continuation_bytes,
      seed=cfg.items_seed)
  references = _references(workdir, model.step)
  executed = []
  bar = _progress(pending, progress, os.path.basename(sw.spec.partition(":")[0]))
  for run in bar:
    bar.set_postfix_str(run.id)
    method, options, seed, key = _model_sampling(run.settings)
    ref_key = json.dumps(key)
    if ref_key not in references:
      references[ref_key] = continuation.reference_outputs(model, items, key)
      _write_text(os.path.join(workdir, REFERENCE), json.dumps(dict(
          model_step=model.step, outputs={k: [o.hex() for o in v]
                                          for k, v in references.items()})) + "\n")
    start = time.perf_counter()
    sampled = {"seed": seed} if key[0] else {}
    result = continuation.run(model, items, method=method,
                              batch_size=run.settings["batch_size"],
                              compare_to=references[ref_key], **sampled, **options)
    _finish(workdir, run, finished, start, label=continuation.label(method, options),
            **result.row(), model=cfg.model, model_step=model.step)
    executed.append(run.id)
  return executed


def _finish(sweep_dir: str, run: Run, finished: dict, start: float, **fields) -> None:
  """Records a finished run (its settings, `fields`, duration and time) in results.jsonl
  and in `finished`."""
  record = dict(id=run.id, settings=run.settings, **fields,
                seconds=time.perf_counter() - start,
                finished=datetime.datetime.now().isoformat(timespec="seconds"))
  _append(sweep_dir, record)
  finished[run.id] = record


def _last_train_metrics(run_dir: str) -> dict:
  path = os.path.join(run_dir, "metrics.jsonl")
  out = {}
  for row in metrics.read_jsonl(path) if os.path.exists(path) else []:
    out.update({k: v for k, v in row.items() if k.startswith("train/")})
  return out


def check_training_runs(sw: Sweep, runs: Sequence[Run], devices=None) -> None:
  """What `load_sweep` cannot check without devices and data, for each training run:
  its mesh and shardings over `devices` (default: all), and its data (`train.check_run`).

  Raises:
    SweepError: naming the run and the problem, before any run trains.
  """
  if sw.kind != "training":
    return
  from bltjax import train  # pylint: disable=g-import-not-at-top
  base = _training_base(sw.config)
  for run in runs:
    try:
      train.check_run(training_run_config(base, run.settings), devices)
    except ValueError as e:   # ConfigError, ShardingError, DataError
      raise SweepError(f"run {run.id}: {e}") from None


def _run_training(sw: Sweep, workdir: str, pending: list[Run], finished: dict, *, devices,
                  progress: bool) -> list[str]:
  from bltjax import checkpoint  # pylint: disable=g-import-not-at-top
  from bltjax import train  # pylint: disable=g-import-not-at-top
  base = _training_base(sw.config)
  executed = []
  bar = _progress(pending, progress, os.path.basename(sw.spec.partition(":")[0]))
  for run in bar:
    bar.set_postfix_str(run.id)
    config = training_run_config(base, run.settings)
    run_dir = os.path.join(workdir, run.id)
    start = time.perf_counter()
    try:
      valid, stopped = train.train(config, run_dir, progress=False, devices=devices) or {}, None
    except train.NonFiniteLossError as e:   # one diverging setting (a large lr) is a result
      valid, stopped = {}, DIVERGED
      if _is_main():
        bar.write(f"run {run.id}: {e}; recorded as {DIVERGED}, the sweep goes on")
    steps = max(checkpoint.saved_steps(run_dir), default=0)
    if stopped is None and steps < config.train.steps:
      stopped = OUT_OF_TIME
    last = _last_train_metrics(run_dir)
    _finish(workdir, run, finished, start, workdir=run_dir, steps=steps, stopped=stopped,
            valid_bpb=valid.get("bpb"), train_loss=last.get("train/loss"),
            train_bpb=last.get("train/bpb"), bytes_per_s=last.get("train/bytes_per_s"))
    executed.append(run.id)
  return executed


def run_sweep(spec: str | Sweep, workdir: str, *, overrides: Sequence[str] = (), model=None,
              devices=None, progress: bool = True) -> SweepReport:
  """Runs the sweep's unfinished runs, then writes its table and plots.

  Args:
    spec: a sweep file (`path.py[:arg]`) or a `load_sweep` result.
    workdir: the sweep directory (re-running resumes; another sweep config is refused).
    overrides: `--config.key=value` strings for the sweep config (with a file spec).
    model: decoding sweeps: an already loaded `bltjax.load(config.model)` to reuse.
    devices: training sweeps: the devices of each run's mesh (default: all).
    progress: show a progress bar.
  """
  sw = spec if isinstance(spec, Sweep) else load_sweep(spec, overrides)
  finished = read_results(workdir)
  skipped = [r.id for r in sw.runs if r.id in finished]
  pending = [r for r in sw.runs if r.id not in finished]
  if pending and sw.kind == "decoding" and model is None and not os.path.isdir(sw.config.model):
    raise SweepError(f"config.model {sw.config.model!r} does not exist; train it first (the "
                     "default is what `make demo` trains) or pass --config.model=DIR")
  check_training_runs(sw, pending, devices)
  if _is_main():
    os.makedirs(workdir, exist_ok=True)
  _check_workdir(workdir, sw.config)
  executed = []
  if pending:
    if sw.kind == "decoding":
      executed = _run_decoding(sw, workdir, pending, finished, model=model,
                               progress=progress and _is_main())
    else:
      executed = _run_training(sw, workdir, pending, finished, devices=devices,
                               progress=progress and _is_main())
  rows = [finished[r.id] for r in sw.runs if r.id in finished]
  files = [os.path.join(workdir, RESULTS)] if rows else []
  if _is_main():
    plots = write_plots(sw.kind, rows, workdir, plot_title(sw, rows)) if rows else []
    table = os.path.join(workdir, TABLE)
    _write_text(table, format_results(sw, rows, plots))
    files += [table] + plots
  return SweepReport(sw, workdir, executed, skipped, rows, files)


# ------------------------------------------------------------------------------------
# Table and plots
# ------------------------------------------------------------------------------------


def _num(value, spec: str) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "-"
  return format(value, spec)


def training_table(rows: Sequence[dict]) -> str:
  keys = list(dict.fromkeys(k for r in rows for k in r["settings"]))
  columns = keys + ["steps", "valid bpb", "train loss", "bytes/s", "minutes"]
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    cells = [str(r["settings"].get(k, "")) for k in keys]
    steps = str(r["steps"]) + (f" ({r['stopped']})" if r.get("stopped") else "")
    cells += [steps, _num(r.get("valid_bpb"), ".4f"), _num(r.get("train_loss"), ".4f"),
              _num(r.get("bytes_per_s"), ".0f"), _num(r["seconds"] / 60, ".1f")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_title(sw: Sweep, rows: Sequence[dict]) -> str:
  cfg = sw.config
  if sw.kind == "training":
    return f"{cfg.experiment}: final validation bits per byte"
  step = rows[0]["model_step"] if rows else "?"
  return (f"{cfg.model} (step {step}): {cfg.prompts} held-out prompts, "
          f"{cfg.continuation_bytes} bytes generated each")


def format_results(sw: Sweep, rows: Sequence[dict], plots: Sequence[str] = ()) -> str:
  """`results.md`: what was swept, the table of finished runs, links to the plots."""
  cfg = sw.config
  lines = [f"# Sweep `{sw.spec}`", ""]
  if sw.kind == "decoding":
    step = rows[0]["model_step"] if rows else "?"
    lines.append(
        f"Model `{cfg.model}` (step {step}); {cfg.prompts} held-out prompts of "
        f"{cfg.prompt_bytes} bytes from {cfg.data or 'its validation split'}, "
        f"{cfg.continuation_bytes} bytes generated each. bytes/s: the compiled generation "
        "loop after a warm-up run, the prompts' prefill timed apart (with prefill: the "
        "speed ratio of the whole decode); traffic: estimated bytes read per generated "
        "byte (bltjax estimate); agree w/ ar: outputs identical to AR's with the same "
        "sampling; bpb: bits per generated byte under the model read as AR. Ratios are "
        "against the AR "
        "run of the same batch size." + (" Compiled at the lowest XLA optimisation level."
                                         if cfg.fast_compile else ""))
    table = continuation.format_table(rows)
  else:
    lines.append(f"Experiment `{cfg.experiment}`"
                 + (f" with {', '.join(cfg.overrides)}" if cfg.overrides else "")
                 + "; one workdir per run in the sweep directory.")
    table = training_table(rows)
  lines += ["", f"{len(rows)} of {len(sw.runs)} runs finished.", "", table, ""]
  lines += [f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.basename(p)})"
            for p in plots]
  return "\n".join(lines) + "\n"


def _pyplot_free_figure(width: float, height: float):
  """A matplotlib Figure on the Agg canvas (no pyplot state, no display needed)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _series(rows: Sequence[dict]) -> dict[str, list[dict]]:
  batches = {r["batch_size"] for r in rows}
  groups: dict[str, list[dict]] = {}
  for r in rows:
    name = r["method"] if len(batches) == 1 else f"{r['method']} (batch {r['batch_size']})"
    groups.setdefault(name, []).append(r)
  return groups


def _quality_plot(rows: Sequence[dict], x_key: str, x_label: str, path: str, title: str,
                  log_threshold: float = 20.0) -> None:
  fig = _pyplot_free_figure(11, 4.4)
  fig.suptitle(title, fontsize=10)
  axes = fig.subplots(1, 2)
  xs = [r[x_key] for r in rows if r.get(x_key) and math.isfinite(r[x_key])]
  scale, unit = 1.0, ""
  if x_key == "traffic_per_byte" and xs:
    scale, unit = next((s, u) for s, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB"), (1, "B"))
                       if max(xs) >= s)
  for ax, (y_key, y_label) in zip(axes, (("bpb", "bits per generated byte (under AR)"),
                                         ("agreement", "agreement with AR"))):
    for name, group in _series(rows).items():
      points = sorted((r[x_key] / scale, r[y_key], r["label"]) for r in group
                      if r.get(y_key) is not None and math.isfinite(r[y_key])
                      and r.get(x_key) and math.isfinite(r[x_key]))
      if not points:
        continue
      ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=name,
              markersize=4, linewidth=1.2)
      details: dict[tuple, list[str]] = {}   # runs at one point share one note
      for x, y, text in points:
        if text.partition(" ")[2]:
          details.setdefault((x, y), []).append(text.partition(" ")[2])
      for (x, y), texts in details.items():
        ax.annotate("; ".join(texts), (x, y), fontsize=6, alpha=0.7, xytext=(3, 3),
                    textcoords="offset points")
    if xs and max(xs) / max(min(xs), 1e-12) > log_threshold:
      ax.set_xscale("log")
    ax.set_xlabel(x_label + (f" ({unit})" if unit else ""))
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
  axes[1].set_ylim(-0.05, 1.05)
  axes[0].legend(fontsize=8)
  fig.savefig(path, dpi=120)


def write_plots(kind: str, rows: Sequence[dict], workdir: str, title: str = "") -> list[str]:
  """PNG plots of the finished runs; [] (with a note) when matplotlib is missing."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print("bltjax sweep: matplotlib is not installed, no plots; pip install 'bltjax[plots]'")
    return []
  paths = []
  if kind == "decoding":
    for name, x_key, x_label in (
        (DECODING_PLOTS[0], "traffic_per_byte", "estimated traffic per generated byte"),
        (DECODING_PLOTS[1], "generation_bytes_per_s", "measured bytes/s (prefill apart)")):
      path = os.path.join(workdir, name)
      _quality_plot(rows, x_key, x_label, path, title)
      paths.append(path)
  else:
    path = os.path.join(workdir, TRAINING_PLOTS[0])
    fig = _pyplot_free_figure(max(4.0, 0.6 * len(rows) + 2), 3.8)
    fig.suptitle(title, fontsize=10)
    ax = fig.subplots()
    values = [r.get("valid_bpb") if r.get("valid_bpb") is not None else math.nan
              for r in rows]
    ax.bar(range(len(rows)), values)
    ax.set_xticks(range(len(rows)), [r["id"].rsplit("-", 1)[0] for r in rows], rotation=45,
                  ha="right", fontsize=7)
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=120)
    paths.append(path)
  return paths


def describe(sw: Sweep, finished: dict | None = None) -> str:
  """One line per run (id and settings), marking the finished ones: the dry run."""
  finished = finished or {}
  lines = [f"{len(sw.runs)} runs ({sw.kind})"
           + (f", {sw.duplicates} duplicate entries dropped" if sw.duplicates else "")]
  for run in sw.runs:
    mark = "done" if run.id in finished else "todo"
    settings = " ".join(f"{k}={v}" for k, v in run.settings.items())
    lines.append(f"  [{mark}] {run.id}  {settings}")
  return "\n".join(lines)


__all__ = ["Run", "Sweep", "SweepError", "SweepReport", "chain", "decoding_config", "describe",
           "fixed", "format_results", "load_sweep", "product", "read_results", "run_id",
           "run_sweep", "sweep", "training_config", "training_run_config", "write_plots",
           "zipit"]
