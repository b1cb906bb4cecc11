"""Evaluation of a trained workdir: bits per byte on any data, per file and overall.

`bltjax eval --workdir W --data FILES` restores the params of W's latest checkpoint and
scores every file of FILES (the `data.train` syntax: comma-separated files, directories
and globs; text, JSONL or ArrayRecord) with the Trainer's own eval step, i.e. through
the objective's `eval_sums`, so any model kind the Trainer trains is evaluated the same
way. Each file is packed into rows of `seq_len` like validation data; the bytes counted
are the predicted targets (a document's bytes plus its end marker, and the next
document's start marker), every one of them: a BLT is given one patch per byte
(`objectives.scoring_objective`, as `Model.score`), whatever training's
`patcher.max_patches` or `--seq_len`. Overall bpb = total nats / total bytes / ln 2,
i.e. the byte-weighted mean of the per-file values. A file that holds no bytes (an empty
text file, JSONL of empty texts) is listed and not scored: its end markers alone would
give a bpb of nothing.

The report is printed as a table and written (by process 0) to
`<workdir>/eval/<name>.json`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import re
from typing import Sequence

import jax

from bltjax import checkpoint
from bltjax import configs
from bltjax import distributed
from bltjax import sharding
from bltjax import train
from bltjax.data import sources


class EvalError(ValueError):
  """A bad eval request (workdir, data or sizes). The message names the fix."""


@dataclasses.dataclass(frozen=True)
class FileResult:
  file: str
  bpb: float | None   # None: the file holds no bytes and is not scored
  bytes: int
  dropped_bytes: int = 0   # target bytes left unscored (none: eval scores every byte)


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Bits per byte of one workdir checkpoint on some data."""
  workdir: str
  step: int
  data: str
  seq_len: int
  batch_size: int
  max_batches: int | None
  files: tuple[FileResult, ...]
  bpb: float       # overall: all nats / all bytes / ln 2
  bytes: int
  dropped_bytes: int = 0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def default_name(data: str) -> str:
  """A file name for a data spec: the base names of its items, e.g. `heapq+notes`."""
  parts = []
  for item in (p.strip() for p in data.split(",") if p.strip()):
    base = os.path.basename(os.path.normpath(os.path.expanduser(item)))
    keep = glob.has_magic(base) or os.path.isdir(item)
    parts.append(base if keep else os.path.splitext(base)[0])
  name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", "+".join(parts)).strip("._")
  return name[:80] or "eval"


def expand_files(data: str) -> list[str]:
  """The files of a data spec, in order. Raises EvalError when an item matches nothing."""
  if not data.strip():
    raise EvalError("--data is empty; pass files, directories or globs (comma-separated)")
  try:
    files = sources.expand_paths(data)
  except sources.DataError as e:
    raise EvalError(str(e).replace("data.train and data.valid take", "--data takes")) from None
  for path in files:
    if "," in path:
      raise EvalError(f"file {path!r} has a comma in its name, which the data syntax "
                      "splits on; rename or link it")
  return files


def content_bytes(path: str, data_cfg) -> int:
  """The document bytes of one file as `data_cfg` reads it (0: nothing to score).

  Raises:
    EvalError: the file cannot be read as that format.
  """
  try:
    source = sources.open_source(glob.escape(path), format=data_cfg.format,
                                 text_field=data_cfg.text_field, require_documents=False)
  except sources.DataError as e:
    raise EvalError(str(e)) from None
  return int(source.lengths.sum())


def eval_config(workdir: str, *, seq_len: int | None = None, batch_size: int | None = None,
                overrides: Sequence[str] = ()):
  """The workdir's config with `--config.*` overrides and the eval sizes applied."""
  config = configs.apply_overrides(checkpoint.read_config(workdir), overrides)
  if seq_len is not None:
    if seq_len < 2:
      raise EvalError(f"--seq_len={seq_len} must be >= 2")
    configs.set_value(config, "train.seq_len", int(seq_len))
  if batch_size is not None:
    if batch_size < 1:
      raise EvalError(f"--batch_size={batch_size} must be >= 1")
    configs.set_value(config, "train.batch_size", int(batch_size))
  return config


