"""Choosing the next byte: greedy, or temperature / top-p sampling keyed by position.

The random draw for row r at position p depends only on (seed, r, p), so every exact
decoding method (AR, BLT-S, BLT-DV) emits the same bytes for the same seed, sampled or
greedy. Only bytes and EOS can be emitted: PAD, BOS and MASK are never chosen.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bltjax import bytes as blt_bytes

NEVER_IDS = (blt_bytes.PAD_ID, blt_bytes.BOS_ID, blt_bytes.MASK_ID)   # never emitted


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature (python 0: greedy) and top_p (python 1.0: off); either may be a traced
  scalar, so one compiled decoder serves many values."""
  temperature: float = 0.0
  top_p: float = 1.0

  @property
  def greedy(self) -> bool:
    return isinstance(self.temperature, (int, float)) and self.temperature == 0


def output_logits(logits):
  """Logits with the ids that are never emitted set to -inf. `[..., V]`."""
  never = jnp.zeros(logits.shape[-1], bool).at[jnp.array(NEVER_IDS)].set(True)
  return jnp.where(never, -jnp.inf, logits.astype(jnp.float32))


def top_p_filter(logits, top_p):
  """Keeps the smallest set of ids whose probability reaches top_p (at least one)."""
  if isinstance(top_p, (int, float)) and top_p >= 1.0:
    return logits
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = before < top_p
  keep = jnp.zeros_like(keep_sorted).at[
      tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


def choose(logits, positions, rng, sampling: SamplingConfig):
  """Next ids for logits `[B, ..., V]` predicting positions `[B, ...]`."""
  logits = output_logits(logits)
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = top_p_filter(logits / sampling.temperature, sampling.top_p)
  rows = jnp.broadcast_to(
      jnp.arange(positions.shape[0]).reshape((-1,) + (1,) * (positions.ndim - 1)),
      positions.shape)

  def gumbel(row, position):
    key = jax.random.fold_in(jax.random.fold_in(rng, row), position)
    return jax.random.gumbel(key, (logits.shape[-1],))

  noise = jax.vmap(gumbel)(rows.reshape(-1), positions.reshape(-1)).reshape(logits.shape)
  return jnp.argmax(logits + noise, axis=-1).astype(jnp.int32)
