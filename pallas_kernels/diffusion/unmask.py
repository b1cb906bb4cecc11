"""`unmask_step`: one BLT-D decoder step's unmasking as one fused kernel (GPU, TPU).

From the block's logits to the revealed tokens in one pass over `[Bk, V]` per row:
softmax over the allowed ids, argmax (or the given sampled tokens), each position's
confidence or entropy, the reveal rule (`reference.unmask_reference`) and the write into
the block, instead of a chain of small XLA ops per decoder step. Rows are grid steps;
the entropy-bounded rule's sort is a rank count over the block's `Bk x Bk` pairs (Bk is
at most a few dozen).

Layout: logits `[R, Bk, Vp]` with V padded (GPU: a power of 2, Triton; TPU: a multiple
of 128) and Bk padded to a power of 2 on GPU; per-position ints as `[R, Bk, 1]` and the
threshold as `[R, 1, 1]` (no lane slicing, no scalar tables).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import backends
from .reference import RULES, unmask_reference

_NEG = -1e30


def _column_to_row(col, eye):
  """`[n, 1]` -> `[1, n]` through the diagonal (no transpose in the kernel)."""
  return jnp.sum(jnp.where(eye, col, jnp.zeros_like(col)), axis=0, keepdims=True)


def _unmask_kernel(thr_ref, logits_ref, tokens_ref, block_ref, still_ref, out_block_ref,
                   out_still_ref, *, rule, never_ids, vocab, given_tokens, subtract_max):
  z = logits_ref[...].astype(jnp.float32)                       # [Bk, Vp]
  bk, vp = z.shape
  ids = lax.broadcasted_iota(jnp.int32, (bk, vp), 1)
  never = ids >= vocab
  for i in never_ids:
    never = never | (ids == i)
  z = jnp.where(never, _NEG, z)
  top = jnp.max(z, axis=1, keepdims=True)
  e = jnp.where(never, 0.0, jnp.exp(z - top))
  total = jnp.sum(e, axis=1, keepdims=True)
  logp = z - top - jnp.log(total)
  if given_tokens:
    tokens = tokens_ref[...]
  else:   # argmax, leftmost on ties
    tokens = jnp.min(jnp.where(z == top, ids, vp), axis=1, keepdims=True)
  still = still_ref[...] != 0                                   # [Bk, 1]
  threshold = thr_ref[...]                                      # [1, 1]
  pos = lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
  if rule == "confidence":
    confidence = jnp.exp(jnp.sum(jnp.where(ids == tokens, logp, 0.0), axis=1, keepdims=True))
    score = jnp.where(still, confidence, -1.0)
    best_score = jnp.max(score, axis=0, keepdims=True)
    best = jnp.min(jnp.where(score == best_score, pos, bk), axis=0, keepdims=True)
    reveal = still & ((confidence >= threshold) | (pos == best))
  else:
    p = e / total
    entropy = -jnp.sum(jnp.where(never, 0.0, p * logp), axis=1, keepdims=True)   # [Bk, 1]
    eye = (lax.broadcasted_iota(jnp.int32, (bk, bk), 0)
           == lax.broadcasted_iota(jnp.int32, (bk, bk), 1))
    entropy_row = _column_to_row(entropy, eye)                  # [1, Bk]
    still_row = _column_to_row(still.astype(jnp.int32), eye) > 0
    pos_row = lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    # pair (i, j): masked j comes before masked i in the (entropy, position) order
    before = still_row & ((entropy_row < entropy) | ((entropy_row == entropy) & (pos_row < pos)))
    rank = jnp.sum(before.astype(jnp.int32), axis=1, keepdims=True)
    earlier = jnp.sum(jnp.where(before, entropy_row, 0.0), axis=1, keepdims=True)
    # In ascending order the largest of a prefix is its last entry, position i itself.
    bound = earlier if subtract_max else earlier + entropy
    reveal = still & ((rank == 0) | (bound <= threshold))
  out_block_ref[...] = jnp.where(reveal, tokens, block_ref[...])
  out_still_ref[...] = (still & ~reveal).astype(jnp.int32)


def unmask_step(logits, block, still_masked, threshold, *, rule: str = "confidence",
                tokens=None, never_ids=(0, 1, 3), subtract_max: bool = True,
                backend: str | None = None, interpret: Any = False, num_warps: int = 4):
  """One unmasking step: logits `[R, Bk, V]`, block `[R, Bk]` int32, still_masked
  `[R, Bk]` bool, threshold (alpha or gamma) a scalar or `[R]`; `tokens` `[R, Bk]` or
  None (argmax). Returns (block `[R, Bk]` int32, still_masked `[R, Bk]` bool); see
  `reference.unmask_reference` for the rules. `backend` as in `range_attention`."""
  if rule not in RULES:
    raise ValueError(f"rule {rule!r} is not one of {RULES}")
  backend = backends.resolve(backend, interpret)
  rows, bk, vocab = logits.shape
  if block.shape != (rows, bk) or still_masked.shape != (rows, bk):
    raise ValueError(f"block {block.shape} and still_masked {still_masked.shape} must be "
                     f"[rows, block_size] = {(rows, bk)} like logits {logits.shape}")
  if tokens is not None and (tokens.shape != (rows, bk)
                             or not jnp.issubdtype(tokens.dtype, jnp.integer)):
    raise ValueError(f"tokens {tokens.shape} {tokens.dtype} must be integer ids [rows, "
                     f"block_size] = {(rows, bk)} like block")
  if backend == "xla":
    return unmask_reference(logits, block, still_masked, threshold, rule=rule, tokens=tokens,
                            never_ids=never_ids, subtract_max=subtract_max)
  bkp = backends.pow2_at_least(bk, 1) if backend == "gpu" else bk
  vp = backends.pow2_at_least(vocab) if backend == "gpu" else backends.round_up(vocab, 128)
  column = lambda x: jnp.pad(x.astype(jnp.int32), [(0, 0), (0, bkp - bk)])[:, :, None]
  logits_p = jnp.pad(logits, [(0, 0), (0, bkp - bk), (0, vp - vocab)])
  thr = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (rows,)).reshape(rows, 1, 1)
  tok = column(tokens if tokens is not None else jnp.zeros((rows, bk), jnp.int32))
  kernel = functools.partial(_unmask_kernel, rule=rule, never_ids=tuple(never_ids),
                             vocab=vocab, given_tokens=tokens is not None,
                             subtract_max=subtract_max)
  per_position = pl.BlockSpec((None, bkp, 1), lambda r: (r, 0, 0))
  params = backends.compiler_params(backend, 1, num_warps=num_warps)
  new_block, new_still = pl.pallas_call(
      kernel, grid=(rows,),
      in_specs=[pl.BlockSpec((None, 1, 1), lambda r: (r, 0, 0)),
                pl.BlockSpec((None, bkp, vp), lambda r: (r, 0, 0)),
                per_position, per_position, per_position],
      out_specs=[per_position, per_position],
      out_shape=[jax.ShapeDtypeStruct((rows, bkp, 1), jnp.int32)] * 2,
      compiler_params=params, interpret=interpret, name="unmask_step",
  )(thr, logits_p, tok, column(block), column(still_masked))
  return new_block[:, :bk, 0], new_still[:, :bk, 0] != 0
