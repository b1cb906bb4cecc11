"""BLT-D decoding: a block of B bytes in a few decoder steps.

From a patch boundary, B MASK positions are appended; each decoder step
(`Engine.block_step`: the block sees the cached prefix and itself bidirectionally,
reading the global output of the last complete patch, as in training) reveals
- every masked position whose confidence >= alpha (at least the most confident one), or
- with `gamma` set, the entropy-bounded set (EB-Sampler).
The finished block is committed with one `Engine.extend` (entropy model, encoder, the
global model once for its patches, decoder caches). The next block must start at a
patch start: `block_commit="forced"` ends a patch at the block's end;
`"last_boundary"` keeps the bytes up to the last natural patch start inside the block
and generates the rest again.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bltjax import bytes as blt_bytes
from bltjax import diffusion as diffusion_lib
from bltjax.generate import sampling as sampling_lib
from bltjax.generate.ar import emit
from bltjax.generate.engine import Engine, GenState

BLOCK_COMMITS = ("forced", "last_boundary")


UNMASK_IMPLS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class UnmaskRule:
  alpha: float = 0.7            # confidence threshold (Fast BLT uses 0.7)
  gamma: float | None = None    # entropy bound: use the EB rule instead of alpha
  impl: str = "xla"             # xla | pallas (pallas_kernels.diffusion.unmask_step: fused)
  backend: str = ""             # pallas: "" (the kernel package picks), gpu | tpu | xla
  interpret: bool = False       # pallas: the kernel in interpret mode (CPU tests)


def reveal_step(logits, block, still_masked, positions, rule: UnmaskRule, rng,
                sampling: sampling_lib.SamplingConfig):
  """One unmasking step on `[B, Bk]`: chooses tokens and the positions to reveal.
  Returns (block, still_masked)."""
  if rule.impl == "pallas":
    # Imported here: generation needs the kernel package only when it is selected.
    from pallas_kernels import diffusion as kernels  # pylint: disable=g-import-not-at-top
    tokens = None if sampling.greedy else sampling_lib.choose(logits, positions, rng, sampling)
    eb = rule.gamma is not None
    return kernels.unmask_step(
        logits, block, still_masked, rule.gamma if eb else rule.alpha,
        rule="entropy_bounded" if eb else "confidence", tokens=tokens,
        never_ids=sampling_lib.NEVER_IDS, backend=rule.backend or None,
        interpret=rule.interpret)
  tokens = sampling_lib.choose(logits, positions, rng, sampling)
  logits = sampling_lib.output_logits(logits)
  if rule.gamma is None:
    reveal = diffusion_lib.confidence_reveal(logits, still_masked, alpha=rule.alpha,
                                             tokens=tokens).reveal
  else:
    entropies = diffusion_lib.predictive_entropy(logits)
    reveal = diffusion_lib.entropy_bounded_reveal(entropies, still_masked, gamma=rule.gamma)
  return diffusion_lib.apply_reveal(block, still_masked, reveal, tokens)


def denoise_block(engine: Engine, params, state: GenState, rule: UnmaskRule, rng,
                  sampling, block_size: int, active, first_logits=None):
  """Runs decoder steps until the block at the length of each `active` `[B]` row has no
  MASK left.

  `first_logits` `[B, Bk, V]`: the first step's logits if already computed (BLT-H).
  Returns (state with NFE counted, block `[B, Bk]`, steps taken)."""
  batch = state.length.shape[0]
  positions = state.length[:, None] + jnp.arange(block_size)
  block = jnp.full((batch, block_size), blt_bytes.MASK_ID, jnp.int32)
  still = jnp.broadcast_to(active[:, None], (batch, block_size))
  steps = jnp.zeros((), jnp.int32)
  if first_logits is not None:
    block, still = reveal_step(first_logits, block, still, positions, rule, rng, sampling)
    steps += 1

  def cond(carry):
    return jnp.any(carry[2])

  def body(carry):
    state, block, still, steps = carry
    state, logits = engine.block_step(params, state, block)
    block, still = reveal_step(logits, block, still, positions, rule, rng, sampling)
    return state, block, still, steps + 1

  state, block, _, steps = jax.lax.while_loop(cond, body, (state, block, still, steps))
  return state, block, steps


def commit_block(engine: Engine, params, state: GenState, block, n_commit, block_commit: str,
                 force=None):
  """Consumes `block[:, :n_commit]`, ending a patch at its end (rows in `force` `[B]`,
  default all); with "last_boundary", rolls back to the last natural patch start inside
  it. Returns (state, logits `[B, Bk, V]`, n_kept)."""
  rows = jnp.arange(block.shape[0])
  force = jnp.ones(rows.shape, bool) if force is None else force
  end = jnp.where((n_commit > 0) & force, state.length + n_commit - 1, engine.max_len)
  start = state.length
  state = dataclasses.replace(
      state, forced_fires=state.forced_fires.at[rows, end].set(True, mode="drop"))
  state, logits = engine.extend(params, state, block, n_commit)
  if block_commit == "forced":
    return state, logits, n_commit
  inside = start[:, None] + 1 + jnp.arange(block.shape[1] - 1)      # positions s+1 .. s+B-1
  natural = jnp.take_along_axis(state.starts, jnp.clip(inside, 0, engine.max_len), axis=1)
  natural = natural & (inside < start[:, None] + n_commit[:, None])
  last = jnp.max(jnp.where(natural, inside, 0), axis=1)
  n_kept = jnp.where(last > 0, last - start, n_commit)
  state = engine.rollback(state, start + n_kept)
  return state, logits, n_kept


def generate(engine: Engine, params, state: GenState, logits, *, max_bytes: int,
             sampling: sampling_lib.SamplingConfig, rng, block_size: int, rule: UnmaskRule,
             block_commit: str = "forced"):
  """BLT-D decoding from a prefilled state. Returns (state, out, count, stats)."""
  del logits  # blocks start from MASKs; the AR prediction after the prompt is not used
  if block_commit not in BLOCK_COMMITS:
    raise ValueError(f"block_commit {block_commit!r} is not one of {BLOCK_COMMITS}")
  if block_size > engine.max_extend:
    raise ValueError(f"block_size={block_size} exceeds max_extend={engine.max_extend}")
  batch = state.length.shape[0]
  # Blocks start at patch starts: close the prompt's open patch.
  state = engine.close_patch(params, state, ~engine.at_boundary(state))

  def cond(carry):
    return ~jnp.all(carry[3])

  def body(carry):
    state, out, count, done, stats = carry
    state, block, steps = denoise_block(engine, params, state, rule, rng, sampling,
                                        block_size, active=~done)
    out_before = count
    out, count, done_after, n_emit = emit(out, count, done, block, max_bytes)
    state, _, n_kept = commit_block(engine, params, state, block,
                                    jnp.where(done, 0, n_emit), block_commit)
    # Bytes past the last natural boundary are generated again: un-emit them.
    count = jnp.where(done, count, out_before + n_kept)
    done = done | (done_after & (n_kept == n_emit))
    stats = {"blocks": stats["blocks"] + 1, "steps": stats["steps"] + steps}
    return state, out, count, done, stats

  zeros = jnp.zeros((batch,), jnp.int32)
  stats = {"blocks": jnp.zeros((), jnp.int32), "steps": jnp.zeros((), jnp.int32)}
  carry = (state, jnp.zeros((batch, max_bytes), jnp.int32), zeros, jnp.zeros((batch,), bool),
           stats)
  state, out, count, _, stats = jax.lax.while_loop(cond, body, carry)
  return state, out, count, stats
