"""`bltjax export`: bltjax BLTs -> Hugging Face BLT checkpoints (the inverse of convert).

The golden data are the transformers-written fixtures of tests/fixtures/hf_blt/: a
fixture converted and exported again is the fixture (same tensors, bit for bit, and a
config.json that reads as the same model), and a model trained here survives export and
conversion back unchanged.
"""

import json
import os
import subprocess

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import bltjax
from bltjax import bytes as blt_bytes
from bltjax import checkpoint
from bltjax import cli
from bltjax import configs
from bltjax import convert
from bltjax import export
from conftest import REPO, tiny_blt_config, train_on_one_device

FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf_blt")
HF_PYTHON = os.environ.get("BLTJAX_HF_PYTHON", "/work/hfvenv/bin/python")


def _plan(hf_dir):
  with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
    return convert.map_config(json.load(f))


@pytest.mark.parametrize("name", ["k2_noproj", "k4_proj_gqa", "k3_maxpatch"])
def test_a_converted_checkpoint_exports_back_to_the_original(name, tmp_path):
  fixture = os.path.join(FIXTURES, name)
  convert.convert(fixture, str(tmp_path / "bltjax"))
  result = export.export(str(tmp_path / "bltjax"), str(tmp_path / "hf"))
  original = load_file(os.path.join(fixture, "model.safetensors"))
  exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
  assert sorted(exported) == sorted(original) and result.tensors == len(original)
  for tensor in original:
    np.testing.assert_array_equal(exported[tensor], original[tensor], err_msg=tensor)
  assert _plan(tmp_path / "hf") == _plan(fixture)
  with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="numpy") as f:
    assert f.metadata() == {"format": "pt"}   # what transformers' torch loader expects


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
  """A tiny BLT trained here (global stack scanned), patched by entropy with a converted
  fixture's entropy model (the port patches by entropy): (workdir, its config). No
  patch length limit: with one, the port's last byte can read the wrong patch (a port
  bug, tests/fixtures/hf_blt/README.md; the k3_maxpatch round trip covers the limit)."""
  root = tmp_path_factory.mktemp("trained")
  workdir = str(root / "blt")
  train_on_one_device(tiny_blt_config(tiny_corpus, "static", model__scan_layers=True,
                                      train__steps=2, train__eval_every=0,
                                      train__eval_batches=1), workdir)
  convert.convert(os.path.join(FIXTURES, "k2_noproj"), str(root / "k2"))
  config = checkpoint.read_config(workdir)
  assert set(convert.abstract_params(config)[0]["global_model"]["transformer"]) == {"layers"}
  with config.unlocked():
    config.patcher.update(mode="entropy", threshold=1.5, max_patch_len=0,
                          entropy_workdir=str(root / "k2" / "entropy"))
  (root / "blt" / "config.json").write_text(configs.to_json(config))
  return workdir, config


def test_a_trained_scanned_model_survives_export_and_conversion(trained, tmp_path):
  workdir, config = trained
  assert cli.main(["export", "--workdir", workdir, "--out", str(tmp_path / "hf")]) == 0
  back = convert.convert_arrays(str(tmp_path / "hf"))
  _, entropy_config, threshold, params, entropy_params, step = export.load_model(workdir)
  assert step == 2 and threshold == back.plan.threshold == 1.5
  assert back.plan == export.plan_from_config(config, entropy_config, threshold)
  jax.tree.map(np.testing.assert_array_equal, back.params, params)
  jax.tree.map(np.testing.assert_array_equal, back.entropy_params, entropy_params)


# Logits of the transformers port on an exported model, one row at a time (the port's
# parity setting: eager attention, no cache, unpadded rows).
PORT_LOGITS = """
import json, sys
import numpy as np, torch
from transformers import BltForCausalLM
model = BltForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
with torch.no_grad():
  rows = [model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
          for ids in json.loads(sys.argv[2])]
np.savez(sys.argv[3], *rows)
"""


