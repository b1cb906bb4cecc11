"""`cached_attention`: a decoding step's attention over a KV cache, as one kernel.

T new positions (one AR byte, a BLT-S draft under verification, a BLT-D block, the
global model's new patches) attend over a fixed-size cache whose slots carry their
positions, and optionally over their own new keys: causally, or, from `block_start`
on, bidirectionally within the block (BLT-D). XLA runs a step's attention per layer as
two matmuls and the mask/softmax fusions around them; on a GPU a decoding step is a
chain of such small launches, and this kernel is one per layer.

Layout: the cache as generation keeps it (keys `[B, G, S, D]`, values `[B, G, D, S]`),
read where it lies; grid (batch, heads); one program holds all T queries (padded to a
tile) and loops, with an online softmax, over the cache blocks of `bk` slots (S % bk ==
0: generation rounds cache sizes to a multiple of 128 when the kernel is on) from the
row's first block holding a filled slot to its last (a global model's cache of
max-length slots fills a patch at a time), then over the new keys. The cache blocks are
streamed (`streaming.block_loop`): on TPU DMA'd from HBM block by block, so VMEM holds
two blocks whatever the cache size. Forward only (decoding).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import backends
from . import streaming
from . import tiles
from .kernels import online_softmax_finish, online_softmax_init, online_softmax_step
from .streaming import kv_group
from .reference import cached_attention_reference, in_block, slot_visible

CACHE_MULTIPLE = 128   # cache sizes the kernel takes: a multiple of this
_NT = (((1,), (1,)), ((), ()))
_NO_BLOCK = jnp.iinfo(jnp.int32).max


def kernel_cache_size(size: int) -> int:
  """A cache size the kernel takes: `size` rounded up to a multiple of `CACHE_MULTIPLE`."""
  return backends.round_up(size, CACHE_MULTIPLE)


def _kernel(bounds_ref, q_ref, qpos_ref, qvalid_ref, start_ref, ck_ref, cv_ref, cpos_ref,
            *rest, bk, window, scale, has_new, backend, rep):
  new_refs, (o_ref, *scratch) = (rest[:3], rest[3:]) if has_new else ((), rest)
  b, h = pl.program_id(0), pl.program_id(1)
  q = q_ref[...]                                   # [Tp, D]
  qp = qpos_ref[...]                               # [Tp, 1]
  valid = qvalid_ref[...] != 0
  scores = lambda keys: lax.dot_general(q, keys.astype(q.dtype), _NT,
                                        preferred_element_type=jnp.float32) * scale
  g = kv_group(h, rep)
  keys, values_t, slots = (streaming.row(ck_ref, backend, b, g),
                           streaming.row(cv_ref, backend, b, g),
                           streaming.row(cpos_ref, backend, b))
  block = lambda j: pl.ds(pl.multiple_of(j * bk, bk), bk)
  sources = [lambda j: keys.at[block(j), :], lambda j: values_t.at[:, block(j)],
             lambda j: slots.at[:, block(j)]]

  def body(t, views, carry):
    kb, vt, kp = (view[...] for view in views)     # [bk, D], [D, bk]: p @ vt^T, [1, bk]
    vt = vt.astype(q.dtype)
    return online_softmax_step(
        carry, scores(kb), slot_visible(kp, qp, window) & valid,
        lambda p: lax.dot_general(p.astype(q.dtype), vt, _NT,
                                  preferred_element_type=jnp.float32))

  first, stop = bounds_ref[2 * b], bounds_ref[2 * b + 1]
  carry = streaming.block_loop(stop - first, lambda t: first + t, sources, scratch, body,
                               online_softmax_init(*q.shape))
  if has_new:
    nk_ref, nv_ref, npos_ref = new_refs
    kp = npos_ref[...]                             # [1, Tp]
    vis = slot_visible(kp, qp, window) | in_block(kp, qp, start_ref[...])   # start [1, 1]
    values = nv_ref[...].astype(q.dtype)
    carry = online_softmax_step(
        carry, scores(nk_ref[...]), vis & valid,
        lambda p: jnp.dot(p.astype(q.dtype), values, preferred_element_type=jnp.float32))
  o_ref[...] = online_softmax_finish(carry)[0].astype(o_ref.dtype)


def filled_blocks(cache_positions, bk: int):
  """cache_positions `[B, S]` (S % bk == 0) -> `[B, 2]` int32: the blocks of `bk` slots
  `[first, stop)` from the first holding a filled slot (position >= 0) to the last."""
  b, size = cache_positions.shape
  held = jnp.any(cache_positions.reshape(b, size // bk, bk) >= 0, axis=-1)   # [B, S / bk]
  return jnp.stack(tiles.true_span(held, axis=-1), axis=-1)


def cached_attention(q, q_positions, q_valid, cache_k, cache_v, cache_positions,
                     new_k=None, new_v=None, new_positions=None, *, window: int = 0,
                     block_start=None, backend: str | None = None, interpret: Any = False,
                     bk: int = 128, num_warps: int = 4):
  """q `[B, T, H, D]`, q_positions `[B, T]` int32, q_valid `[B, T]` bool; cache_k
  `[B, G, S, D]`, cache_v `[B, G, D, S]`, cache_positions `[B, S]` (-1: not visible);
  optionally new_k, new_v `[B, T, G, D]` and new_positions `[B, T]` (-1: invalid);
  block_start `[B]` or None. -> `[B, T, H, D]` (see `reference.cached_attention_mask`).

  Kernels need S % bk == 0 (`CACHE_MULTIPLE` does) and, on GPU, head_dim a power of 2
  >= 16. `backend` as in `range_attention` ("xla": the reference, reading the cache in
  place)."""
  backend = backends.resolve(backend, interpret)
  b, t, heads, d = q.shape
  groups, size = cache_k.shape[1], cache_k.shape[2]
  # name -> (array, layout, shape); kv_heads and size are cache_k's.
  expected = {
      "q_positions": (q_positions, "[batch, T]", (b, t)),
      "q_valid": (q_valid, "[batch, T]", (b, t)),
      "cache_k": (cache_k, "[batch, kv_heads, size, head_dim]", (b, groups, size, d)),
      "cache_v": (cache_v, "[batch, kv_heads, head_dim, size]", (b, groups, d, size)),
      "cache_positions": (cache_positions, "[batch, size]", (b, size))}
  new = {"new_k": new_k, "new_v": new_v, "new_positions": new_positions}
  if any(x is not None for x in new.values()):
    missing = [name for name, x in new.items() if x is None]
    if missing:
      raise ValueError(f"new_k, new_v and new_positions come together; {', '.join(missing)} "
                       "missing")
    expected.update(new_k=(new_k, "[batch, T, kv_heads, head_dim]", (b, t, groups, d)),
                    new_v=(new_v, "[batch, T, kv_heads, head_dim]", (b, t, groups, d)),
                    new_positions=(new_positions, "[batch, T]", (b, t)))
  for name, (x, layout, shape) in expected.items():
    if tuple(x.shape) != shape:
      raise ValueError(f"{name} {tuple(x.shape)} must be {layout} = {shape} (q {q.shape}, "
                       f"cache_k {cache_k.shape})")
  if heads % groups:
    raise ValueError(f"heads {heads} must be a multiple of kv_heads {groups}")
  if block_start is not None:
    block_start = jnp.broadcast_to(jnp.asarray(block_start, jnp.int32), (b,))
  if backend == "xla":
    return cached_attention_reference(q, q_positions, q_valid, cache_k, cache_v,
                                      cache_positions, new_k, new_v, new_positions,
                                      window=window, block_start=block_start)
  bk = min(bk, size)
  if size % bk:
    raise ValueError(f"cache size {size} is not a multiple of the key block {bk}: size "
                     f"caches to a multiple of {CACHE_MULTIPLE} for the kernel")
  if backend == "gpu" and (d < 16 or d & (d - 1) or bk & (bk - 1)):
    raise ValueError(f"GPU kernel needs head_dim ({d}) and bk ({bk}) powers of 2 >= 16 "
                     "(Triton)")
  tp = backends.pow2_at_least(t) if backend == "gpu" else backends.round_up(t, 8)
  pad_t = lambda x, value=0: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2),
                                     constant_values=value)
  qh = pad_t(q).transpose(0, 2, 1, 3)                             # [B, H, Tp, D]
  column = lambda x: pad_t(x.astype(jnp.int32))[:, :, None]       # [B, Tp, 1]
  start = jnp.full((b,), _NO_BLOCK, jnp.int32) if block_start is None else block_start
  inputs = [qh, column(q_positions), column(q_valid), start.astype(jnp.int32).reshape(b, 1, 1),
            cache_k, cache_v, cache_positions.astype(jnp.int32)[:, None, :]]
  rep = heads // groups
  group = lambda h: kv_group(h, rep)
  per_row = lambda shape: pl.BlockSpec((None, *shape), lambda i, h, *_: (i, 0, 0))
  streamed = lambda shape, index: streaming.streamed_spec(backend, shape, index)
  specs = [pl.BlockSpec((None, None, tp, d), lambda i, h, *_: (i, h, 0, 0)),
           per_row((tp, 1)), per_row((tp, 1)), per_row((1, 1)),
           streamed((None, None, size, d), lambda i, h, *_: (i, group(h), 0, 0)),
           streamed((None, None, d, size), lambda i, h, *_: (i, group(h), 0, 0)),
           streamed((None, 1, size), lambda i, h, *_: (i, 0, 0))]
  has_new = new_k is not None
  if has_new:
    inputs += [pad_t(new_k).transpose(0, 2, 1, 3), pad_t(new_v).transpose(0, 2, 1, 3),
               pad_t(new_positions.astype(jnp.int32), -1)[:, None, :]]
    specs += [pl.BlockSpec((None, None, tp, d), lambda i, h, *_: (i, group(h), 0, 0))] * 2
    specs += [per_row((1, tp))]
  kernel = functools.partial(_kernel, bk=bk, window=window, scale=d ** -0.5, has_new=has_new,
                             backend=backend, rep=rep)
  out = streaming.call_with_scalars(
      kernel, backend, n_scalars=1, grid=(b, heads), in_specs=specs,
      out_specs=pl.BlockSpec((None, None, tp, d), lambda i, h, *_: (i, h, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((b, heads, tp, d), q.dtype),
      scratch_shapes=streaming.stream_scratch(
          [((bk, d), cache_k.dtype), ((d, bk), cache_v.dtype), ((1, bk), jnp.int32)]),
      compiler_params=backends.compiler_params(backend, 2, num_warps=num_warps),
      interpret=interpret, name="cached_attention",
  )(filled_blocks(cache_positions, bk).reshape(-1), *inputs)
  return out.transpose(0, 2, 1, 3)[:, :t]
