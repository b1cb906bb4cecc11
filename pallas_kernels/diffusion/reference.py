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


def _masked_softmax(scores, mask):
  """Softmax over the last axis of the `mask`ed entries only; rows with none give 0."""
  return jnp.where(mask, jax.nn.softmax(jnp.where(mask, scores, _NEG_INF), axis=-1), 0.0)


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
  probs = _masked_softmax(scores * head_dim ** -0.5, mask)
  out = jnp.einsum("bgrqk,bkgd->bqgrd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(q.shape).astype(q.dtype)


# --------------------------------------------------------------------------- unmasking

RULES = ("confidence", "entropy_bounded")


def allowed_log_probs(logits, never_ids):
  """log-softmax over the ids a block may hold (`never_ids` removed). `[..., V]` f32."""
  vocab = jnp.arange(logits.shape[-1])
  never = jnp.isin(vocab, jnp.asarray(never_ids, jnp.int32))
  return jax.nn.log_softmax(jnp.where(never, -jnp.inf, logits.astype(jnp.float32)), axis=-1)


def unmask_reference(logits, block, still_masked, threshold, *, rule: str = "confidence",
                     tokens=None, never_ids=(0, 1, 3), subtract_max: bool = True):
  """One BLT-D unmasking step over a block (DESIGN §4), the ground truth of `unmask_step`.

  logits `[R, Bk, V]`; block `[R, Bk]` int32 (MASK where still masked); still_masked
  `[R, Bk]` bool; threshold: alpha (confidence rule) or gamma (entropy-bounded rule), a
  scalar or `[R]`; tokens `[R, Bk]` the chosen ids, or None for the argmax of the allowed
  ids (leftmost on ties).
  - confidence: reveal every still-masked position whose probability of its token is
    >= alpha, and always the most confident one (leftmost on ties);
  - entropy_bounded: sort the still-masked positions by entropy (ascending, leftmost
    first on ties) and reveal the longest prefix whose entropy sum minus its largest
    entropy (`subtract_max`; else the plain sum) is <= gamma, at least one.
  Returns (block with the revealed tokens written, still_masked without them).
  """
  logp = allowed_log_probs(logits, never_ids)
  if tokens is None:
    tokens = jnp.argmax(logp, axis=-1).astype(jnp.int32)
  threshold = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), block.shape[:1])[:, None]
  positions = jnp.arange(block.shape[1])[None]
  if rule == "confidence":
    confidence = jnp.exp(jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0])
    best = jnp.argmax(jnp.where(still_masked, confidence, -1.0), axis=-1)[:, None]
    reveal = still_masked & ((confidence >= threshold) | (positions == best))
  elif rule == "entropy_bounded":
    p = jnp.exp(logp)
    entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
    order = jnp.argsort(jnp.where(still_masked, entropy, jnp.inf), axis=-1, stable=True)
    masked = jnp.take_along_axis(still_masked, order, axis=-1)
    h = jnp.where(masked, jnp.take_along_axis(entropy, order, axis=-1), 0.0)
    bound = jnp.cumsum(h, axis=-1) - (jax.lax.cummax(h, axis=1) if subtract_max else 0.0)
    accept = masked & ((positions == 0) | (bound <= threshold))
    accept = jnp.cumprod(accept.astype(jnp.int32), axis=-1).astype(bool)
    reveal = jnp.take_along_axis(accept, jnp.argsort(order, axis=-1), axis=-1)
  else:
    raise ValueError(f"rule {rule!r} is not one of {RULES}")
  return jnp.where(reveal, tokens, block), still_masked & ~reveal


# --------------------------------------------------------------------------- decoding


def slot_visible(kp, qp, window: int):
  """A key at position kp (-1: empty or not visible) is seen by a query at qp: `kp <= qp`
  and, with a window W, `qp - kp < W` (broadcasting; also inside the kernel)."""
  seen = (kp >= 0) & (kp <= qp)
  return seen & (qp - kp < window) if window else seen


def in_block(kp, qp, start):
  """Key and query both at or after the row's block start (a BLT-D block sees itself
  bidirectionally); kp -1: an invalid key."""
  return (kp >= 0) & (kp >= start) & (qp >= start)


def cached_attention_mask(q_positions, q_valid, cache_positions, new_positions=None, *,
                          window: int = 0, block_start=None):
  """`[batch, T, S (+ T)]` bool: which cache slots (and new keys) each new query sees.

  A cache slot holding position kp (-1: empty or not visible) is seen by a valid query
  at qp when `kp <= qp` and, with a window W, `qp - kp < W`. A new key at np (-1:
  invalid) likewise, or, with `block_start` `[batch]`, when both np and qp are at or
  after the row's block start (a BLT-D block sees itself bidirectionally)."""
  qp = q_positions[:, :, None]
  mask = slot_visible(cache_positions[:, None, :], qp, window)
  if new_positions is not None:
    np_ = new_positions[:, None, :]
    new = slot_visible(np_, qp, window)
    if block_start is not None:
      new = new | in_block(np_, qp, block_start[:, None, None])
    mask = jnp.concatenate([mask, new], axis=2)
  return mask & q_valid[:, :, None]


def cached_attention_reference(q, q_positions, q_valid, cache_k, cache_v, cache_positions,
                               new_k=None, new_v=None, new_positions=None, *,
                               window: int = 0, block_start=None):
  """Attention of T new queries over a KV cache (and optionally their own new keys).

  q `[B, T, H, D]`; cache_k `[B, G, S, D]`, cache_v `[B, G, D, S]` (a generation cache's
  layout, read where it lies); cache_positions `[B, S]`; new_k, new_v `[B, T, G, D]`,
  new_positions `[B, T]`. Visibility: `cached_attention_mask`. Rows that see nothing
  return zeros."""
  b, t, heads, d = q.shape
  groups = cache_k.shape[1]
  qg = q.reshape(b, t, groups, heads // groups, d)
  scores = [jnp.einsum("bqgrd,bgkd->bgrqk", qg, cache_k.astype(q.dtype),
                       preferred_element_type=jnp.float32)]
  if new_k is not None:
    scores.append(jnp.einsum("bqgrd,bkgd->bgrqk", qg, new_k.astype(q.dtype),
                             preferred_element_type=jnp.float32))
  scores = jnp.concatenate(scores, axis=-1) * d ** -0.5
  mask = cached_attention_mask(q_positions, q_valid, cache_positions, new_positions,
                               window=window, block_start=block_start)[:, None, None]
  probs = _masked_softmax(scores, mask).astype(q.dtype)
  size = cache_k.shape[2]
  out = jnp.einsum("bgrqk,bgdk->bqgrd", probs[..., :size], cache_v.astype(q.dtype),
                   preferred_element_type=jnp.float32)
  if new_k is not None:
    out = out + jnp.einsum("bgrqk,bkgd->bqgrd", probs[..., size:], new_v.astype(q.dtype),
                           preferred_element_type=jnp.float32)
  return out.reshape(q.shape).astype(q.dtype)
