"""Import a Hugging Face BLT checkpoint (transformers `BltForCausalLM`) as a bltjax model.

    bltjax convert --hf DIR --out DIR [--entropy DIR]

reads `DIR/config.json` and `DIR/*.safetensors` (the entropy model inside them under
`model.patcher.*`, or in a separate `--entropy` directory) and writes a bltjax model
directory that `checkpoint.load_params`, `bltjax eval` and `train.init_params_from`
read:

    <out>/config.json              full bltjax config: model.kind "blt", every shape from
                                   the HF config, patcher.mode "entropy", rule "global",
                                   patcher.threshold = HF patching_threshold,
                                   patcher.entropy_workdir = "entropy" (relative to <out>)
    <out>/checkpoints/0/state/     orbax PyTree {"params": <BLT params>} (no optimizer
                                   state; `checkpoint.save_params`)
    <out>/entropy/config.json      model.kind "entropy" (the patcher's entropy model)
    <out>/entropy/checkpoints/0/   its params, same format
    <out>/entropy/patcher.json     {"threshold": ...} (the calibration file)
    <out>/hf_config.json           the source config.json, verbatim
    <out>/convert.json             what was converted from where

Every field of the transformers config is either mapped onto a bltjax config field,
checked against the one value bltjax supports, or on an explicit list of fields with
no effect on the weights or the forward (`IGNORED_FIELDS`); anything else is refused
with an error naming it. Every tensor of the checkpoint is consumed: an unknown, a
missing or a mis-shaped tensor is an error naming it (with the expected shape). See
docs/convert.md for the mapping and the differences between the port and the original.

Weight layout: torch `nn.Linear` weights `[out, in]` become bltjax `Dense` kernels
`[in, out]` (a transpose; head h of a projection is rows `[h*hd, (h+1)*hd)` in both,
and both use interleaved RoPE pairs, so no permutation); RMSNorm weights become
`scale`; the fused hash table `[n_tables * V, d]` is bltjax's fused `hash_embed` as is
(table t = f * len(sizes) + s at rows `[t*V, (t+1)*V)`, `hashing.fused_table_offsets`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np

from bltjax import bytes as blt_bytes
from bltjax import configs

ENTROPY_SUBDIR = "entropy"
DEFAULT_NGRAM_SIZES = [3, 4, 5, 6, 7, 8]


class ConvertError(ValueError):
  """A checkpoint that cannot be converted. The message names the field or tensor."""


# -----------------------------------------------------------------------------------------
# Config: transformers BltConfig (5.24) -> bltjax config sections.
# -----------------------------------------------------------------------------------------

# Fields with no effect on the weights or on the forward bltjax computes (metadata,
# runtime switches of the port, generation defaults). Anything not listed here and not
# read by the mapping below is refused.
IGNORED_FIELDS = frozenset({
    # provenance / runtime of the port
    "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "chunk_size_feed_forward", "_attn_implementation",
    "_attn_implementation_autoset", "attn_impl", "initializer_range",
    # bltjax has no position table (RoPE); the port does not enforce it either
    "max_position_embeddings",
    # the original's entropy-model mask type ("causal"/"local_block_causal"); the port
    # ignores it, bltjax uses causal + window + documents (DESIGN §3)
    "attn_bias_type",
    # labels, tokenizer and special ids (bltjax's byte ids are fixed: BOS 1, EOS 2, PAD 0)
    "id2label", "label2id", "finetuning_task", "problem_type", "tokenizer_class", "prefix",
    "task_specific_params", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "is_decoder",
    # generation defaults
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
    # patching runtime switches of the port (where/how much it batches the entropy model)
    "patching_batch_size", "patching_device", "realtime_patching",
})

# Generic PretrainedConfig fields that must keep their default (anything else changes
# the architecture in a way the port itself does not support).
FIXED_GENERIC = {
    "is_encoder_decoder": False, "add_cross_attention": False, "tie_encoder_decoder": False,
    "cross_attention_hidden_size": None, "pruned_heads": {}, "tie_word_embeddings": False,
}

# transformers 5.24 defaults of the fields that shape the model (a config.json written
# by `save_pretrained` has them all; a hand-written one may omit some).
_DEFAULTS = {
    "encoder_config": dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=1,
                           intermediate_size=2816, cross_attn_all_layers=False, theta=5e5),
    "decoder_config": dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=9,
                           intermediate_size=2816, cross_attn_all_layers=True, theta=5e5,
                           hidden_size_global=2048),
    "global_config": dict(hidden_size=2048, num_attention_heads=16, num_hidden_layers=25,
                          intermediate_size=5632, theta=5e5),
    "patcher_config": dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=14,
                           intermediate_size=2048, theta=1e4, sliding_window=512),
}
_MODEL_TYPES = {"encoder_config": "blt_local_encoder", "decoder_config": "blt_local_decoder",
                "global_config": "blt_global_transformer", "patcher_config": "blt_patcher"}


class _Fields:
  """A config dict whose every field must be read, checked or ignored (see `finish`)."""

  def __init__(self, data: Mapping, where: str, source: str = "config.json"):
    if not isinstance(data, Mapping):
      what = f"{source} {where}" if where else source
      raise ConvertError(f"{what} must be a JSON object, got {str(data)[:80]}")
    self.data = dict(data)
    self.where = where
    self.source = source
    self.seen: set[str] = set()

  def name(self, key: str) -> str:
    """`config.json encoder_config.hidden_size`: where a field is, for messages."""
    return f"{self.source} {self.where}.{key}" if self.where else f"{self.source} {key}"

  def get(self, key: str, default: Any = None) -> Any:
    self.seen.add(key)
    value = self.data.get(key)
    return default if value is None else value

  def raw(self, key: str, missing: Any = None) -> Any:
    """The field as stored (null stays None); `missing` when the field is absent."""
    self.seen.add(key)
    return self.data[key] if key in self.data else missing

  def has(self, key: str) -> bool:
    return self.data.get(key) is not None

  def int(self, key: str, default: int | None = None, *, minimum: int = 1) -> int:
    value = self.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ConvertError(f"{self.name(key)}={value!r} must be an integer >= {minimum}")
    return value

  def expect(self, key: str, allowed: tuple, why: str) -> Any:
    """Reads a field that must hold one of `allowed` (None = absent)."""
    self.seen.add(key)
    value = self.data.get(key)
    if value not in allowed:
      shown = " or ".join(repr(a) for a in allowed if a is not None) or "null"
      raise ConvertError(f"{self.name(key)}={value!r} is not supported ({why}); "
                         f"bltjax converts only {shown}")
    return value

  def finish(self) -> None:
    for key, value in self.data.items():
      if key in self.seen or key in IGNORED_FIELDS:
        continue
      if key in FIXED_GENERIC:
        default = FIXED_GENERIC[key]
        if value != default and not (value is None and default in ({}, False)):
          raise ConvertError(f"{self.name(key)}={value!r} is not supported "
                             f"(bltjax converts only {default!r})")
        continue
      path = f"{self.where}.{key}" if self.where else key
      raise ConvertError(
          f"{self.source} field {path!r} (= {value!r}) is unknown to the converter "
          "(not a transformers BltConfig field it maps or ignores); remove it, or map it in "
          "bltjax/convert.py")


def _rope_theta(fields: _Fields, default: float) -> float:
  """`rope_parameters.rope_theta` (transformers >= 5) or legacy `rope_theta`+`rope_scaling`."""
  params = fields.get("rope_parameters")
  legacy_theta = fields.get("rope_theta")
  scaling = fields.get("rope_scaling")
  if scaling is not None:
    if not isinstance(scaling, Mapping) or set(scaling) - {"rope_type", "type"} or \
        scaling.get("rope_type", scaling.get("type", "default")) != "default":
      raise ConvertError(f"{fields.name('rope_scaling')}={scaling!r} is not "
                         "supported (bltjax has plain RoPE); only null or "
                         "{'rope_type': 'default'}")
  theta = legacy_theta
  if params is not None:
    if not isinstance(params, Mapping) or "rope_theta" not in params:
      raise ConvertError(f"{fields.name('rope_parameters')}={params!r} is not "
                         "supported: bltjax needs one {'rope_type': 'default', 'rope_theta': "
                         "...} per component")
    extra = set(params) - {"rope_type", "rope_theta"}
    if params.get("rope_type", "default") != "default" or extra:
      raise ConvertError(f"{fields.name('rope_parameters')}={params!r}: RoPE "
                         "scaling is not supported (bltjax has plain RoPE); only rope_type "
                         "'default' with a rope_theta")
    if legacy_theta is not None and float(legacy_theta) != float(params["rope_theta"]):
      raise ConvertError(f"{fields.name('rope_theta')}={legacy_theta} contradicts "
                         f"{fields.name('rope_parameters')}.rope_theta={params['rope_theta']}")
    theta = params["rope_theta"]
  theta = default if theta is None else float(theta)
  if not theta > 0:
    raise ConvertError(f"{fields.name('rope_parameters')}: rope_theta={theta} "
                       "must be > 0")
  return theta


def _transformer_fields(fields: _Fields, sub: str, *, window: int) -> dict:
  """The stack shape of one sub-config -> a `configs.transformer_section` dict."""
  defaults = _DEFAULTS[sub]
  model_type = fields.get("model_type")
  if model_type is not None and model_type != _MODEL_TYPES[sub]:
    raise ConvertError(f"{fields.name('model_type')}={model_type!r}: expected "
                       f"{_MODEL_TYPES[sub]!r}")
  d = fields.int("hidden_size", defaults["hidden_size"])
  heads = fields.int("num_attention_heads", defaults["num_attention_heads"])
  kv = fields.int("num_key_value_heads", heads)
  layers = fields.int("num_hidden_layers", defaults["num_hidden_layers"])
  if d % heads:
    raise ConvertError(f"{fields.name('hidden_size')}={d} is not divisible by "
                       f"num_attention_heads={heads}")
  if heads % kv:
    raise ConvertError(f"{fields.name('num_attention_heads')}={heads} is not "
                       f"divisible by num_key_value_heads={kv}")
  head_dim = fields.get("head_dim")
  if head_dim is not None and head_dim != d // heads:
    raise ConvertError(f"{fields.name('head_dim')}={head_dim} != hidden_size // "
                       f"num_attention_heads = {d // heads}: the port and bltjax both use "
                       "hidden_size // num_attention_heads")
  if (d // heads) % 2:
    raise ConvertError(f"{fields.name('hidden_size')}: head_dim = {d // heads} "
                       "is odd; RoPE needs an even head_dim")
  if fields.has("intermediate_size") or "intermediate_size" not in fields.data:
    ffn = fields.int("intermediate_size", defaults["intermediate_size"])
  else:  # null: the port derives int(8 d / 3)
    fields.seen.add("intermediate_size")
    ffn = int(8 * d / 3)
  fields.expect("hidden_act", (None, "silu"),
                "bltjax's reference FFN is SwiGLU, down(silu(gate x) * up x)")
  for eps_key in ("rms_norm_eps", "norm_eps"):
    eps = fields.get(eps_key)
    if eps is not None and not math.isclose(float(eps), 1e-5, rel_tol=1e-6):
      raise ConvertError(f"{fields.name(eps_key)}={eps} is not supported: "
                         "bltjax's RMSNorm eps is 1e-5")
  dropout = fields.get("dropout", 0.0)
  if dropout not in (0, 0.0):
    raise ConvertError(f"{fields.name('dropout')}={dropout} is not supported "
                       "(bltjax has no dropout); set it to 0.0 to convert")
  fields.expect("pm_size", (None, 0), "product-key memory layers are not implemented")
  fields.expect("tie_word_embeddings", (None, False), "bltjax's heads are untied")
  theta = _rope_theta(fields, defaults["theta"])
  return dict(d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn,
              window=window, rope_theta=theta)


def _window(value: Any, name: str) -> int:
  if value is None:
    return 0
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConvertError(f"{name}={value!r} must be null or an integer >= 1")
  return value


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the conversion produces: bltjax config sections and the tensor shapes."""
  encoder: dict
  global_model: dict
  decoder: dict
  entropy: dict
  cross_attn_k: int
  cross_attn_heads: int
  cross_attn_all_layers_decoder: bool
  ngram_sizes: tuple[int, ...]
  hash_table_size: int
  hash_functions: int
  threshold: float
  max_patch_len: int
  patch_size: int

  @property
  def n_hash_tables(self) -> int:
    return self.hash_functions * len(self.ngram_sizes)


