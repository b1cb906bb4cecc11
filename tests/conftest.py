"""Test setup: 8 fake CPU devices (set before jax starts), float32 matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import os  # noqa: E402
import shutil  # noqa: E402
import sysconfig  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small, real, fixed text for training tests: a few standard-library modules.
CORPUS_MODULES = ("argparse.py", "textwrap.py", "fractions.py", "heapq.py", "bisect.py")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
  """A directory of a few real Python source files (~120 KB)."""
  directory = tmp_path_factory.mktemp("corpus")
  stdlib = sysconfig.get_paths()["stdlib"]
  for name in CORPUS_MODULES:
    shutil.copy(os.path.join(stdlib, name), directory / name)
  return str(directory)


def tiny_entropy_config(corpus: str, **overrides):
  """The runlocal entropy config on `corpus`, with `section.key=value` overrides."""
  from bltjax import configs  # pylint: disable=g-import-not-at-top
  config = configs.load(os.path.join(REPO, "experiments", "entropy_tiny.py:runlocal"))
  configs.set_value(config, "data.train", corpus)
  configs.set_value(config, "data.prefetch", 0)
  for key, value in overrides.items():
    configs.set_value(config, key.replace("__", "."), value)
  return config


def tiny_blt_config(corpus: str, variant: str = "static", **overrides):
  """The runlocal BLT config (`variant`: static | space | bltd4 ...) on `corpus`."""
  from bltjax import configs  # pylint: disable=g-import-not-at-top
  config = configs.load(os.path.join(REPO, "experiments", f"blt_tiny.py:{variant},runlocal"))
  configs.set_value(config, "data.train", corpus)
  configs.set_value(config, "data.prefetch", 0)
  for key, value in overrides.items():
    configs.set_value(config, key.replace("__", "."), value)
  return config
