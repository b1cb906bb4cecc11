"""Fixed-size KV caches tagged with positions, and the attention specs that read them.

A cache holds, per layer, the rotated keys and values of the positions a stack has
seen, in `size` slots: position p lives in slot `p % size`. Each slot remembers its
position (-1: empty), so the one mask rule of `model.attention` decides what a query
sees. With `size >= window + longest extension`, a slot is only overwritten once its
old position has left every future query's window, and rolling back (BLT-S rejecting
a draft) needs no copy: stale positions past the accepted length are masked out by the
next extension, which rewrites them.

With an attention kernel (`kernel`: (backend, interpret), from a stack config's
`attention_impl = "pallas"`), the specs call `pallas_kernels.diffusion.cached_attention`
(one kernel per layer and step, reading the cache where it lies) instead of XLA's
matmuls and mask; caches are then sized to a multiple of its key block.

Two ways to attend over a cache: `CachedSpec` reads the cache and the new positions as
they are (nothing is written: a BLT-D block, or the global model, whose write happens
outside the conditional that runs it); `StoringSpec` writes the new positions' keys
into the cache first and then attends over the cache alone, so the attention reads what
the write produced and XLA updates each layer's cache in place (after a read-then-write,
the read and the write are unordered and XLA copies the whole cache, twice per step).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from bltjax.model import attention


@flax.struct.dataclass
class KVCache:
  """One array per layer (a stacked `[layers, ...]` cache would be read through a layer
  slice, which XLA:CPU materialises: a copy of every layer's cache on every step)."""
  k: tuple[jax.Array, ...]   # per layer [batch, kv_heads, size, head_dim]
  v: tuple[jax.Array, ...]   # per layer [batch, kv_heads, head_dim, size]
  positions: jax.Array       # [batch, size] int32, -1 = empty

  @classmethod
  def empty(cls, n_layers: int, batch: int, size: int, kv_heads: int, head_dim: int, dtype):
    return cls(tuple(jnp.zeros((batch, kv_heads, size, head_dim), dtype)
                     for _ in range(n_layers)),
               tuple(jnp.zeros((batch, kv_heads, head_dim, size), dtype)
                     for _ in range(n_layers)),
               jnp.full((batch, size), -1, jnp.int32))

  @property
  def size(self) -> int:
    return self.positions.shape[1]

  def write(self, kvs, positions, valid) -> "KVCache":
    """Stores per-layer (k, v) `[batch, T, kv_heads, head_dim]` of new positions `[batch, T]`
    (only where `valid`). T must not exceed the cache size."""
    return KVCache(
        k=tuple(_store_keys(c, kv[0], positions, valid) for c, kv in zip(self.k, kvs)),
        v=tuple(_store_values(c, kv[1], positions, valid) for c, kv in zip(self.v, kvs)),
        positions=_store_positions(self.positions, positions, valid))

  def specs(self, positions, valid, *, window: int, block_start=None, kernel=None) -> tuple:
    """One `CachedSpec` per layer for queries at `positions` `[batch, T]` (reads only)."""
    return tuple(CachedSpec(k, v, self.positions, positions, valid, block_start,
                            window=window, kernel=kernel)
                 for k, v in zip(self.k, self.v))

  def storing_specs(self, positions, valid, *, window: int, kernel=None) -> tuple:
    """One `StoringSpec` per layer: the stack writes the new positions `[batch, T]` (where
    `valid`, a prefix of each row) and returns the written layers for `with_stored`."""
    # After the write, a slot is visible up to the last new position: later ones hold a
    # rejected draft's keys (never before a query; the cache's size keeps every position
    # a query may see from being overwritten).
    written = _store_positions(self.positions, positions, valid)
    last_new = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
    key_positions = jnp.where(written <= last_new, written, -1)
    return tuple(StoringSpec(k, v, key_positions, positions, valid, window=window,
                             kernel=kernel)
                 for k, v in zip(self.k, self.v))

  def with_stored(self, stored, positions, valid) -> "KVCache":
    """The cache after a stack ran on `storing_specs(positions, valid)`: `stored` is the
    stack's per-layer (k, v), here the written cache layers."""
    return KVCache(k=tuple(kv[0] for kv in stored), v=tuple(kv[1] for kv in stored),
                   positions=_store_positions(self.positions, positions, valid))


def _slots(positions, valid, size: int):
  """Cache slots of positions `[batch, T]`; invalid ones get `size` (dropped)."""
  return jnp.where(valid, positions % size, size)


def _store_positions(cache_positions, positions, valid):
  rows = jnp.arange(positions.shape[0])[:, None]
  return cache_positions.at[rows, _slots(positions, valid, cache_positions.shape[1])].set(
      positions, mode="drop")


def _store_keys(cache_k, k, positions, valid):
  """cache_k `[batch, kv_heads, size, head_dim]` with k `[batch, T, kv_heads, head_dim]` at
  the slots of `positions`; one scatter, index arrays broadcast to `[batch, heads, T]`."""
  slots = _slots(positions, valid, cache_k.shape[2])
  rows = jnp.arange(k.shape[0])[:, None, None]
  heads = jnp.arange(k.shape[2])[None, :, None]
  return cache_k.at[rows, heads, slots[:, None, :]].set(
      k.astype(cache_k.dtype).transpose(0, 2, 1, 3), mode="drop")


def _store_values(cache_v, v, positions, valid):
  """cache_v `[batch, kv_heads, head_dim, size]` with v `[batch, T, kv_heads, head_dim]`."""
  slots = _slots(positions, valid, cache_v.shape[3])
  rows = jnp.arange(v.shape[0])[:, None, None, None]
  heads = jnp.arange(v.shape[2])[None, :, None, None]
  dims = jnp.arange(v.shape[3])[None, None, :, None]
  return cache_v.at[rows, heads, dims, slots[:, None, None, :]].set(
      v.astype(cache_v.dtype).transpose(0, 2, 3, 1), mode="drop")


@flax.struct.dataclass
class CachedSpec:
  """Attention of T new positions over a cache plus themselves.

  Keys: the cache's slots (only positions before the first new one: later ones are
  stale) and the new positions. Causal with the window, unless `block_start` is given:
  then new positions at or after `block_start` see each other bidirectionally (a BLT-D
  block), while the cache is seen causally as always.
  """
  cache_k: jax.Array          # [batch, kv_heads, size, head_dim]
  cache_v: jax.Array          # [batch, kv_heads, head_dim, size]
  cache_positions: jax.Array  # [batch, size]
  positions: jax.Array        # [batch, T] of the new queries/keys
  valid: jax.Array            # [batch, T] bool
  block_start: jax.Array | None = None   # [batch] int32
  window: int = flax.struct.field(pytree_node=False, default=0)
  kernel: tuple | None = flax.struct.field(pytree_node=False, default=None)

  def __call__(self, q, k, v):
    first_new = jnp.min(jnp.where(self.valid, self.positions, jnp.iinfo(jnp.int32).max),
                        axis=1, keepdims=True)
    cache_pos = jnp.where(self.cache_positions < first_new, self.cache_positions, -1)
    new_pos = jnp.where(self.valid, self.positions, -1)
    if self.kernel is not None:
      return _kernel_attention(self.kernel, q, self.positions, self.valid, self.cache_k,
                               self.cache_v, cache_pos, new_k=k, new_v=v,
                               new_positions=new_pos, window=self.window,
                               block_start=self.block_start)
    # read in place, not concatenated
    keys = (attention.CachedKeys(self.cache_k.astype(k.dtype)), k)
    values = (attention.CachedValues(self.cache_v.astype(v.dtype)), v)
    k_pos = jnp.concatenate([cache_pos, new_pos], axis=1)[:, None, :]
    q_pos = self.positions[:, :, None]
    mask = attention.attention_mask(q_pos, k_pos, 0, 0, window=self.window)
    if self.block_start is not None:
      in_block = lambda p: p >= self.block_start[:, None, None]
      is_new = jnp.arange(k_pos.shape[-1]) >= cache_pos.shape[1]
      mask = mask | (is_new[None, None] & in_block(k_pos) & in_block(q_pos) & (k_pos >= 0))
    mask = mask & self.valid[:, :, None]
    return attention.masked_attention(q, keys, values, mask)


@flax.struct.dataclass
class StoringSpec:
  """Causal (windowed) attention of T new positions that first stores their keys and
  values in the cache, then attends over the cache alone (see the module docstring).

  The stack calls `store(k, v)` (through `attention.with_new_keys`) and attends with the
  `CacheView` it returns; the layer returns the written cache arrays in place of its
  (k, v). `key_positions` are the slots' positions after the write, -1 where not visible
  (`KVCache.storing_specs` computes them once for every layer).
  """
  cache_k: jax.Array          # [batch, kv_heads, size, head_dim]
  cache_v: jax.Array          # [batch, kv_heads, head_dim, size]
  key_positions: jax.Array    # [batch, size], after the write; -1 = not visible
  positions: jax.Array        # [batch, T]
  valid: jax.Array            # [batch, T] bool, a prefix of each row
  window: int = flax.struct.field(pytree_node=False, default=0)
  kernel: tuple | None = flax.struct.field(pytree_node=False, default=None)

  def store(self, k, v):
    """k, v `[batch, T, kv_heads, head_dim]` -> (the `CacheView` to attend with, the
    written (cache_k, cache_v))."""
    cache_k = _store_keys(self.cache_k, k, self.positions, self.valid)
    cache_v = _store_values(self.cache_v, v, self.positions, self.valid)
    view = CacheView(cache_k, cache_v, self.key_positions, self.positions, self.valid,
                     window=self.window, kernel=self.kernel)
    return view, (cache_k, cache_v)


@flax.struct.dataclass
class CacheView:
  """Attention of T queries over a cache that already holds their own keys (what
  `StoringSpec.store` returns). Called like any spec; its k and v arguments are the
  cached ones' source and are not read again."""
  cache_k: jax.Array          # [batch, kv_heads, size, head_dim]
  cache_v: jax.Array          # [batch, kv_heads, head_dim, size]
  key_positions: jax.Array    # [batch, size], -1 = not visible
  positions: jax.Array        # [batch, T] of the queries
  valid: jax.Array            # [batch, T] bool
  window: int = flax.struct.field(pytree_node=False, default=0)
  kernel: tuple | None = flax.struct.field(pytree_node=False, default=None)

  def __call__(self, q, k, v):
    del k, v   # already in the cache
    if self.kernel is not None:
      return _kernel_attention(self.kernel, q, self.positions, self.valid, self.cache_k,
                               self.cache_v, self.key_positions, window=self.window)
    mask = attention.attention_mask(self.positions[:, :, None], self.key_positions[:, None],
                                    0, 0, window=self.window)
    mask = mask & self.valid[:, :, None]
    return attention.masked_attention(q, (attention.CachedKeys(self.cache_k),),
                                      (attention.CachedValues(self.cache_v),), mask)


def kernel_cache_size(size: int) -> int:
  """A cache size the attention kernel takes (`size` rounded up); the kernel package is
  imported only by caches that attend with it."""
  from pallas_kernels import diffusion as kernels  # pylint: disable=g-import-not-at-top
  return kernels.kernel_cache_size(size)


def _kernel_attention(kernel, q, positions, valid, cache_k, cache_v, cache_positions, **kw):
  """`pallas_kernels.diffusion.cached_attention` with `kernel` = (backend, interpret)."""
  from pallas_kernels import diffusion as kernels  # pylint: disable=g-import-not-at-top
  backend, interpret = kernel
  return kernels.cached_attention(q, positions, valid, cache_k, cache_v, cache_positions,
                                  backend=backend, interpret=interpret, **kw)