def map_config(hf: Mapping, entropy_hf: Mapping | None = None) -> Plan:
  """Maps a transformers BLT `config.json` (+ a separate entropy model's config) to a Plan.

  `entropy_hf`: config.json of the `--entropy` directory (model_type "blt_patcher", or a
  "blt" config whose `patcher_config` is used). Raises ConvertError naming the field.
  """
  top = _Fields(hf, "")
  model_type = top.get("model_type")
  if model_type != "blt":
    raise ConvertError(f"config.json model_type={model_type!r}: not a BLT checkpoint (expected "
                       "'blt', a transformers BltForCausalLM); pass the directory of a BLT model")
  top.expect("vocab_size", (None, blt_bytes.VOCAB_SIZE), "bltjax's byte vocabulary has 260 ids")
  top.expect("tie_word_embeddings", (None, False), "bltjax's byte head is untied")
  top.expect("patching_mode", ("entropy",),
             "the port patches one byte per patch in any other mode; bltjax converts entropy "
             "patching")
  top.expect("monotonicity", (None, False),
             "the port ignores it and uses the global threshold; set patcher.rule=monotonic "
             "after converting a model trained with it")
  top.expect("patching_threshold_add", (None, 0, 0.0), "bltjax has no threshold_add")
  top.expect("pm_size", (None, 0), "product-key memory layers are not implemented")
  top.get("rope_parameters")  # unused by every module of the port (each component has its own)
  top.get("patch_in_forward")  # where the entropy model is: decided by the tensors
  patch_size = top.get("patch_size", 4)
  if isinstance(patch_size, bool) or not isinstance(patch_size, (int, float)) or patch_size < 1:
    raise ConvertError(f"config.json patch_size={patch_size!r} must be a number >= 1 (the port "
                       "patches by entropy only when it is set)")
  threshold = top.get("patching_threshold", 1.335442066192627)
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
    raise ConvertError(f"config.json patching_threshold={threshold!r} must be a number")
  max_patch_len = top.get("max_patch_length")
  if max_patch_len is None:
    max_patch_len = 0   # bltjax: 0 = no limit
  elif isinstance(max_patch_len, bool) or not isinstance(max_patch_len, int) or max_patch_len < 1:
    raise ConvertError(f"config.json max_patch_length={max_patch_len!r} must be null or an "
                       "integer >= 1")
  local_window = _window(top.raw("local_attention_window_len", 512),
                         "config.json local_attention_window_len")
  k = top.int("cross_attn_k", 2)
  sizes = top.get("encoder_hash_byte_group_size", DEFAULT_NGRAM_SIZES)
  if not isinstance(sizes, list) or not sizes or not all(
      isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 32 for n in sizes):
    raise ConvertError(f"config.json encoder_hash_byte_group_size={sizes!r} must be a list of "
                       "n-gram sizes in [1, 32]")
  vocab = top.int("encoder_hash_byte_group_vocab", 500002)
  n_functions = top.int("encoder_hash_byte_group_nb_functions", 1)
  if n_functions * len(sizes) * vocab > 2**31:
    raise ConvertError(f"config.json: {n_functions} x {len(sizes)} hash tables of "
                       f"{vocab} rows do not fit int32 row ids")

  subs = {}
  for sub in ("encoder_config", "decoder_config", "global_config", "patcher_config"):
    data = top.get(sub, {})
    subs[sub] = _Fields(data, sub)

  enc, dec, glob_ = subs["encoder_config"], subs["decoder_config"], subs["global_config"]
  # Encoder and decoder use the top-level window (the port copies it into
  # encoder_config.sliding_window; the decoder reuses the encoder's mask).
  for fields in (enc, dec):
    if fields.has("sliding_window") and fields.get("sliding_window") != (local_window or None):
      raise ConvertError(
          f"{fields.name('sliding_window')}={fields.get('sliding_window')} != "
          f"local_attention_window_len={local_window or None}: the port's local encoder and "
          "decoder both use local_attention_window_len")
    fields.seen.add("sliding_window")
    fields.expect("vocab_size", (None, blt_bytes.VOCAB_SIZE), "260 byte ids")
    sub_k = fields.get("cross_attn_k", k)
    if sub_k != k:
      raise ConvertError(f"{fields.name('cross_attn_k')}={sub_k} != cross_attn_k="
                         f"{k}: the port reads both and needs them equal")
  encoder = _transformer_fields(enc, "encoder_config", window=local_window)
  decoder = _transformer_fields(dec, "decoder_config", window=local_window)
  if glob_.has("sliding_window"):
    raise ConvertError(f"config.json global_config.sliding_window={glob_.get('sliding_window')}"
                       " is not supported: the port's global transformer is plain causal")
  glob_.seen.add("sliding_window")
  global_model = _transformer_fields(glob_, "global_config", window=0)

  enc_all = bool(enc.get("cross_attn_all_layers", _DEFAULTS["encoder_config"][
      "cross_attn_all_layers"]))
  if enc_all and encoder["n_layers"] > 1:
    raise ConvertError(
        f"config.json encoder_config.cross_attn_all_layers=true with num_hidden_layers="
        f"{encoder['n_layers']} is not supported: the port re-pools the patches from every "
        "layer and discards the previous ones, the original (and bltjax) pools once and "
        "refines; the two differ, so the weights cannot be used as they are")
  dec_all = bool(dec.get("cross_attn_all_layers", _DEFAULTS["decoder_config"][
      "cross_attn_all_layers"]))
  if encoder["d_model"] != decoder["d_model"]:
    raise ConvertError(f"config.json encoder_config.hidden_size={encoder['d_model']} != "
                       f"decoder_config.hidden_size={decoder['d_model']}: the decoder reads the "
                       "encoder's byte states")
  for name, section in (("encoder_config", encoder), ("decoder_config", decoder)):
    if section["n_kv_heads"] != section["n_heads"]:
      raise ConvertError(
          f"config.json {name}.num_key_value_heads={section['n_kv_heads']} != "
          f"num_attention_heads={section['n_heads']}: the port's cross-attentions then use "
          "grouped kv heads, which bltjax's (as the original's) do not have")
  if encoder["n_heads"] != decoder["n_heads"]:
    raise ConvertError(
        f"config.json encoder_config.num_attention_heads={encoder['n_heads']} != "
        f"decoder_config.num_attention_heads={decoder['n_heads']}: bltjax (as the original) has "
        "one cross_attn_heads for the encoder's and the decoder's cross-attentions")
  dec_global = dec.get("hidden_size_global", _DEFAULTS["decoder_config"]["hidden_size_global"])
  if dec_global != global_model["d_model"]:
    raise ConvertError(f"config.json decoder_config.hidden_size_global={dec_global} != "
                       f"global_config.hidden_size={global_model['d_model']}")
  enc.get("hidden_size_global")  # not read by the port's encoder
  cross_out = glob_.get("encoder_cross_output_size")
  expected_out = k * encoder["d_model"]
  if cross_out is not None and cross_out != expected_out:
    raise ConvertError(f"config.json global_config.encoder_cross_output_size={cross_out} != "
                       f"cross_attn_k * encoder hidden_size = {expected_out}")
  if cross_out is None and "encoder_cross_output_size" in glob_.data and \
      expected_out != global_model["d_model"]:
    raise ConvertError(f"config.json global_config.encoder_cross_output_size is null but "
                       f"cross_attn_k * encoder hidden_size = {expected_out} != "
                       f"global hidden_size {global_model['d_model']}")

  # The entropy model: the main config's patcher_config, or the --entropy directory's.
  patcher_fields = subs["patcher_config"]
  entropy_fields = patcher_fields if entropy_hf is None else _entropy_fields(entropy_hf)
  entropy_window = _window(entropy_fields.raw("sliding_window", 512),
                           entropy_fields.name("sliding_window"))
  entropy_fields.expect("vocab_size", (None, blt_bytes.VOCAB_SIZE), "260 byte ids")
  entropy = _transformer_fields(entropy_fields, "patcher_config", window=entropy_window)
  if entropy_hf is not None:
    # The main config's own patcher_config describes no tensors here; its fields are still
    # checked to be known (nothing silently accepted).
    _skim(patcher_fields)
  for fields in (*subs.values(), entropy_fields, top):
    fields.finish()
  return Plan(encoder=encoder, global_model=global_model, decoder=decoder, entropy=entropy,
              cross_attn_k=k, cross_attn_heads=encoder["n_heads"],
              cross_attn_all_layers_decoder=dec_all, ngram_sizes=tuple(sizes),
              hash_table_size=vocab, hash_functions=n_functions, threshold=float(threshold),
              max_patch_len=max_patch_len, patch_size=int(patch_size))


