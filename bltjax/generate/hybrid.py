"""BLT-H (a bltjax extension, not in the Fast BLT paper): per block, diffusion when the
model is confident, else exact AR.

At a patch boundary the decoder takes one diffusion step on a block of B MASKs. If the
mean confidence of its predictions reaches `gate`, the block is finished by BLT-D
(`diffusion.denoise_block`) and committed with a forced patch end; otherwise the row
emits one exact AR byte and tries again at its next patch boundary. Rows of a batch may
take different paths in the same iteration: one `Engine.extend` commits them all.
"""

from __future__ import annotations

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


def generate(engine: Engine, params, state: GenState, logits, *, max_bytes: int,
             sampling: sampling_lib.SamplingConfig, rng, block_size: int,
             rule: diffusion_dec.UnmaskRule, gate: float):
  """BLT-H decoding from a prefilled state. Returns (state, out, count, stats)."""
  if block_size > engine.max_extend:
    raise ValueError(f"block_size={block_size} exceeds max_extend={engine.max_extend}")
  batch = logits.shape[0]
  masks = jnp.full((batch, block_size), blt_bytes.MASK_ID, jnp.int32)

  def try_diffusion(state, boundary):
    state, first = engine.block_step(params, state, masks)
    use = boundary & (block_confidence(first) >= gate)
    state, block, steps = diffusion_dec.denoise_block(
        engine, params, state, rule, rng, sampling, block_size, active=use,
        first_logits=first)
    return state, block, use, steps

  def no_diffusion(state, boundary):
    return state, masks, jnp.zeros_like(boundary), jnp.zeros((), jnp.int32)

  def cond(carry):
    return ~jnp.all(carry[4])

  def body(carry):
    state, logits, out, count, done, stats = carry
    boundary = engine.at_boundary(state) & ~done
    state, block, use, steps = jax.lax.cond(jnp.any(boundary), try_diffusion, no_diffusion,
                                            state, boundary)
    ar_token = sampling_lib.choose(logits, state.length, rng, sampling)
    tokens = jnp.where(use[:, None], block, masks.at[:, 0].set(ar_token))
    out, count, done_after, n_emit = emit(out, count, done, tokens, max_bytes,
                                          n_valid=jnp.where(use, block_size, 1))
    n_commit = jnp.where(done_after, 0, n_emit)

    def commit_blocks(state):   # some rows diffused: a block-wide commit
      state, logits, _ = diffusion_dec.commit_block(engine, params, state, tokens, n_commit,
                                                    "forced", force=use)
      last = jnp.clip(n_commit - 1, 0, block_size - 1)
      return state, jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]

    def commit_bytes(state):    # every row took an AR byte: a one-byte extend
      state, logits = engine.extend(params, state, tokens[:, :1], n_commit)
      return state, logits[:, 0]

    state, logits = jax.lax.cond(jnp.any(use), commit_blocks, commit_bytes, state)
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
