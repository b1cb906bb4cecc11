"""Fixed-size KV caches tagged with positions, and the attention spec that reads them.

A cache holds, per layer, the rotated keys and values of the positions a stack has
seen, in `size` slots: position p lives in slot `p % size`. Each slot remembers its
position (-1: empty), so the one mask rule of `model.attention` decides what a query
sees. With `size >= window + longest extension`, a slot is only overwritten once its
old position has left every future query's window, and rolling back (BLT-S rejecting
a draft) needs no copy: stale positions past the accepted length are masked out by the
next extension, which rewrites them.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from bltjax.model import attention


@flax.struct.dataclass
class KVCache:
  k: jax.Array          # [layers, batch, kv_heads, size, head_dim]
  v: jax.Array          # [layers, batch, kv_heads, head_dim, size]
  positions: jax.Array  # [batch, size] int32, -1 = empty

  @classmethod
  def empty(cls, n_layers: int, batch: int, size: int, kv_heads: int, head_dim: int, dtype):
    return cls(jnp.zeros((n_layers, batch, kv_heads, size, head_dim), dtype),
               jnp.zeros((n_layers, batch, kv_heads, head_dim, size), dtype),
               jnp.full((batch, size), -1, jnp.int32))

  @property
  def size(self) -> int:
    return self.positions.shape[1]

  def write(self, kvs, positions, valid) -> "KVCache":
    """Stores per-layer (k, v) `[batch, T, kv_heads, head_dim]` of new positions `[batch, T]`
    (only where `valid`). T must not exceed the cache size."""
    slots = jnp.where(valid, positions % self.size, self.size)   # invalid -> dropped
    rows = jnp.arange(positions.shape[0])[:, None]
    # [layers, batch, T, kv_heads, head_dim] -> the cache's layouts (see the fields)
    k = jnp.stack([kv[0] for kv in kvs]).astype(self.k.dtype).transpose(0, 1, 3, 2, 4)
    v = jnp.stack([kv[1] for kv in kvs]).astype(self.v.dtype).transpose(0, 1, 3, 4, 2)
    heads = jnp.arange(self.k.shape[2])[None, :, None]
    dims = jnp.arange(self.v.shape[3])[None, None, :, None]
    return KVCache(   # index arrays broadcast to [batch, heads, (head_dim,) T]
        k=self.k.at[:, rows[:, :, None], heads, slots[:, None, :]].set(k, mode="drop"),
        v=self.v.at[:, rows[:, :, None, None], heads[..., None], dims,
                    slots[:, None, None, :]].set(v, mode="drop"),
        positions=self.positions.at[rows, slots].set(positions, mode="drop"))

  def specs(self, positions, valid, *, window: int, block_start=None) -> tuple:
    """One `CachedSpec` per layer for queries at `positions` `[batch, T]`."""
    return tuple(CachedSpec(self.k[i], self.v[i], self.positions, positions, valid,
                            block_start, window=window)
                 for i in range(self.k.shape[0]))


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

  def __call__(self, q, k, v):
    first_new = jnp.min(jnp.where(self.valid, self.positions, jnp.iinfo(jnp.int32).max),
                        axis=1, keepdims=True)
    cache_pos = jnp.where(self.cache_positions < first_new, self.cache_positions, -1)
    new_pos = jnp.where(self.valid, self.positions, -1)
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