def _entropy_fields(entropy_hf: Mapping) -> _Fields:
  """The entropy model's config from a separate directory's config.json."""
  model_type = entropy_hf.get("model_type")
  source = "--entropy config.json"
  if model_type == "blt_patcher":
    return _Fields(entropy_hf, "", source)
  if model_type == "blt":
    return _Fields(entropy_hf.get("patcher_config") or {}, "patcher_config", source)
  if isinstance(entropy_hf.get("model"), Mapping) and "kind" in entropy_hf["model"]:
    raise ConvertError("--entropy is a bltjax workdir (the config.json of `bltjax train`), "
                       "not a Hugging Face checkpoint; pass the Hugging Face directory of the "
                       "BLT's entropy model (model_type 'blt_patcher'), whose weights and "
                       "threshold the converted BLT was trained with")
  raise ConvertError(f"--entropy config.json model_type={model_type!r}: expected 'blt_patcher' "
                     "(a BltPatcherConfig) or 'blt' (a BLT checkpoint holding model.patcher.*)")


_PATCHER_FIELDS = frozenset({
    "model_type", "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
    "num_hidden_layers", "head_dim", "intermediate_size", "hidden_act", "rms_norm_eps",
    "norm_eps", "dropout", "pm_size", "tie_word_embeddings", "rope_parameters", "rope_theta",
    "rope_scaling", "sliding_window"})


