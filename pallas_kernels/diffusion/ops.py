"""`range_attention`: attention over two key ranges per query row, with a custom VJP.

    out[b, q] = softmax over keys k in [a0, a1) U [b0, b1) of q . k / sqrt(d), applied to v

`backend`: None (GPU -> "gpu", TPU -> "tpu", else "xla"), "gpu" (Pallas Triton), "tpu"
(Pallas Mosaic), "xla" (the dense reference; plain autodiff). The kernels skip every key
block no row of a query tile can see (`tiles.tile_bounds`), so BLT-D's `[clean ; noisy]`
decoder input costs its windows and blocks, never a `[T, T]` mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import backends
from . import kernels
from . import tiles as tiles_lib
from .reference import range_attention_reference

GPU_DEFAULTS = dict(bq=64, bk=64, num_warps=4, num_stages=2)
TPU_DEFAULTS = dict(bq=128, bk=128)


def _heads_major(x, length: int, d: int):
  """`[B, L, H, D]` -> `[B, H, length, d]`, zero-padded."""
  x = x.transpose(0, 2, 1, 3)
  return jnp.pad(x, [(0, 0), (0, 0), (0, length - x.shape[2]), (0, d - x.shape[3])])


def range_attention(q, k, v, ranges, *, backend: str | None = None, interpret=False,
                    **tile_kw):
  """q `[B, Q, H, D]`, k/v `[B, K, G, D]`, ranges (a0, a1, b0, b1) int32 `[B, Q]` each
  (indices into the key axis, clipped to [0, K]) -> `[B, Q, H, D]` in q.dtype; rows with
  no key get zeros. k and v are cast to q.dtype.

  Tiles: `bq`, `bk` (GPU: powers of 2 >= 16; TPU: multiples of 8, 16 for bf16), and on GPU
  `num_warps`, `num_stages`. Q and K need not divide the tiles (padded inside).
  """
  backend = backends.resolve(backend, interpret)
  ranges = tuple(jnp.asarray(r, jnp.int32) for r in ranges)
  if len(ranges) != 4 or any(r.shape != q.shape[:2] for r in ranges):
    raise ValueError(f"ranges must be 4 arrays [batch, q_len] = {q.shape[:2]}, got "
                     f"{[r.shape for r in ranges]}")
  if (q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0]
      or k.shape[3] != q.shape[3] or q.shape[2] % k.shape[2]):
    raise ValueError(f"need q [batch, q_len, heads, head_dim] and k, v [batch, k_len, "
                     f"kv_heads, head_dim] alike, heads a multiple of kv_heads; got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}")
  defaults = GPU_DEFAULTS if backend == "gpu" else TPU_DEFAULTS
  unknown = set(tile_kw) - set(defaults if backend != "xla" else {**GPU_DEFAULTS,
                                                                  **TPU_DEFAULTS})
  if unknown:
    raise ValueError(f"unknown {backend} tile options {sorted(unknown)}; "
                     f"known: {sorted(defaults)}")
  # A key index outside [0, K) names no key; the kernels' padded key blocks must not see it.
  ranges = tuple(jnp.clip(r, 0, k.shape[1]) for r in ranges)
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  if backend == "xla" or q.shape[1] == 0 or k.shape[1] == 0:
    return range_attention_reference(q, k, v, ranges)
  tiles = kernels.Tiles(backend=backend, interpret=interpret, **{**defaults, **tile_kw})
  tiles.check(q.dtype)
  return _attention(tiles, q, k, v, ranges)


def _prepare(tiles: kernels.Tiles, q, k, v, ranges):
  """Heads-major, padded operands and the block tables."""
  q_len, k_len, d = q.shape[1], k.shape[1], q.shape[3]
  qp, kp = backends.round_up(q_len, tiles.bq), backends.round_up(k_len, tiles.bk)
  dp = backends.pow2_at_least(d) if tiles.backend == "gpu" else d
  qh, kh, vh = _heads_major(q, qp, dp), _heads_major(k, kp, dp), _heads_major(v, kp, dp)
  padded = tuple(jnp.pad(r, [(0, 0), (0, qp - q_len)]) for r in ranges)  # padding: empty
  bounds = tiles_lib.tile_bounds(padded, bq=tiles.bq, bk=tiles.bk)
  columns = tuple(r[:, :, None] for r in padded)
  return qh, kh, vh, columns, bounds


def _unpad(x, length: int, d: int):
  """`[B, H, Lp, Dp]` -> `[B, length, H, d]`."""
  return x[:, :, :length, :d].transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(tiles, q, k, v, ranges):
  return _attention_fwd(tiles, q, k, v, ranges)[0]


def _attention_fwd(tiles, q, k, v, ranges):
  qh, kh, vh, columns, bounds = _prepare(tiles, q, k, v, ranges)
  out, lse = kernels.forward(bounds.reshape(-1), qh, kh, vh, columns, tiles, q.shape[3] ** -0.5)
  result = _unpad(out, q.shape[1], q.shape[3])
  return result, (qh, kh, vh, columns, bounds, out, lse, q.shape, k.shape, ranges)


def _attention_bwd(tiles, residuals, g):
  qh, kh, vh, columns, bounds, out, lse, q_shape, k_shape, ranges = residuals
  b, q_len, heads, d = q_shape
  k_len, groups = k_shape[1], k_shape[2]
  do = _heads_major(g.astype(qh.dtype), qh.shape[2], qh.shape[3])
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
  flat_bounds = bounds.reshape(-1)
  dq = kernels.dq(flat_bounds, qh, kh, vh, do, lse, delta, columns, tiles, d ** -0.5)
  n_key_blocks = kh.shape[2] // tiles.bk
  qtiles = tiles_lib.key_block_tiles(bounds, n_key_blocks).reshape(-1)
  dk, dv = kernels.dkv(flat_bounds, qtiles, qh, kh, vh, do, lse, delta, columns, tiles,
                       d ** -0.5)
  per_group = lambda x: x.reshape(b, groups, heads // groups, *x.shape[2:]).sum(axis=2)
  dk, dv = per_group(dk).astype(kh.dtype), per_group(dv).astype(vh.dtype)
  zero_ranges = tuple(np.zeros(r.shape, jax.dtypes.float0) for r in ranges)
  return (_unpad(dq, q_len, d), _unpad(dk, k_len, d), _unpad(dv, k_len, d), zero_ranges)


_attention.defvjp(_attention_fwd, _attention_bwd)
