"""Pallas kernels of range attention (flash attention over two key ranges per query row).

One kernel body per pass serves both backends; `gpu` lowers through Triton, `tpu` through
Mosaic. Layout: heads-major `[batch, heads, len, head_dim]`. A tile's own rows are
BlockSpec blocks; the operand a pass loops over (key/value blocks in `forward` and `dq`,
query tiles in `dkv`) is streamed by `streaming.block_loop`, one visited block at a time: on TPU
the operand stays in HBM and each block is DMA'd into a double-buffered VMEM slot, so
VMEM holds a few blocks whatever the row length; on GPU the kernel reads the blocks of
the row in place (Triton loads from global memory). Ranges come as four `[batch, Qp, 1]`
int32 arrays (no lane slicing in the kernel).

* `forward`  (batch, heads, Qp/bq): online softmax over the key blocks `tiles.tile_bounds`
             gives the tile; writes out and the row log-sum-exp.
* `dq`       (batch, heads, Qp/bq): dq = sum_k (p * (do v^T - delta)) k, same blocks.
* `dkv`      (batch, heads, Kp/bk): dk, dv of one key block, looping over the query tiles
             `tiles.key_block_tiles` gives it (two spans), skipping those that do not
             visit it; per query head (f32), summed over a kv head's group by the caller.
             Scores are transposed (`[bk, bq]`), so a query tile's per-row inputs (lse,
             delta, ranges) come as lane-major rows, packed in one `[8, bq]` block
             (`row_stats`): a visited tile streams q, do and that block.

Block intervals are read as scalars: scalar prefetch (SMEM) on TPU, a GMEM input on GPU
(Triton has no scalar prefetch). Rows that see no key get out = 0 and lse = 0.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import backends
from . import streaming
from .streaming import kv_group

_NEG = -1e30
_NT = (((1,), (1,)), ((), ()))   # a @ b^T


@dataclasses.dataclass(frozen=True)
class Tiles:
  backend: str             # "gpu" | "tpu"
  bq: int = 64             # query rows per tile
  bk: int = 64             # keys per block
  num_warps: int = 4       # GPU only
  num_stages: int = 2      # GPU only
  interpret: Any = False

  def check(self, dtype):
    if self.backend == "gpu":
      for name, v in (("bq", self.bq), ("bk", self.bk)):
        if v < 16 or v & (v - 1):
          raise ValueError(f"GPU tile {name}={v} must be a power of 2 >= 16 (Triton)")
    else:
      sub = 16 if jnp.dtype(dtype).itemsize == 2 else 8
      if self.bq < sub or self.bk < sub or self.bq % sub or self.bk % sub:
        raise ValueError(f"TPU tiles bq and bk must be positive multiples of {sub}, got "
                         f"bq={self.bq}, bk={self.bk}")


def _keys(k0, bk, axis: int):
  """Key indices k0 .. k0 + bk - 1 as a `[1, bk]` row (axis 1) or `[bk, 1]` column (0)."""
  return k0 + lax.broadcasted_iota(jnp.int32, (bk, 1) if axis == 0 else (1, bk), axis)


def _visible(a0, a1, b0, b1, key):
  """Ranges and keys that broadcast (`[bq, 1]` ranges and a `[1, bk]` key row, or `[1, bq]`
  range rows and a `[bk, 1]` key column) -> bool: the key lies in a range."""
  return ((key >= a0) & (key < a1)) | ((key >= b0) & (key < b1))


def _scores(a, b, scale):
  """a @ b^T * scale, f32 (q against keys, or keys against q for transposed scores)."""
  return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32) * scale


def _intervals(bounds_ref, b, i, n_q_tiles):
  base = (b * n_q_tiles + i) * 4
  return [bounds_ref[base + c] for c in range(4)]


# --------------------------------------------------------------------------- online softmax


def online_softmax_init(rows: int, d: int):
  """(running max [rows, 1], running sum [rows, 1], output accumulator [rows, d]), f32."""
  return (jnp.full((rows, 1), _NEG, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros((rows, d), jnp.float32))


def online_softmax_step(carry, s, vis, pv):
  """Folds one block of scores s `[rows, bk]` (f32; only `vis` entries count) into the
  carry; `pv(p)` is p `[rows, bk]` (f32) times the block's values, `[rows, d]` f32."""
  m, l, acc = carry
  s = jnp.where(vis, s, _NEG)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
  corr = jnp.exp(m - m_new)
  return m_new, l * corr + jnp.sum(p, axis=1, keepdims=True), acc * corr + pv(p)