def _skim(fields: _Fields) -> None:
  """An unused patcher_config (the entropy model comes from --entropy): names only."""
  fields.seen.update(k for k in fields.data if k in _PATCHER_FIELDS)


# -----------------------------------------------------------------------------------------
# Tensors: names, shapes and where they go.
# -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  shape: tuple[int, ...]       # HF shape
  tree: str                    # "blt" | "entropy"
  path: tuple[str, ...]        # bltjax param path
  transpose: bool              # torch Linear [out, in] -> Dense kernel [in, out]
  what: str                    # for error messages


def _linear(spec, name, out_in, tree, path, what):
  spec[name] = TensorSpec(tuple(out_in), tree, tuple(path) + ("kernel",), True, what)


def _vector(spec, name, d, tree, path, what):
  spec[name] = TensorSpec((d,), tree, tuple(path) + ("scale",), False, what)


def _stack(spec, layers_prefix, section, tree, path, what):
  d, f = section["d_model"], section["ffn_dim"]
  hd = d // section["n_heads"]
  q, kv = section["n_heads"] * hd, section["n_kv_heads"] * hd
  for i in range(section["n_layers"]):
    p, b = f"{layers_prefix}.{i}", (*path, f"layer_{i}")
    w = f"{what} layer {i}"
    _vector(spec, f"{p}.input_layernorm.weight", d, tree, (*b, "attn_norm"), f"{w} attention norm")
    _linear(spec, f"{p}.self_attn.q_proj.weight", (q, d), tree, (*b, "attn", "q"), f"{w} query")
    _linear(spec, f"{p}.self_attn.k_proj.weight", (kv, d), tree, (*b, "attn", "k"), f"{w} key")
    _linear(spec, f"{p}.self_attn.v_proj.weight", (kv, d), tree, (*b, "attn", "v"), f"{w} value")
    _linear(spec, f"{p}.self_attn.o_proj.weight", (d, q), tree, (*b, "attn", "o"), f"{w} output")
    _vector(spec, f"{p}.post_attention_layernorm.weight", d, tree, (*b, "ffn_norm"),
            f"{w} FFN norm")
    _linear(spec, f"{p}.mlp.gate_proj.weight", (f, d), tree, (*b, "ffn", "gate"), f"{w} FFN gate")
    _linear(spec, f"{p}.mlp.up_proj.weight", (f, d), tree, (*b, "ffn", "up"), f"{w} FFN up")
    _linear(spec, f"{p}.mlp.down_proj.weight", (d, f), tree, (*b, "ffn", "down"), f"{w} FFN down")


