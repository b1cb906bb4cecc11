"""Model code (Flax linen): layers, hashing, patcher, entropy model and the BLT."""

from __future__ import annotations

from typing import Mapping

from bltjax.model import layers
from bltjax.model import patcher as patcher_lib


def transformer_config(section: Mapping, model: Mapping) -> layers.TransformerConfig:
  """A `config.model.<component>` section + model-wide options -> TransformerConfig."""
  return layers.TransformerConfig(
      d_model=int(section["d_model"]),
      n_layers=int(section["n_layers"]),
      n_heads=int(section["n_heads"]),
      n_kv_heads=int(section["n_kv_heads"]),
      ffn_dim=int(section["ffn_dim"]),
      window=int(section["window"]),
      rope_theta=float(section["rope_theta"]),
      activation=model["ffn"]["activation"],
      l1_coef=float(model["ffn"]["l1_coef"]),
      ffn_impl=model["ffn"]["impl"],
      dtype=model["dtype"],
      remat=bool(model["remat"]),
  )


def patcher_config(section: Mapping, *, threshold: float | None = None,
                   default_max_patches: int = 0) -> patcher_lib.PatcherConfig:
  """`config.patcher` -> PatcherConfig (threshold resolved by the caller if calibrated)."""
  return patcher_lib.PatcherConfig(
      mode=section["mode"],
      threshold=float(section["threshold"] if threshold is None else threshold),
      rule=section["rule"],
      max_patch_len=int(section["max_patch_len"]),
      patch_size=int(section["patch_size"]),
      max_patches=int(section["max_patches"]) or default_max_patches,
  )
