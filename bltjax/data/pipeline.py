"""Grain pipelines: the batch of each training step, and eval batches.

Training: the rows of one epoch (packing.py) are shuffled by a permutation that depends
on (seed, epoch) only, and epochs follow one another, giving an endless row order. The
global batch of step s is rows `[s*G, (s+1)*G)` of that order and process p takes rows
`[p*b, (p+1)*b)` of it, `b = G // process_count`. So the batch of step s is a pure
function of (seed, s, data): resume is exact, on any number of processes. A mixture
(`data.train_weights`) gives each source its own endless order and a fixed share of
every global batch (`config.rows_per_source`), the sources' rows one after the other.

A batch is a dict of int32 numpy arrays, each `[b, seq_len]`: `inputs`, `targets`,
`segment_ids` (see packing.py; the loss mask is `targets != PAD_ID`).

The training iterator's state is grain's `{"next_index": step}`: the next step it yields.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Sequence

import grain
import numpy as np
from grain.experimental import index_shuffle

from bltjax.data.config import (check_data_config, mixture_weights, rows_per_source,
                                train_specs)
from bltjax.data.packing import PADDING_ROW, PackedRows
from bltjax.data.sources import DataError, DocumentSource
from bltjax.data.splits import split_source, split_sources


def epoch_seed(seed: int, epoch: int, source: int = 0) -> int:
  """The 32-bit seed of one epoch's permutation of a source's rows, from the run seed,
  the epoch and the source's index in a mixture."""
  key = f"bltjax-epoch:{seed}:{epoch}" + (f":{source}" if source else "")
  digest = hashlib.sha256(key.encode()).digest()
  return int.from_bytes(digest[:4], "little")


def local_batch_size(global_batch: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} is not in [0, process_count="
                    f"{process_count})")
  if global_batch < 1 or global_batch % process_count:
    raise DataError(f"global batch {global_batch} is not a positive multiple of the "
                    f"process count {process_count}; set config.train.batch_size to a "
                    "multiple of it")
  return global_batch // process_count