def _cross(spec, prefix, d, path, what):
  _vector(spec, f"{prefix}.q_norm.weight", d, "blt", (*path, "q_norm"), f"{what} query norm")
  _vector(spec, f"{prefix}.k_norm.weight", d, "blt", (*path, "kv_norm"), f"{what} key/value norm")
  for name in ("q", "k", "v", "o"):
    _linear(spec, f"{prefix}.{name}_proj.weight", (d, d), "blt", (*path, name), f"{what} {name}")


def expected_tensors(plan: Plan) -> dict[str, TensorSpec]:
  """Every tensor a checkpoint with its entropy model inside must hold (name -> spec)."""
  return blt_tensors(plan) | entropy_tensors(plan, "model.patcher.")


def blt_tensors(plan: Plan) -> dict[str, TensorSpec]:
  """The BLT's tensors (HF name -> spec), in the port's order."""
  spec: dict[str, TensorSpec] = {}
  enc, glob_, dec = plan.encoder, plan.global_model, plan.decoder
  d, k, dg = enc["d_model"], plan.cross_attn_k, glob_["d_model"]
  vocab = blt_bytes.VOCAB_SIZE
  spec["model.local_encoder.embed_tokens.weight"] = TensorSpec(
      (vocab, d), "blt", ("encoder", "embedding", "byte_embed", "embedding"), False,
      "encoder byte embedding")
  spec["model.encoder_hash_tok_embedding.weight"] = TensorSpec(
      (plan.n_hash_tables * plan.hash_table_size, d), "blt",
      ("encoder", "embedding", "hash_embed", "embedding"), False,
      f"fused hash tables ({plan.n_hash_tables} x {plan.hash_table_size} rows)")
  _stack(spec, "model.local_encoder.layers", enc, "blt", ("encoder", "layers"), "encoder")
  _linear(spec, "model.local_encoder.patch_embedding_projection.weight", (k * d, d), "blt",
          ("encoder", "pooling_0", "query_proj"), "encoder patch projection")
  _cross(spec, "model.local_encoder.cross_attn_layers.0", d, ("encoder", "pooling_0", "cross"),
         "encoder cross-attention")
  if k * d != dg:
    _linear(spec, "model.global_transformer.token_embedding_projection.weight", (dg, k * d),
            "blt", ("global_model", "input_proj"), "global input projection")
  _stack(spec, "model.global_transformer.layers", glob_, "blt", ("global_model", "transformer"),
         "global")
  _linear(spec, "model.local_decoder.patch_embedding_projection.weight", (k * d, dg), "blt",
          ("decoder", "patch_proj"), "decoder patch projection")
  n_cross = dec["n_layers"] if plan.cross_attn_all_layers_decoder else 1
  for i in range(n_cross):
    _cross(spec, f"model.local_decoder.cross_attn_layers.{i}", d, ("decoder", f"cross_{i}"),
           f"decoder cross-attention {i}")
  _stack(spec, "model.local_decoder.layers", dec, "blt", ("decoder", "layers"), "decoder")
  _vector(spec, "model.local_decoder.norm.weight", d, "blt", ("decoder", "norm"), "decoder norm")
  spec["lm_head.weight"] = TensorSpec((vocab, d), "blt", ("decoder", "head", "kernel"), True,
                                      "byte head")
  return spec


