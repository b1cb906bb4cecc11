"""`bltjax convert`: Hugging Face BLT checkpoints -> bltjax model directories.

Golden data: tests/fixtures/hf_blt/ (three small random transformers `BltForCausalLM`
models with their patches and logits; README.md there is the spec). Parity is checked
through the path training and eval use: the workdir's config, `BltObjective.patches`
(entropy model of `patcher.entropy_workdir`) and `BLT.apply` on the restored params.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bltjax import checkpoint
from bltjax import cli
from bltjax import configs
from bltjax import convert
from bltjax import evaluate
from bltjax import objectives
from bltjax import patching
from bltjax import train
from conftest import REPO

FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf_blt")
NAMES = ("k2_noproj", "k4_proj_gqa", "k3_maxpatch")
TOL = 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """Each fixture converted once (k3 through the command line)."""
  root = tmp_path_factory.mktemp("converted")
  out = {}
  for name in NAMES:
    out[name] = str(root / name)
    if name == "k3_maxpatch":
      assert cli.main(["convert", "--hf", os.path.join(FIXTURES, name), "--out",
                       out[name]]) == 0
    else:
      convert.convert(os.path.join(FIXTURES, name), out[name])
  return out


def _restore(workdir):
  """What eval does: the workdir's config, its objective, params and entropy model."""
  config = checkpoint.read_config(workdir)
  objective = objectives.BltObjective(config)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          convert.abstract_params(config)[0])
  params, step = checkpoint.load_params(workdir, abstract)
  assert step == 0
  frozen = patching.blt_entropy_model(config.patcher, sharding).params
  return config, objective, params, frozen


@pytest.mark.parametrize("name", NAMES)
def test_converted_model_reproduces_patches_hash_ids_and_logits(converted, name):
  config, objective, params, frozen = _restore(converted[name])
  cases = np.load(os.path.join(FIXTURES, name, "cases.npz"))
  ids, lengths = jnp.asarray(cases["ids"]), cases["lengths"]
  # Rows longer than every window (local and entropy model), so the windows matter.
  windows = (config.model.blt.encoder.window, config.model.blt.decoder.window,
             config.model.entropy.window)
  assert lengths.min() > max(windows)
  # Right padding stays in the row's document: as in the port's unpadded single-row
  # runs, the last real byte then reads the last complete patch (a new document would
  # open a patch there).
  batch = {"inputs": ids, "segment_ids": jnp.ones_like(ids)}

  @jax.jit
  def forward(params, frozen, batch):
    patches = objective.patches(batch, frozen)
    logits, _ = objective.module.apply({"params": params}, batch["inputs"],
                                       batch["segment_ids"], patches)
    hash_ids = objective.module.apply({"params": params}, batch["inputs"], method="hash_ids")
    entropies = objective.entropy_model.entropies(frozen, batch["inputs"], batch["segment_ids"])
    return patches, logits, hash_ids, entropies

  patches, logits, hash_ids, entropies = jax.device_get(forward(params, frozen, batch))
  errors = []
  for row, n in enumerate(lengths):
    np.testing.assert_array_equal(patches.starts[row, :n + 1], cases["starts"][row, :n + 1])
    np.testing.assert_array_equal(patches.patch_ids[row, :n], cases["patch_ids"][row, :n])
    np.testing.assert_array_equal(patches.next_patch_ids[row, :n] - 1,
                                  cases["decoder_patch_ids"][row, :n])
    np.testing.assert_array_equal(hash_ids[row, :n], cases["hash_ids"][row, :n])
    np.testing.assert_allclose(entropies[row, :n], cases["entropies"][row, :n], atol=TOL)
    errors.append(np.abs(logits[row, :n] - cases["logits"][row, :n]).max())
  print(f"{name}: max |logit error| per row {['%.2e' % e for e in errors]}")
  assert max(errors) < TOL


def test_config_maps_every_component(converted):
  with open(os.path.join(converted["k4_proj_gqa"], "config.json")) as f:
    config = json.load(f)
  blt = config["model"]["blt"]
  assert config["model"]["kind"] == "blt"
  assert [blt[s]["rope_theta"] for s in ("encoder", "global_model", "decoder")] == [2e4, 1e3, 2e4]
  assert config["model"]["entropy"]["rope_theta"] == 300.0
  assert (blt["encoder"]["window"], blt["decoder"]["window"], blt["global_model"]["window"],
          config["model"]["entropy"]["window"]) == (24, 24, 0, 20)
  assert (blt["global_model"]["n_heads"], blt["global_model"]["n_kv_heads"]) == (6, 2)
  assert (blt["cross_attn_k"], blt["cross_attn_heads"], blt["hash_functions"],
          blt["ngram_sizes"], blt["hash_table_size"]) == (4, 2, 2, [3, 5, 8], 1201)
  assert config["patcher"] == dict(config["patcher"], mode="entropy", rule="global",
                                   threshold=1.8977, max_patch_len=0, entropy_workdir="entropy")
  entropy_dir = os.path.join(converted["k4_proj_gqa"], "entropy")
  assert checkpoint.read_config(entropy_dir).model.kind == "entropy"
  assert patching.read_calibration(entropy_dir)["threshold"] == 1.8977
  # The relative entropy_workdir resolves against the model directory.
  assert checkpoint.read_config(converted["k4_proj_gqa"]).patcher.entropy_workdir == entropy_dir
  k3 = checkpoint.read_config(converted["k3_maxpatch"])
  assert (k3.patcher.max_patch_len, k3.model.entropy.window) == (4, 0)   # null: full causal


