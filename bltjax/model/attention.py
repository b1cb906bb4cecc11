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

import flax.struct
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


@flax.struct.dataclass
class CachedKeys:
  """Keys stored `[B, G, K, D]` (a KV cache's layout). XLA:CPU's batched matmul reads
  its right operand with the contracted axis minor-most: a cache in that layout is read
  as it lies, where `[B, K, G, D]` would be transposed whole on every decoding step."""
  x: jax.Array

  @property
  def length(self) -> int:
    return self.x.shape[2]


@flax.struct.dataclass
class CachedValues:
  """Values stored `[B, G, D, K]` (a KV cache's layout; see CachedKeys)."""
  x: jax.Array

  @property
  def length(self) -> int:
    return self.x.shape[3]


def with_new_keys(spec, k, v):
  """(the spec to attend with, what a layer returns as its keys and values) for a layer's
  new k, v `[B, T, kv_heads, head_dim]`. A spec that stores keys itself (a generation
  cache's `StoringSpec`) writes them and returns the written cache; any other spec is
  used as it is and the layer returns (k, v)."""
  store = getattr(spec, "store", None)
  return store(k, v) if store is not None else (spec, (k, v))


def _length(part) -> int:
  return part.length if isinstance(part, (CachedKeys, CachedValues)) else part.shape[1]


def _grouped_scores(q, k):
  """q `[B, Q, H, D]`, k `[B, K, G, D]` or CachedKeys -> scores `[B, G, H/G, Q, K]` f32."""
  b, q_len, heads, head_dim = q.shape
  cached = isinstance(k, CachedKeys)
  groups = k.x.shape[1] if cached else k.shape[2]
  q = q.reshape(b, q_len, groups, heads // groups, head_dim)
  if cached:
    scores = jnp.einsum("bqgrd,bgkd->bgrqk", q, k.x, preferred_element_type=jnp.float32)
  else:
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", q, k, preferred_element_type=jnp.float32)
  return scores * (head_dim ** -0.5)


def _grouped_output(probs, v, q_shape):
  """probs `[B, G, H/G, Q, K]`, v `[B, K, G, D]` or CachedValues -> `[B, Q, H, D]`."""
  if isinstance(v, CachedValues):
    out = jnp.einsum("bgrqk,bgdk->bqgrd", probs.astype(v.x.dtype), v.x)
  else:
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs.astype(v.dtype), v)
  return out.reshape(q_shape)


def masked_attention(q, k, v, mask):
  """Softmax attention with an explicit bool mask `[B, Q, K]` (broadcastable).

  `k` and `v` may be tuples of parts along the key axis (e.g. a KV cache and the new
  positions), so the parts are read where they lie instead of copied into one array.
  Rows with no visible key return zeros.
  """
  k_parts, v_parts = (k, v) if isinstance(k, tuple) else ((k,), (v,))
  scores = jnp.concatenate([_grouped_scores(q, part) for part in k_parts], axis=-1)
  mask = mask[:, None, None]
  scores = jnp.where(mask, scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(mask, probs, 0.0)
  out, start = 0, 0
  for part in v_parts:
    out = out + _grouped_output(probs[..., start:start + _length(part)], part, q.shape)
    start += _length(part)
  return out


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


def document_starts(segment_ids):
  """First position of each position's document. `[batch, len]` -> `[batch, len]` int32.

  Documents are the runs of equal segment ids (packed rows: each document is one
  contiguous run; a row may begin inside a document, which then starts at 0).
  """
  length = segment_ids.shape[1]
  pos = jnp.arange(length, dtype=jnp.int32)
  first = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1)
  return jax.lax.cummax(jnp.where(first, pos[None], 0), axis=1)


def causal_ranges(segment_ids, *, window: int = 0):
  """The visibility rule of a training row as key ranges: row t sees
  `[max(doc(t), t - W + 1), t + 1)` (second range empty), `attention_mask` for positions
  0, 1, ... of the row. segment_ids `[batch, len]` -> (a0, a1, b0, b1) `[batch, len]`."""
  t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None]
  doc = document_starts(segment_ids)
  a0 = jnp.maximum(doc, t - window + 1) if window else doc
  a1 = jnp.broadcast_to(t + 1, doc.shape)
  empty = jnp.zeros_like(doc)
  return a0, a1, empty, empty


def causal_attention(q, k, v, positions, segment_ids, *, window: int = 0):
  """Causal self-attention within segments; sliding window when `window > 0`."""
  if window:
    return chunked_window_attention(q, k, v, positions, segment_ids, window=window)
  return dense_causal_attention(q, k, v, positions, segment_ids)


@flax.struct.dataclass
class CausalSpec:
  """How a stack attends during training / prefill: causal within segments."""
  positions: jax.Array        # [B, T] int32
  segment_ids: jax.Array      # [B, T] int32
  window: int = flax.struct.field(pytree_node=False, default=0)

  def __call__(self, q, k, v):
    return causal_attention(q, k, v, self.positions, self.segment_ids, window=self.window)


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


