"""GPU kernels (Pallas, Triton lowering) of the activation-sparse ReLU FFN.

Layout: the hidden activation is kept *neuron-major*, hT [d_ff, tokens], so that gathering
the active hidden units of a token tile reads contiguous rows of `tm` tokens (coalesced),
like gathering weight rows. Token counts are padded to a multiple of the token tile `tm`.

Kernels (grid, what each program does, what is skipped):

* `up_relu`        (T/tm, F/bf): hT tile = relu(x_tile @ w_up[:, f-tile])^T; the epilogue
                   writes, for free, the per-tile column flags (the "packing" metadata) and
                   per-token partial L1 / nonzero sums. Dense (the up projection is what
                   finds the zeros). Optional: the default uses XLA (cuBLAS) for it.
* `gather_matmul`  (T/tm, N/bn): out[tile] = sum over the active columns c of tile i of
                   aT[c, tile]^T @ b[c, n-tile], in chunks of `bk` gathered rows. Inactive
                   hidden units are never read: forward down projection (aT=hT, b=w_down)
                   and backward dx (aT=daT, b=w_up^T).
* `sddmm`          (T/tm, F/bk): daT[c, tile] = (b[c, :] @ g[tile, :]^T + ct_l1) * (hT > 0)
                   for the active columns c only (programs past the tile's count exit at
                   once); the rest of daT stays at its aliased zero init.
* `block_t_matmul` (F/kb, N/bn): out[r-block] = sum over the token tiles i where block r
                   has an active unit of aT[r-block, tile_i] @ g[tile_i, n-tile]: weight
                   gradients dW_down = hT @ g and dW_up^T = daT @ x (block granularity).

Triton constraints honoured: every loaded/stored tile is a power of 2 with dims >= 16; no
scalar prefetch (counts and ids are read from GMEM), dynamic trip counts via fori_loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b


def _params(num_warps, num_stages):
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _check_tile(name, v):
  if v < 16 or v & (v - 1):
    raise ValueError(f"GPU tile {name}={v} must be a power of 2 >= 16 (Triton)")


# --------------------------------------------------------------------------- up + ReLU


def _up_relu_kernel(x_ref, w_ref, h_ref, flag_ref, l1_ref, nnz_ref, *, tm, bf, bd, nd):
  i = pl.program_id(0)
  j = pl.program_id(1)
  r0 = pl.multiple_of(i * tm, tm)
  c0 = pl.multiple_of(j * bf, bf)

  def body(k, acc):
    d0 = pl.multiple_of(k * bd, bd)
    xa = x_ref[pl.ds(r0, tm), pl.ds(d0, bd)]
    wb = w_ref[pl.ds(d0, bd), pl.ds(c0, bf)]
    return acc + jnp.dot(xa, wb, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, nd, body, jnp.zeros((tm, bf), jnp.float32))
  h = jnp.maximum(acc, 0.0).astype(h_ref.dtype)  # [tm, bf]
  h_ref[...] = h.T
  hf = h.astype(jnp.float32)
  pos = (hf > 0).astype(jnp.float32)
  flag_ref[...] = (jnp.max(pos, axis=0) > 0).astype(jnp.int32)[None, :]
  l1_ref[...] = jnp.sum(hf, axis=1)[None, :]
  nnz_ref[...] = jnp.sum(pos, axis=1)[None, :]


def up_relu(x, w_up, *, tm=64, bf=128, bd=64, num_warps=4, num_stages=3, interpret=False):
  """x [T, D], w_up [D, F] -> (hT [F, T] x.dtype, flags [T/tm, F] int32,
  l1_part [F/bf, T] f32, nnz_part [F/bf, T] f32). T % tm == F % bf == D % bd == 0."""
  t, d = x.shape
  f = w_up.shape[1]
  for n, v in (("tm", tm), ("bf", bf), ("bd", bd)):
    _check_tile(n, v)
  assert t % tm == 0 and f % bf == 0 and d % bd == 0, (x.shape, w_up.shape, tm, bf, bd)
  kernel = functools.partial(_up_relu_kernel, tm=tm, bf=bf, bd=bd, nd=d // bd)
  return pl.pallas_call(
      kernel,
      grid=(t // tm, f // bf),
      in_specs=[pl.no_block_spec, pl.no_block_spec],
      out_specs=[
          pl.BlockSpec((bf, tm), lambda i, j: (j, i)),
          pl.BlockSpec((1, bf), lambda i, j: (i, j)),
          pl.BlockSpec((1, tm), lambda i, j: (j, i)),
          pl.BlockSpec((1, tm), lambda i, j: (j, i)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((f, t), x.dtype),
          jax.ShapeDtypeStruct((t // tm, f), jnp.int32),
          jax.ShapeDtypeStruct((f // bf, t), jnp.float32),
          jax.ShapeDtypeStruct((f // bf, t), jnp.float32),
      ],
      compiler_params=_params(num_warps, num_stages),
      interpret=interpret,
      name="sparse_ffn_up_relu",
  )(x, w_up)


# --------------------------------------------------------------------------- gather matmul


def _gather_matmul_kernel(cnt_ref, ids_ref, a_ref, b_ref, o_ref, *, tm, bk, bn):
  i = pl.program_id(0)
  n = pl.program_id(1)
  cnt = cnt_ref[i]
  r0 = pl.multiple_of(i * tm, tm)
  n0 = pl.multiple_of(n * bn, bn)

  def body(c, acc):
    k0 = pl.multiple_of(c * bk, bk)
    ids = ids_ref[i, pl.ds(k0, bk)]
    valid = (k0 + lax.iota(jnp.int32, bk)) < cnt
    a = a_ref[ids, pl.ds(r0, tm)]  # [bk, tm] rows of the active units
    a = jnp.where(valid[:, None], a, jnp.zeros_like(a))
    b = b_ref[ids, pl.ds(n0, bn)]  # [bk, bn] gathered weight rows
    return acc + lax.dot_general(a, b, _TN, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, (cnt + bk - 1) // bk, body, jnp.zeros((tm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def gather_matmul(cnt, ids, a_t, b, *, tm=64, bk=64, bn=128, out_dtype=None,
                  num_warps=4, num_stages=3, interpret=False):
  """out [T, N] = sum_c a_t[ids_c, tile]^T @ b[ids_c, :] over each token tile's list.

  cnt [T/tm] int32, ids [T/tm, W] int32 (W % bk == 0), a_t [F, T], b [F, N]."""
  f, t = a_t.shape
  nout = b.shape[1]
  for n_, v in (("tm", tm), ("bk", bk), ("bn", bn)):
    _check_tile(n_, v)
  assert t % tm == 0 and nout % bn == 0 and ids.shape[1] % bk == 0, (a_t.shape, b.shape)
  kernel = functools.partial(_gather_matmul_kernel, tm=tm, bk=bk, bn=bn)
  return pl.pallas_call(
      kernel,
      grid=(t // tm, nout // bn),
      in_specs=[pl.no_block_spec] * 4,
      out_specs=pl.BlockSpec((tm, bn), lambda i, n: (i, n)),
      out_shape=jax.ShapeDtypeStruct((t, nout), out_dtype or b.dtype),
      compiler_params=_params(num_warps, num_stages),
      interpret=interpret,
      name="sparse_ffn_gather_matmul",
  )(cnt, ids, a_t, b)


# --------------------------------------------------------------------------- SDDMM


def _sddmm_kernel(cnt_ref, ids_ref, g_ref, b_ref, h_ref, l1_ref, z_ref, o_ref,
                  *, tm, bk, bd, nd):
  del z_ref  # aliased with o_ref: the zero init of the inactive entries
  i = pl.program_id(0)
  c = pl.program_id(1)
  k0 = pl.multiple_of(c * bk, bk)

  @pl.when(k0 < cnt_ref[i])
  def _():
    r0 = pl.multiple_of(i * tm, tm)
    # Entries past cnt repeat the last valid id: they recompute and rewrite that
    # unit's values, an idempotent write.
    ids = ids_ref[i, pl.ds(k0, bk)]

    def body(k, acc):
      d0 = pl.multiple_of(k * bd, bd)
      b = b_ref[ids, pl.ds(d0, bd)]  # [bk, bd]
      g = g_ref[pl.ds(r0, tm), pl.ds(d0, bd)]  # [tm, bd]
      return acc + lax.dot_general(b, g, _NT, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, nd, body, jnp.zeros((bk, tm), jnp.float32))
    acc = acc + l1_ref[0, pl.ds(r0, tm)][None, :]
    h = h_ref[ids, pl.ds(r0, tm)]
    da = jnp.where(h > 0, acc, 0.0)
    o_ref[ids, pl.ds(r0, tm)] = da.astype(o_ref.dtype)


def sddmm(cnt, ids, g, b, h_t, ct_l1, *, tm=64, bk=64, bd=64, num_warps=4, num_stages=3,
          interpret=False):
  """daT [F, T] = (b @ g^T + ct_l1[None, :]) * (h_t > 0) at the active (unit, tile) pairs.

  g [T, D] (output cotangent), b [F, D] (w_down), h_t [F, T], ct_l1 [T] f32 (cotangent of
  the per-token L1 sums). Entries outside the lists are 0."""
  f, t = h_t.shape
  d = g.shape[1]
  for n_, v in (("tm", tm), ("bk", bk), ("bd", bd)):
    _check_tile(n_, v)
  assert t % tm == 0 and d % bd == 0 and ids.shape[1] % bk == 0, (h_t.shape, g.shape)
  zeros = jnp.zeros((f, t), h_t.dtype)
  kernel = functools.partial(_sddmm_kernel, tm=tm, bk=bk, bd=bd, nd=d // bd)
  return pl.pallas_call(
      kernel,
      grid=(t // tm, ids.shape[1] // bk),
      in_specs=[pl.no_block_spec] * 7,
      out_specs=pl.no_block_spec,
      out_shape=jax.ShapeDtypeStruct((f, t), h_t.dtype),
      input_output_aliases={6: 0},
      compiler_params=_params(num_warps, num_stages),
      interpret=interpret,
      name="sparse_ffn_sddmm",
  )(cnt, ids, g, b, h_t, ct_l1.astype(jnp.float32).reshape(1, t), zeros)


# --------------------------------------------------------------------------- dW


def _block_t_matmul_kernel(cnt_ref, tids_ref, a_ref, g_ref, o_ref, *, tm, kb, bn):
  r = pl.program_id(0)
  n = pl.program_id(1)
  f0 = pl.multiple_of(r * kb, kb)
  n0 = pl.multiple_of(n * bn, bn)

  def body(s, acc):
    t0 = pl.multiple_of(tids_ref[r, s] * tm, tm)
    a = a_ref[pl.ds(f0, kb), pl.ds(t0, tm)]  # [kb, tm]
    g = g_ref[pl.ds(t0, tm), pl.ds(n0, bn)]  # [tm, bn]
    return acc + jnp.dot(a, g, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, cnt_ref[r], body, jnp.zeros((kb, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def block_t_matmul(tcnt, tids, a_t, g, *, tm=64, kb=64, bn=128, out_dtype=None,
                   num_warps=4, num_stages=3, interpret=False):
  """out [F, N] = a_t [F, T] @ g [T, N], per block of kb units summing only the token
  tiles in its list: tcnt [F/kb], tids [F/kb, T/tm]."""
  f, t = a_t.shape
  nout = g.shape[1]
  for n_, v in (("tm", tm), ("kb", kb), ("bn", bn)):
    _check_tile(n_, v)
  assert t % tm == 0 and f % kb == 0 and nout % bn == 0, (a_t.shape, g.shape)
  kernel = functools.partial(_block_t_matmul_kernel, tm=tm, kb=kb, bn=bn)
  return pl.pallas_call(
      kernel,
      grid=(f // kb, nout // bn),
      in_specs=[pl.no_block_spec] * 4,
      out_specs=pl.BlockSpec((kb, bn), lambda r, n: (r, n)),
      out_shape=jax.ShapeDtypeStruct((f, nout), out_dtype or g.dtype),
      compiler_params=_params(num_warps, num_stages),
      interpret=interpret,
      name="sparse_ffn_block_t_matmul",
  )(tcnt, tids, a_t, g)
