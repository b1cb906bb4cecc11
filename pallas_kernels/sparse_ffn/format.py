"""Sparsity metadata shared by the GPU and TPU kernels (small XLA ops on flag arrays).

The kernels never see a dense mask. They see, per token tile of `tm` rows, the ascending
list of the *active* hidden units (columns of h with any nonzero in the tile) -- the TwELL
idea (a per-tile list of nonzero columns, produced from the up projection's output) with a
token tile instead of a single token, so that the down projection still runs on tensor
cores / the MXU:

  cnt[i]        number of active entries of token tile i
  ids[i, :cnt]  their ids, ascending; entries past cnt repeat the last valid id (0 if none),
                so a kernel can read a whole chunk and a repeated write is idempotent.

On GPU an entry is one hidden unit (column granularity); on TPU it is one block of `bk`
contiguous hidden units (block granularity: TPU cannot gather rows inside a kernel
cheaply). The backward weight-gradient kernels use the transposed view: per block of
hidden units, the list of token tiles where it is active.

TPU kernels walk a flattened work list (megablox style): one grid step per active
(row, id) pair, with a dynamic grid size, so that inactive pairs cost no grid step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def compact_rows(flags, pad_to: int = 1):
  """Per row of a bool matrix [n, m]: (cnt [n] int32, ids [n, round_up(m, pad_to)] int32).

  ids[r, :cnt[r]] are the indices of the true entries of row r, ascending; later entries
  repeat the last valid index (0 when the row is empty).
  """
  n, m = flags.shape
  width = round_up(m, pad_to)
  f = flags.astype(jnp.int32)
  cnt = jnp.sum(f, axis=1, dtype=jnp.int32)
  pos = jnp.cumsum(f, axis=1, dtype=jnp.int32) - 1
  tgt = jnp.where(flags, pos, width)  # out of range -> dropped
  rows = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, m))
  vals = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32)[None, :], (n, m))
  ids = jnp.zeros((n, width), jnp.int32).at[rows, tgt].set(vals, mode="drop")
  last = jnp.take_along_axis(ids, jnp.maximum(cnt - 1, 0)[:, None], axis=1)
  ids = jnp.where(jnp.arange(width, dtype=jnp.int32)[None, :] < cnt[:, None], ids, last)
  return cnt, ids


class WorkList(NamedTuple):
  """Flattened (row, id) steps for a TPU kernel with a dynamic grid.

  steps: [S] int32, S static = n * width; the first `num` entries are the grid. Each is
  packed (one SMEM word per step: scalar memory is small) as
  row << ROW_SHIFT | id << ID_SHIFT | flags, flags bit 0 (VALID) = compute this step,
  bit 1 (FIRST) = first step of its row (zero the accumulator), bit 2 (LAST) = last step
  of its row (write the output). num: [] int32, >= 1.
  """
  steps: jax.Array
  num: jax.Array

  @property
  def row(self):
    return self.steps >> ROW_SHIFT

  @property
  def col(self):
    return (self.steps >> ID_SHIFT) & ID_MASK

  @property
  def flags(self):
    return self.steps & FLAG_MASK


VALID, FIRST, LAST = 1, 2, 4
FLAG_MASK, ID_SHIFT, ID_MASK, ROW_SHIFT = 7, 3, (1 << 13) - 1, 16


def work_list(cnt, ids, *, include_empty: bool) -> WorkList:
  """Flatten per-row lists into steps. include_empty: rows with cnt 0 get one step with
  VALID unset (so their output block is still written, with zeros)."""
  n, width = ids.shape
  if n > (1 << 15) or width > ID_MASK + 1:
    raise ValueError(f"work list too large to pack: {n} rows x {width} ids")
  steps = jnp.maximum(cnt, 1) if include_empty else cnt
  ends = jnp.cumsum(steps, dtype=jnp.int32)
  starts = ends - steps
  total = ends[-1]
  size = n * width
  mark = jnp.full((size,), -1, jnp.int32).at[starts].max(
      jnp.arange(n, dtype=jnp.int32), mode="drop")
  row = jnp.maximum(jax.lax.cummax(mark, axis=0), 0)
  s = jnp.arange(size, dtype=jnp.int32)
  t = s - starts[row]
  valid = (t < cnt[row]) & (s < total)
  col = jnp.take_along_axis(ids[row], jnp.clip(t, 0, width - 1)[:, None], axis=1)[:, 0]
  first = t == 0
  last = t == steps[row] - 1
  fl = (valid.astype(jnp.int32) * VALID + first.astype(jnp.int32) * FIRST
        + last.astype(jnp.int32) * LAST)
  packed = (row << ROW_SHIFT) | (col << ID_SHIFT) | fl
  return WorkList(packed, jnp.maximum(total, 1).astype(jnp.int32))


def column_flags_tokmajor(h, tm: int):
  """h [T, F] (T % tm == 0) -> [T/tm, F] bool: column f has a nonzero in token tile i."""
  t, f = h.shape
  return jnp.any(h.reshape(t // tm, tm, f) != 0, axis=1)


def column_flags_neuronmajor(h_t, tm: int):
  """hT [F, T] (T % tm == 0) -> [T/tm, F] bool (same flags as column_flags_tokmajor(hT.T))."""
  f, t = h_t.shape
  return jnp.any(h_t.reshape(f, t // tm, tm) != 0, axis=2).T


def block_flags(col_flags, bk: int):
  """[nT, F] column flags -> [nT, F/bk] block flags (F % bk == 0)."""
  n, f = col_flags.shape
  return jnp.any(col_flags.reshape(n, f // bk, bk), axis=2)


def neuron_order(nonzero_counts):
  """A permutation of the hidden units, most often active first (stable).

  Applying it to the FFN weights (`permute_ffn_weights`) leaves the function unchanged and
  groups rarely active units together, which is what makes token-tile / block skipping
  pay (see twell_pallas.md 4.3). `nonzero_counts` [d_ff]: activations counted on data.
  """
  return jnp.argsort(-jnp.asarray(nonzero_counts), stable=True)


def permute_ffn_weights(w_up, w_down, perm):
  """Reorder the hidden units: w_up[:, perm], w_down[perm, :] (same FFN function)."""
  return w_up[:, perm], w_down[perm, :]
