"""Patch cross-attention between bytes and patches (no attention kernel needed).

- Encoder (`pool_bytes_into_patches`): each patch's `k` query vectors attend to the
  bytes of that patch only: a segment softmax over each patch's bytes, linear in L.
- Decoder (`read_patch_vectors`): byte t attends to the `k` vectors of one patch
  (`read_patch[t]`): a gather and a softmax over k.

`CrossAttention` (compat "blt"): RMSNorm on the queries and on the key/value source, no
RoPE, bias-free q/k/v/o, and it returns `queries + attn` (the caller adds the queries
again, as the reference does).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from bltjax.model import layers


def segment_max_pool(x, segment_ids, num_segments: int):
  """Max over each segment: x `[B, L, d]`, ids `[B, L]` -> `[B, S, d]`; empty -> 0.

  Ids outside [0, num_segments) are ignored."""
  def one(xr, ids):
    valid = (ids >= 0) & (ids < num_segments)
    ids = jnp.where(valid, ids, num_segments)
    pooled = jax.ops.segment_max(xr, ids, num_segments=num_segments + 1)[:num_segments]
    count = jax.ops.segment_sum(valid.astype(jnp.int32), ids, num_segments=num_segments + 1)
    return jnp.where(count[:num_segments, None] > 0, pooled, 0)
  return jax.vmap(one)(x, segment_ids)


def pool_bytes_into_patches(q, k, v, patch_ids, num_patches: int):
  """Encoder cross-attention. q `[B, P, c, H, D]` (c = cross_attn_k queries per patch),
  k, v `[B, L, H, D]`, patch_ids `[B, L]` -> `[B, P, c, H, D]` (0 for empty patches)."""
  scale = q.shape[-1] ** -0.5

  def one(qr, kr, vr, ids):
    valid = (ids >= 0) & (ids < num_patches)
    ids = jnp.where(valid, ids, num_patches)        # an overflow segment, dropped below
    n = num_patches + 1
    q_of_byte = jnp.take(qr, jnp.minimum(ids, num_patches - 1), axis=0)      # [L, c, H, D]
    scores = jnp.einsum("lchd,lhd->lch", q_of_byte, kr,
                        preferred_element_type=jnp.float32) * scale
    smax = jax.ops.segment_max(scores, ids, num_segments=n)
    weights = jnp.exp(scores - smax[ids]) * valid[:, None, None]
    den = jax.ops.segment_sum(weights, ids, num_segments=n)
    num = jax.ops.segment_sum(weights[..., None] * vr[:, None].astype(jnp.float32), ids,
                              num_segments=n)
    den = den[:num_patches]
    out = num[:num_patches] / jnp.where(den > 0, den, 1.0)[..., None]
    return out.astype(v.dtype)

  return jax.vmap(one)(q, k, v, patch_ids)


def read_patch_vectors(q, k, v, read_patch):
  """Decoder cross-attention. q `[B, T, H, D]`, k, v `[B, P, c, H, D]`, read_patch
  `[B, T]` (clipped into range) -> `[B, T, H, D]`."""
  idx = jnp.clip(read_patch, 0, k.shape[1] - 1)
  gather = jax.vmap(lambda x, i: jnp.take(x, i, axis=0))
  kr, vr = gather(k, idx), gather(v, idx)                           # [B, T, c, H, D]
  scores = jnp.einsum("bthd,btchd->bthc", q, kr,
                      preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bthc,btchd->bthd", probs, vr)


@flax.struct.dataclass
class PoolIntoPatches:
  patch_ids: jax.Array                                   # [B, L]
  num_patches: int = flax.struct.field(pytree_node=False, default=0)

  def __call__(self, q, k, v):
    return pool_bytes_into_patches(q, k, v, self.patch_ids, self.num_patches)


@flax.struct.dataclass
class ReadPatch:
  read_patch: jax.Array                                  # [B, T]

  def __call__(self, q, k, v):
    return read_patch_vectors(q, k, v, self.read_patch)


class CrossAttention(nn.Module):
  """`queries + o(attend(q(norm(queries)), k(norm(kv)), v(norm(kv))))`.

  queries `[..., Q, d]` and kv `[..., K, d]` may carry extra leading axes (patch slots);
  `attend` (PoolIntoPatches or ReadPatch) says which keys each query sees.
  """
  n_heads: int
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, kv, attend):
    d = queries.shape[-1]
    head_dim = d // self.n_heads        # as the reference: inner width heads * (d // heads)
    inner = self.n_heads * head_dim
    heads = lambda x: x.reshape(*x.shape[:-1], self.n_heads, head_dim)
    qn = layers.RMSNorm(self.norm_eps, self.dtype, name="q_norm")(queries)
    kvn = layers.RMSNorm(self.norm_eps, self.dtype, name="kv_norm")(kv)
    q = heads(layers.Dense(inner, ("embed", "heads"), self.dtype, name="q")(qn))
    k = heads(layers.Dense(inner, ("embed", "heads"), self.dtype, name="k")(kvn))
    v = heads(layers.Dense(inner, ("embed", "heads"), self.dtype, name="v")(kvn))
    out = attend(q, k, v)
    out = out.reshape(*out.shape[:-2], inner)
    return queries + layers.Dense(d, ("heads", "embed"), self.dtype, name="o")(out)
