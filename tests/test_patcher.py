"""Patching rules on hand-made entropies: boundaries, max length, causality, layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax import bytes as blt_bytes
from bltjax.model import patcher


def _row(text: str):
  tokens = blt_bytes.encode(text, add_eos=False)[None]
  return jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32)


def _starts(config, tokens, segment_ids, entropies=None):
  return [int(t) for t in np.flatnonzero(
      patcher.patch(config, tokens, segment_ids, entropies).starts[0])]


H = jnp.array([[0.1, 0.5, 2.0, 2.4, 0.2, 3.0, 0.1, 0.1, 0.1, 0.1, 0.1]])
TOKENS, SEGMENTS = _row("abcdefghij")


def test_global_rule_starts_the_byte_after_each_high_entropy():
  config = patcher.PatcherConfig(mode="entropy", threshold=1.0, rule="global")
  # H_2, H_3, H_5 > 1 -> bytes 3, 4, 6 start patches; 0 (BOS) and 1 always do.
  assert _starts(config, TOKENS, SEGMENTS, H) == [0, 1, 3, 4, 6]


def test_monotonic_rule_fires_on_entropy_jumps_only():
  config = patcher.PatcherConfig(mode="entropy", threshold=1.0, rule="monotonic")
  # H_2 - H_1 = 1.5 and H_5 - H_4 = 2.8 exceed 1; H_3 - H_2 = 0.4 does not.
  assert _starts(config, TOKENS, SEGMENTS, H) == [0, 1, 3, 6]


def test_max_patch_len_splits_long_patches():
  config = patcher.PatcherConfig(mode="entropy", threshold=1.0, max_patch_len=2)
  starts = _starts(config, TOKENS, SEGMENTS, H)
  assert starts == [0, 1, 3, 4, 6, 8, 10]
  lengths = np.diff(starts + [TOKENS.shape[1]])
  assert lengths.max() <= 2


def test_last_flag_tells_whether_the_next_byte_opens_a_patch():
  config = patcher.PatcherConfig(mode="entropy", threshold=1.0)
  high_last = H.at[0, -1].set(5.0)
  patches = patcher.patch(config, TOKENS, SEGMENTS, high_last)
  assert bool(patches.starts[0, -1]) and not bool(
      patcher.patch(config, TOKENS, SEGMENTS, H).starts[0, -1])
  assert int(patches.next_patch_ids[0, -1]) == int(patches.patch_ids[0, -1]) + 1


def test_static_patching_cuts_every_patch_size_bytes():
  tokens, segments = _row("abcdefg")
  config = patcher.PatcherConfig(mode="static", patch_size=3)
  patches = patcher.patch(config, tokens, segments)
  assert patches.patch_ids[0].tolist() == [0, 1, 1, 1, 2, 2, 2, 3]


def test_space_patching_ends_a_patch_after_the_first_space():
  tokens, segments = _row("ab  cd,e")
  config = patcher.PatcherConfig(mode="space")
  starts = _starts(config, tokens, segments)
  text = "\x00ab  cd,e"  # index 0 stands for BOS
  pieces = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
  assert pieces == ["\x00", "ab ", " cd,", "e"]


def test_patches_never_cross_documents():
  tokens = jnp.asarray(np.concatenate([blt_bytes.encode("abc"), blt_bytes.encode("de")])[None])
  segments = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2, 2]])
  config = patcher.PatcherConfig(mode="static", patch_size=100)
  # doc 2 starts at 5 (its BOS, alone) and 6.
  assert _starts(config, tokens, segments) == [0, 1, 5, 6]


def test_layout_counts_lengths_and_drops_bytes_past_max_patches():
  config = patcher.PatcherConfig(mode="entropy", threshold=1.0, max_patches=3)
  patches = patcher.patch(config, TOKENS, SEGMENTS, H)
  assert patches.patch_ids[0].tolist() == [0, 1, 1, 2, 3, 3, 4, 4, 4, 4, 4]
  assert patches.lengths[0].tolist() == [1, 2, 1]
  assert int(patches.num_patches[0]) == 3
  assert patches.in_patches[0].tolist() == [True] * 4 + [False] * 7


@pytest.mark.parametrize("config", [
    patcher.PatcherConfig(mode="entropy", threshold=1.5, max_patch_len=4),
    patcher.PatcherConfig(mode="entropy", threshold=0.5, rule="monotonic", max_patch_len=3),
    patcher.PatcherConfig(mode="space", max_patch_len=5),
])
def test_boundaries_never_depend_on_later_bytes(config):
  rng = np.random.default_rng(0)
  length = 64
  tokens = jnp.asarray(np.concatenate([[blt_bytes.BOS_ID], rng.integers(4, 260, length - 1)])[None])
  segments = jnp.ones((1, length), jnp.int32)
  entropies = jnp.asarray(rng.uniform(0, 3, (1, length)), jnp.float32)
  base = patcher.patch(config, tokens, segments, entropies).starts
  for t in (5, 20, 40):
    later_tokens = tokens.at[:, t + 1:].set(jnp.asarray(rng.integers(4, 260, length - t - 1)))
    later_entropies = entropies.at[:, t + 1:].set(jnp.asarray(rng.uniform(0, 3, length - t - 1)))
    changed = patcher.patch(config, later_tokens, segments, later_entropies).starts
    # Whether byte t+1 starts a patch is decided by bytes <= t.
    np.testing.assert_array_equal(base[:, :t + 2], changed[:, :t + 2])


def test_entropies_from_logits_are_in_nats():
  uniform = jnp.zeros((1, 1, 260))
  np.testing.assert_allclose(patcher.entropies_from_logits(uniform), [[np.log(260)]], rtol=1e-6)
  peaked = jnp.zeros((1, 1, 260)).at[..., 7].set(100.0)
  assert float(patcher.entropies_from_logits(peaked)[0, 0]) < 1e-6


def test_patching_runs_inside_jit_with_a_static_patch_count():
  config = patcher.PatcherConfig(mode="entropy", threshold=1.0, max_patches=8)
  fn = jax.jit(lambda t, s, h: patcher.patch(config, t, s, h).lengths)
  assert fn(TOKENS, SEGMENTS, H).shape == (1, 8)
