"""The entropy model: a small causal byte transformer whose next-byte entropies cut
bytes into patches (BLT's `LMTransformer` with a final norm and an untied head)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bltjax import bytes as blt_bytes
from bltjax.model import attention
from bltjax.model import layers


class EntropyModel(nn.Module):
  """tokens `[batch, len]` -> next-byte logits `[batch, len, 260]` (float32)."""
  config: layers.TransformerConfig

  @nn.compact
  def __call__(self, tokens, segment_ids, positions=None):
    cfg = self.config
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = layers.Embed(blt_bytes.VOCAB_SIZE, cfg.d_model, cfg.compute_dtype, name="embed")(tokens)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    spec = attention.CausalSpec(positions, segment_ids, window=cfg.window)
    x, _ = layers.Transformer(cfg, name="transformer")(x, positions, spec)
    x = layers.RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="norm")(x)
    logits = layers.Dense(blt_bytes.VOCAB_SIZE, ("embed", "vocab"), cfg.compute_dtype,
                          name="lm_head")(x)
    return logits.astype(jnp.float32)
