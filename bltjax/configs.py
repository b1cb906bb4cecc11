"""Experiment files and command-line overrides.

An experiment file is a Python file with `get_config(arg=None) -> ConfigDict` (big_vision
style). It is named on the command line as `path/to/file.py` or `path/to/file.py:arg`;
overrides are `--config.section.key=value`. The returned config is locked: an unknown
key or a value of the wrong type is a `ConfigError` with a one-line message.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Any, Sequence

import ml_collections
import numpy as np


class ConfigError(ValueError):
  """A bad experiment file, override or config value. The message names the fix."""


SAVED_CONFIG = "config.json"   # what `bltjax train` writes into its workdir


def check_experiment_path(path: str) -> None:
  """Raises ConfigError unless `path` is a Python file; a workdir or its saved config
  gets how to resume or reuse that run."""
  workdir = path if os.path.isdir(path) else os.path.dirname(path) or "."
  if (os.path.basename(path) == SAVED_CONFIG or os.path.isdir(path)) and os.path.isfile(
      os.path.join(workdir, SAVED_CONFIG)):
    raise ConfigError(
        f"{path} is the saved config of workdir {workdir}, not an experiment file (a Python "
        f"file with get_config()); to resume that run, re-run `bltjax train` with the "
        f"experiment file it was started with and --workdir {workdir}; `bltjax eval`, "
        f"`generate`, `calibrate`, `export` and `params` take --workdir {workdir} itself")
  if not os.path.isfile(path):
    raise ConfigError(f"experiment file {path!r} does not exist; pass e.g. "
                      "--config experiments/entropy_tiny.py")
  if not path.endswith(".py"):
    raise ConfigError(f"{path} is not an experiment file: experiment files are Python files "
                      "with get_config(arg=None); pass e.g. --config experiments/entropy_tiny.py")


def load_experiment(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py` or `path.py:arg` and returns its locked config."""
  path, _, arg = spec.partition(":")
  check_experiment_path(path)
  module_name = "bltjax_experiment_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config(arg=None) function")
  config = module.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
  config.lock()
  return config


def parse_value(text: str, current: Any) -> Any:
  """Parses an override string into the type of the value it replaces."""
  if isinstance(current, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError(f"expected true or false, got {text!r}")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _lookup(config: ml_collections.ConfigDict, dotted: str):
  parent = config
  keys = dotted.split(".")
  for i, key in enumerate(keys[:-1]):
    if key not in parent or not isinstance(parent[key], ml_collections.ConfigDict):
      raise ConfigError(_unknown_key_message(".".join(keys[:i + 1]), parent))
    parent = parent[key]
  if keys[-1] not in parent:
    raise ConfigError(_unknown_key_message(dotted, parent))
  return parent, keys[-1]


def _unknown_key_message(dotted: str, parent: ml_collections.ConfigDict) -> str:
  known = ", ".join(sorted(parent.keys()))
  return f"config key {dotted!r} does not exist; known keys here: {known}"


def set_value(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """Sets `config.<dotted> = value`, type-checked; `value` may be a string to parse."""
  parent, key = _lookup(config, dotted)
  current = parent[key]
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"config key {dotted!r} is a section; set one of its keys instead")
  if isinstance(value, str) and not isinstance(current, str):
    try:
      value = parse_value(value, current)
    except ValueError as e:
      raise ConfigError(f"config key {dotted!r} holds {type(current).__name__}: {e}") from None
  if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
    value = type(current)(value)
  try:
    with parent.unlocked():
      parent[key] = value
  except TypeError as e:
    raise ConfigError(
        f"config key {dotted!r} holds {type(current).__name__}, cannot set {value!r} "
        f"({type(value).__name__}): {e}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]
                    ) -> ml_collections.ConfigDict:
  """Applies `--config.a.b=value` (or `a.b=value`) strings in order."""
  for item in overrides:
    text = item[2:] if item.startswith("--") else item
    if text.startswith("config."):
      text = text[len("config."):]
    dotted, eq, value = text.partition("=")
    if not eq:
      raise ConfigError(f"override {item!r} has no '='; write --config.train.steps=100")
    set_value(config, dotted, value)
  return config


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Experiment file + overrides -> locked config."""
  return apply_overrides(load_experiment(spec), overrides)


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(text: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(json.loads(text))
  config.lock()
  return config


_ABSENT = object()   # a key a config lacks (`differences`)


def differences(saved: Any, given: Any, prefix: str = "") -> list[str]:
  """Where two configs as JSON (dicts of dicts) differ, sorted by dotted key:
  `["model.diffusion.block_size: 8 (saved) vs 4 (given)", ...]`. `prefix` is the dotted
  name of `saved`/`given`; a key one of them lacks shows as `absent`."""
  if isinstance(saved, dict) and isinstance(given, dict):
    return [line for key in sorted(set(saved) | set(given), key=str)
            for line in differences(saved.get(key, _ABSENT), given.get(key, _ABSENT),
                                    f"{prefix}.{key}" if prefix else str(key))]
  if saved == given:
    return []
  show = lambda value: "absent" if value is _ABSENT else json.dumps(value, default=str)
  return [f"{prefix}: {show(saved)} (saved) vs {show(given)} (given)"]


def describe_differences(saved: Any, given: Any, prefix: str = "", most: int = 4) -> str:
  """The first `most` `differences`, "; "-separated, and how many more there are."""
  lines = differences(saved, given, prefix)
  more = f"; {len(lines) - most} more" if len(lines) > most else ""
  return "; ".join(lines[:most]) + more


def with_defaults(saved: dict) -> dict:
  """A saved config (`config.json` as a dict) with the keys it lacks taken from
  `base_config()`: a key added to bltjax after the run was saved defaults to the behaviour
  the run had, so older workdirs still load and resume."""
  def merge(defaults: dict, values: dict) -> dict:
    out = dict(values)
    for key, default in defaults.items():
      if key not in out:
        out[key] = default
      elif isinstance(default, dict) and isinstance(out[key], dict):
        out[key] = merge(default, out[key])
    return out
  return merge(json.loads(to_json(base_config())), saved)


def check_integer(name: str, value, least: int, below: int | None = None) -> int:
  """`value` as an int when it is an integer (not a bool) in [least, below); else a
  ValueError naming `name` and the range."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least or (
      below is not None and value >= below):
    bounds = f"in [{least}, {below})" if below is not None else f">= {least}"
    raise ValueError(f"{name}={value!r} must be an integer {bounds}")
  return int(value)


