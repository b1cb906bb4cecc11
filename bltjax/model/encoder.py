"""Local encoder: bytes -> byte states and patch vectors.

Byte embedding + hash n-gram embeddings, causal sliding-window byte layers, then patch
cross-attention: each patch's `cross_attn_k` query vectors start as the max-pool of the
layer's byte outputs over the patch, projected, and attend to the patch's own bytes.
The byte states never see the patches, so they can be cached per byte.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bltjax import bytes as blt_bytes
from bltjax.model import cross_attention
from bltjax.model import hashing
from bltjax.model import layers
from bltjax.model.blt_config import BltConfig


class ByteEmbedding(nn.Module):
  """tokens `[B, T]` (+ hash ids `[B, T, n_tables]`) -> embeddings `[B, T, d_local]`."""
  config: BltConfig

  @nn.compact
  def __call__(self, tokens, hash_ids=None):
    cfg = self.config
    dtype = cfg.encoder.compute_dtype
    x = layers.Embed(blt_bytes.VOCAB_SIZE, cfg.d_local, dtype, name="byte_embed")(tokens)
    if cfg.n_hash_tables:
      table = layers.Embed(cfg.n_hash_tables * cfg.hash_table_size, cfg.d_local, dtype,
                           table_axes=("hash_vocab", "embed"), name="hash_embed")
      offsets = hashing.fused_table_offsets(cfg.ngram_sizes, cfg.hash_table_size,
                                            cfg.hash_functions)
      x = x + jnp.sum(table(hash_ids + offsets), axis=-2)
    return x


class PatchPooling(nn.Module):
  """Patch vectors from byte states: max-pool -> k query vectors -> cross-attention."""
  config: BltConfig

  @nn.compact
  def __call__(self, byte_states, patch_ids, num_patches: int, slots=None):
    """byte_states `[B, L, d]`, patch_ids `[B, L]` -> slots `[B, P, k, d]`.

    `slots` given: refine them (cross-attention after several layers pools once)."""
    cfg = self.config
    d, k = cfg.d_local, cfg.cross_attn_k
    if slots is None:
      pooled = cross_attention.segment_max_pool(byte_states, patch_ids, num_patches)
      slots = layers.Dense(d * k, ("embed", "mlp"), cfg.encoder.compute_dtype,
                           init_std=d ** -0.5, name="query_proj")(pooled)
      slots = slots.reshape(*slots.shape[:2], k, d)
    attend = cross_attention.PoolIntoPatches(patch_ids, num_patches)
    update = cross_attention.CrossAttention(cfg.cross_heads, cfg.encoder.norm_eps,
                                            cfg.encoder.compute_dtype, name="cross")(
                                                slots, byte_states, attend)
    return slots + update  # compat "blt": `x + (x + attn)`


class LocalEncoder(nn.Module):
  """See module doc. `attention` is the byte layers' spec (clean, or clean + noisy)."""
  config: BltConfig

  def setup(self):
    cfg = self.config
    self.embedding = ByteEmbedding(cfg)
    self.layers = layers.Transformer(cfg.encoder)
    n_cross = cfg.encoder.n_layers if cfg.cross_attn_all_layers_encoder else 1
    self.pooling = [PatchPooling(cfg, name=f"pooling_{i}") for i in range(n_cross)]

  def embed(self, tokens, hash_ids=None):
    return self.embedding(tokens, hash_ids)

  def __call__(self, x, positions, attention, patch_ids, num_patches: int):
    """x: embeddings `[B, T, d]` (T >= L; the first L positions are the clean bytes),
    patch_ids `[B, L]` -> (byte states `[B, T, d]`, patch vectors `[B, P, k*d]`)."""
    cfg = self.config
    length = patch_ids.shape[1]
    slots = None
    if cfg.cross_attn_all_layers_encoder:
      for i, layer in enumerate(self.layers.layers):
        x, _ = layer(x, positions, attention)
        slots = self.pooling[i](x[:, :length], patch_ids, num_patches, slots)
    else:
      x, _ = self.layers(x, positions, attention)
      slots = self.pooling[0](x[:, :length], patch_ids, num_patches)
    b, p = slots.shape[:2]
    return x, slots.reshape(b, p, cfg.cross_attn_k * cfg.d_local)
