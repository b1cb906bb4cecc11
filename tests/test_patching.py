"""A BLT keeps the entropy model and threshold it was trained with (`bltjax.patching`).

An entropy workdir changes under a BLT: it is recalibrated (`patcher.json`) or trained
further (new checkpoints, old ones deleted by keep-N). The BLT's config pins the
threshold and the entropy checkpoint step when its training starts.
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

import bltjax
from bltjax import checkpoint
from bltjax import configs
from bltjax import model as model_lib
from bltjax import patching
from bltjax.model import entropy_model
from conftest import REPO, tiny_blt_config, train_on_one_device


def _save_entropy_step(workdir: str, step: int, seed: int):
  """A random small entropy model saved as checkpoint `step` of `workdir` -> its params."""
  config = configs.base_config()
  config.model.entropy = configs.transformer_section(32, 1, 2, window=16)
  module = entropy_model.EntropyModel(
      model_lib.transformer_config(config.model.entropy, config.model))
  tokens = np.full((1, 8), 5, np.int32)
  params = nn.meta.unbox(jax.jit(module.init)(jax.random.PRNGKey(seed), tokens,
                                              np.ones_like(tokens))["params"])
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=10,
                                 async_save=False)
  ckpt.save_state(step, {"params": params})
  ckpt.close()
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(configs.to_json(config))
  return params


def _calibrate(workdir: str, threshold: float):
  patching.write_calibration(workdir, dict(threshold=threshold, mean_patch_len=4.5))


def _saved_patcher(workdir: str) -> dict:
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    return json.load(f)["patcher"]


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
  """A BLT trained 1 step on entropy model step 1 at threshold 1.5; then the entropy
  workdir is recalibrated (2.5) and trained on (step 2), and the BLT resumed to step 2."""
  root = tmp_path_factory.mktemp("pinning")
  entropy_dir, blt_dir = str(root / "entropy"), str(root / "blt")
  first = _save_entropy_step(entropy_dir, 1, seed=1)
  _calibrate(entropy_dir, 1.5)
  config = lambda steps: tiny_blt_config(
      tiny_corpus, "static", patcher__mode="entropy", patcher__entropy_workdir=entropy_dir,
      train__steps=steps, train__eval_every=0, train__eval_batches=1)
  train_on_one_device(config(1), blt_dir)
  started = _saved_patcher(blt_dir)
  _save_entropy_step(entropy_dir, 2, seed=2)
  _calibrate(entropy_dir, 2.5)
  train_on_one_device(config(2), blt_dir)
  return dict(entropy_dir=entropy_dir, blt_dir=blt_dir, first=first, started=started)


def test_training_pins_the_threshold_and_entropy_step_it_started_with(trained):
  assert trained["started"]["threshold"] == 1.5 and trained["started"]["entropy_step"] == 1
  # Resumed after the recalibration and the new entropy step: still the first ones.
  resumed = _saved_patcher(trained["blt_dir"])
  assert resumed["threshold"] == 1.5 and resumed["entropy_step"] == 1


def test_a_loaded_blt_is_patched_by_its_pinned_entropy_model(trained):
  model = bltjax.load(trained["blt_dir"])
  assert model.step == 2
  jax.tree.map(np.testing.assert_array_equal, trained["first"], model.frozen)
  assert model.config.patcher.threshold == 1.5


def test_a_new_blt_pins_what_the_entropy_workdir_holds_today(trained, tmp_path):
  config = configs.load(os.path.join(REPO, "experiments", "blt_tiny.py:bltd8"))
  configs.set_value(config, "patcher.entropy_workdir", trained["entropy_dir"])
  pinned = patching.pin_entropy_model(config, str(tmp_path / "new"))
  assert pinned.patcher.threshold == 2.5 and pinned.patcher.entropy_step == 2
  assert config.patcher.threshold == -1.0 and config.patcher.entropy_step == -1   # untouched
  # Explicit values are kept as given.
  configs.set_value(config, "patcher.threshold", 3.0)
  configs.set_value(config, "patcher.entropy_step", 1)
  pinned = patching.pin_entropy_model(config, str(tmp_path / "new"))
  assert pinned.patcher.threshold == 3.0 and pinned.patcher.entropy_step == 1


def test_a_pinned_entropy_step_that_is_gone_is_named_with_the_fix(trained, tmp_path):
  blt_dir = str(tmp_path / "blt")
  shutil.copytree(trained["blt_dir"], blt_dir)
  entropy_dir = str(tmp_path / "entropy")
  shutil.copytree(trained["entropy_dir"], entropy_dir)
  shutil.rmtree(os.path.join(entropy_dir, "checkpoints", "1"))
  with open(os.path.join(blt_dir, "config.json"), encoding="utf-8") as f:
    saved = json.load(f)
  saved["patcher"]["entropy_workdir"] = entropy_dir
  with open(os.path.join(blt_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(saved, f)
  with pytest.raises(configs.ConfigError,
                     match=r"has no checkpoint 1 .*holds \[2\].*patcher.entropy_step=-1"):
    bltjax.load(blt_dir)


@pytest.mark.parametrize("where", ["missing", "file"])
def test_an_entropy_workdir_that_is_not_a_directory_is_named(where, tmp_path):
  path = tmp_path / "entropy"
  if where == "file":
    path.write_text("not a workdir")
  config = configs.load(os.path.join(REPO, "experiments", "blt_tiny.py:bltd8"))
  configs.set_value(config, "patcher.entropy_workdir", str(path))
  why = "does not exist" if where == "missing" else "is a file, not a directory"
  with pytest.raises(configs.ConfigError, match=f"entropy_workdir .*{why}; pass the workdir "
                     "of a trained entropy model"):
    patching.pin_entropy_model(config, str(tmp_path / "blt"))


def test_a_threshold_calibrated_under_another_rule_or_cap_is_refused(tmp_path):
  """A threshold found under the monotonic rule cut every byte into its own patch when a
  BLT patched with the global rule; the patching settings are part of the calibration."""
  workdir = str(tmp_path)
  patching.write_calibration(workdir, dict(threshold=0.03, rule="monotonic", max_patch_len=8))
  section = dict(configs.base_config().patcher, threshold=-1.0)
  assert patching.resolve_threshold(dict(section, rule="monotonic", max_patch_len=8),
                                    workdir) == 0.03
  with pytest.raises(configs.ConfigError, match=r"found under other patching settings: "
                     r"patcher\.rule='monotonic' \(calibrated\) vs 'global' \(this config\); "
                     r"re-run `bltjax calibrate --workdir "):
    patching.resolve_threshold(dict(section, rule="global", max_patch_len=8), workdir)
  with pytest.raises(configs.ConfigError, match=r"patcher\.max_patch_len=8 \(calibrated\) vs "
                     r"16 \(this config\)"):
    patching.resolve_threshold(dict(section, rule="monotonic", max_patch_len=16), workdir)
  # Set by hand, a threshold is taken as it is.
  assert patching.resolve_threshold(dict(section, threshold=0.5, rule="global"), workdir) == 0.5


@pytest.mark.parametrize("option, value", [("batches", 0), ("batch_size", 0)])
def test_calibration_sizes_below_one_name_their_option(option, value, tmp_path):
  with pytest.raises(ValueError, match=f"^{option}={value} must be >= 1 "
                     rf"\(bltjax calibrate --{option}\)$"):
    patching.calibrate_workdir(str(tmp_path), **{option: value})
