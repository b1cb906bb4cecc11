"""Pallas kernels of range attention (flash attention over two key ranges per query row).

One kernel body per pass serves both backends; `gpu` lowers through Triton, `tpu` through
Mosaic. Layout: heads-major `[batch, heads, len, head_dim]`; a query tile's q, and the
whole key/value rows of its (batch, kv head), are the kernel's blocks (VMEM on TPU: a
row of 8k keys of width 128 in bf16 is 2 MiB), sliced `bk` keys at a time inside.
Ranges come as four `[batch, Qp, 1]` int32 arrays (no lane slicing in the kernel).

* `forward`  (batch, heads, Qp/bq): online softmax over the key blocks `tiles.tile_bounds`
             gives the tile; writes out and the row log-sum-exp.
* `dq`       (batch, heads, Qp/bq): dq = sum_k (p * (do v^T - delta)) k, same blocks.
* `dkv`      (batch, heads, Kp/bk): dk, dv of one key block, looping over the query tiles
             `tiles.key_block_tiles` gives it and skipping those that do not visit it;
             per query head (f32), summed over a kv head's group by the caller.

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
from jax.experimental.pallas import tpu as pltpu

from . import backends

_NEG = -1e30
_NT = (((1,), (1,)), ((), ()))   # a @ b^T
_TN = (((0,), (0,)), ((), ()))   # a^T @ b
_VMEM_LIMIT = 64 * 1024 * 1024


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
      if self.bq % sub or self.bk % sub:
        raise ValueError(f"TPU tiles need bq % {sub} == 0 and bk % {sub} == 0, "
                         f"got bq={self.bq}, bk={self.bk}")


def _visible(a0, a1, b0, b1, k0, bk):
  """[bq, 1] ranges, first key k0 -> [bq, bk] bool."""
  key = k0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  return ((key >= a0) & (key < a1)) | ((key >= b0) & (key < b1))


def _lhs_t_dot(a, b, backend):
  """a^T @ b, f32 accumulate. Mosaic gets an explicit f32 transpose (the megablox pattern)."""
  if backend == "tpu":
    a = a.astype(jnp.float32).swapaxes(0, 1).astype(b.dtype)
    return jnp.dot(a, b, preferred_element_type=jnp.float32)
  return lax.dot_general(a.astype(b.dtype), b, _TN, preferred_element_type=jnp.float32)


def _scores(q, kb, scale):
  return lax.dot_general(q, kb, _NT, preferred_element_type=jnp.float32) * scale


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


# --------------------------------------------------------------------------- forward


def _fwd_kernel(bounds_ref, q_ref, k_ref, v_ref, a0_ref, a1_ref, b0_ref, b1_ref,
                o_ref, lse_ref, *, bk, scale, n_q_tiles):
  b, i = pl.program_id(0), pl.program_id(2)
  lo_a, hi_a, lo_b, hi_b = _intervals(bounds_ref, b, i, n_q_tiles)
  q = q_ref[...]
  ranges = (a0_ref[...], a1_ref[...], b0_ref[...], b1_ref[...])

  def body(j, carry):
    k0 = pl.multiple_of(j * bk, bk)
    kb = k_ref[pl.ds(k0, bk), :]
    vb = v_ref[pl.ds(k0, bk), :]
    return online_softmax_step(
        carry, _scores(q, kb, scale), _visible(*ranges, k0, bk),
        lambda p: jnp.dot(p.astype(vb.dtype), vb, preferred_element_type=jnp.float32))

  carry = lax.fori_loop(lo_a, hi_a, body, online_softmax_init(*q.shape))
  out, lse = online_softmax_finish(lax.fori_loop(lo_b, hi_b, body, carry))
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


# --------------------------------------------------------------------------- dq


def _dq_kernel(bounds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               a0_ref, a1_ref, b0_ref, b1_ref, dq_ref, *, bk, scale, n_q_tiles):
  b, i = pl.program_id(0), pl.program_id(2)
  lo_a, hi_a, lo_b, hi_b = _intervals(bounds_ref, b, i, n_q_tiles)
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  ranges = (a0_ref[...], a1_ref[...], b0_ref[...], b1_ref[...])

  def body(j, dq):
    k0 = pl.multiple_of(j * bk, bk)
    kb = k_ref[pl.ds(k0, bk), :]
    vb = v_ref[pl.ds(k0, bk), :]
    vis = _visible(*ranges, k0, bk)
    p = jnp.where(vis, jnp.exp(_scores(q, kb, scale) - lse), 0.0)
    dp = lax.dot_general(do, vb, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta)
    return dq + jnp.dot(ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)

  dq = jnp.zeros(q.shape, jnp.float32)
  dq = lax.fori_loop(lo_a, hi_a, body, dq)
  dq = lax.fori_loop(lo_b, hi_b, body, dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# --------------------------------------------------------------------------- dk, dv


def _dkv_kernel(bounds_ref, qtiles_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                a0_ref, a1_ref, b0_ref, b1_ref, dk_ref, dv_ref,
                *, bq, bk, scale, n_q_tiles, n_k_blocks, backend):
  b, j = pl.program_id(0), pl.program_id(2)
  k0 = j * bk
  kb, vb = k_ref[...], v_ref[...]
  qt = (b * n_k_blocks + j) * 2
  first, stop = qtiles_ref[qt], qtiles_ref[qt + 1]

  def visit(i, carry):
    dk, dv = carry
    r0 = pl.multiple_of(i * bq, bq)
    rows = pl.ds(r0, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    lse, delta = lse_ref[rows, :], delta_ref[rows, :]
    vis = _visible(a0_ref[rows, :], a1_ref[rows, :], b0_ref[rows, :], b1_ref[rows, :],
                   k0, bk)
    p = jnp.where(vis, jnp.exp(_scores(q, kb, scale) - lse), 0.0)
    dv = dv + _lhs_t_dot(p, do, backend)
    dp = lax.dot_general(do, vb, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta)
    dk = dk + _lhs_t_dot(ds, q, backend)
    return dk, dv

  def body(i, carry):
    lo_a, hi_a, lo_b, hi_b = _intervals(bounds_ref, b, i, n_q_tiles)
    touches = ((lo_a <= j) & (j < hi_a)) | ((lo_b <= j) & (j < hi_b))
    return lax.cond(touches, functools.partial(visit, i), lambda c: c, carry)

  zeros = jnp.zeros(kb.shape, jnp.float32)
  dk, dv = lax.fori_loop(first, stop, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------- calls


def _call(kernel, tiles: Tiles, *, grid, n_scalars, in_specs, out_specs, out_shape, name):
  """pallas_call with the first `n_scalars` inputs as scalar tables: scalar prefetch on
  TPU, plain GMEM inputs on GPU."""
  params = backends.compiler_params(tiles.backend, len(grid), num_warps=tiles.num_warps,
                                    num_stages=tiles.num_stages, vmem_limit_bytes=_VMEM_LIMIT)
  if tiles.backend == "tpu":
    spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=n_scalars, grid=grid,
                                        in_specs=in_specs, out_specs=out_specs)
    return pl.pallas_call(kernel, grid_spec=spec, out_shape=out_shape,
                          compiler_params=params, interpret=tiles.interpret, name=name)
  return pl.pallas_call(kernel, grid=grid, in_specs=[pl.no_block_spec] * n_scalars + in_specs,
                        out_specs=out_specs, out_shape=out_shape, compiler_params=params,
                        interpret=tiles.interpret, name=name)


def kv_group(head, heads_per_group: int):
  """kv head of a query head (truncating division: floor division lowers to `sign`, which
  Mosaic resolves against the local TPU generation and so cannot cross-lower)."""
  return lax.div(head, heads_per_group) if heads_per_group > 1 else head


def _row_block(rows, d):
  """A tile of `rows` rows of `[B, H, L, d]` at grid index i (the grid's third axis)."""
  return pl.BlockSpec((None, None, rows, d), lambda b, h, i, *_: (b, h, i, 0))


def _whole(length, d, heads_per_group=1):
  """The whole `[length, d]` row of the (batch, head // heads_per_group) of `[B, G, L, d]`."""
  return pl.BlockSpec((None, None, length, d),
                      lambda b, h, i, *_: (b, kv_group(h, heads_per_group), 0, 0))


def _range_specs(rows, whole_length=None):
  if whole_length is not None:
    return [pl.BlockSpec((None, whole_length, 1), lambda b, h, i, *_: (b, 0, 0))] * 4
  return [pl.BlockSpec((None, rows, 1), lambda b, h, i, *_: (b, i, 0))] * 4


def forward(bounds, q, k, v, ranges, tiles: Tiles, scale: float):
  """q `[B, H, Qp, D]`, k/v `[B, G, Kp, D]`, ranges 4 x `[B, Qp, 1]`, bounds flat int32;
  `scale` multiplies the scores (1/sqrt of the unpadded head_dim)
  -> (out `[B, H, Qp, D]` q.dtype, lse `[B, H, Qp, 1]` f32)."""
  b, heads, qp, d = q.shape
  groups, kp = k.shape[1], k.shape[2]
  rep, nq = heads // groups, qp // tiles.bq
  kernel = functools.partial(_fwd_kernel, bk=tiles.bk, scale=scale, n_q_tiles=nq)
  return _call(
      kernel, tiles, grid=(b, heads, nq), n_scalars=1,
      in_specs=[_row_block(tiles.bq, d), _whole(kp, d, rep), _whole(kp, d, rep),
                *_range_specs(tiles.bq)],
      out_specs=[_row_block(tiles.bq, d), _row_block(tiles.bq, 1)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, heads, qp, 1), jnp.float32)],
      name="range_attention_fwd")(bounds, q, k, v, *ranges)