def online_softmax_finish(carry):
  """-> (output `[rows, d]` f32, row log-sum-exp `[rows, 1]`); rows that saw no key: 0."""
  m, l, acc = carry
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  return jnp.where(seen, acc / l_safe, 0.0), jnp.where(seen, m + jnp.log(l_safe), 0.0)


# --------------------------------------------------------------------------- visited blocks


def _two_intervals(lo_a, hi_a, lo_b, hi_b):
  """(count, index_of): the indices of `[lo_a, hi_a)` then `[lo_b, hi_b)`, as t = 0, 1..."""
  n_a = hi_a - lo_a
  return n_a + (hi_b - lo_b), lambda t: jnp.where(t < n_a, lo_a + t, lo_b + (t - n_a))


def _key_sources(k_ref, v_ref, bk, backend, rep):
  """Ref views of key/value block j of the current (batch, kv head)."""
  b, g = pl.program_id(0), kv_group(pl.program_id(1), rep)
  rows = [streaming.row(ref, backend, b, g) for ref in (k_ref, v_ref)]
  return [lambda j, r=r: r.at[pl.ds(pl.multiple_of(j * bk, bk), bk), :] for r in rows]


# --------------------------------------------------------------------------- forward


def _fwd_kernel(bounds_ref, q_ref, k_ref, v_ref, a0_ref, a1_ref, b0_ref, b1_ref,
                o_ref, lse_ref, *scratch, bk, scale, n_q_tiles, backend, rep):
  n, block_of = _two_intervals(
      *_intervals(bounds_ref, pl.program_id(0), pl.program_id(2), n_q_tiles))
  q = q_ref[...]
  ranges = (a0_ref[...], a1_ref[...], b0_ref[...], b1_ref[...])

  def body(t, views, carry):
    kb, vb = (view[...] for view in views)
    return online_softmax_step(
        carry, _scores(q, kb, scale), _visible(*ranges, _keys(block_of(t) * bk, bk, axis=1)),
        lambda p: jnp.dot(p.astype(vb.dtype), vb, preferred_element_type=jnp.float32))

  carry = streaming.block_loop(n, block_of, _key_sources(k_ref, v_ref, bk, backend, rep),
                               scratch, body, online_softmax_init(*q.shape))
  out, lse = online_softmax_finish(carry)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


# --------------------------------------------------------------------------- dq


