"""Attention as pure functions: the one mask rule, dense and chunked sliding-window forms.

Every self-attention in BLT lets query position `q` see key position `k` when
`visible(q, k)`: same segment (document), causal (`k <= q`) and, with a window W,
`q - k < W` (W keys including itself; the reference's `make_local_attention(W)`).
`attention_mask` is that rule and is the only place it is written; the chunked form
below evaluates it on `[chunk, 2 * chunk]` frames instead of a `[T, T]` matrix.

Shapes: q `[batch, q_len, heads, head_dim]`, k/v `[batch, k_len, kv_heads, head_dim]`
(grouped-query attention when kv_heads < heads), positions and segment ids
`[batch, len]` int32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = -1e30


def attention_mask(q_pos, k_pos, q_seg, k_seg, *, window: int = 0, causal: bool = True):
  """The visibility rule. Broadcasts its arguments; returns bool.

  `window=0` means unlimited. Keys with negative positions are invalid (padding frames).
  """
  mask = (q_seg == k_seg) & (k_pos >= 0)
  if causal:
    mask = mask & (k_pos <= q_pos)
  if window:
    mask = mask & (q_pos - k_pos < window)
  return mask


def _grouped_scores(q, k):
  """q `[B, Q, H, D]`, k `[B, K, G, D]` -> scores `[B, G, H/G, Q, K]` in float32."""
  b, q_len, heads, head_dim = q.shape
  groups = k.shape[2]
  q = q.reshape(b, q_len, groups, heads // groups, head_dim)
  scores = jnp.einsum("bqgrd,bkgd->bgrqk", q, k, preferred_element_type=jnp.float32)
  return scores * (head_dim ** -0.5)


def _grouped_output(probs, v, q_shape):
  out = jnp.einsum("bgrqk,bkgd->bqgrd", probs.astype(v.dtype), v)
  return out.reshape(q_shape)


def masked_attention(q, k, v, mask):
  """Softmax attention with an explicit bool mask `[B, Q, K]` (broadcastable).

  Rows with no visible key return zeros.
  """
  scores = _grouped_scores(q, k)
  mask = mask[:, None, None]
  scores = jnp.where(mask, scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(mask, probs, 0.0)
  return _grouped_output(probs, v, q.shape)


def dense_causal_attention(q, k, v, positions, segment_ids, *, window: int = 0):
  """Causal (optionally windowed) attention with a `[T, T]` mask: for short sequences
  (the global model over patches) and as the test reference."""
  mask = attention_mask(positions[:, :, None], positions[:, None, :],
                        segment_ids[:, :, None], segment_ids[:, None, :], window=window)
  return masked_attention(q, k, v, mask)


def _frames(x, n_chunks, chunk):
  """`[B, n*C, ...]` -> `[B, n, 2C, ...]`: previous chunk ++ this chunk."""
  x = x.reshape(x.shape[0], n_chunks, chunk, *x.shape[2:])
  pad = [(0, 0)] * x.ndim
  pad[1] = (1, 0)
  prev = jnp.pad(x, pad)[:, :-1]
  return jnp.concatenate([prev, x], axis=2)


def chunked_window_attention(q, k, v, positions, segment_ids, *, window: int):
  """Exact causal sliding-window attention in O(T * 2W) (DESIGN §3).

  The sequence is cut into chunks of W; chunk c attends to chunks c-1 and c, which
  hold every key a query in chunk c may see. Requires positions to increase by one
  along the sequence (true for training rows). T need not divide W.
  """
  b, t = q.shape[:2]
  positions = jnp.asarray(positions, jnp.int32)
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  if t <= window:
    return dense_causal_attention(q, k, v, positions, segment_ids, window=window)
  chunk = window
  n_chunks = -(-t // chunk)
  pad = n_chunks * chunk - t
  if pad:
    pad_seq = lambda x, value=0: jnp.pad(
        x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
    q, k, v = pad_seq(q), pad_seq(k), pad_seq(v)
    # Padded tail positions sit after the sequence in a segment of their own.
    positions = jnp.concatenate(
        [positions, positions[:, -1:] + 1 + jnp.arange(pad, dtype=positions.dtype)], axis=1)
    segment_ids = pad_seq(segment_ids, value=-1)
  q_chunks = q.reshape(b * n_chunks, chunk, *q.shape[2:])
  k_frames = _frames(k, n_chunks, chunk).reshape(b * n_chunks, 2 * chunk, *k.shape[2:])
  v_frames = _frames(v, n_chunks, chunk).reshape(b * n_chunks, 2 * chunk, *v.shape[2:])
  q_pos = positions.reshape(b * n_chunks, chunk)
  # The first chunk's "previous chunk" is zero padding: give it position -1 (invalid).
  k_pos = _frames(positions + 1, n_chunks, chunk).reshape(b * n_chunks, 2 * chunk) - 1
  q_seg = segment_ids.reshape(b * n_chunks, chunk)
  k_seg = _frames(segment_ids, n_chunks, chunk).reshape(b * n_chunks, 2 * chunk)
  mask = attention_mask(q_pos[:, :, None], k_pos[:, None, :], q_seg[:, :, None],
                        k_seg[:, None, :], window=window)
  out = masked_attention(q_chunks, k_frames, v_frames, mask)
  return out.reshape(b, n_chunks * chunk, *q.shape[2:])[:, :t]


def causal_attention(q, k, v, positions, segment_ids, *, window: int = 0):
  """Causal self-attention within segments; sliding window when `window > 0`."""
  if window:
    return chunked_window_attention(q, k, v, positions, segment_ids, window=window)
  return dense_causal_attention(q, k, v, positions, segment_ids)


def attention_flops(q_len: int, k_len: int, heads: int, head_dim: int) -> float:
  """Forward FLOPs of the two attention matmuls for one sequence (no masking discount)."""
  return 4.0 * q_len * k_len * heads * head_dim


def visible_keys_per_query(seq_len: int, window: int = 0) -> float:
  """Average number of keys a causal (windowed) query sees in a full row: for MFU."""
  if not window or window >= seq_len:
    return (seq_len + 1) / 2.0
  full = seq_len - window + 1
  ramp = np.arange(1, window).sum()
  return (full * window + ramp) / seq_len