def dq(bounds, q, k, v, do, lse, delta, ranges, tiles: Tiles, scale: float):
  """-> dq `[B, H, Qp, D]` q.dtype."""
  b, heads, qp, d = q.shape
  groups, kp = k.shape[1], k.shape[2]
  rep, nq = heads // groups, qp // tiles.bq
  kernel = functools.partial(_dq_kernel, bk=tiles.bk, scale=scale, n_q_tiles=nq)
  row = _row_block(tiles.bq, d)
  return _call(
      kernel, tiles, grid=(b, heads, nq), n_scalars=1,
      in_specs=[row, _whole(kp, d, rep), _whole(kp, d, rep), row,
                _row_block(tiles.bq, 1), _row_block(tiles.bq, 1), *_range_specs(tiles.bq)],
      out_specs=row, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
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
  return _call(
      kernel, tiles, grid=(b, heads, nk), n_scalars=2,
      in_specs=[_whole(qp, d), key_block, key_block, _whole(qp, d), _whole(qp, 1),
                _whole(qp, 1), *_range_specs(None, qp)],
      out_specs=[out_block, out_block],
      out_shape=[jax.ShapeDtypeStruct((b, heads, kp, d), jnp.float32)] * 2,
      name="range_attention_dkv")(bounds, qtiles, q, k, v, do, lse, delta, *ranges)