def _dq_kernel(bounds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               a0_ref, a1_ref, b0_ref, b1_ref, dq_ref, *scratch, bk, scale, n_q_tiles,
               backend, rep):
  n, block_of = _two_intervals(
      *_intervals(bounds_ref, pl.program_id(0), pl.program_id(2), n_q_tiles))
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  ranges = (a0_ref[...], a1_ref[...], b0_ref[...], b1_ref[...])

  def body(t, views, dq):
    kb, vb = (view[...] for view in views)
    vis = _visible(*ranges, _keys(block_of(t) * bk, bk, axis=1))
    p = jnp.where(vis, jnp.exp(_scores(q, kb, scale) - lse), 0.0)
    dp = lax.dot_general(do, vb, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta)
    return dq + jnp.dot(ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)

  dq = streaming.block_loop(n, block_of, _key_sources(k_ref, v_ref, bk, backend, rep),
                            scratch, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# --------------------------------------------------------------------------- dk, dv


ROW_STATS = 8   # rows of `row_stats`: a TPU float32 tile's sublanes


def row_stats(lse, delta, ranges):
  """lse, delta `[B, H, Qp, 1]` f32 and ranges 4 x `[B, Qp, 1]` int32 -> `[B, H, 8, Qp]`
  f32: rows lse, delta, a0, a1, b0, b1 (bit patterns of the int32 ranges), then zeros.
  dk/dv reads a query tile's rows as one `[8, bq]` block (one TPU tile, one DMA) where
  columns would take six `[bq, 1]` blocks, each padded to 128 lanes."""
  b, heads, qp, _ = lse.shape
  as_rows = lambda r: jnp.broadcast_to(
      lax.bitcast_convert_type(r[:, None, :, 0], jnp.float32), (b, heads, qp))
  rows = [lse[..., 0], delta[..., 0], *map(as_rows, ranges)]
  rows += [jnp.zeros((b, heads, qp), jnp.float32)] * (ROW_STATS - len(rows))
  return jnp.stack(rows, axis=2)


def _row(block, r: int):
  """Row r of a `[rows, n]` value as `[1, n]`, bit-exact (Triton takes no value slices,
  nor a second index into a ref view: a masked sum over the rows)."""
  rows = lax.broadcasted_iota(jnp.int32, block.shape, 0)
  return jnp.sum(jnp.where(rows == r, block, jnp.zeros_like(block)), axis=0, keepdims=True)


def _dkv_kernel(bounds_ref, qtiles_ref, q_ref, k_ref, v_ref, do_ref, stats_ref,
                dk_ref, dv_ref, *scratch, bq, bk, scale, n_q_tiles, n_k_blocks, backend):
  b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kb, vb = k_ref[...], v_ref[...]
  key = _keys(j * bk, bk, axis=0)                                   # [bk, 1]
  qt = (b * n_k_blocks + j) * 4
  n, tile_of = _two_intervals(*[qtiles_ref[qt + c] for c in range(4)])
  q_row, do_row, stats = (streaming.row(ref, backend, b, h)
                          for ref in (q_ref, do_ref, stats_ref))
  tile = lambda i: pl.ds(pl.multiple_of(i * bq, bq), bq)
  sources = [lambda i: q_row.at[tile(i), :], lambda i: do_row.at[tile(i), :],
             lambda i: stats.at[:, tile(i)]]

  def visit(views, carry):
    dk, dv = carry
    q_view, do_view, stats_view = views
    q, do, stats_f32 = q_view[...], do_view[...], stats_view[...]
    stats_i32 = lax.bitcast_convert_type(stats_f32, jnp.int32)
    lse, delta = _row(stats_f32, 0), _row(stats_f32, 1)             # [1, bq]
    ranges = [_row(stats_i32, r) for r in range(2, 6)]
    # Transposed: p^T, dp^T, ds^T are [bk, bq], so dv = p^T do and dk = ds^T q.
    p = jnp.where(_visible(*ranges, key), jnp.exp(_scores(kb, q, scale) - lse), 0.0)
    dv = dv + jnp.dot(p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    ds = p * (_scores(vb, do, 1.0) - delta)
    dk = dk + jnp.dot(ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
    return dk, dv

  def body(t, views, carry):
    lo_a, hi_a, lo_b, hi_b = _intervals(bounds_ref, b, tile_of(t), n_q_tiles)
    touches = ((lo_a <= j) & (j < hi_a)) | ((lo_b <= j) & (j < hi_b))
    return lax.cond(touches, functools.partial(visit, views), lambda c: c, carry)

  zeros = jnp.zeros(kb.shape, jnp.float32)
  dk, dv = streaming.block_loop(n, tile_of, sources, scratch, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------- calls


def _call(kernel, tiles: Tiles, **kw):
  """`streaming.call_with_scalars` with the tiles' backend, launch parameters and mode."""
  params = backends.compiler_params(tiles.backend, len(kw["grid"]), num_warps=tiles.num_warps,
                                    num_stages=tiles.num_stages)
  return streaming.call_with_scalars(kernel, tiles.backend, compiler_params=params,
                                     interpret=tiles.interpret, **kw)


def _row_block(rows, d):
  """A tile of `rows` rows of `[B, H, L, d]` at grid index i (the grid's third axis)."""
  return pl.BlockSpec((None, None, rows, d), lambda b, h, i, *_: (b, h, i, 0))


def _streamed(tiles: Tiles, length: int, d: int, heads_per_group: int):
  """A streamed operand (`streaming.streamed_spec`) of `[B, G, length, d]`; its GPU block
  is the whole `[length, d]` row of the (batch, head // heads_per_group)."""
  return streaming.streamed_spec(
      tiles.backend, (None, None, length, d),
      lambda b, h, i, *_: (b, kv_group(h, heads_per_group), 0, 0))


def _range_specs(rows):
  return [pl.BlockSpec((None, rows, 1), lambda b, h, i, *_: (b, i, 0))] * 4


def _key_scratch(tiles: Tiles, k):
  return streaming.stream_scratch([((tiles.bk, k.shape[3]), k.dtype)] * 2)


def forward(bounds, q, k, v, ranges, tiles: Tiles, scale: float):
  """q `[B, H, Qp, D]`, k/v `[B, G, Kp, D]`, ranges 4 x `[B, Qp, 1]`, bounds flat int32;
  `scale` multiplies the scores (1/sqrt of the unpadded head_dim)
  -> (out `[B, H, Qp, D]` q.dtype, lse `[B, H, Qp, 1]` f32)."""
  b, heads, qp, d = q.shape
  groups, kp = k.shape[1], k.shape[2]
  rep, nq = heads // groups, qp // tiles.bq
  kernel = functools.partial(_fwd_kernel, bk=tiles.bk, scale=scale, n_q_tiles=nq,
                             backend=tiles.backend, rep=rep)
  return _call(
      kernel, tiles, grid=(b, heads, nq), n_scalars=1,
      in_specs=[_row_block(tiles.bq, d), _streamed(tiles, kp, d, rep),
                _streamed(tiles, kp, d, rep), *_range_specs(tiles.bq)],
      out_specs=[_row_block(tiles.bq, d), _row_block(tiles.bq, 1)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, heads, qp, 1), jnp.float32)],
      scratch_shapes=_key_scratch(tiles, k),
      name="range_attention_fwd")(bounds, q, k, v, *ranges)


def dq(bounds, q, k, v, do, lse, delta, ranges, tiles: Tiles, scale: float):
  """-> dq `[B, H, Qp, D]` q.dtype."""
  b, heads, qp, d = q.shape
  groups, kp = k.shape[1], k.shape[2]
  rep, nq = heads // groups, qp // tiles.bq
  kernel = functools.partial(_dq_kernel, bk=tiles.bk, scale=scale, n_q_tiles=nq,
                             backend=tiles.backend, rep=rep)
  row = _row_block(tiles.bq, d)
  return _call(
      kernel, tiles, grid=(b, heads, nq), n_scalars=1,
      in_specs=[row, _streamed(tiles, kp, d, rep), _streamed(tiles, kp, d, rep), row,
                _row_block(tiles.bq, 1), _row_block(tiles.bq, 1), *_range_specs(tiles.bq)],
      out_specs=row, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=_key_scratch(tiles, k),
      name="range_attention_dq")(bounds, q, k, v, do, lse, delta, *ranges)


def dkv(bounds, qtiles, q, k, v, do, lse, delta, ranges, tiles: Tiles, scale: float):
  """-> (dk, dv) per query head `[B, H, Kp, D]` f32."""
  b, heads, qp, d = q.shape
  groups, kp = k.shape[1], k.shape[2]
  rep, nq, nk = heads // groups, qp // tiles.bq, kp // tiles.bk
  kernel = functools.partial(_dkv_kernel, bq=tiles.bq, bk=tiles.bk, scale=scale,
                             n_q_tiles=nq, n_k_blocks=nk, backend=tiles.backend)
  key_block = pl.BlockSpec((None, None, tiles.bk, d),
                           lambda b, h, j, *_: (b, kv_group(h, rep), j, 0))
  out_block = pl.BlockSpec((None, None, tiles.bk, d), lambda b, h, j, *_: (b, h, j, 0))
  query_row = _streamed(tiles, qp, d, 1)
  stats_row = streaming.streamed_spec(tiles.backend, (None, None, ROW_STATS, qp),
                                      lambda b, h, j, *_: (b, h, 0, 0))
  return _call(
      kernel, tiles, grid=(b, heads, nk), n_scalars=2,
      in_specs=[query_row, key_block, key_block, query_row, stats_row],
      out_specs=[out_block, out_block],
      out_shape=[jax.ShapeDtypeStruct((b, heads, kp, d), jnp.float32)] * 2,
      scratch_shapes=streaming.stream_scratch(
          [((tiles.bq, d), q.dtype)] * 2 + [((ROW_STATS, tiles.bq), jnp.float32)]),
      name="range_attention_dkv")(bounds, qtiles, q, k, v, do,
                                  row_stats(lse, delta, ranges))
