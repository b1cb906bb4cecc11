"""Shape of a BLT: local encoder, global transformer, local decoder and how they connect."""

from __future__ import annotations

import dataclasses

from bltjax.model import hashing
from bltjax.model.layers import TransformerConfig

NOISY_EMBEDDINGS = ("encoder", "embedding")


@dataclasses.dataclass(frozen=True)
class BltConfig:
  encoder: TransformerConfig
  global_model: TransformerConfig
  decoder: TransformerConfig
  cross_attn_k: int = 2                      # patch vectors per patch
  cross_attn_heads: int = 0                  # 0: the local models' n_heads
  cross_attn_all_layers_encoder: bool = False
  cross_attn_all_layers_decoder: bool = True
  ngram_sizes: tuple[int, ...] = hashing.DEFAULT_NGRAM_SIZES
  hash_table_size: int = 500002              # rows per hash table; 0: no hash embeddings
  hash_functions: int = 1
  noisy_embedding: str = "encoder"           # BLT-D noisy bytes: encoder layers | embedding only

  def __post_init__(self):
    if self.encoder.d_model != self.decoder.d_model:
      raise ValueError(
          f"encoder d_model {self.encoder.d_model} != decoder d_model {self.decoder.d_model}: "
          "the decoder reads the encoder's byte states; make them equal")
    if self.cross_attn_k < 1:
      raise ValueError(f"cross_attn_k must be >= 1, got {self.cross_attn_k}")
    if not 1 <= self.cross_heads <= self.d_local:
      raise ValueError(f"cross_attn_heads={self.cross_heads} must be in [1, d_local="
                       f"{self.d_local}]")
    if self.noisy_embedding not in NOISY_EMBEDDINGS:
      raise ValueError(f"noisy_embedding {self.noisy_embedding!r} is not one of "
                       f"{NOISY_EMBEDDINGS}")

  @property
  def d_local(self) -> int:
    return self.encoder.d_model

  @property
  def cross_heads(self) -> int:
    return self.cross_attn_heads or self.encoder.n_heads

  @property
  def n_hash_tables(self) -> int:
    return self.hash_functions * len(self.ngram_sizes) if self.hash_table_size else 0