def check_fields(section: ml_collections.ConfigDict | dict, name: str, allowed: dict) -> None:
  """Checks enumerated string fields: `allowed` maps key -> tuple of allowed values."""
  for key, values in allowed.items():
    value = section[key]
    if value not in values:
      raise ConfigError(f"config.{name}.{key}={value!r} is not one of {list(values)}")


# ---------------------------------------------------------------------------
# The default config every experiment file starts from.
# ---------------------------------------------------------------------------


def transformer_section(d_model: int, n_layers: int, n_heads: int, *, n_kv_heads: int = 0,
                        ffn_dim: int = 0, window: int = 0,
                        rope_theta: float = 10000.0) -> ml_collections.ConfigDict:
  """Shape of one transformer stack; see `bltjax.model.layers.TransformerConfig`."""
  return ml_collections.ConfigDict(dict(
      d_model=d_model,          # width
      n_layers=n_layers,
      n_heads=n_heads,
      n_kv_heads=n_kv_heads,    # 0: as many as n_heads (no GQA)
      ffn_dim=ffn_dim,          # 0: BLT rule 256 * ceil(int(8d/3) / 256)
      window=window,            # sliding attention window in positions; 0: full causal
      rope_theta=float(rope_theta),
  ))


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every section; experiment files change what they need."""
  from bltjax.data import default_data_config  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.kind = "entropy"      # entropy: train the patcher's entropy model
  config.model.dtype = "float32"     # compute dtype: float32 | bfloat16 (params stay float32)
  config.model.remat = False         # recompute activations in the backward pass
  config.model.scan_layers = False   # global/entropy stacks as one scanned block: compile
                                     # time independent of depth (params [layers, ...])
  config.model.ffn = ml_collections.ConfigDict(dict(
      activation="swiglu",           # swiglu | relu
      l1_coef=0.0,                   # L1 on relu activations (sparsity)
      impl="xla",                    # xla | pallas (activation-sparse kernel; relu only)
      backend="",                    # pallas: "" (the kernel package picks), gpu | tpu | xla
      interpret=False,               # pallas: kernels in interpret mode (CPU tests)
      dense_threshold=0.5,           # pallas: dense matmuls above this occupancy; >= 1: never
  ))
  config.model.attention = ml_collections.ConfigDict(dict(   # training / scoring attention
      impl="xla",                    # xla (chunked window frames, dense over patches) |
                                     # pallas (GPU/TPU kernels: flash attention over each
                                     # row's key ranges, BLT-D's [clean ; noisy] included,
                                     # and over the KV caches in decoding; on a CPU their
                                     # dense jnp reference: small sizes only)
      backend="",                    # pallas: "" (the kernel package picks), gpu | tpu | xla
      interpret=False,               # pallas: kernels in interpret mode (CPU tests)
  ))
  config.model.entropy = transformer_section(128, 2, 4, window=512)   # kind "entropy"
  config.model.blt = ml_collections.ConfigDict(dict(                    # kind "blt"
      encoder=transformer_section(128, 1, 4, window=512, rope_theta=500000.0),
      global_model=transformer_section(256, 2, 4, rope_theta=500000.0),
      decoder=transformer_section(128, 2, 4, window=512, rope_theta=500000.0),
      cross_attn_k=2,                    # patch vectors per patch
      cross_attn_heads=0,                # 0: the local models' n_heads
      cross_attn_all_layers_encoder=False,
      cross_attn_all_layers_decoder=True,
      ngram_sizes=(3, 4, 5, 6, 7, 8),    # hash n-gram embeddings
      hash_table_size=500002,            # rows per table; 0: no hash embeddings
      hash_functions=1,
      ffn_local=False,                   # model.ffn also for the local models (else swiglu)
  ))
  config.model.diffusion = ml_collections.ConfigDict(dict(              # BLT-D objective
      lambda_diff=0.0,                   # loss = ce_next + lambda_diff * ce_masked; 0: BLT
      block_size=8,                      # B: bytes per noisy block
      blocks_per_chunk=0,                # noisy blocks per window-long chunk; 0: chunk / 4
      noise="per_example",               # per_example | per_block: t ~ U(eps, 1]
      eps=1e-3,
      elbo_weight=False,                 # weight masked CE by 1/t
      noisy_embedding="encoder",         # encoder: noisy bytes go through the encoder layers
  ))

  config.patcher = ml_collections.ConfigDict(dict(
      mode="entropy",                # entropy | static | space
      threshold=-1.0,                # nats; < 0: the calibrated value of the entropy workdir
      rule="global",                 # global: H_t > threshold; monotonic: H_t - H_{t-1} > threshold
      max_patch_len=8,               # split longer patches; 0: no limit
      patch_size=4,                  # static mode
      max_patches=0,                 # patches per row P; 0: seq_len (never drops bytes)
      target_patch_len=4.5,          # `bltjax calibrate` aims at this mean patch length
      entropy_workdir="",            # workdir of a trained entropy model
      entropy_step=-1,               # its checkpoint step; < 0: the latest (`bltjax train`
                                     # pins it and the threshold in the BLT's config.json)
  ))

  config.data = default_data_config()

  config.train = ml_collections.ConfigDict(dict(
      steps=1000,
      batch_size=16,                 # global batch (rows)
      grad_accum_steps=1,            # microbatches per step: gradients summed in a scan
                                     # (activation memory of batch_size / this)
      seq_len=512,                   # bytes per row
      log_every=10,                  # steps per logged row (>= 1; the last step is logged)
      eval_every=200,                # steps per evaluation; 0: only at the end
      eval_batches=8,                # validation batches per eval; 0: the whole split
      save_every=200,                # steps per checkpoint (>= 1; the last step is saved)
      keep=3,                        # checkpoints kept (>= 1: the last holds the model)
      async_checkpoint=True,
      init_params_from="",           # a workdir or converted model dir: start from its params
      time_budget_s=0.0,             # stop (and save) after this much training (first step
                                     # and its compilation not counted); 0: off
      profile_steps=0,               # jax.profiler trace of this many steps into
                                     # <workdir>/profile (TensorBoard); 0: off
      profile_skip=2,                # steps of a run before the traced ones
  ))

  config.optim = ml_collections.ConfigDict(dict(
      lr=3e-3,
      warmup_steps=100,
      schedule="cosine",             # after warmup: cosine | wsd | constant
      min_lr_ratio=0.1,              # cosine and wsd decay to lr * min_lr_ratio
      decay_fraction=0.2,            # wsd: the last fraction of train.steps decays
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      clip_norm=1.0,                 # global gradient norm clip; 0: none
  ))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return config
