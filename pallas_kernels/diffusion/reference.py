"""Pure-jnp ground truth of range attention (dense `[Q, K]` mask: tests and small sizes).

Range attention: query row q sees the keys `[a0, a1) U [b0, b1)` of its row's key axis.
Every self-attention of BLT-D training is of this form (DESIGN §3: the clean copy sees a
causal window of itself; a noisy block sees the clean prefix before its anchor and its
own block); `bltjax.diffusion.bltd_attention_ranges` builds the ranges on device.

Shapes: q `[batch, q_len, heads, head_dim]`, k/v `[batch, k_len, kv_heads, head_dim]`
(grouped-query attention when kv_heads < heads), ranges: four int32 `[batch, q_len]`
arrays (a0, a1, b0, b1). Rows that see no key return zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -1e30


def ranges_mask(ranges, k_len: int):
  """`[batch, q_len, k_len]` bool: key k inside `[a0, a1) U [b0, b1)` of its query row."""
  a0, a1, b0, b1 = (jnp.asarray(r, jnp.int32)[:, :, None] for r in ranges)
  key = jnp.arange(k_len, dtype=jnp.int32)[None, None]
  return ((key >= a0) & (key < a1)) | ((key >= b0) & (key < b1))


def range_attention_reference(q, k, v, ranges):
  """Softmax attention of each query row over its two key ranges. Returns q's shape/dtype."""
  b, q_len, heads, head_dim = q.shape
  groups = k.shape[2]
  mask = ranges_mask(ranges, k.shape[1])[:, None, None]            # [B, 1, 1, Q, K]
  qg = q.reshape(b, q_len, groups, heads // groups, head_dim)
  scores = jnp.einsum("bqgrd,bkgd->bgrqk", qg, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask, scores * head_dim ** -0.5, _NEG_INF)
  probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
  out = jnp.einsum("bgrqk,bkgd->bqgrd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(q.shape).astype(q.dtype)
