"""Grain pipelines: the batch of each training step, and eval batches.

Training: the rows of one epoch (packing.py) are shuffled by a permutation that depends
on (seed, epoch) only, and epochs follow one another, giving an endless row order. The
global batch of step s is rows `[s*G, (s+1)*G)` of that order and process p takes rows
`[p*b, (p+1)*b)` of it, `b = G // process_count`. So the batch of step s is a pure
function of (seed, s, data): resume is exact, on any number of processes.

A batch is a dict of int32 numpy arrays, each `[b, seq_len]`: `inputs`, `targets`,
`segment_ids` (see packing.py; the loss mask is `targets != PAD_ID`).

The training iterator's state is grain's `{"next_index": step}`: the next step it yields.
"""

from __future__ import annotations

import hashlib
import sys

import grain
import numpy as np
from grain.experimental import index_shuffle

from bltjax.data.config import check_data_config
from bltjax.data.packing import PADDING_ROW, PackedRows
from bltjax.data.sources import DataError
from bltjax.data.splits import split_source


def epoch_seed(seed: int, epoch: int) -> int:
  """The 32-bit seed of one epoch's permutation, from the run seed and the epoch."""
  digest = hashlib.sha256(f"bltjax-epoch:{seed}:{epoch}".encode()).digest()
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
  """Step s -> the process-local batch of step s (a picklable map function)."""

  def __init__(self, rows: PackedRows, *, seed: int, global_batch: int,
               process_index: int, process_count: int):
    self.rows = rows
    self.seed = seed
    self.global_batch = global_batch
    self.local_batch = local_batch_size(global_batch, process_index, process_count)
    self.process_index = process_index

  def row_indices(self, step: int) -> list[int]:
    """The packed-row indices of this process's part of step `step`, `[b]`."""
    num_rows = self.rows.num_rows
    first = step * self.global_batch + self.process_index * self.local_batch
    indices = []
    for position in range(first, first + self.local_batch):
      epoch, within = divmod(position, num_rows)
      indices.append(index_shuffle(within, max_index=num_rows - 1,
                                   seed=epoch_seed(self.seed, epoch), rounds=4))
    return indices

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    return self.rows.rows(self.row_indices(int(step)))


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
  step_batch = StepBatch(PackedRows(split_source(data_cfg, "train"), seq_len), seed=seed,
                         global_batch=global_batch, process_index=process_index,
                         process_count=process_count)
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
                 max_batches: int | None = None) -> EvalBatches:
  """Process-local batches covering every row of `split` exactly once, in order.

  The global batch of eval step s is rows `[s*G, (s+1)*G)` (the last one filled up with
  all-padding rows); process p takes rows `[p*b, (p+1)*b)` of it. `max_batches` stops
  early. Same dict format as `train_dataset`.
  """
  check_data_config(data_cfg)
  rows = PackedRows(split_source(data_cfg, split), seq_len)
  return EvalBatches(rows, global_batch=global_batch, process_index=process_index,
                     process_count=process_count, max_batches=max_batches,
                     read_options=_read_options(data_cfg.prefetch, data_cfg.read_threads))
