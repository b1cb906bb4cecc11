"""BLT-S (self-speculation) and BLT-DV (diffusion draft + verification).

A round starts from the exact next byte d_0 (its logits came from the last verified
position). The drafter proposes d_1..d_{k-1}:
- BLT-S: the local decoder alone, byte by byte, past the patch boundary, reading the
  stale latest global output (`Engine.draft_step`);
- BLT-DV: one BLT-D diffusion step on `[d_0, MASK, ..., MASK]` (`Engine.block_step`).
One `Engine.extend` over d_0..d_{k-1} (entropy model, encoder, global model for the
patches that close, decoder) then gives the model's own choice g_j after each d_j.
The longest prefix with d_{j+1} == g_j is kept, g_m (the correction, or a bonus byte
when all matched) is the next round's d_0, and the caches roll back to the kept bytes.
The verifier chooses exactly as AR does (greedy, or position-keyed sampling), so the
output equals AR's byte for byte.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bltjax import bytes as blt_bytes
from bltjax.generate import sampling as sampling_lib
from bltjax.generate.ar import emit
from bltjax.generate.engine import Engine, GenState

DRAFTERS = ("decoder", "diffusion")


def _decoder_draft(engine: Engine, params, state: GenState, first, *, draft_len, sampling,
                   rng):
  """d_0 = first; d_j from local decoder steps on d_{j-1}. Returns (state, drafts [B, k])."""
  drafts = jnp.zeros((first.shape[0], draft_len), jnp.int32).at[:, 0].set(first)

  def step(j, carry):
    state, drafts = carry
    position = state.length + j - 1
    state, logits = engine.draft_step(params, state, drafts[:, j - 1], position)
    token = sampling_lib.choose(logits, position + 1, rng, sampling)
    return state, drafts.at[:, j].set(token)

  return jax.lax.fori_loop(1, draft_len, step, (state, drafts))


def _diffusion_draft(engine: Engine, params, state: GenState, first, *, draft_len, sampling,
                     rng):
  """d_0 = first; d_1..d_{k-1} from one diffusion step on [d_0, MASK...]."""
  block = jnp.full((first.shape[0], draft_len), blt_bytes.MASK_ID, jnp.int32)
  block = block.at[:, 0].set(first)
  state, logits = engine.block_step(params, state, block)
  positions = state.length[:, None] + jnp.arange(draft_len)
  tokens = sampling_lib.choose(logits, positions, rng, sampling)
  return state, tokens.at[:, 0].set(first)


def generate(engine: Engine, params, state: GenState, logits, *, max_bytes: int,
             sampling: sampling_lib.SamplingConfig, rng, draft_len: int,
             drafter: str = "decoder"):
  """Speculative decoding from a prefilled state; returns (state, out, count, stats).

  stats: `drafted` and `accepted` draft bytes (d_1.., not the exact d_0), summed."""
  if drafter not in DRAFTERS:
    raise ValueError(f"drafter {drafter!r} is not one of {DRAFTERS}")
  if not 2 <= draft_len <= engine.max_extend:
    raise ValueError(f"draft_len={draft_len} must be in [2, max_extend={engine.max_extend}]")
  draft = _decoder_draft if drafter == "decoder" else _diffusion_draft
  batch = logits.shape[0]

  def cond(carry):
    return ~jnp.all(carry[4])

  def body(carry):
    state, first, out, count, done, stats = carry
    start = state.length
    state, drafts = draft(engine, params, state, first, draft_len=draft_len,
                          sampling=sampling, rng=rng)
    state, verify = engine.extend(params, state, drafts, jnp.where(done, 0, draft_len))
    choices = sampling_lib.choose(verify, start[:, None] + 1 + jnp.arange(draft_len), rng,
                                  sampling)
    agree = drafts[:, 1:] == choices[:, :-1]                         # [B, k-1]
    matched = jnp.sum(jnp.cumprod(agree.astype(jnp.int32), axis=1), axis=1)
    n_accept = matched + 1                                           # d_0 .. d_m
    live = ~done
    out, count, done, n_keep = emit(out, count, done, drafts, max_bytes, n_valid=n_accept)
    state = engine.rollback(state, start + n_keep)
    first = jnp.take_along_axis(choices, matched[:, None], axis=1)[:, 0]
    stats = {"drafted": stats["drafted"] + jnp.sum(jnp.where(live, draft_len - 1, 0)),
             "accepted": stats["accepted"] + jnp.sum(jnp.where(live, matched, 0))}
    return state, first, out, count, done, stats

  first = sampling_lib.choose(logits, state.length, rng, sampling)
  zeros = jnp.zeros((batch,), jnp.int32)
  stats = {"drafted": jnp.zeros((), jnp.int32), "accepted": jnp.zeros((), jnp.int32)}
  carry = (state, first, jnp.zeros((batch, max_bytes), jnp.int32), zeros,
           jnp.zeros((batch,), bool), stats)
  state, _, out, count, _, stats = jax.lax.while_loop(cond, body, carry)
  return state, out, count, stats
