"""BLT-D: block anchoring and corruption (training), unmasking rules (decoding).

Training (DESIGN §3 "BLT-D training input"). Noisy blocks of B bytes are anchored at
patch starts: the block of the patch starting at s covers bytes s .. s+B-1, cut at the
end of the row and of s's document; blocks overlap when patches are shorter than B.
The decoder input is `[clean copy (len) ; K noisy blocks (K * B)]`, concatenated along
the sequence, with K static. Each noisy position p = s + j holds x_p or MASK and
predicts x_p (no shift, MDLM style); its RoPE position is p; it cross-attends to global
output i - 1 (`Blocks.context_patch`), like the clean position s - 1. Attention in that
layout is given as key ranges per query row, never a dense mask
(`bltd_attention_ranges`).

Decoding (DESIGN §4 BLT-D). A block of B MASKs is revealed over several decoder steps;
each step reveals the masked positions chosen by the confidence rule (Fast-dLLM:
probability >= alpha, at least the most confident one) or the entropy-bounded rule
(EB-Sampler, Ben-Hamu et al. 2505.24857). MASK is never predicted: its logit is -inf
(`losses.suppress_mask_logit`).

Every function is pure (PRNG keys are passed in) and jit-able: block size, block count
and the rule's switches are static; nothing has a data-dependent shape.

Shapes: `len` bytes per row, K blocks per row (`num_blocks`), B bytes per block
(`block_size`), V = 260 ids.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bltjax import bytes as blt_bytes
from bltjax import losses
from bltjax.model import attention

NOISE_MODES = ("per_example", "per_block")
# A block's anchor lies this many bytes or more past its row's (and document's) start:
# `anchor_blocks`' default min_offset, which training uses.
MIN_ANCHOR_OFFSET = 2


# ----------------------------------------------------------------------------- training


class Blocks(NamedTuple):
  """The K noisy blocks of each row (`anchor_blocks`).

  Unused slots (rows with fewer than K anchors) have `valid` False, anchor `len` (so
  `anchors` is non-decreasing along K) and an empty block.
  """
  anchors: jax.Array         # [batch, K] int32: block start s (a patch start); len if unused
  valid: jax.Array           # [batch, K] bool: the slot holds a block
  positions: jax.Array       # [batch, K, B] int32: s + arange(B), the RoPE positions
  in_block: jax.Array        # [batch, K, B] bool: real byte of the block (a prefix of it)
  lengths: jax.Array         # [batch, K] int32: in_block positions per block (0 if unused)
  context_patch: jax.Array   # [batch, K] int32: global output read by the block (i - 1)
  num_candidates: jax.Array  # [batch] int32: patch starts that could anchor a block
  num_dropped: jax.Array     # [batch] int32: candidates left out, max(candidates - K, 0)


class Corruption(NamedTuple):
  """Noisy blocks (`corrupt_blocks`)."""
  tokens: jax.Array     # [batch, K, B] int32: clean ids with masked positions set to MASK
  is_masked: jax.Array  # [batch, K, B] bool: masked positions (always inside the block)
  t: jax.Array          # [batch, K] float32: mask probability of each block


class Ranges(NamedTuple):
  """Key ranges per query row: row q sees keys `[a0, a1) U [b0, b1)`.

  Indices are in the concatenated `[clean ; noisy]` space of length `len + K * B`,
  both for queries and keys. An empty range is written `[x, x)` with x next to the
  row's other keys (see `bltd_attention_ranges`), so per-tile min/max stay tight.
  """
  a0: jax.Array  # [batch, len + K * B] int32
  a1: jax.Array
  b0: jax.Array
  b1: jax.Array


def _take(x, idx):
  """x `[batch, len]`, idx `[batch, ...]` (clipped into range) -> `[batch, ...]`."""
  flat = jnp.clip(idx, 0, x.shape[1] - 1).reshape(idx.shape[0], -1)
  return jnp.take_along_axis(x, flat, axis=1).reshape(idx.shape)


def max_block_size(seq_len: int) -> int:
  """The most real bytes a noisy block of a `seq_len`-byte row can hold: it starts
  `MIN_ANCHOR_OFFSET` or more bytes into the row and is cut at the row's end (a longer
  block only adds padding positions, K of them per extra byte)."""
  return seq_len - MIN_ANCHOR_OFFSET


def _block_extent(anchors, valid, segment_ids, allowed, block_size):
  """positions `[batch, K, B]` and in_block (the leading run of real bytes)."""
  length = segment_ids.shape[1]
  positions = anchors[:, :, None] + jnp.arange(block_size, dtype=jnp.int32)
  same_doc = _take(segment_ids, positions) == _take(segment_ids, anchors)[:, :, None]
  ok = valid[:, :, None] & (positions < length) & same_doc & _take(allowed, positions)
  # A block is cut at its first non-real byte: in_block is always a prefix.
  in_block = jnp.cumprod(ok.astype(jnp.int32), axis=-1).astype(bool)
  return positions, in_block


def anchor_blocks(starts, segment_ids, *, block_size: int, num_blocks: int, rng,
                  allowed=None, min_offset: int = MIN_ANCHOR_OFFSET) -> Blocks:
  """Chooses K = `num_blocks` block anchors per row among the patch starts.

  Candidates are the patch starts s (`starts[:, :len]`) with `s - doc_start(s) >=
  min_offset`: with the default 2 this leaves out the BOS patch and the first byte
  patch (positions 0 and 1 of the row), and likewise a document's first two positions
  when it begins inside the row (its BOS block would have no same-document prefix and
  would read the previous document's global output). Candidates must also be
  `allowed`. A row with <= K candidates uses all of them (the other slots are unused);
  a row with more keeps a uniformly random subset of K (top-K of i.i.d. uniform scores;
  a pure function of `rng`). Anchors are sorted by position, unused slots last.

  K is static (shapes depend on it). All anchors of a typical row need
  K ~ len / mean_patch_len (decoder length ~ len * (1 + B / mean_patch_len)); a smaller
  K subsamples blocks as a memory knob. `num_dropped` counts the candidates left out
  per row, so the caller can log `sum(num_dropped) / sum(num_candidates)`.

  Args:
    starts: `[batch, len + 1]` bool patch start flags (`Patches.starts`).
    segment_ids: `[batch, len]` int32; documents are contiguous runs.
    block_size: B (static).
    num_blocks: K (static).
    rng: PRNG key for the subset.
    allowed: `[batch, len]` bool, bytes that may anchor or lie in a block; default
      `segment_ids > 0` (the padding of packed rows has segment 0). Pass e.g.
      `patches.in_patches & (segment_ids > 0)` to keep blocks within the first P
      patches. Blocks are cut at the first byte that is not allowed.
    min_offset: smallest anchor offset from the row's and the document's start (static).

  Returns:
    `Blocks`. `in_block` is False past the row's end, in another document, at bytes
    not allowed, and in unused slots.
  """
  candidate = _candidates(starts, segment_ids, allowed, min_offset)
  batch, length = segment_ids.shape
  scores = jnp.where(candidate, jax.random.uniform(rng, (batch, length)), -1.0)
  if num_blocks > length:
    scores = jnp.pad(scores, ((0, 0), (0, num_blocks - length)), constant_values=-1.0)
  top, index = jax.lax.top_k(scores, num_blocks)
  anchors = jnp.sort(jnp.where(top >= 0.0, index, length).astype(jnp.int32), axis=1)
  return _blocks(anchors, starts, segment_ids, allowed, candidate, block_size)


def anchor_blocks_per_chunk(starts, segment_ids, *, block_size: int, chunk: int,
                            blocks_per_chunk: int, rng, allowed=None,
                            min_offset: int = MIN_ANCHOR_OFFSET) -> Blocks:
  """`anchor_blocks`, but choosing up to A = `blocks_per_chunk` anchors in each chunk.

  Chunk c holds the anchors s with `(s - 1) // chunk == c`: the clean keys such a block
  may see (`[s - window, s)`, chunk = window) all lie in chunks c - 1 and c, which is
  what `attention.noisy_block_attention` relies on. Returns `Blocks` with
  K = n_chunks * A slots in chunk-major order (each chunk's anchors sorted, its unused
  slots last with anchor = len).
  """
  candidate = _candidates(starts, segment_ids, allowed, min_offset)
  batch, length = segment_ids.shape
  n_chunks = -(-length // chunk)
  # Position s goes to slot s - 1 of the chunked layout (s = 0 is never a candidate).
  scores = jnp.where(candidate, jax.random.uniform(rng, (batch, length)), -1.0)[:, 1:]
  scores = jnp.pad(scores, ((0, 0), (0, n_chunks * chunk - length + 1)), constant_values=-1.0)
  scores = scores.reshape(batch, n_chunks, chunk)
  if blocks_per_chunk > chunk:
    scores = jnp.pad(scores, ((0, 0), (0, 0), (0, blocks_per_chunk - chunk)),
                     constant_values=-1.0)
  top, index = jax.lax.top_k(scores, blocks_per_chunk)
  first = (jnp.arange(n_chunks, dtype=jnp.int32) * chunk + 1)[None, :, None]
  anchors = jnp.sort(jnp.where(top >= 0.0, index + first, length).astype(jnp.int32), axis=2)
  return _blocks(anchors.reshape(batch, -1), starts, segment_ids, allowed, candidate,
                 block_size)


def per_chunk_layout(x, blocks_per_chunk: int):
  """`[batch, K, B, ...]` per block -> `[batch, n_chunks, A * B, ...]`, the chunk-major
  noisy layout (K = n_chunks * A): block k's positions at k * B of the flat noisy axis."""
  b, k, size = x.shape[:3]
  return x.reshape(b, k // blocks_per_chunk, blocks_per_chunk * size, *x.shape[3:])


def chunked_attention_info(blocks: Blocks, segment_ids, *, blocks_per_chunk: int
                           ) -> attention.NoisyAttentionInfo:
  """Where the noisy positions of `anchor_blocks_per_chunk`'s blocks sit, for the chunked
  XLA attention (`attention.CleanNoisySpec`). Each field `[batch, n_chunks, A * B]`."""
  b, k, size = blocks.in_block.shape
  length = segment_ids.shape[1]
  per_position = lambda x: jnp.broadcast_to(x[..., None], x.shape + (size,))
  chunked = lambda x: per_chunk_layout(x, blocks_per_chunk)
  block_index = jnp.broadcast_to(jnp.arange(blocks_per_chunk, dtype=jnp.int32)[:, None],
                                 (b, k // blocks_per_chunk, blocks_per_chunk, size))
  anchor_segments = jnp.take_along_axis(segment_ids, jnp.minimum(blocks.anchors, length - 1),
                                        axis=1)
  return attention.NoisyAttentionInfo(
      positions=chunked(blocks.positions), anchors=chunked(per_position(blocks.anchors)),
      blocks=block_index.reshape(b, k // blocks_per_chunk, blocks_per_chunk * size),
      segment_ids=chunked(per_position(anchor_segments)), valid=chunked(blocks.in_block))


def _candidates(starts, segment_ids, allowed, min_offset):
  length = segment_ids.shape[1]
  if allowed is None:
    allowed = segment_ids > 0
  pos = jnp.arange(length, dtype=jnp.int32)[None]
  return (starts[:, :length] & allowed
          & (pos - attention.document_starts(segment_ids) >= min_offset))


def _blocks(anchors, starts, segment_ids, allowed, candidate, block_size) -> Blocks:
  length = segment_ids.shape[1]
  if allowed is None:
    allowed = segment_ids > 0
  valid = anchors < length
  positions, in_block = _block_extent(anchors, valid, segment_ids, allowed, block_size)
  patch_ids = jnp.cumsum(starts[:, :length].astype(jnp.int32), axis=1) - 1
  context_patch = jnp.where(valid, _take(patch_ids, anchors) - 1, 0)
  num_candidates = jnp.sum(candidate, axis=1, dtype=jnp.int32)
  num_chosen = jnp.sum(valid, axis=1, dtype=jnp.int32)
  return Blocks(anchors=anchors, valid=valid, positions=positions, in_block=in_block,
                lengths=jnp.sum(in_block, axis=-1, dtype=jnp.int32),
                context_patch=context_patch, num_candidates=num_candidates,
                num_dropped=num_candidates - num_chosen)


def gather_blocks(x, blocks: Blocks, fill=blt_bytes.PAD_ID):
  """Per-byte values for the block positions, `fill` outside the blocks.

  x `[batch, len, ...]` -> `[batch, K, B, ...]`. With x = the input ids this gives the
  clean block tokens, which are also the targets of the noisy positions (no shift).
  """
  x = jnp.asarray(x)
  batch, k, b = blocks.positions.shape
  idx = jnp.clip(blocks.positions, 0, x.shape[1] - 1).reshape(batch, k * b)
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  out = jnp.take_along_axis(x, idx, axis=1).reshape((batch, k, b) + x.shape[2:])
  mask = blocks.in_block.reshape(blocks.in_block.shape + (1,) * (x.ndim - 2))
  return jnp.where(mask, out, jnp.asarray(fill, x.dtype))


def corrupt_blocks(clean_tokens, in_block, *, rng, noise: str = "per_example",
                   eps: float = 1e-3) -> Corruption:
  """Absorbing-mask corruption: each real byte becomes MASK with probability t.

  t ~ U(eps, 1] per example (the paper; the same t for all K blocks of a row) or per
  block (BD3-LM), drawn as `1 - (1 - eps) * u`, u ~ U[0, 1). Only `in_block` positions
  are masked; the others keep their clean value. A block may end up with no masked
  position (likelier for small t and short blocks): that is allowed, it simply adds
  nothing to the masked loss or its count (no resampling).

  Args:
    clean_tokens: `[batch, K, B]` int32 (`gather_blocks` of the inputs).
    in_block: `[batch, K, B]` bool.
    rng: PRNG key.
    noise: "per_example" | "per_block" (static).
    eps: smallest mask probability, > 0 so the ELBO weight 1/t stays bounded.

  Returns:
    `Corruption(tokens, is_masked, t [batch, K])`.
  """
  if noise not in NOISE_MODES:
    raise ValueError(f"noise {noise!r} is not one of {NOISE_MODES}")
  clean_tokens = jnp.asarray(clean_tokens)
  batch, k, _ = clean_tokens.shape
  t_rng, mask_rng = jax.random.split(rng)
  u = jax.random.uniform(t_rng, (batch, 1) if noise == "per_example" else (batch, k))
  t = jnp.broadcast_to(1.0 - (1.0 - eps) * u, (batch, k))
  is_masked = in_block & (jax.random.uniform(mask_rng, clean_tokens.shape) < t[..., None])
  tokens = jnp.where(is_masked, jnp.asarray(blt_bytes.MASK_ID, clean_tokens.dtype),
                     clean_tokens)
  return Corruption(tokens=tokens, is_masked=is_masked, t=t)


def bltd_positions(blocks: Blocks, seq_len: int):
  """RoPE positions of the `[clean ; noisy]` layout: `[batch, len + K * B]` int32."""
  batch = blocks.positions.shape[0]
  clean = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
  return jnp.concatenate([clean, blocks.positions.reshape(batch, -1)], axis=1)


def bltd_attention_ranges(anchors, valid, segment_ids, *, seq_len: int, block_size: int,
                          window: int = 0, in_block=None) -> Ranges:
  """Self-attention key ranges for the decoder's `[clean copy ; K noisy blocks]` input.

  With W = `window` (0: unlimited) and doc(t) the first position of t's document:
  - clean row t: `[max(doc(t), t - W + 1), t + 1)`, the AR decoder's own rule
    (`attention.attention_mask`); it never sees a noisy position. Second range empty,
    written `[0, 0)`.
  - noisy row p = s + j of block k (anchor s): the clean prefix
    `[max(doc(s), p - W + 1), s)` and the real bytes of its own block
    `[len + k*B, len + k*B + n_k)`, bidirectionally, where n_k is the block's length
    (`Blocks.lengths`): b1 is shrunk so a block's padding is never attended. It never
    sees the clean copy at positions >= s (its own bytes and later) nor another block.
    The window is per position (p - W + 1, as for a clean row at p); the prefix uses
    doc(s), so a block never reaches into the previous document.
  - padding rows (j >= n_k, and every row of an unused block) attend to nothing: both
    ranges empty, `[s, s)` and `[len + k*B, len + k*B)` (an unused block's s is
    `len`). Attention must give such rows zeros (e.g. `attention.masked_attention`).

  Args:
    anchors: `[batch, K]` int32 block starts.
    valid: `[batch, K]` bool.
    segment_ids: `[batch, len]` int32.
    seq_len: len (static; must equal `segment_ids.shape[1]`).
    block_size: B (static).
    window: W (static); 0 means unlimited.
    in_block: `[batch, K, B]` bool from `anchor_blocks` (a prefix of each block); by
      default recomputed as "before the row's end and in the anchor's document" (pass it
      when `anchor_blocks` was given a custom `allowed`).

  Returns:
    `Ranges`, each `[batch, len + K * B]` int32.
  """
  batch, length = segment_ids.shape
  if length != seq_len:
    raise ValueError(f"segment_ids has length {length}, seq_len is {seq_len}")
  k = anchors.shape[1]
  anchors = jnp.where(valid, anchors, seq_len).astype(jnp.int32)
  if in_block is None:
    _, in_block = _block_extent(anchors, valid, segment_ids,
                                jnp.ones((batch, seq_len), bool), block_size)
  lengths = jnp.sum(in_block, axis=-1, dtype=jnp.int32)
  doc = attention.document_starts(segment_ids)
  clean_a0, clean_a1, clean_b, _ = attention.causal_ranges(segment_ids, window=window)

  j = jnp.arange(block_size, dtype=jnp.int32)
  s = anchors[:, :, None]                                     # [batch, K, 1]
  p = s + j                                                   # [batch, K, B]
  doc_s = _take(doc, anchors)[:, :, None]
  noisy_a0 = jnp.maximum(doc_s, p - window + 1) if window else jnp.broadcast_to(doc_s, p.shape)
  noisy_a0 = jnp.minimum(noisy_a0, s)                         # empty, not reversed, if j >= W
  noisy_a1 = jnp.broadcast_to(s, p.shape)
  block_start = seq_len + jnp.arange(k, dtype=jnp.int32)[None, :, None] * block_size
  noisy_b0 = jnp.broadcast_to(block_start, p.shape)
  noisy_b1 = block_start + lengths[:, :, None]
  noisy_a0 = jnp.where(in_block, noisy_a0, s)
  noisy_a1 = jnp.where(in_block, noisy_a1, s)
  noisy_b1 = jnp.where(in_block, noisy_b1, noisy_b0)

  cat = lambda clean, noisy: jnp.concatenate([clean, noisy.reshape(batch, -1)], axis=1)
  return Ranges(a0=cat(clean_a0, noisy_a0), a1=cat(clean_a1, noisy_a1),
                b0=cat(clean_b, noisy_b0), b1=cat(clean_b, noisy_b1))


def ranges_to_mask(ranges: Ranges, num_keys: int | None = None):
  """Dense `[batch, Q, num_keys]` bool mask of `Ranges` (test reference, small sizes)."""
  num_keys = ranges.a0.shape[1] if num_keys is None else num_keys
  key = jnp.arange(num_keys, dtype=jnp.int32)[None, None]
  inside = lambda lo, hi: (key >= lo[:, :, None]) & (key < hi[:, :, None])
  return inside(ranges.a0, ranges.a1) | inside(ranges.b0, ranges.b1)


# ----------------------------------------------------------------------------- decoding


class Reveal(NamedTuple):
  """One unmasking step's choice (`confidence_reveal`)."""
  reveal: jax.Array      # [batch, B] bool: positions to fill now (all still masked)
  tokens: jax.Array      # [batch, B] int32: the predicted id at every position (never MASK)
  confidence: jax.Array  # [batch, B] float32: model probability of `tokens`


def predictive_entropy(logits):
  """Entropy (nats) of the MASK-free prediction. `[..., V]` -> `[...]` float32."""
  logp = jax.nn.log_softmax(losses.suppress_mask_logit(logits), axis=-1)
  p = jnp.exp(logp)
  return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def _at_least_one(chosen, score, still_masked):
  """chosen | (the masked position of highest score), within still_masked."""
  best = jnp.argmax(jnp.where(still_masked, score, -jnp.inf), axis=-1)
  is_best = jnp.arange(score.shape[-1])[None] == best[:, None]
  return still_masked & (chosen | is_best)


def confidence_reveal(logits, still_masked, *, alpha, tokens=None) -> Reveal:
  """Fast-dLLM confidence rule for one decoder step over a block.

  The confidence of a position is the model's probability (MASK removed) of its token:
  `tokens` if given (generation chooses them, greedy or sampled), else the argmax.
  Every still-masked position with confidence >= alpha is revealed, and always the
  single most confident one (ties: the leftmost), so a step reveals >= 1 position while
  any is masked. alpha > 1 reveals one per step, in confidence order (B steps per
  block); alpha = 0 reveals the whole block at once.

  Args:
    logits: `[batch, B, V]` decoder logits for the block (log-probs work too).
    still_masked: `[batch, B]` bool.
    alpha: threshold (a float or a traced scalar).
    tokens: `[batch, B]` int chosen ids, or None for the argmax.

  Returns:
    `Reveal(reveal, tokens, confidence)`.
  """
  logp = jax.nn.log_softmax(losses.suppress_mask_logit(logits), axis=-1)
  if tokens is None:
    tokens = jnp.argmax(logp, axis=-1).astype(jnp.int32)
  confidence = jnp.exp(jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0])
  reveal = _at_least_one(confidence >= alpha, confidence, still_masked)
  return Reveal(reveal=reveal, tokens=tokens, confidence=confidence)


def entropy_bounded_reveal(entropies, still_masked, *, gamma, subtract_max: bool = True):
  """EB-Sampler rule (Ben-Hamu et al., arXiv 2505.24857) for one step over a block.

  The still-masked positions are sorted by entropy, ascending (ties: leftmost first);
  the longest prefix H_(1) <= ... <= H_(k) with
  `sum_{i<=k} H_(i) - max_{i<=k} H_(i) <= gamma` is revealed, and at least the
  lowest-entropy position. The left side grows with k, so the accepted set is a prefix
  of the order. gamma = inf reveals every masked position; gamma = 0 reveals one (or
  several when their entropies after the first are 0). `subtract_max=False` gives the
  plain "cumulative entropy <= gamma" variant. Static shapes: sort + cumsum.

  Args:
    entropies: `[batch, B]` float (nats; `predictive_entropy`).
    still_masked: `[batch, B]` bool.
    gamma: bound (a float or a traced scalar).
    subtract_max: the EB-Sampler form (static).

  Returns:
    reveal `[batch, B]` bool.
  """
  entropies = entropies.astype(jnp.float32)
  order = jnp.argsort(jnp.where(still_masked, entropies, jnp.inf), axis=-1, stable=True)
  masked = jnp.take_along_axis(still_masked, order, axis=-1)
  h = jnp.where(masked, jnp.take_along_axis(entropies, order, axis=-1), 0.0)
  bound = jnp.cumsum(h, axis=-1)
  if subtract_max:
    bound = bound - jax.lax.cummax(h, axis=h.ndim - 1)
  accept = masked & (bound <= gamma)
  accept = accept.at[:, 0].set(masked[:, 0])  # at least one
  accept = jnp.cumprod(accept.astype(jnp.int32), axis=-1).astype(bool)
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(accept, inverse, axis=-1)


def apply_reveal(block_tokens, still_masked, reveal, tokens):
  """Writes `tokens` at `reveal` into the block: -> (block_tokens, still_masked)."""
  return jnp.where(reveal, tokens, block_tokens), still_masked & ~reveal