def entropy_tensors(plan: Plan, prefix: str) -> dict[str, TensorSpec]:
  """The entropy model's tensors, named `<prefix>embed_tokens.weight` etc."""
  spec: dict[str, TensorSpec] = {}
  ent, vocab = plan.entropy, blt_bytes.VOCAB_SIZE
  p, de = prefix, ent["d_model"]
  spec[f"{p}embed_tokens.weight"] = TensorSpec((vocab, de), "entropy", ("embed", "embedding"),
                                               False, "entropy-model embedding")
  _stack(spec, f"{p}layers", ent, "entropy", ("transformer",), "entropy model")
  _vector(spec, f"{p}norm.weight", de, "entropy", ("norm",), "entropy-model final norm")
  spec[f"{p}lm_head.weight"] = TensorSpec((vocab, de), "entropy", ("lm_head", "kernel"), True,
                                          "entropy-model head")
  return spec


# -----------------------------------------------------------------------------------------
# Reading safetensors (lazily: shapes first, data after every check passed).
# -----------------------------------------------------------------------------------------


class _Tensors:
  """All tensors of a directory's `*.safetensors` files: name -> (file, shape, dtype)."""

  def __init__(self, directory: str, label: str):
    try:
      from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConvertError("reading Hugging Face checkpoints needs the safetensors package: "
                         "pip install 'bltjax[convert]'") from None
    # Registers bfloat16 with numpy, so BF16 tensors load (then become float32).
    import ml_dtypes  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    self._safe_open = safe_open
    files = sorted(glob.glob(os.path.join(glob.escape(directory), "*.safetensors")))
    if not files:
      other = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))]
      raise ConvertError(
          f"{label} {directory} has no *.safetensors file" + (
              f" (found {', '.join(sorted(other))}: re-save it with safetensors)" if other
              else ""))
    self.files = files
    self.index: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for path in files:
      with safe_open(path, framework="numpy") as f:
        for name in f.keys():
          piece = f.get_slice(name)
          if name in self.index:
            raise ConvertError(f"tensor {name} is in both {os.path.basename(self.index[name][0])}"
                               f" and {os.path.basename(path)}")
          self.index[name] = (path, tuple(piece.get_shape()), piece.get_dtype())
    index_file = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index_file):
      with open(index_file, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map", {})
      for name, file in weight_map.items():
        if name not in self.index:
          raise ConvertError(f"tensor {name} is listed in {index_file} (in {file}) but no "
                             f"*.safetensors file of {directory} holds it")

  def load(self, name: str) -> np.ndarray:
    path, _, dtype = self.index[name]
    if dtype not in ("F32", "F16", "BF16", "F64"):
      raise ConvertError(f"tensor {name} has dtype {dtype}; expected a float tensor "
                         "(F32, BF16, F16, F64)")
    with self._safe_open(path, framework="numpy") as f:
      return np.asarray(f.get_tensor(name)).astype(np.float32)


def _check_tensors(found: Mapping[str, tuple], spec: Mapping[str, TensorSpec],
                   label: str) -> None:
  missing = [n for n in spec if n not in found]
  extra = sorted(n for n in found if n not in spec)
  if extra:
    shown = ", ".join(f"{n} {list(found[n][1])}" for n in extra[:5])
    more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
    raise ConvertError(f"{label}: unexpected tensor{'s' if len(extra) > 1 else ''} {shown}{more}"
                       " (not part of a BLT with this config.json; nothing is dropped "
                       "silently)")
  if missing:
    shown = ", ".join(f"{n} (expected {list(spec[n].shape)})" for n in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise ConvertError(f"{label}: missing tensor{'s' if len(missing) > 1 else ''} {shown}{more}")
  for name, s in spec.items():
    shape = tuple(found[name][1])
    if shape != s.shape:
      raise ConvertError(f"tensor {name} ({s.what}) has shape {list(shape)}, expected "
                         f"{list(s.shape)} from config.json")


def _entropy_prefix(names) -> str:
  for prefix in ("model.patcher.", "patcher.", ""):
    if f"{prefix}embed_tokens.weight" in names and f"{prefix}lm_head.weight" in names:
      return prefix
  raise ConvertError("--entropy: no entropy model found (expected embed_tokens.weight and "
                     "lm_head.weight, optionally under model.patcher.)")


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def read_config_file(directory: str, label: str) -> dict:
  if not os.path.isdir(directory):
    raise ConvertError(f"{label} {directory!r} is not a directory")
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise ConvertError(f"{label} {directory} has no config.json: not a Hugging Face checkpoint "
                       "directory (expected config.json + *.safetensors)")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ConvertError(f"{path} is not valid JSON: {e}") from None


@dataclasses.dataclass
class Converted:
  """In-memory result: bltjax configs and params (numpy float32 trees)."""
  plan: Plan
  config: Any              # ConfigDict of the BLT
  entropy_config: Any      # ConfigDict of the entropy model
  params: dict
  entropy_params: dict
  tensors: int


def build_configs(plan: Plan):
  """The bltjax configs (locked ConfigDicts) of the converted BLT and its entropy model."""
  main = configs.base_config()
  main.model.kind = "blt"
  for name in ("encoder", "global_model", "decoder"):
    main.model.blt[name] = configs.transformer_section(**getattr(plan, name))
  main.model.entropy = configs.transformer_section(**plan.entropy)
  main.model.blt.cross_attn_k = plan.cross_attn_k
  main.model.blt.cross_attn_heads = plan.cross_attn_heads
  main.model.blt.cross_attn_all_layers_encoder = False
  main.model.blt.cross_attn_all_layers_decoder = plan.cross_attn_all_layers_decoder
  main.model.blt.ngram_sizes = tuple(plan.ngram_sizes)
  main.model.blt.hash_table_size = plan.hash_table_size
  main.model.blt.hash_functions = plan.hash_functions
  main.model.blt.ffn_local = False
  main.model.ffn.activation = "swiglu"
  main.patcher.mode = "entropy"
  main.patcher.rule = "global"
  main.patcher.threshold = plan.threshold
  main.patcher.max_patch_len = plan.max_patch_len
  main.patcher.patch_size = plan.patch_size
  main.patcher.max_patches = 0
  main.patcher.entropy_workdir = ENTROPY_SUBDIR
  entropy = configs.base_config()
  entropy.model.kind = "entropy"
  entropy.model.entropy = configs.transformer_section(**plan.entropy)
  entropy.patcher = main.patcher.copy_and_resolve_references()
  entropy.patcher.entropy_workdir = ""
  main.lock()
  entropy.lock()
  return main, entropy


def convert_arrays(hf_dir: str, entropy_dir: str | None = None) -> Converted:
  """Reads and checks a HF BLT checkpoint; returns bltjax configs and params (no writing)."""
  hf = read_config_file(hf_dir, "--hf")
  entropy_hf = read_config_file(entropy_dir, "--entropy") if entropy_dir else None
  plan = map_config(hf, entropy_hf)
  tensors = _Tensors(hf_dir, "--hf")
  if entropy_dir is None and not any(n.startswith("model.patcher.") for n in tensors.index):
    why = " (patch_in_forward=false)" if hf.get("patch_in_forward") is False else ""
    raise ConvertError(f"--hf {hf_dir} holds no entropy model{why}: no model.patcher.* tensors; "
                       "pass the directory of one with --entropy DIR")
  if entropy_dir is None:
    spec = expected_tensors(plan)
    _check_tensors(tensors.index, spec, f"--hf {hf_dir}")
    sources = [(spec, tensors)]
  else:
    if any(n.startswith("model.patcher.") for n in tensors.index):
      raise ConvertError(f"--hf {hf_dir} holds an entropy model (model.patcher.*) and --entropy "
                         "names another one; drop --entropy to use the one inside")
    ent_tensors = _Tensors(entropy_dir, "--entropy")
    main_spec = blt_tensors(plan)
    ent_spec = entropy_tensors(plan, _entropy_prefix(ent_tensors.index))
    _check_tensors(tensors.index, main_spec, f"--hf {hf_dir}")
    _check_tensors(ent_tensors.index, ent_spec, f"--entropy {entropy_dir}")
    sources = [(main_spec, tensors), (ent_spec, ent_tensors)]
  trees: dict[str, dict] = {"blt": {}, "entropy": {}}
  count = 0
  for spec, source in sources:
    for name, s in spec.items():
      value = source.load(name)
      _set(trees[s.tree], s.path, np.ascontiguousarray(value.T) if s.transpose else value)
      count += 1
  main, entropy = build_configs(plan)
  _check_against_model(main, trees["blt"], trees["entropy"])
  return Converted(plan, main, entropy, trees["blt"], trees["entropy"], count)


def abstract_params(config) -> tuple[Any, Any]:
  """ShapeDtypeStruct trees of the BLT and entropy-model params a config describes."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from bltjax import model as model_lib  # pylint: disable=g-import-not-at-top
  from bltjax.model import blt  # pylint: disable=g-import-not-at-top
  from bltjax.model import entropy_model  # pylint: disable=g-import-not-at-top
  from bltjax.model import patcher as patcher_lib  # pylint: disable=g-import-not-at-top
  tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
  module = blt.BLT(model_lib.blt_config(config.model))

  def init(rng, t):
    patches = patcher_lib.patch(patcher_lib.PatcherConfig(mode="static", max_patches=16), t, t)
    return module.init(rng, t, t, patches)["params"]

  blt_params = nn.meta.unbox(jax.eval_shape(init, jax.random.PRNGKey(0), tokens))
  ent = entropy_model.EntropyModel(model_lib.transformer_config(config.model.entropy,
                                                                config.model))
  ent_params = nn.meta.unbox(jax.eval_shape(ent.init, jax.random.PRNGKey(0), tokens,
                                            tokens)["params"])
  return blt_params, ent_params


def _check_against_model(config, params, entropy_params) -> None:
  """The converted trees have exactly the bltjax modules' structure and shapes."""
  import jax  # pylint: disable=g-import-not-at-top
  want_blt, want_ent = abstract_params(config)
  for label, want, got in (("BLT", want_blt, params), ("entropy model", want_ent,
                                                       entropy_params)):
    want_shapes = {jax.tree_util.keystr(p): tuple(x.shape)
                   for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
    got_shapes = {jax.tree_util.keystr(p): tuple(x.shape)
                  for p, x in jax.tree_util.tree_flatten_with_path(got)[0]}
    if want_shapes != got_shapes:
      diff = sorted(set(want_shapes.items()) ^ set(got_shapes.items()))[:4]
      raise AssertionError(f"converter bug: the {label} params do not match the bltjax model "
                           f"({diff})")


def check_new_directory(out_dir: str, error=None) -> None:
  """Raises `error` (default ConvertError) unless `out_dir` names a directory that is
  absent or empty (a symbolic link is refused: the finished directory is renamed onto
  `out_dir`, which would replace the link, not fill its target)."""
  error = error or ConvertError
  if not out_dir.strip():
    raise error("--out is empty; pass the path of a new directory")
  if os.path.islink(out_dir):
    raise error(f"--out {out_dir} is a symbolic link; pass the directory it points to "
                f"({os.path.realpath(out_dir)}) or a new path")
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise error(f"--out {out_dir} exists and is not an empty directory; choose a new --out "
                "or delete it")


@contextlib.contextmanager
def staged_directory(out_dir: str):
  """Yields a temporary directory next to `out_dir` to write into; it becomes `out_dir`
  (absent or empty) when the block ends, and is removed if the block raises: a failed
  write leaves nothing behind."""
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".writing-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is a normal directory
  try:
    yield tmp
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty (the caller checked)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def convert(hf_dir: str, out_dir: str, *, entropy_dir: str | None = None) -> Converted:
  """Converts `hf_dir` (+ `entropy_dir`) into the bltjax model directory `out_dir`.

  Everything is checked before anything is written; the directory is written under a
  temporary name next to `out_dir` and renamed at the end, so a failed conversion
  leaves nothing behind. `out_dir` must not exist or be empty.
  """
  from bltjax import checkpoint  # pylint: disable=g-import-not-at-top
  from bltjax import patching  # pylint: disable=g-import-not-at-top
  check_new_directory(out_dir)
  converted = convert_arrays(hf_dir, entropy_dir)
  with staged_directory(out_dir) as tmp:
    entropy_out = os.path.join(tmp, ENTROPY_SUBDIR)
    os.makedirs(entropy_out)
    checkpoint.save_params(entropy_out, converted.entropy_params, step=0)
    _write_json(os.path.join(entropy_out, "config.json"),
                json.loads(configs.to_json(converted.entropy_config)))
    patching.write_calibration(entropy_out, dict(
        threshold=converted.plan.threshold, rule="global",
        max_patch_len=converted.plan.max_patch_len,
        source="transformers BltConfig.patching_threshold", hf_dir=os.path.abspath(hf_dir)))
    checkpoint.save_params(tmp, converted.params, step=0)
    _write_json(os.path.join(tmp, "config.json"), json.loads(configs.to_json(converted.config)))
    shutil.copyfile(os.path.join(hf_dir, "config.json"), os.path.join(tmp, "hf_config.json"))
    count = lambda tree: int(sum(np.size(x) for x in _leaves(tree)))
    _write_json(os.path.join(tmp, "convert.json"), dict(
        source=os.path.abspath(hf_dir),
        entropy_source=os.path.abspath(entropy_dir) if entropy_dir else None,
        tensors=converted.tensors, blt_params=count(converted.params),
        entropy_params=count(converted.entropy_params),
        format="orbax PyTree {'params': ...} at checkpoints/0/state (checkpoint.save_params)"))
  return converted


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def _write_json(path: str, data: Mapping) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=True, default=str)
    f.write("\n")
