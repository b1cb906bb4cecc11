"""Local decoder: byte states + global patch outputs -> next-byte logits.

Before each layer (the first only, unless `cross_attn_all_layers_decoder`) byte t
cross-attends to the k vectors of the global output of `read_patch[t]`: patch j - 1,
where j is the patch of byte t+1 (the last patch complete at t). Then causal
sliding-window self-attention and FFN; RMSNorm; a head over 260 ids in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bltjax import bytes as blt_bytes
from bltjax.model import cross_attention
from bltjax.model import layers
from bltjax.model.blt_config import BltConfig


def read_patch_ids(next_patch_ids):
  """Patch whose global output byte t reads: (patch of byte t+1) - 1. `[B, L]`."""
  return jnp.maximum(next_patch_ids - 1, 0)


class LocalDecoder(nn.Module):
  config: BltConfig

  def setup(self):
    cfg = self.config
    dec = cfg.decoder
    self.patch_proj = layers.Dense(cfg.cross_attn_k * cfg.d_local, ("embed", "mlp"),
                                   dec.compute_dtype)
    self.layers = layers.Transformer(dec)
    n_cross = dec.n_layers if cfg.cross_attn_all_layers_decoder else 1
    self.cross = [cross_attention.CrossAttention(cfg.cross_heads, dec.norm_eps,
                                                 dec.compute_dtype, name=f"cross_{i}")
                  for i in range(n_cross)]
    # The output norm and head run in float32 whatever the compute dtype: bf16 logits keep
    # 8 significant bits (0.016 apart near 2.5), which ties near-equal bytes in greedy
    # decoding and coarsens the loss.
    self.norm = layers.RMSNorm(dec.norm_eps, jnp.float32)
    self.head = layers.Dense(blt_bytes.VOCAB_SIZE, ("embed", "vocab"), jnp.float32)

  def patch_vectors(self, global_out):
    """`[B, P, d_global]` -> the k key/value vectors per patch `[B, P, k, d_local]`."""
    cfg = self.config
    slots = self.patch_proj(global_out)
    return slots.reshape(*slots.shape[:2], cfg.cross_attn_k, cfg.d_local)

  def __call__(self, byte_states, positions, attention, patch_slots, read_patch):
    """byte_states `[B, T, d]`, patch_slots `[B, P, k, d]`, read_patch `[B, T]`
    -> (logits `[B, T, 260]` float32, per-layer (k, v)). `attention`: one spec, or one
    per layer."""
    h = byte_states
    batch, width = read_patch.shape
    if width < patch_slots.shape[1]:
      # Fewer bytes than patches (generation): gather each byte's patch first, so the
      # cross-attention projects T * k vectors rather than all P * k.
      idx = jnp.clip(read_patch, 0, patch_slots.shape[1] - 1)
      patch_slots = jnp.take_along_axis(patch_slots, idx[:, :, None, None], axis=1)
      read_patch = jnp.broadcast_to(jnp.arange(width), (batch, width))
    attend = cross_attention.ReadPatch(read_patch)
    kvs = []
    for i, layer in enumerate(self.layers.layers):
      if i < len(self.cross):
        h = h + self.cross[i](h, patch_slots, attend)   # compat "blt": `x + (x + attn)`
      h, kv = layer(h, positions, attention[i] if isinstance(attention, tuple) else attention)
      kvs.append(kv)
    return self.head(self.norm(h)), kvs
