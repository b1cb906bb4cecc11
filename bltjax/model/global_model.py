"""Global (latent) transformer: causal over patches, per document, no final norm."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bltjax.model import layers
from bltjax.model import range_attention
from bltjax.model.blt_config import BltConfig


class GlobalTransformer(nn.Module):
  """patch vectors `[B, P, k*d_local]` -> (`[B, P, d_global]`, per-layer (k, v)).

  A projection to d_global is added only when k*d_local != d_global (as the reference)."""
  config: BltConfig

  def setup(self):
    cfg = self.config
    self.project = cfg.cross_attn_k * cfg.d_local != cfg.global_model.d_model
    if self.project:
      self.input_proj = layers.Dense(cfg.global_model.d_model, ("mlp", "embed"),
                                     cfg.global_model.compute_dtype)
    self.transformer = layers.Transformer(cfg.global_model)

  def __call__(self, patch_vectors, patch_segments, positions=None, spec=None):
    """patch_segments `[B, P]`: document of each patch (patches never cross documents)."""
    x = self.input_proj(patch_vectors) if self.project else patch_vectors
    x = x.astype(self.config.global_model.compute_dtype)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    if spec is None:
      spec = range_attention.causal_spec(self.config.global_model, positions, patch_segments,
                                         window=0)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    return self.transformer(x, positions, spec)
