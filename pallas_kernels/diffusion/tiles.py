"""Which key blocks a query tile visits, and which query tiles a key block is seen by.

Per query tile of `bq` rows, the rows' first ranges cover key blocks `[lo_a, hi_a)` and
their second ranges `[lo_b, hi_b)` (blocks of `bk` keys; rows with an empty range do not
count). The kernels loop over exactly those blocks, so a BLT-D tile costs its window plus
its blocks, not the whole row. Two intervals that overlap (or touch one block from both
sides) are merged into the first, so no block is visited twice.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_BIG = jnp.iinfo(jnp.int32).max


def _block_interval(lo, hi, bq: int, bk: int):
  """lo, hi `[batch, Qp]` key ranges -> per tile `[batch, Qp/bq]` block interval."""
  b, qp = lo.shape
  nonempty = (hi > lo).reshape(b, qp // bq, bq)
  first = jnp.min(jnp.where(nonempty, lo.reshape(b, -1, bq), _BIG), axis=-1)
  last = jnp.max(jnp.where(nonempty, hi.reshape(b, -1, bq), 0), axis=-1)
  any_row = jnp.any(nonempty, axis=-1)
  start = jnp.where(any_row, first // bk, 0)
  stop = jnp.where(any_row, -(-last // bk), 0)
  return start, stop


def tile_bounds(ranges, *, bq: int, bk: int):
  """ranges (a0, a1, b0, b1) `[batch, Qp]` (Qp % bq == 0) -> `[batch, Qp/bq, 4]` int32:
  key-block intervals `[lo_a, hi_a)`, `[lo_b, hi_b)` of each query tile, disjoint."""
  a0, a1, b0, b1 = ranges
  lo_a, hi_a = _block_interval(a0, a1, bq, bk)
  lo_b, hi_b = _block_interval(b0, b1, bq, bk)
  both = (hi_a > lo_a) & (hi_b > lo_b)
  overlap = both & (lo_a <= hi_b) & (lo_b <= hi_a)
  only_b = (hi_a <= lo_a) & (hi_b > lo_b)
  merged_lo = jnp.where(overlap, jnp.minimum(lo_a, lo_b), jnp.where(only_b, lo_b, lo_a))
  merged_hi = jnp.where(overlap, jnp.maximum(hi_a, hi_b), jnp.where(only_b, hi_b, hi_a))
  second = ~overlap & ~only_b
  lo_b = jnp.where(second, lo_b, 0)
  hi_b = jnp.where(second, hi_b, 0)
  return jnp.stack([merged_lo, merged_hi, lo_b, hi_b], axis=-1).astype(jnp.int32)


def tile_touches(bounds, n_key_blocks: int):
  """`[batch, n_q_tiles, n_key_blocks]` bool: query tile i visits key block j."""
  j = jnp.arange(n_key_blocks, dtype=jnp.int32)[None, None]
  inside = lambda lo, hi: (j >= bounds[..., lo, None]) & (j < bounds[..., hi, None])
  return inside(0, 1) | inside(2, 3)


def true_span(mask, axis: int):
  """(first, stop) int32: the first index along `axis` where `mask` holds and one past
  the last; (0, 0) where it never does."""
  axis = axis % mask.ndim
  index = lax.broadcasted_iota(jnp.int32, mask.shape, axis)
  any_true = jnp.any(mask, axis=axis)
  first = jnp.where(any_true, jnp.min(jnp.where(mask, index, _BIG), axis=axis), 0)
  stop = jnp.where(any_true, jnp.max(jnp.where(mask, index + 1, 0), axis=axis), 0)
  return first, stop


def key_block_tiles(bounds, n_key_blocks: int):
  """`[batch, n_key_blocks, 4]` int32: two spans of query tiles `[f1, s1)`, `[f2, s2)` that
  hold every tile visiting each key block: its first to last visiting tile, split at the
  longest run of tiles that do not (BLT-D: a clean block's window tiles, then the noisy
  tiles far after them). Tiles inside a span that do not visit are skipped in the kernel."""
  touches = tile_touches(bounds, n_key_blocks)           # [B, nq, nk]
  i = jnp.arange(bounds.shape[1], dtype=jnp.int32)[None, :, None]
  first, stop = true_span(touches, axis=1)
  # The visiting tile before each tile, and the run of non-visiting tiles in between.
  last_seen = lax.cummax(jnp.where(touches, i, -1), axis=1)
  previous = jnp.pad(last_seen[:, :-1], [(0, 0), (1, 0), (0, 0)], constant_values=-1)
  gap = jnp.where(touches & (previous >= 0), i - previous - 1, 0)
  split = jnp.argmax(gap, axis=1)                        # [B, nk]: the first longest gap
  split_gap = jnp.take_along_axis(gap, split[:, None], axis=1)[:, 0]
  end_first = jnp.take_along_axis(previous, split[:, None], axis=1)[:, 0] + 1
  two = split_gap > 0
  spans = [first, jnp.where(two, end_first, stop), jnp.where(two, split, 0),
           jnp.where(two, stop, 0)]
  return jnp.stack(spans, axis=-1).astype(jnp.int32)


def occupancy(bounds, n_key_blocks: int) -> jnp.ndarray:
  """Fraction of the (query tile, key block) pairs the kernels compute: the work done
  relative to dense attention over the whole row."""
  return jnp.mean(tile_touches(bounds, n_key_blocks).astype(jnp.float32))
