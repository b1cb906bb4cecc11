"""Experiment files and overrides: typed, locked, one-line errors that name the fix."""

import pytest

from bltjax import configs

EXPERIMENT = "experiments/entropy_tiny.py"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, request):
  monkeypatch.chdir(request.config.rootpath)


def test_overrides_are_parsed_into_the_type_they_replace():
  config = configs.load(EXPERIMENT, ["--config.train.steps=300", "--config.optim.lr=1e-3",
                                     "--config.model.remat=true", "--config.model.dtype=bfloat16",
                                     "config.data.train=a.txt,b.txt"])
  assert config.train.steps == 300 and isinstance(config.train.steps, int)
  assert config.optim.lr == 1e-3
  assert config.model.remat is True
  assert config.model.dtype == "bfloat16"
  assert config.data.train == "a.txt,b.txt"


def test_variant_argument_selects_a_smaller_config():
  assert configs.load(EXPERIMENT + ":runlocal").train.steps < configs.load(EXPERIMENT).train.steps


def test_unknown_key_names_the_known_keys():
  with pytest.raises(configs.ConfigError, match="'train.stpes' does not exist.*steps"):
    configs.load(EXPERIMENT, ["--config.train.stpes=3"])
  with pytest.raises(configs.ConfigError, match="'trian' does not exist"):
    configs.load(EXPERIMENT, ["--config.trian.steps=3"])


def test_wrong_type_is_an_error():
  with pytest.raises(configs.ConfigError, match="'train.steps' holds int"):
    configs.load(EXPERIMENT, ["--config.train.steps=lots"])
  with pytest.raises(configs.ConfigError, match="holds bool"):
    configs.load(EXPERIMENT, ["--config.model.remat=maybe"])


def test_override_without_value_and_missing_file_are_errors():
  with pytest.raises(configs.ConfigError, match="has no '='"):
    configs.load(EXPERIMENT, ["--config.train.steps"])
  with pytest.raises(configs.ConfigError, match="does not exist"):
    configs.load("experiments/nope.py")


def test_config_round_trips_through_json():
  config = configs.load(EXPERIMENT)
  assert configs.to_json(configs.from_json(configs.to_json(config))) == configs.to_json(config)


def test_a_config_that_is_not_a_python_file_names_the_fix(tmp_path):
  with pytest.raises(configs.ConfigError, match="README.md is not an experiment file: "
                     "experiment files are Python files with get_config"):
    configs.load("README.md")
  # A workdir's config.json (or the workdir itself): how to resume or reuse that run.
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(configs.to_json(configs.load(EXPERIMENT)))
  for spec in (str(workdir / "config.json"), str(workdir)):
    with pytest.raises(configs.ConfigError) as info:
      configs.load(spec)
    assert f"is the saved config of workdir {workdir}, not an experiment file" in str(info.value)
    assert (f"re-run `bltjax train` with the experiment file it was started with and "
            f"--workdir {workdir}") in str(info.value)