def evaluate_workdir(workdir: str, data: str, *, seq_len: int | None = None,
                     batch_size: int | None = None, max_batches: int | None = None,
                     overrides: Sequence[str] = (), step: int | None = None,
                     devices=None) -> EvalResult:
  """Bits per byte of `workdir`'s latest (or given) checkpoint on each file of `data`.

  Args:
    workdir: a `bltjax train` workdir (config.json and checkpoints/).
    data: comma-separated files, directories and globs (text, JSONL, ArrayRecord; the
      format and JSONL field follow the workdir's `config.data`, or overrides).
    seq_len: bytes per row (default: the training `train.seq_len`).
    batch_size: global rows per eval step (default: `train.batch_size`); must divide
      over the mesh's batch shards and the processes.
    max_batches: at most this many batches per file (default: all of each file).
    overrides: `--config.section.key=value` strings (e.g. another `mesh`).
    step: a checkpoint step (default: the latest).
    devices: the devices of the mesh (default: all).

  Raises:
    EvalError, FileNotFoundError: no such workdir or checkpoint, data matching nothing,
      or sizes the mesh cannot split.
  """
  if max_batches is not None and max_batches < 1:
    raise EvalError(f"--max_batches={max_batches} must be >= 1")
  why = checkpoint.not_a_directory(workdir)
  if why:
    raise EvalError(f"workdir {workdir!r} {why}; pass the --workdir of a `bltjax train` run")
  files = expand_files(data)
  config = eval_config(workdir, seq_len=seq_len, batch_size=batch_size, overrides=overrides)
  sizes = {path: content_bytes(path, config.data) for path in files}
  if not any(sizes.values()):
    raise EvalError(f"every file of --data {data!r} is empty (no document bytes); pass "
                    "files with text to score")
  try:
    checkpoint.require_checkpoints(workdir)
  except FileNotFoundError as e:
    raise EvalError(str(e)) from None
  try:
    trainer = train.Trainer(config, workdir, devices, score_every_byte=True)
  except sharding.ShardingError as e:
    raise EvalError(f"{e} (for bltjax eval: pass --batch_size or --config.mesh.*)") from None
  distributed.barrier("bltjax/eval_start")   # before the checkpoint's first collective
  params, step = checkpoint.load_params(workdir, trainer.abstract_state.params, step=step)
  trainer.compile_steps(train_step=False)

  results = []
  for path in files:
    if not sizes[path]:
      results.append(FileResult(path, None, 0))
      continue
    data_cfg = config.data.copy_and_resolve_references()
    with data_cfg.unlocked():
      data_cfg.valid = glob.escape(path)
    sums = trainer.evaluate(params, max_batches, data_cfg=data_cfg)
    results.append(FileResult(path, float(sums["bpb"]), int(round(sums["bytes"])),
                              int(round(sums["dropped_bytes"]))))
  total = sum(r.bytes for r in results)
  overall = sum(r.bpb * r.bytes for r in results if r.bytes) / total if total else math.nan
  return EvalResult(workdir=workdir, step=int(step), data=data, seq_len=config.train.seq_len,
                    batch_size=config.train.batch_size, max_batches=max_batches,
                    files=tuple(results), bpb=overall, bytes=total,
                    dropped_bytes=sum(r.dropped_bytes for r in results))


def format_table(result: EvalResult) -> str:
  """A plain-text table: one row per file, then the overall row."""
  rows = [(r.file, "empty" if r.bpb is None else f"{r.bpb:.4f}", str(r.bytes))
          for r in result.files]
  rows.append(("overall", f"{result.bpb:.4f}", str(result.bytes)))
  width = max(len("file"), *(len(r[0]) for r in rows))
  lines = [f"bits per byte of {result.workdir} at step {result.step} "
           f"(seq_len {result.seq_len}, batch {result.batch_size}"
           + (f", at most {result.max_batches} batches per file)" if result.max_batches
              else ")"),
           f"{'file':<{width}}  {'bpb':>8}  {'bytes':>12}",
           f"{'-' * width}  {'-' * 8}  {'-' * 12}"]
  for i, (name, bpb, n) in enumerate(rows):
    if i == len(rows) - 1:
      lines.append(f"{'-' * width}  {'-' * 8}  {'-' * 12}")
    lines.append(f"{name:<{width}}  {bpb:>8}  {n:>12}")
  if result.dropped_bytes:
    lines.append(f"{result.dropped_bytes} target bytes could not be scored and are not in "
                 "bpb or bytes")
  return "\n".join(lines)


def check_name(name: str) -> str:
  if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name.startswith("."):
    raise EvalError(f"--name {name!r} must be a plain file name (letters, digits, _.+-)")
  return name


VALIDATION_SPLIT = "the validation split"   # a report's `data` when no --data was given


def _data_id(data: str) -> str:
  """What a report's `data` names, comparable across spellings: its items as absolute
  paths."""
  if data == VALIDATION_SPLIT:
    return data
  return ",".join(os.path.abspath(os.path.expanduser(item.strip()))
                  for item in data.split(",") if item.strip())


def write_report(workdir: str, report: dict, name: str | None = None) -> str:
  """Writes `report` (with `data` and `step`) to `<workdir>/eval/<name>.json` (process 0
  only); returns its path.

  Without a name: the data's base names and the step, `heapq+notes_step400` (or
  `valid_step400` for the validation split). Should that file hold the report of other
  data (`x/notes.txt` then `y/notes.txt`), a hash of this data's paths is added to the
  name: a default name never replaces the report of other data or another step."""
  if name is None:
    data = report["data"]
    name = (default_name(data) if data != VALIDATION_SPLIT else "valid") + \
        f"_step{report['step']}"
    existing = os.path.join(workdir, "eval", name + ".json")
    if os.path.exists(existing):
      with open(existing, encoding="utf-8") as f:
        other = json.load(f).get("data", "")
      if _data_id(other) != _data_id(data):
        name += "_" + hashlib.sha256(_data_id(data).encode()).hexdigest()[:8]
  path = os.path.join(workdir, "eval", check_name(name) + ".json")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
      f.write("\n")
    os.replace(path + ".tmp", path)
  return path
