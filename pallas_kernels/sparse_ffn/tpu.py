"""TPU kernels (Pallas, Mosaic lowering) of the activation-sparse ReLU FFN.

Block granularity: a "unit" is a block of `bk` contiguous hidden units (a multiple of
128 lanes); token tiles of `tm` rows (a multiple of 8; 16 for bf16). The hidden
activation is token-major, h [T, F]. Every kernel walks a flattened work list
(`format.work_list`) passed by scalar prefetch, with a *dynamic* grid of one step per
active (row, unit) pair: inactive pairs cost neither a DMA nor a grid step. The model
dimension D is kept whole in each block (VMEM ~ a few MiB at D = 2048).

* `rowlist_matmul`  out[tile] = sum over active blocks j of a[tile, j] @ b[j]:
                    forward down projection (a=h, b=w_down) and backward dx (a=da,
                    b=w_up read as [D, F] blocks, i.e. a @ b^T).
* `sddmm`           da[tile, j] = (g[tile] @ w_down[j]^T + ct_l1) * (h > 0) for the active
                    blocks only; the others keep their aliased zero init.
* `collist_t_matmul` out[j] = sum over the token tiles i where block j is active of
                    a[i, j]^T @ g[i]: dW_down = h^T g and dW_up^T = da^T x.

Transposed-LHS products cast to f32, swap axes, cast back (the megablox `tgmm` pattern).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .format import FIRST, ID_MASK, ID_SHIFT, LAST, ROW_SHIFT, VALID, WorkList

_NT = (((1,), (1,)), ((), ()))
_VMEM_LIMIT = 48 * 1024 * 1024


def _params():
  return pltpu.CompilerParams(dimension_semantics=("arbitrary",),
                              vmem_limit_bytes=_VMEM_LIMIT)


def _check(tm, bk, dtype):
  sub = 16 if jnp.dtype(dtype).itemsize == 2 else 8
  if tm % sub or bk % 128:
    raise ValueError(f"TPU tiles need tm % {sub} == 0 and bk % 128 == 0, got {tm}, {bk}")


def _flag(wl_ref, s, bit):
  return (wl_ref[s] & bit) != 0


def _row(wl, s):
  return wl[s] >> ROW_SHIFT


def _col(wl, s):
  return (wl[s] >> ID_SHIFT) & ID_MASK


def _transpose(a):
  return a.astype(jnp.float32).swapaxes(0, 1).astype(a.dtype)


# --------------------------------------------------------------------------- row lists


def _rowlist_kernel(fl_ref, a_ref, b_ref, o_ref, acc_ref, *, rhs_t):
  s = pl.program_id(0)

  @pl.when(_flag(fl_ref, s, FIRST))
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(_flag(fl_ref, s, VALID))
  def _():
    if rhs_t:
      acc_ref[...] += lax.dot_general(a_ref[...], b_ref[...], _NT,
                                      preferred_element_type=jnp.float32)
    else:
      acc_ref[...] += jnp.dot(a_ref[...], b_ref[...], preferred_element_type=jnp.float32)

  @pl.when(_flag(fl_ref, s, LAST))
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def rowlist_matmul(wl: WorkList, a, b, *, tm, bk, rhs_transposed=False, out_dtype=None,
                   interpret=False):
  """a [T, F]; b [F, N] (or [N, F] with rhs_transposed) -> [T, N].

  wl: work list over (token tile, block) built with include_empty=True."""
  t, f = a.shape
  n = b.shape[0] if rhs_transposed else b.shape[1]
  _check(tm, bk, a.dtype)
  assert t % tm == 0 and f % bk == 0, (a.shape, tm, bk)
  if rhs_transposed:
    b_spec = pl.BlockSpec((n, bk), lambda s, wl: (0, _col(wl, s)))
  else:
    b_spec = pl.BlockSpec((bk, n), lambda s, wl: (_col(wl, s), 0))
  gs = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(wl.num,),
      in_specs=[pl.BlockSpec((tm, bk), lambda s, wl: (_row(wl, s), _col(wl, s))), b_spec],
      out_specs=pl.BlockSpec((tm, n), lambda s, wl: (_row(wl, s), 0)),
      scratch_shapes=[pltpu.VMEM((tm, n), jnp.float32)],
  )
  return pl.pallas_call(
      functools.partial(_rowlist_kernel, rhs_t=rhs_transposed),
      grid_spec=gs,
      out_shape=jax.ShapeDtypeStruct((t, n), out_dtype or a.dtype),
      compiler_params=_params(),
      interpret=interpret,
      name="sparse_ffn_rowlist_matmul",
  )(wl.steps, a, b)


# --------------------------------------------------------------------------- SDDMM


def _sddmm_kernel(fl_ref, g_ref, b_ref, h_ref, l1_ref, z_ref, o_ref):
  del z_ref
  s = pl.program_id(0)
  valid = _flag(fl_ref, s, VALID)

  @pl.when(valid)
  def _():
    acc = lax.dot_general(g_ref[...], b_ref[...], _NT, preferred_element_type=jnp.float32)
    acc = acc + l1_ref[...]
    o_ref[...] = jnp.where(h_ref[...] > 0, acc, 0.0).astype(o_ref.dtype)

  @pl.when(jnp.logical_not(valid))
  def _():
    o_ref[...] = jnp.zeros_like(o_ref)


def sddmm(wl: WorkList, g, b, h, ct_l1, *, tm, bk, interpret=False):
  """da [T, F] = (g @ b^T + ct_l1[:, None]) * (h > 0) on the active blocks, 0 elsewhere.

  g [T, D], b [F, D] (w_down), h [T, F], ct_l1 [T]; wl built with include_empty=False."""
  t, f = h.shape
  d = g.shape[1]
  _check(tm, bk, h.dtype)
  gs = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(wl.num,),
      in_specs=[
          pl.BlockSpec((tm, d), lambda s, wl: (_row(wl, s), 0)),
          pl.BlockSpec((bk, d), lambda s, wl: (_col(wl, s), 0)),
          pl.BlockSpec((tm, bk), lambda s, wl: (_row(wl, s), _col(wl, s))),
          pl.BlockSpec((tm, 1), lambda s, wl: (_row(wl, s), 0)),
          pl.BlockSpec(memory_space=pl.ANY),
      ],
      out_specs=pl.BlockSpec((tm, bk), lambda s, wl: (_row(wl, s), _col(wl, s))),
  )
  zeros = jnp.zeros((t, f), h.dtype)
  return pl.pallas_call(
      _sddmm_kernel,
      grid_spec=gs,
      out_shape=jax.ShapeDtypeStruct((t, f), h.dtype),
      input_output_aliases={5: 0},
      compiler_params=_params(),
      interpret=interpret,
      name="sparse_ffn_sddmm",
  )(wl.steps, g, b, h, ct_l1.astype(jnp.float32).reshape(t, 1), zeros)


# --------------------------------------------------------------------------- column lists


def _collist_kernel(fl_ref, a_ref, g_ref, o_ref, acc_ref):
  s = pl.program_id(0)

  @pl.when(_flag(fl_ref, s, FIRST))
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(_flag(fl_ref, s, VALID))
  def _():
    acc_ref[...] += jnp.dot(_transpose(a_ref[...]), g_ref[...],
                            preferred_element_type=jnp.float32)

  @pl.when(_flag(fl_ref, s, LAST))
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def collist_t_matmul(wl: WorkList, a, g, *, tm, bk, out_dtype=None, interpret=False):
  """a [T, F], g [T, N] -> a^T @ g [F, N], per block summing only its active token tiles.

  wl: work list over (block, token tile) built with include_empty=True."""
  t, f = a.shape
  n = g.shape[1]
  _check(tm, bk, a.dtype)
  gs = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(wl.num,),
      in_specs=[
          pl.BlockSpec((tm, bk), lambda s, wl: (_col(wl, s), _row(wl, s))),
          pl.BlockSpec((tm, n), lambda s, wl: (_col(wl, s), 0)),
      ],
      out_specs=pl.BlockSpec((bk, n), lambda s, wl: (_row(wl, s), 0)),
      scratch_shapes=[pltpu.VMEM((bk, n), jnp.float32)],
  )
  return pl.pallas_call(
      _collist_kernel,
      grid_spec=gs,
      out_shape=jax.ShapeDtypeStruct((f, n), out_dtype or g.dtype),
      compiler_params=_params(),
      interpret=interpret,
      name="sparse_ffn_collist_t_matmul",
  )(wl.steps, a, g)
