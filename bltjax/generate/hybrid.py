"""BLT-H (a bltjax extension, not in the Fast BLT paper): per block, diffusion when the
model is confident, else exact AR.

At a patch boundary the decoder takes one diffusion step on a block of B MASKs. If the
mean confidence of its predictions reaches `gate`, the block is finished by BLT-D
(`diffusion.denoise_block`) and committed with a forced patch end; otherwise the row
emits one exact AR byte and tries again at its next patch boundary. Rows of a batch may
take different paths in the same iteration: one `Engine.extend` commits them all.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bltjax import bytes as blt_bytes
from bltjax.generate import diffusion as diffusion_dec
from bltjax.generate import sampling as sampling_lib
from bltjax.generate.ar import emit
from bltjax.generate.engine import Engine, GenState


def block_confidence(logits):
  """Mean over the block of the top probability (PAD/BOS/MASK excluded). `[B]`."""
  probs = jax.nn.softmax(sampling_lib.output_logits(logits), axis=-1)
  return jnp.mean(jnp.max(probs, axis=-1), axis=-1)


def _at_most_once(run, go, carry):
  """`run(carry)` if `go` (a scalar bool), else `carry`, as a while loop of zero or one
  trips. A while loop updates its carry in place; the `lax.cond` between a block commit
  and a one-byte extend that this replaces, both branches returning the decoding state,
  copied the caches whole on every step (BLT-H ran at 0.32x AR on CPU, bench/RESULTS.md)."""
  return jax.lax.while_loop(lambda c: c[1], lambda c: (run(c[0]), False), (carry, go))[0]


def generate(engine: Engine, params, state: GenState, logits, *, max_bytes: int,
             sampling: sampling_lib.SamplingConfig, rng, block_size: int,
             rule: diffusion_dec.UnmaskRule, gate: float):
  """BLT-H decoding from a prefilled state. Returns (state, out, count, stats)."""
  if block_size > engine.max_extend:
    raise ValueError(f"block_size={block_size} exceeds max_extend={engine.max_extend}")
  batch = logits.shape[0]
  masks = jnp.full((batch, block_size), blt_bytes.MASK_ID, jnp.int32)

  # The branches return the NFE counts, not the state (see `_at_most_once`).
  def try_diffusion(state, boundary):
    state, first = engine.block_step(params, state, masks)
    use = boundary & (block_confidence(first) >= gate)
    state, block, steps = diffusion_dec.denoise_block(
        engine, params, state, rule, rng, sampling, block_size, active=use,
        first_logits=first)
    return state.nfe, block, use, steps

  def no_diffusion(state, boundary):
    return state.nfe, masks, jnp.zeros_like(boundary), jnp.zeros((), jnp.int32)

  def cond(carry):
    return ~jnp.all(carry[4])

  def body(carry):
    state, logits, out, count, done, stats = carry
    boundary = engine.at_boundary(state) & ~done
    nfe, block, use, steps = jax.lax.cond(jnp.any(boundary), try_diffusion, no_diffusion,
                                          state, boundary)
    state = dataclasses.replace(state, nfe=nfe)
    ar_token = sampling_lib.choose(logits, state.length, rng, sampling)
    tokens = jnp.where(use[:, None], block, masks.at[:, 0].set(ar_token))
    out, count, done_after, n_emit = emit(out, count, done, tokens, max_bytes,
                                          n_valid=jnp.where(use, block_size, 1))
    n_commit = jnp.where(done_after, 0, n_emit)

    def commit_blocks(carry):   # some rows diffused: a block-wide commit
      state, block_logits, _ = diffusion_dec.commit_block(
          engine, params, carry[0], tokens, n_commit, "forced", force=use)
      last = jnp.clip(n_commit - 1, 0, block_size - 1)
      return state, jnp.take_along_axis(block_logits, last[:, None, None], axis=1)[:, 0]

    def commit_bytes(carry):    # every row took an AR byte: a one-byte extend
      state, byte_logits = engine.extend(params, carry[0], tokens[:, :1], n_commit)
      return state, byte_logits[:, 0]

    some_diffused = jnp.any(use)
    state, logits = _at_most_once(commit_blocks, some_diffused, (state, logits))
    state, logits = _at_most_once(commit_bytes, ~some_diffused, (state, logits))
    stats = {"diffusion_blocks": stats["diffusion_blocks"] + jnp.sum(use),
             "ar_bytes": stats["ar_bytes"] + jnp.sum(~use & ~done),
             "steps": stats["steps"] + steps}
    return state, logits, out, count, done_after, stats

  zeros = jnp.zeros((batch,), jnp.int32)
  stats = {k: jnp.zeros((), jnp.int32) for k in ("diffusion_blocks", "ar_bytes", "steps")}
  carry = (state, logits, jnp.zeros((batch, max_bytes), jnp.int32), zeros,
           jnp.zeros((batch,), bool), stats)
  state, _, out, count, _, stats = jax.lax.while_loop(cond, body, carry)
  return state, out, count, stats
