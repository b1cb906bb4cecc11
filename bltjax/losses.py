"""Losses and bits per byte.

Bits per byte = cross-entropy nats / ln 2 over real target positions (BOS/EOS targets
included, padding excluded), as the BLT reference reports it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bltjax import bytes as blt_bytes

LN2 = math.log(2.0)


def token_cross_entropy(logits, targets):
  """Per-position CE (nats). logits `[..., V]` float32, targets `[...]` int -> `[...]`."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def target_mask(targets):
  """Real target positions: everything but padding."""
  return targets != blt_bytes.PAD_ID


def masked_mean(values, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def bits_per_byte(nats_sum, n_bytes):
  return nats_sum / jnp.maximum(n_bytes, 1.0) / LN2


def cross_entropy_sums(logits, targets, mask):
  """(sum of CE nats, number of positions) over `mask`; for exact averages across
  batches and devices."""
  ce = token_cross_entropy(logits, targets)
  mask = mask.astype(jnp.float32)
  return jnp.sum(ce * mask), jnp.sum(mask)


def suppress_mask_logit(logits):
  """The SUBS parameterisation: MASK's logit set to -inf, so MASK is never predicted.

  `[..., V]` -> `[..., V]` float32.
  """
  logits = logits.astype(jnp.float32)
  is_mask = jnp.arange(logits.shape[-1]) == blt_bytes.MASK_ID
  return jnp.where(is_mask, -jnp.inf, logits)


class MaskedCE(NamedTuple):
  """Sums of the masked block-diffusion loss, for exact averages across batches and
  devices: mean = nats / count, accuracy = correct / count (use `.mean`, `.accuracy`)."""
  nats: jax.Array     # sum of (weighted) CE nats over MASK positions
  count: jax.Array    # number of MASK positions
  correct: jax.Array  # MASK positions whose argmax is the clean byte

  @property
  def mean(self):
    return self.nats / jnp.maximum(self.count, 1.0)

  @property
  def accuracy(self):
    return self.correct / jnp.maximum(self.count, 1.0)


def masked_block_ce(logits, clean, is_masked, t, *, elbo_weight: bool = False) -> MaskedCE:
  """BLT-D's masked cross-entropy over the noisy blocks (DESIGN §3 "Loss").

  CE of the clean byte at MASK positions only (unmasked positions copy their input and
  carry no loss), with MASK's logit forced to -inf (SUBS). With `elbo_weight`, each
  position is weighted by 1/t of its block (the MDLM/BD3-LM ELBO for the linear
  schedule). Normalisation: `.mean` divides the (weighted) sum by the number of MASK
  positions, over the whole batch, so each masked byte counts the same whatever its
  block or row; a batch with no MASK gives 0.

  Args:
    logits: `[batch, K, B, V]` decoder logits at the noisy positions.
    clean: `[batch, K, B]` int clean ids (the targets; no shift).
    is_masked: `[batch, K, B]` bool.
    t: `[batch, K]` mask probability of each block.
    elbo_weight: weight by 1/t (static).

  Returns:
    `MaskedCE(nats, count, correct)`, float32 scalars.
  """
  logits = suppress_mask_logit(logits)
  ce = jnp.where(is_masked, token_cross_entropy(logits, clean), 0.0)
  if elbo_weight:
    ce = ce / t[..., None].astype(jnp.float32)
  correct = is_masked & (jnp.argmax(logits, axis=-1) == clean)
  return MaskedCE(nats=jnp.sum(ce), count=jnp.sum(is_masked, dtype=jnp.float32),
                  correct=jnp.sum(correct, dtype=jnp.float32))
