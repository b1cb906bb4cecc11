"""Model code (Flax linen): layers, hashing, patcher, entropy model and the BLT."""

from __future__ import annotations

from typing import Mapping

from bltjax.model import layers
from bltjax.model import patcher as patcher_lib
from bltjax.model.blt_config import BltConfig


def transformer_config(section: Mapping, model: Mapping, *, use_ffn_config: bool = True,
                       scannable: bool = True) -> layers.TransformerConfig:
  """A `config.model.<component>` section + model-wide options -> TransformerConfig.

  `use_ffn_config=False` keeps the reference SwiGLU FFN (local models by default).
  `scannable=False`: the stack never scans its layers (the local encoder and decoder
  run their blocks one by one, between cross-attentions)."""
  ffn = model["ffn"] if use_ffn_config else dict(activation="swiglu", l1_coef=0.0, impl="xla")
  attention = model.get("attention", {})
  return layers.TransformerConfig(
      d_model=int(section["d_model"]),
      n_layers=int(section["n_layers"]),
      n_heads=int(section["n_heads"]),
      n_kv_heads=int(section["n_kv_heads"]),
      ffn_dim=int(section["ffn_dim"]),
      window=int(section["window"]),
      rope_theta=float(section["rope_theta"]),
      activation=ffn["activation"],
      l1_coef=float(ffn["l1_coef"]),
      ffn_impl=ffn["impl"],
      ffn_backend=str(ffn.get("backend", "")),
      ffn_interpret=bool(ffn.get("interpret", False)),
      ffn_dense_threshold=float(ffn.get("dense_threshold", 0.5)),
      attention_impl=attention.get("impl", "xla"),
      attention_backend=str(attention.get("backend", "")),
      attention_interpret=bool(attention.get("interpret", False)),
      dtype=model["dtype"],
      remat=bool(model["remat"]),
      scan_layers=scannable and bool(model.get("scan_layers", False)),
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


def blt_config(model: Mapping) -> BltConfig:
  """`config.model` (kind "blt") -> BltConfig."""
  blt = model["blt"]
  local = lambda name: transformer_config(blt[name], model, use_ffn_config=blt["ffn_local"],
                                          scannable=False)
  return BltConfig(
      encoder=local("encoder"),
      global_model=transformer_config(blt["global_model"], model),
      decoder=local("decoder"),
      cross_attn_k=int(blt["cross_attn_k"]),
      cross_attn_heads=int(blt["cross_attn_heads"]),
      cross_attn_all_layers_encoder=bool(blt["cross_attn_all_layers_encoder"]),
      cross_attn_all_layers_decoder=bool(blt["cross_attn_all_layers_decoder"]),
      ngram_sizes=tuple(int(n) for n in blt["ngram_sizes"]),
      hash_table_size=int(blt["hash_table_size"]),
      hash_functions=int(blt["hash_functions"]),
      noisy_embedding=model["diffusion"]["noisy_embedding"],
  )
