"""Experiment files: every one loads; the paper-size shapes match the papers' counts."""

import glob
import os
import re
import sys

import pytest

from bltjax import configs
from bltjax import objectives
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "experiments"))
import blt_paper  # noqa: E402  pylint: disable=g-import-not-at-top

EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_every_experiment_file_loads(path):
  config = configs.load(path)
  assert config.model.kind in ("entropy", "blt")


PAPER = os.path.join(REPO, "experiments", "blt_paper.py")


@pytest.mark.parametrize("size", sorted(blt_paper.SHAPES))
def test_paper_sizes_match_the_reported_parameter_counts(size):
  counts = objectives.param_counts(configs.load(f"{PAPER}:{size},bltd8"))
  for component, reported in blt_paper.PAPER_PARAMS[size].items():
    assert abs(counts[component] / reported - 1) < 0.05, (component, counts[component])
  assert abs(counts["entropy_model"] / 99.5e6 - 1) < 0.01
  # Six 500002-row hash tables of width d_local.
  assert counts["hash_tables"] == 6 * 500002 * blt_paper.SHAPES[size][0]


def test_released_1b_component_counts():
  """The 1B shape is the released blt-1b: encoder 19.4M, global 1.285B, decoder 158M."""
  counts = objectives.param_counts(configs.load(f"{PAPER}:1b"))
  assert round(counts["local_encoder"] / 1e6, 1) == 19.4
  assert round(counts["global_model"] / 1e6) == 1285
  assert round(counts["local_decoder"] / 1e6) == 158


@pytest.mark.parametrize("spec, variants", [
    ("blt_tiny.py:bltdx", "bltd4|bltd8|bltd16, static|space, runlocal"),
    ("blt_bench.py:bltd", "bltd4|bltd8|bltd16|large|runlocal"),
    ("blt_paper.py:1b,bltd_8", "bltd4|bltd8|bltd16"),
])
def test_a_bad_bltd_variant_names_the_valid_variants(spec, variants):
  with pytest.raises(ValueError, match=r"unknown variant '\w+'; use " + re.escape(variants)):
    configs.load(os.path.join(REPO, "experiments", spec))
