"""`bltjax export`: a bltjax BLT -> a Hugging Face BLT checkpoint directory.

The inverse of `convert.py`, through its tables: a trained workdir (or a converted model
directory) and its entropy model become `config.json` + `model.safetensors` (the entropy
model inside, `model.patcher.*`), which transformers' `BltForCausalLM.from_pretrained`
reads. Tensor names, shapes and transposes are those of `convert.expected_tensors`; the
config.json is checked to map back (`convert.map_config`) to exactly the model's shapes
before anything is written. A model the port cannot run as it is (static or space
patching, a ReLU FFN, a windowed global model, ...) is refused, naming the config key.
BLT-D weights export as the plain BLT they also are (the port decodes byte by byte).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

from bltjax import bytes as blt_bytes
from bltjax import convert

MAX_SHARD_BYTES = 5 * 1024**3   # transformers' default shard size


class ExportError(ValueError):
  """A model the Hugging Face BLT port cannot hold. The message names the config key."""


def _require(ok: bool, key: str, value: Any, why: str) -> None:
  if not ok:
    raise ExportError(f"config.{key}={value!r} cannot be exported: {why}")


def _section(section: Mapping, model: Mapping) -> dict:
  """A transformer section with its defaults resolved (kv heads, FFN width), as
  `convert.map_config` reads it back."""
  from bltjax import model as model_lib  # pylint: disable=g-import-not-at-top
  cfg = model_lib.transformer_config(section, model, use_ffn_config=False)
  return dict(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
              n_kv_heads=cfg.kv_heads, ffn_dim=cfg.hidden_dim, window=cfg.window,
              rope_theta=float(cfg.rope_theta))


def plan_from_config(config, entropy_config, threshold: float) -> convert.Plan:
  """The export plan of a BLT config and its entropy model's (`threshold`: the patcher's
  resolved entropy threshold, nats). Raises ExportError naming what the port lacks."""
  model, blt, patcher = config.model, config.model.blt, config.patcher
  _require(model.kind == "blt", "model.kind", model.kind, "only a BLT exports")
  _require(patcher.mode == "entropy", "patcher.mode", patcher.mode,
           "the port patches by entropy only (it cuts one byte per patch otherwise)")
  _require(patcher.rule == "global", "patcher.rule", patcher.rule,
           "the port applies the global threshold rule only")
  for key, ffn in (("model.ffn.activation", model.ffn),
                   ("model.ffn.activation of the entropy model", entropy_config.model.ffn)):
    _require(ffn.activation == "swiglu", key, ffn.activation, "the port's FFNs are SwiGLU")
  encoder, decoder = _section(blt.encoder, model), _section(blt.decoder, model)
  global_model = _section(blt.global_model, model)
  entropy = _section(entropy_config.model.entropy, entropy_config.model)
  _require(global_model["window"] == 0, "model.blt.global_model.window",
           global_model["window"], "the port's global transformer is plain causal")
  _require(encoder["window"] == decoder["window"], "model.blt.decoder.window",
           decoder["window"], "the port's encoder and decoder share one window "
           f"(the encoder's is {encoder['window']})")
  for key in ("d_model", "n_heads"):
    _require(encoder[key] == decoder[key], f"model.blt.decoder.{key}", decoder[key],
             f"the port's local encoder and decoder share it (encoder: {encoder[key]})")
  for name, section in (("encoder", encoder), ("decoder", decoder)):
    _require(section["n_kv_heads"] == section["n_heads"], f"model.blt.{name}.n_kv_heads",
             section["n_kv_heads"], "the port's local cross-attentions have no kv groups")
  _require(blt.cross_attn_heads in (0, encoder["n_heads"]), "model.blt.cross_attn_heads",
           blt.cross_attn_heads, "the port's cross-attentions use the local models' heads")
  _require(not blt.cross_attn_all_layers_encoder or encoder["n_layers"] == 1,
           "model.blt.cross_attn_all_layers_encoder", blt.cross_attn_all_layers_encoder,
           "the port re-pools the patches at every encoder layer, which is another model")
  _require(blt.hash_table_size > 0 and len(blt.ngram_sizes) > 0, "model.blt.hash_table_size",
           blt.hash_table_size, "the port always has hash n-gram embeddings")
  return convert.Plan(
      encoder=encoder, global_model=global_model, decoder=decoder, entropy=entropy,
      cross_attn_k=int(blt.cross_attn_k), cross_attn_heads=encoder["n_heads"],
      cross_attn_all_layers_decoder=bool(blt.cross_attn_all_layers_decoder),
      ngram_sizes=tuple(int(n) for n in blt.ngram_sizes),
      hash_table_size=int(blt.hash_table_size), hash_functions=int(blt.hash_functions),
      threshold=float(threshold), max_patch_len=int(patcher.max_patch_len),
      patch_size=int(patcher.patch_size))


def hf_config(plan: convert.Plan) -> dict:
  """The transformers `BltConfig` (as config.json) of a plan."""
  k, d, dg = plan.cross_attn_k, plan.encoder["d_model"], plan.global_model["d_model"]

  def sub(section: Mapping, model_type: str, **extra) -> dict:
    return dict(
        model_type=model_type, hidden_size=section["d_model"],
        num_attention_heads=section["n_heads"], num_key_value_heads=section["n_kv_heads"],
        num_hidden_layers=section["n_layers"], intermediate_size=section["ffn_dim"],
        hidden_act="silu", rms_norm_eps=1e-5, dropout=0.0, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": section["rope_theta"]},
        **extra)

  local_window = plan.encoder["window"] or None
  local = dict(vocab_size=blt_bytes.VOCAB_SIZE, cross_attn_k=k, hidden_size_global=dg)
  return dict(
      architectures=["BltForCausalLM"], model_type="blt", vocab_size=blt_bytes.VOCAB_SIZE,
      bos_token_id=blt_bytes.BOS_ID, eos_token_id=blt_bytes.EOS_ID,
      tie_word_embeddings=False, patch_in_forward=True, patching_mode="entropy",
      patching_threshold=plan.threshold, max_patch_length=plan.max_patch_len or None,
      patch_size=plan.patch_size, local_attention_window_len=local_window, cross_attn_k=k,
      encoder_hash_byte_group_size=list(plan.ngram_sizes),
      encoder_hash_byte_group_vocab=plan.hash_table_size,
      encoder_hash_byte_group_nb_functions=plan.hash_functions,
      encoder_config=sub(plan.encoder, "blt_local_encoder", cross_attn_all_layers=False,
                         sliding_window=local_window, **local),
      decoder_config=sub(plan.decoder, "blt_local_decoder",
                         cross_attn_all_layers=plan.cross_attn_all_layers_decoder, **local),
      global_config=sub(plan.global_model, "blt_global_transformer",
                        encoder_cross_output_size=k * d if k * d != dg else None),
      patcher_config=sub(plan.entropy, "blt_patcher", vocab_size=blt_bytes.VOCAB_SIZE,
                         sliding_window=plan.entropy["window"] or None))


def _get(tree: Mapping, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def hf_tensors(plan: convert.Plan, params: Mapping, entropy_params: Mapping
               ) -> dict[str, np.ndarray]:
  """HF name -> float32 array of every tensor of `convert.expected_tensors(plan)`, taken
  from unrolled bltjax params (torch Linear weights are [out, in])."""
  trees = {"blt": params, "entropy": entropy_params}
  out = {}
  for name, spec in convert.expected_tensors(plan).items():
    value = np.asarray(_get(trees[spec.tree], spec.path), np.float32)
    value = np.ascontiguousarray(value.T if spec.transpose else value)
    if value.shape != spec.shape:
      raise AssertionError(f"export bug: {name} ({spec.what}) has shape {value.shape}, the "
                           f"plan expects {spec.shape}")
    out[name] = value
  return out


def _unrolled(params: Mapping) -> dict:
  """BLT params with scanned stacks (`scan_layers`) unrolled, as the tensor table names
  them."""
  from bltjax.model import layers  # pylint: disable=g-import-not-at-top
  params = dict(params)
  if "global_model" in params:
    params["global_model"] = dict(params["global_model"], transformer=layers.unstack_layers(
        params["global_model"]["transformer"]))
  elif "transformer" in params:   # an entropy model
    params["transformer"] = layers.unstack_layers(params["transformer"])
  return params


@dataclasses.dataclass(frozen=True)
class Exported:
  plan: convert.Plan
  step: int
  tensors: int
  files: tuple[str, ...]


def load_model(workdir: str, step: int | None = None):
  """(config, entropy config, threshold, BLT params, entropy params, step) of a workdir,
  params unrolled numpy float32."""
  import jax  # pylint: disable=g-import-not-at-top
  from bltjax import checkpoint  # pylint: disable=g-import-not-at-top
  from bltjax import patching  # pylint: disable=g-import-not-at-top
  config = checkpoint.read_config(workdir)
  if config.model.kind != "blt":
    raise ExportError(f"{workdir} holds a {config.model.kind!r} model; `bltjax export` takes "
                      "the workdir of a BLT (its entropy model goes inside)")
  if config.patcher.mode != "entropy" or not config.patcher.entropy_workdir:
    raise ExportError(f"config.patcher.mode={config.patcher.mode!r} of {workdir} cannot be "
                      "exported: the port patches by entropy only")
  entropy = patching.blt_entropy_model(config.patcher)
  threshold = patching.resolve_threshold(config.patcher, config.patcher.entropy_workdir)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          convert.abstract_params(config)[0])
  params, step = checkpoint.load_params(workdir, abstract, step=step)
  as_numpy = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
  return (config, entropy.config, threshold, _unrolled(as_numpy(params)),
          _unrolled(as_numpy(entropy.params)), int(step))


def _write_safetensors(directory: str, tensors: Mapping[str, np.ndarray],
                       max_shard_bytes: int) -> tuple[str, ...]:
  """`model.safetensors`, or shards `model-0000i-of-0000n.safetensors` + index."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  shards, size = [{}], 0
  for name, value in tensors.items():
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = value
    size += value.nbytes
  if len(shards) == 1:
    names = ["model.safetensors"]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index = dict(metadata={"total_size": int(sum(v.nbytes for v in tensors.values()))},
                 weight_map={n: f for f, shard in zip(names, shards) for n in shard})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w",
              encoding="utf-8") as f:
      json.dump(index, f, indent=2, sort_keys=True)
  umask = os.umask(0)
  os.umask(umask)
  for file_name, shard in zip(names, shards):
    path = os.path.join(directory, file_name)
    save_file(shard, path, metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~umask)   # save_file leaves its temporary file's 0600
  return tuple(names)


def export(workdir: str, out_dir: str, *, step: int | None = None,
           max_shard_bytes: int = MAX_SHARD_BYTES) -> Exported:
  """Writes the BLT of `workdir` (latest or `step` checkpoint) as a Hugging Face BLT
  directory `out_dir` (must not exist or be empty). Checked before anything is written;
  written under a temporary name and renamed at the end."""
  convert.check_new_directory(out_dir, ExportError)
  config, entropy_config, threshold, params, entropy_params, step = load_model(workdir, step)
  plan = plan_from_config(config, entropy_config, threshold)
  hf = hf_config(plan)
  if convert.map_config(hf) != plan:
    raise AssertionError(f"export bug: the written config.json would read back as "
                         f"{convert.map_config(hf)}, not {plan}")
  tensors = hf_tensors(plan, params, entropy_params)
  with convert.staged_directory(out_dir) as tmp:
    files = _write_safetensors(tmp, tensors, max_shard_bytes)
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      json.dump(hf, f, indent=2, sort_keys=True)
      f.write("\n")
  return Exported(plan=plan, step=step, tensors=len(tensors), files=files)
