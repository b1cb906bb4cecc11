"""Losses and bits per byte.

Bits per byte = cross-entropy nats / ln 2 over real target positions (BOS/EOS targets
included, padding excluded), as the BLT reference reports it.
"""

from __future__ import annotations

import math

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