class StepBatch:
  """Step s -> the process-local batch of step s (a picklable map function).

  `rows` is one source's PackedRows, or a mixture's list with `rows_per_source` (the
  rows each takes in a global batch, default all of it for one source). Each source
  has its own endless order (epochs reshuffled); the global batch of step s is rows
  `[s*n_i, (s+1)*n_i)` of source i's order, sources one after the other.
  """

  def __init__(self, rows: PackedRows | Sequence[PackedRows], *, seed: int,
               global_batch: int, process_index: int, process_count: int,
               rows_per_source: Sequence[int] | None = None):
    self.sources = [rows] if isinstance(rows, PackedRows) else list(rows)
    self.rows_per_source = list(rows_per_source or [global_batch])
    if len(self.rows_per_source) != len(self.sources) or sum(self.rows_per_source) != \
        global_batch:
      raise DataError(f"rows_per_source {self.rows_per_source} must give each of the "
                      f"{len(self.sources)} source(s) a share of the {global_batch} rows")
    for source in self.sources:
      if source.num_rows == 0:
        raise DataError("a training source has no documents; check config.data.train")
    self.seed = seed
    self.global_batch = global_batch
    self.local_batch = local_batch_size(global_batch, process_index, process_count)
    self.process_index = process_index

  def source_rows(self, step: int) -> list[tuple[int, int]]:
    """(source index, packed-row index) of this process's part of step `step`, `[b]`."""
    first_of_source = np.cumsum([0] + self.rows_per_source)   # in the global batch
    picked = []
    first = self.process_index * self.local_batch
    for global_row in range(first, first + self.local_batch):
      source = int(np.searchsorted(first_of_source, global_row, side="right")) - 1
      rows, count = self.sources[source], self.rows_per_source[source]
      position = step * count + global_row - int(first_of_source[source])
      epoch, within = divmod(position, rows.num_rows)
      picked.append((source, index_shuffle(within, max_index=rows.num_rows - 1,
                                           seed=epoch_seed(self.seed, epoch, source),
                                           rounds=4)))
    return picked

  def row_indices(self, step: int) -> list[int]:
    """The packed-row indices of this process's part of step `step` (one source), `[b]`."""
    return [row for _, row in self.source_rows(step)]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    picked = self.source_rows(int(step))   # in source order
    parts = [self.sources[source].rows([row for s, row in picked if s == source])
             for source in sorted({s for s, _ in picked})]
    return parts[0] if len(parts) == 1 else {
        key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def mixture_rows(data_cfg, global_batch: int) -> list[int] | None:
  """Rows per global batch of each source of a `data.train` mixture; None for one source."""
  if len(train_specs(data_cfg)) < 2:
    return None
  return rows_per_source(global_batch, mixture_weights(data_cfg))


def train_dataset(data_cfg, *, seq_len: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Element s = this process's batch of training step s (endless; epochs reshuffled).

  Returns:
    A `grain.MapDataset` of dicts `inputs`, `targets`, `segment_ids`, each
    `[global_batch // process_count, seq_len]` int32.

  Raises:
    DataError: bad data, or a global batch that process_count does not divide.
  """
  check_data_config(data_cfg)
  sources = split_sources(data_cfg, "train")
  counts = mixture_rows(data_cfg, global_batch)
  step_batch = StepBatch([PackedRows(source, seq_len) for source in sources], seed=seed,
                         global_batch=global_batch, process_index=process_index,
                         process_count=process_count, rows_per_source=counts)
  return grain.MapDataset.range(sys.maxsize).map(step_batch)


def _read_options(prefetch: int, read_threads: int) -> grain.ReadOptions:
  if prefetch < 0 or read_threads < 0:
    raise DataError("prefetch and read_threads must be >= 0")
  return grain.ReadOptions(num_threads=read_threads if prefetch else 0,
                           prefetch_buffer_size=prefetch if read_threads else 0)


def train_iterator(dataset: grain.MapDataset, start_step: int = 0, *, prefetch: int = 4,
                   read_threads: int = 1) -> grain.DatasetIterator:
  """A checkpointable iterator over `dataset` whose first batch is that of `start_step`.

  Pass `prefetch=config.data.prefetch, read_threads=config.data.read_threads`. Its
  state (`get_state()`, or `grain.checkpoint.CheckpointSave/Restore` in an orbax
  CheckpointManager) is `{"next_index": next step}`.
  """
  iterator = iter(dataset.to_iter_dataset(_read_options(prefetch, read_threads)))
  if start_step:
    iterator.set_state({"next_index": int(start_step)})
  return iterator


class EvalBatches:
  """Iterator over the process-local batches of one pass over a split, in row order.

  `len()` is the number of batches (every process gets the same number); `num_rows` the
  real rows. Rows past the split's end are all padding (segment_ids 0, targets 0).
  """

  def __init__(self, rows: PackedRows, *, global_batch: int, process_index: int,
               process_count: int, max_batches: int | None, read_options: grain.ReadOptions):
    self.rows = rows
    self.num_rows = rows.num_rows
    self.local_batch = local_batch_size(global_batch, process_index, process_count)
    self.global_batch = global_batch
    self.process_index = process_index
    num_batches = -(-rows.num_rows // global_batch)
    if max_batches is not None:
      num_batches = min(num_batches, max_batches)
    self.num_batches = num_batches
    dataset = grain.MapDataset.range(num_batches).map(self.batch)
    self._iterator = iter(dataset.to_iter_dataset(read_options))

  def batch(self, step: int) -> dict[str, np.ndarray]:
    first = int(step) * self.global_batch + self.process_index * self.local_batch
    indices = [i if i < self.num_rows else PADDING_ROW
               for i in range(first, first + self.local_batch)]
    return self.rows.rows(indices)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)


def eval_batches(data_cfg, *, split: str = "valid", seq_len: int, global_batch: int,
                 process_index: int = 0, process_count: int = 1,
                 max_batches: int | None = None,
                 documents: DocumentSource | None = None) -> EvalBatches:
  """Process-local batches covering every row of `split` exactly once, in order.

  The global batch of eval step s is rows `[s*G, (s+1)*G)` (the last one filled up with
  all-padding rows); process p takes rows `[p*b, (p+1)*b)` of it. `max_batches` stops
  early. `documents` replaces `split`'s (e.g. one source of a mixture's
  `split_sources`, opened once by the caller). Same dict format as `train_dataset`.
  """
  check_data_config(data_cfg)
  if documents is None:
    documents = split_source(data_cfg, split)
  rows = PackedRows(documents, seq_len)
  return EvalBatches(rows, global_batch=global_batch, process_index=process_index,
                     process_count=process_count, max_batches=max_batches,
                     read_options=_read_options(data_cfg.prefetch, data_cfg.read_threads))