# ---------------------------------------------------------------------------------------
# BLT-D training: the decoder (and encoder) run over [clean ; noisy blocks].
# ---------------------------------------------------------------------------------------


def noisy_chunk_size(seq_len: int, window: int) -> int:
  """Chunk length C that groups noisy blocks: a block anchored at s belongs to chunk
  (s - 1) // C, whose frame (the previous and this chunk of clean keys) holds every
  clean key the block may see. C = window when the window is shorter than the row."""
  return window if 0 < window < seq_len else seq_len


def _clean_frames(x, chunk: int, n_chunks: int, fill):
  """`[B, L, ...]` -> frames `[B, n, F, ...]`: F = 2C (previous ++ this chunk), or C when
  there is a single chunk. Positions past L are `fill`."""
  b, length = x.shape[:2]
  pad = n_chunks * chunk - length
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  if n_chunks == 1:
    return x.reshape(b, 1, chunk, *x.shape[2:])
  chunks = x.reshape(b, n_chunks, chunk, *x.shape[2:])
  prev = jnp.concatenate([jnp.full_like(chunks[:, :1], fill), chunks[:, :-1]], axis=1)
  return jnp.concatenate([prev, chunks], axis=2)


def noisy_block_attention(q, k, v, k_clean, v_clean, clean_positions, clean_segments,
                          noisy, *, window: int, chunk: int):
  """Attention of the noisy positions: each sees the clean prefix before its block's
  anchor (within the window and the document) and its own block, bidirectionally.

  q, k, v: `[B, n*M, H|G, D]` for the noisy positions in chunk-major order (n chunks of
  M positions); k_clean, v_clean `[B, L, G, D]`; `noisy` a `NoisyAttentionInfo`.
  Returns `[B, n*M, H, D]`; invalid positions get zeros.
  """
  b, length = clean_positions.shape
  n_chunks = noisy.positions.shape[1]
  m = noisy.positions.shape[2]
  frame_k = _clean_frames(k_clean, chunk, n_chunks, 0)
  frame_v = _clean_frames(v_clean, chunk, n_chunks, 0)
  frame_pos = _clean_frames(clean_positions, chunk, n_chunks, -1)
  frame_seg = _clean_frames(clean_segments, chunk, n_chunks, -2)
  flat = lambda x: x.reshape(b * n_chunks, *x.shape[2:])
  qn = flat(q.reshape(b, n_chunks, m, *q.shape[2:]))
  kn = flat(k.reshape(b, n_chunks, m, *k.shape[2:]))
  vn = flat(v.reshape(b, n_chunks, m, *v.shape[2:]))
  keys = jnp.concatenate([flat(frame_k), kn], axis=1)
  values = jnp.concatenate([flat(frame_v), vn], axis=1)
  q_pos, q_anchor, q_block, q_seg, q_valid = (
      flat(x)[:, :, None] for x in (noisy.positions, noisy.anchors, noisy.blocks,
                                    noisy.segment_ids, noisy.valid))
  k_pos, k_seg = flat(frame_pos)[:, None, :], flat(frame_seg)[:, None, :]
  sees_prefix = attention_mask(q_pos, k_pos, q_seg, k_seg, window=window) & (k_pos < q_anchor)
  k_block, k_valid = flat(noisy.blocks)[:, None, :], flat(noisy.valid)[:, None, :]
  sees_block = (q_block == k_block) & k_valid
  mask = jnp.concatenate([sees_prefix, sees_block], axis=2) & q_valid
  out = masked_attention(qn, keys, values, mask)
  return out.reshape(b, n_chunks * m, *q.shape[2:])


@flax.struct.dataclass
class NoisyAttentionInfo:
  """Where the noisy positions of BLT-D training sit. All `[B, n_chunks, M]`."""
  positions: jax.Array    # absolute byte position (RoPE position)
  anchors: jax.Array      # anchor (first position) of the position's block
  blocks: jax.Array       # block index within its chunk
  segment_ids: jax.Array  # document of the anchor
  valid: jax.Array        # bool: a real byte of a selected block


@flax.struct.dataclass
class CleanNoisySpec:
  """BLT-D training over `[clean L ; noisy n*M]`: the clean copy is exactly the causal
  stack (it never sees a noisy position); noisy blocks see the clean prefix before
  their anchor and themselves (`noisy_block_attention`)."""
  clean: CausalSpec
  noisy: NoisyAttentionInfo
  chunk: int = flax.struct.field(pytree_node=False, default=0)

  def __call__(self, q, k, v):
    length = self.clean.positions.shape[1]
    clean = self.clean(q[:, :length], k[:, :length], v[:, :length])
    noisy = noisy_block_attention(
        q[:, length:], k[:, length:], v[:, length:], k[:, :length], v[:, :length],
        self.clean.positions, self.clean.segment_ids, self.noisy,
        window=self.clean.window, chunk=self.chunk)
    return jnp.concatenate([clean, noisy], axis=1)