@pytest.mark.skipif(not os.path.exists(HF_PYTHON),
                    reason=f"needs torch and transformers in {HF_PYTHON} (see "
                           "tests/fixtures/hf_blt/README.md; BLTJAX_HF_PYTHON overrides)")
def test_transformers_reads_an_exported_model_and_computes_its_logits(trained, tmp_path):
  workdir, _ = trained
  export.export(workdir, str(tmp_path / "hf"))
  texts = ["def add(a, b):\n    return a + b  # the sum of two numbers, as a function\n",
           "The quick brown fox jumps over the lazy dog; the dog sleeps on."]
  rows = [[blt_bytes.BOS_ID] + [b + blt_bytes.OFFSET for b in t.encode()] for t in texts]
  subprocess.run([HF_PYTHON, "-c", PORT_LOGITS, str(tmp_path / "hf"), json.dumps(rows),
                  str(tmp_path / "port.npz")], check=True, timeout=600)
  port = np.load(tmp_path / "port.npz")
  model = bltjax.load(workdir)
  for i, ids in enumerate(rows):
    ours = model.logits(np.asarray([ids], np.int32))[0]
    np.testing.assert_allclose(ours, port[f"arr_{i}"], atol=1e-4, err_msg=f"row {i}")


def test_models_the_port_cannot_hold_are_refused_naming_the_key(tiny_corpus, tmp_path):
  workdir = str(tmp_path / "static")
  train_on_one_device(tiny_blt_config(tiny_corpus, "static", train__steps=1,
                                      train__eval_every=0, train__eval_batches=1), workdir)
  with pytest.raises(export.ExportError, match="patcher.mode='static'.*by entropy only"):
    export.export(workdir, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")

  convert.convert(os.path.join(FIXTURES, "k2_noproj"), str(tmp_path / "k2"))
  base = checkpoint.read_config(str(tmp_path / "k2"))
  entropy_config = checkpoint.read_config(str(tmp_path / "k2" / "entropy"))
  for key, value, error in [
      ("model.ffn.activation", "relu", "model.ffn.activation='relu'.*SwiGLU"),
      ("model.blt.global_model.window", 64, "global_model.window=64.*plain causal"),
      ("model.blt.decoder.window", 8, "decoder.window=8.*share one window"),
      ("patcher.rule", "monotonic", "patcher.rule='monotonic'")]:
    config = base.copy_and_resolve_references()
    with config.unlocked():
      configs.set_value(config, key, value)
    with pytest.raises(export.ExportError, match=error):
      export.plan_from_config(config, entropy_config, 1.0)

  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "file").write_text("x")
  assert cli.main(["export", "--workdir", str(tmp_path / "k2"), "--out",
                   str(tmp_path / "taken")]) == 2


def test_large_models_are_written_in_shards_with_an_index(tmp_path):
  convert.convert(os.path.join(FIXTURES, "k3_maxpatch"), str(tmp_path / "bltjax"))
  result = export.export(str(tmp_path / "bltjax"), str(tmp_path / "hf"),
                         max_shard_bytes=200_000)
  assert len(result.files) > 1 and result.files[0].endswith(f"-of-{len(result.files):05d}"
                                                             ".safetensors")
  with open(tmp_path / "hf" / "model.safetensors.index.json", encoding="utf-8") as f:
    weight_map = json.load(f)["weight_map"]
  assert set(weight_map.values()) == set(result.files)
  # Readable like the config beside them (safetensors wrote its files 0600).
  mode = lambda name: os.stat(tmp_path / "hf" / name).st_mode & 0o777
  assert {mode(name) for name in result.files} == {mode("config.json")}
  # The converter reads shards through the index: the same model as the fixture.
  whole = convert.convert_arrays(os.path.join(FIXTURES, "k3_maxpatch"))
  sharded = convert.convert_arrays(str(tmp_path / "hf"))
  jax.tree.map(np.testing.assert_array_equal, sharded.params, whole.params)
