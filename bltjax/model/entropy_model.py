"""The entropy model: a small causal byte transformer whose next-byte entropies cut
bytes into patches (BLT's `LMTransformer` with a final norm and an untied head)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bltjax import bytes as blt_bytes
from bltjax.model import layers
from bltjax.model import range_attention


class EntropyModel(nn.Module):
  """tokens `[batch, len]` -> next-byte logits `[batch, len, 260]` (float32)."""
  config: layers.TransformerConfig

  def setup(self):
    cfg = self.config
    self.embed = layers.Embed(blt_bytes.VOCAB_SIZE, cfg.d_model, cfg.compute_dtype)
    self.transformer = layers.Transformer(cfg)
    self.norm = layers.RMSNorm(cfg.norm_eps, jnp.float32)    # float32 logits: see decoder
    self.lm_head = layers.Dense(blt_bytes.VOCAB_SIZE, ("embed", "vocab"), jnp.float32)

  def __call__(self, tokens, segment_ids, positions=None):
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    spec = range_attention.causal_spec(self.config, positions, segment_ids,
                                       window=self.config.window)
    return self.forward(tokens, positions, spec)[0]

  def forward(self, tokens, positions, spec):
    """Logits and per-layer (k, v) under any attention spec (generation passes caches)."""
    x = nn.with_logical_constraint(self.embed(tokens), ("batch", "length", "act_embed"))
    x, kvs = self.transformer(x, positions, spec)
    return self.lm_head(self.norm(x)), kvs