def _copy(name, tmp_path, edit_config=None, edit_tensors=None):
  """A fixture copied to tmp_path with its config.json and/or tensors edited."""
  directory = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), directory)
  if edit_config:
    with open(directory / "config.json") as f:
      config = json.load(f)
    edit_config(config)
    with open(directory / "config.json", "w") as f:
      json.dump(config, f)
  if edit_tensors:
    tensors = load_file(str(directory / "model.safetensors"))
    edit_tensors(tensors)
    save_file(tensors, str(directory / "model.safetensors"))
  return str(directory)


def _set(path, value):
  def edit(config):
    *parents, key = path.split(".")
    for p in parents:
      config = config[p]
    config[key] = value
  return edit


CONFIG_ERRORS = {
    "unknown_field": (_set("decoder_config.fancy_option", 1),
                      r"decoder_config.fancy_option'.*unknown"),
    "hidden_act": (_set("global_config.hidden_act", "gelu"), r"global_config.hidden_act='gelu'"),
    "rope_scaling": (_set("encoder_config.rope_parameters",
                          {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
                     r"encoder_config.rope_parameters.*scaling"),
    "tied": (_set("tie_word_embeddings", True), r"tie_word_embeddings=True"),
    "patching_mode": (_set("patching_mode", "space"), r"patching_mode='space'"),
    "cross_attn_k": (_set("decoder_config.cross_attn_k", 3), r"decoder_config.cross_attn_k=3"),
    "kv_heads": (_set("encoder_config.num_key_value_heads", 1),
                 r"encoder_config.num_key_value_heads=1"),
    "not_blt": (_set("model_type", "llama"), r"model_type='llama': not a BLT checkpoint"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_unsupported_config_is_refused_naming_the_field(case, tmp_path):
  edit, message = CONFIG_ERRORS[case]
  hf = _copy("k2_noproj", tmp_path, edit_config=edit)
  out = str(tmp_path / "out")
  with pytest.raises(convert.ConvertError, match=message):
    convert.convert(hf, out)
  assert not os.path.exists(out)


def test_encoder_cross_attention_in_every_layer_is_refused(tmp_path):
  # k4 has 2 encoder layers: the port re-pools per layer, the original refines.
  hf = _copy("k4_proj_gqa", tmp_path, edit_config=_set("encoder_config.cross_attn_all_layers",
                                                       True))
  with pytest.raises(convert.ConvertError, match="cross_attn_all_layers=true with "
                     "num_hidden_layers=2.*re-pools"):
    convert.convert_arrays(hf)


def _reshape(name, shape):
  def edit(tensors):
    tensors[name] = np.zeros(shape, np.float32)
  return edit


TENSOR_ERRORS = {
    "shape": (_reshape("model.global_transformer.layers.1.mlp.up_proj.weight", (70, 48)),
              r"tensor model.global_transformer.layers.1.mlp.up_proj.weight .*has shape "
              r"\[70, 48\], expected \[72, 48\]"),
    "extra": (_reshape("model.local_encoder.layers.0.mlp.bias", (64,)),
              r"unexpected tensor model.local_encoder.layers.0.mlp.bias \[64\]"),
    "missing": (lambda t: t.pop("model.patcher.norm.weight"),
                r"missing tensor model.patcher.norm.weight \(expected \[24\]\)"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_ERRORS))
def test_bad_tensors_are_refused_naming_the_tensor(case, tmp_path):
  edit, message = TENSOR_ERRORS[case]
  hf = _copy("k2_noproj", tmp_path, edit_tensors=edit)
  with pytest.raises(convert.ConvertError, match=message):
    convert.convert_arrays(hf)


def test_bfloat16_checkpoints_convert_to_float32(tmp_path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top

  def to_bf16(tensors):
    for name in tensors:
      tensors[name] = tensors[name].astype(ml_dtypes.bfloat16)

  result = convert.convert_arrays(_copy("k2_noproj", tmp_path, edit_tensors=to_bf16))
  whole = convert.convert_arrays(os.path.join(FIXTURES, "k2_noproj"))
  rounded = lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, rounded(b)), result.params,
               whole.params)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(result.params))


def test_cli_prints_one_line_errors(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  assert cli.main(["convert", "--hf", str(tmp_path / "empty"), "--out",
                   str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "has no config.json" in err
  (tmp_path / "empty" / "config.json").write_text("[1, 2]")
  assert cli.main(["convert", "--hf", str(tmp_path / "empty"), "--out",
                   str(tmp_path / "out")]) == 2
  assert "config.json must be a JSON object, got [1, 2]" in capsys.readouterr().err


def test_a_bltjax_workdir_given_as_entropy_model_is_named():
  with pytest.raises(convert.ConvertError, match=r"--entropy is a bltjax workdir \(the "
                     r"config.json of `bltjax train`\), not a Hugging Face checkpoint"):
    convert._entropy_fields({"model": {"kind": "entropy"}, "patcher": {}})  # pylint: disable=protected-access


@pytest.mark.parametrize("kind, message", [
    ("empty string", "--out is empty; pass the path of a new directory"),
    ("link", "is a symbolic link; pass the directory it points to"),
    ("file", "exists and is not an empty directory"),
])
def test_an_out_that_cannot_become_the_new_directory_is_refused_first(kind, message, tmp_path):
  (tmp_path / "target").mkdir()
  out = {"empty string": "", "link": str(tmp_path / "link"), "file": str(tmp_path / "file")}
  os.symlink(tmp_path / "target", tmp_path / "link")
  (tmp_path / "file").write_text("x")
  with pytest.raises(convert.ConvertError, match=message):
    convert.check_new_directory(out[kind])
  assert os.path.islink(tmp_path / "link") and not os.listdir(tmp_path / "target")


def test_entropy_model_beside_and_sharded_safetensors(tmp_path):
  """Main weights in two files (+ index), the entropy model in its own directory."""
  name = "k3_maxpatch"
  with open(os.path.join(FIXTURES, name, "config.json")) as f:
    config = json.load(f)
  tensors = load_file(os.path.join(FIXTURES, name, "model.safetensors"))
  main = tmp_path / "main"
  entropy = tmp_path / "entropy"
  main.mkdir()
  entropy.mkdir()
  patcher = {k[len("model.patcher."):]: v for k, v in tensors.items()
             if k.startswith("model.patcher.")}
  rest = sorted(k for k in tensors if not k.startswith("model.patcher."))
  halves = {"model-00001-of-00002.safetensors": rest[::2],
            "model-00002-of-00002.safetensors": rest[1::2]}
  for file, names in halves.items():
    save_file({k: tensors[k] for k in names}, str(main / file))
  with open(main / "model.safetensors.index.json", "w") as f:
    json.dump({"weight_map": {k: file for file, names in halves.items() for k in names}}, f)
  with open(main / "config.json", "w") as f:
    json.dump(dict(config, patch_in_forward=False), f)
  with open(entropy / "config.json", "w") as f:
    json.dump(dict(config["patcher_config"]), f)
  save_file(patcher, str(entropy / "model.safetensors"))

  with pytest.raises(convert.ConvertError, match="patch_in_forward=false.*--entropy"):
    convert.convert_arrays(str(main))
  split = convert.convert_arrays(str(main), str(entropy))
  whole = convert.convert_arrays(os.path.join(FIXTURES, name))
  jax.tree.map(np.testing.assert_array_equal, split.params, whole.params)
  jax.tree.map(np.testing.assert_array_equal, split.entropy_params, whole.entropy_params)
  assert split.tensors == whole.tensors == 76


def test_converted_dir_evaluates_and_initialises_training(converted, tiny_corpus, tmp_path):
  model_dir = converted["k3_maxpatch"]
  data = os.path.join(tiny_corpus, "heapq.py")
  # `bltjax eval`: load_params + the BLT objective's eval_sums, the entropy model from the
  # relative patcher.entropy_workdir of the converted config.
  result = evaluate.evaluate_workdir(model_dir, data, seq_len=96, batch_size=8, max_batches=1)
  assert result.step == 0 and result.bytes > 0 and np.isfinite(result.bpb)

  # `bltjax train --config.train.init_params_from=<dir>`: a run whose model section is the
  # converted one restores the converted params into its (sharded) train state.
  with open(os.path.join(model_dir, "config.json")) as f:
    config = configs.from_json(f.read())
  for key, value in dict(train__init_params_from=model_dir, train__seq_len=64,
                         train__batch_size=8, data__train=data,
                         patcher__entropy_workdir=os.path.join(model_dir, "entropy")).items():
    configs.set_value(config, key.replace("__", "."), value)
  trainer = train.Trainer(config, str(tmp_path / "finetune"))
  params, step = checkpoint.load_params(config.train.init_params_from,
                                        trainer.abstract_state.params)
  whole = convert.convert_arrays(os.path.join(FIXTURES, "k3_maxpatch"))
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), whole.params)
