"""The Byte Latent Transformer: local encoder -> global transformer -> local decoder.

Patches come from outside (the patcher runs the frozen entropy model): the model maps
tokens `[B, L]` and a `Patches` layout with a static patch count P to next-byte logits
`[B, L, 260]`. For BLT-D training it also takes K noisy blocks (`NoisyInput`) and
returns their logits: the decoder (and, with `noisy_embedding="encoder"`, the encoder's
byte layers) run over `[clean L ; noisy]` in one pass (DESIGN §3).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.model import attention
from bltjax.model import cross_attention
from bltjax.model import hashing
from bltjax.model import range_attention
from bltjax.model.blt_config import BltConfig
from bltjax.model.decoder import LocalDecoder, read_patch_ids
from bltjax.model.encoder import LocalEncoder
from bltjax.model.global_model import GlobalTransformer
from bltjax.model.patcher import Patches


class NoisyInput(NamedTuple):
  """The noisy blocks of BLT-D training, grouped in n chunks of M = A*B positions."""
  tokens: jax.Array                          # [batch, n, M] ids (MASK where corrupted)
  hash_ids: jax.Array                        # [batch, n, M, n_tables] (hash of prefix + block)
  read_patch: jax.Array                      # [batch, n, M] global output each position reads
  info: attention.NoisyAttentionInfo         # positions, anchors, blocks, documents, valid
  # For a stack with `attention_impl="pallas"`: the key ranges of every `[clean ; noisy]`
  # row (`diffusion.bltd_attention_ranges`; a0, a1, b0, b1 `[batch, L + n*M]`) for the
  # encoder's window and the decoder's.
  encoder_ranges: tuple | None = None
  decoder_ranges: tuple | None = None


def stack_window(cfg: BltConfig) -> int:
  """The widest local window (0 = unlimited) — what noisy chunks must cover."""
  windows = (cfg.encoder.window, cfg.decoder.window)
  return 0 if 0 in windows else max(windows)


def patch_segments(segment_ids, patch_ids, num_patches: int):
  """Document of each patch `[B, P]` (patches never cross documents; empty: 0)."""
  pooled = cross_attention.segment_max_pool(segment_ids[..., None].astype(jnp.float32),
                                            patch_ids, num_patches)
  return pooled[..., 0].astype(jnp.int32)


def noisy_hash_ids(cfg: BltConfig, tokens, block_tokens, anchors):
  """Hash n-gram ids of noisy blocks: the n-grams of `clean[..anchor) ++ block`.

  tokens `[B, L]`, block_tokens `[B, ..., blocks, B_size]`, anchors `[B, ..., blocks]`
  -> `[B, ..., blocks, B_size, n_tables]`.
  """
  context = max(cfg.ngram_sizes) - 1
  idx = anchors[..., None] - context + jnp.arange(context)
  flat_idx = jnp.clip(idx, 0, tokens.shape[1] - 1).reshape(tokens.shape[0], -1)
  prefix = jnp.take_along_axis(tokens, flat_idx, axis=1).reshape(idx.shape)
  prefix = jnp.where(idx >= 0, prefix, 0)
  window = jnp.concatenate([prefix, block_tokens], axis=-1)
  ids = hashing.hash_ngram_ids(window, ngram_sizes=cfg.ngram_sizes,
                               table_size=cfg.hash_table_size, n_functions=cfg.hash_functions)
  return ids[..., context:, :]


class BLT(nn.Module):
  config: BltConfig

  def setup(self):
    self.encoder = LocalEncoder(self.config)
    self.global_model = GlobalTransformer(self.config)
    self.decoder = LocalDecoder(self.config)

  def hash_ids(self, tokens):
    cfg = self.config
    if not cfg.n_hash_tables:
      return None
    return hashing.hash_ngram_ids(tokens, ngram_sizes=cfg.ngram_sizes,
                                  table_size=cfg.hash_table_size, n_functions=cfg.hash_functions)

  @staticmethod
  def _noisy_spec(stack, clean_spec, noisy: NoisyInput, ranges, chunk: int):
    """How a local stack (its `TransformerConfig`) attends over `[clean ; noisy]`
    (DESIGN §3): chunked frames, or the range kernel over the input's ranges."""
    if stack.attention_impl == "xla":
      return attention.CleanNoisySpec(clean_spec, noisy.info, chunk=chunk)
    if ranges is None:
      raise ValueError("attention impl 'pallas' needs the NoisyInput's key ranges "
                       "(objectives.BltObjective.noisy_blocks computes them)")
    return range_attention.kernel_spec(stack, ranges)

  def __call__(self, tokens, segment_ids, patches: Patches, noisy: NoisyInput | None = None):
    """tokens, segment_ids `[B, L]` -> (logits `[B, L, 260]`, noisy logits `[B, n*M, 260]`
    or None)."""
    cfg = self.config
    b, length = tokens.shape
    num_patches = patches.lengths.shape[1]
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    x = self.encoder.embed(tokens, self.hash_ids(tokens))
    read = read_patch_ids(patches.next_patch_ids)
    enc_spec = range_attention.causal_spec(cfg.encoder, positions, segment_ids,
                                           window=cfg.encoder.window)
    dec_spec = range_attention.causal_spec(cfg.decoder, positions, segment_ids,
                                           window=cfg.decoder.window)
    all_positions = positions
    if noisy is not None:
      flat = lambda a: a.reshape(b, -1, *a.shape[3:])
      noisy_x = self.encoder.embed(flat(noisy.tokens), flat(noisy.hash_ids)
                                   if cfg.n_hash_tables else None)
      all_positions = jnp.concatenate([positions, flat(noisy.info.positions)], axis=1)
      chunk = attention.noisy_chunk_size(length, stack_window(cfg))
      if cfg.noisy_embedding == "encoder":
        x = jnp.concatenate([x, noisy_x], axis=1)
        enc_spec = self._noisy_spec(cfg.encoder, enc_spec, noisy, noisy.encoder_ranges, chunk)
      dec_spec = self._noisy_spec(cfg.decoder, dec_spec, noisy, noisy.decoder_ranges, chunk)
      read = jnp.concatenate([read, flat(noisy.read_patch)], axis=1)
    enc_positions = all_positions if x.shape[1] > length else positions
    byte_states, patch_vectors = self.encoder(x, enc_positions, enc_spec, patches.patch_ids,
                                              num_patches)
    if noisy is not None and cfg.noisy_embedding == "embedding":
      byte_states = jnp.concatenate([byte_states, noisy_x.astype(byte_states.dtype)], axis=1)
    global_out, _ = self.global_model(
        patch_vectors, patch_segments(segment_ids, patches.patch_ids, num_patches))
    slots = self.decoder.patch_vectors(global_out)
    logits, _ = self.decoder(byte_states, all_positions, dec_spec, slots, read)
    if noisy is None:
      return logits, None
    return logits[:, :length], logits[:, length:]
