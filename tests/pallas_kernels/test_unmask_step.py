"""pallas_kernels.diffusion.unmask_step: the fused BLT-D unmasking step. Its reference
equals bltjax's unmasking rules (`bltjax.diffusion`); the kernels equal the reference
exactly (interpret mode) and lower for Triton and Mosaic."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from bltjax import bytes as blt_bytes
from bltjax import diffusion
from bltjax.generate import sampling
from conftest import lowered_text
from pallas_kernels.diffusion import unmask_reference, unmask_step

RULES = ("confidence", "entropy_bounded")


def inputs(seed, rows=4, block_size=8, scale=3.0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(rows, block_size, 260)) * scale, dtype)
  still = jnp.asarray(rng.random((rows, block_size)) < 0.7)
  still = still.at[-1].set(False)   # a finished row: nothing to reveal
  block = jnp.where(still, blt_bytes.MASK_ID,
                    jnp.asarray(rng.integers(4, 260, (rows, block_size)), jnp.int32))
  return logits, block, still


def xla_rules(logits, block, still, threshold, rule, tokens=None):
  """The unmasking ops generation runs with `unmask_impl="xla"`."""
  allowed = sampling.output_logits(logits)
  if tokens is None:
    tokens = jnp.argmax(allowed, axis=-1).astype(jnp.int32)
  if rule == "confidence":
    reveal = diffusion.confidence_reveal(allowed, still, alpha=threshold, tokens=tokens).reveal
  else:
    reveal = diffusion.entropy_bounded_reveal(diffusion.predictive_entropy(allowed), still,
                                              gamma=threshold)
  return diffusion.apply_reveal(block, still, reveal, tokens)


def assert_same(a, b):
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("rule", RULES)
def test_reference_equals_the_generation_rules(rule):
  for seed in range(6):
    logits, block, still = inputs(seed)
    for threshold in (0.0, 0.2, 0.5, 0.9, 1.5, 4.0, 100.0):
      assert_same(unmask_reference(logits, block, still, threshold, rule=rule),
                  xla_rules(logits, block, still, threshold, rule))
    tokens = jnp.asarray(np.random.default_rng(seed).integers(4, 260, block.shape), jnp.int32)
    assert_same(unmask_reference(logits, block, still, 0.3, rule=rule, tokens=tokens),
                xla_rules(logits, block, still, 0.3, rule, tokens))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("block_size,dtype", [(8, jnp.float32), (5, jnp.float32),
                                              (16, jnp.bfloat16)])
def test_kernel_equals_reference(backend, rule, block_size, dtype):
  """Greedy and given tokens, per-row thresholds, a block size that is no power of 2."""
  logits, block, still = inputs(block_size, block_size=block_size, dtype=dtype)
  thresholds = jnp.array([0.3, 0.0, 1.0, 0.5]) * (1.0 if rule == "confidence" else 4.0)
  tokens = (block % 200 + 4).astype(jnp.int32)
  for given in (None, tokens):
    want = unmask_reference(logits, block, still, thresholds, rule=rule, tokens=given)
    got = jax.jit(lambda *a, given=given: unmask_step(
        *a, rule=rule, tokens=given, backend=backend, interpret=True))(
            logits, block, still, thresholds)
    assert_same(got, want)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kernel_rules_at_their_limits(backend):
  logits, block, still = inputs(11)
  n_masked = jnp.sum(still, axis=1)
  step = lambda thr, rule: unmask_step(logits, block, still, thr, rule=rule, backend=backend,
                                       interpret=True)
  # alpha above every confidence: exactly one position (the most confident) per row
  _, left = step(1.1, "confidence")
  np.testing.assert_array_equal(jnp.sum(left, axis=1), jnp.maximum(n_masked - 1, 0))
  # alpha = 0 and gamma = inf: the whole block
  for thr, rule in ((0.0, "confidence"), (jnp.inf, "entropy_bounded")):
    new_block, left = step(thr, rule)
    assert not bool(jnp.any(left))
    assert bool(jnp.all(new_block != blt_bytes.MASK_ID))
  # ties: equal logits everywhere reveal the leftmost masked position only
  flat = jnp.zeros_like(logits)
  new_block, left = unmask_step(flat, block, still, 1.1, backend=backend, interpret=True)
  first = jnp.argmax(still, axis=1)
  revealed = still & ~left
  for r in range(3):
    assert np.flatnonzero(np.asarray(revealed[r])).tolist() == [int(first[r])]


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_never_emits_special_ids_even_when_they_score_highest(backend):
  logits, block, still = inputs(12)
  for special in sampling.NEVER_IDS:
    boosted = logits.at[..., special].set(50.0)
    new_block, _ = unmask_step(boosted, block, still, 0.0, backend=backend, interpret=True)
    revealed = np.asarray(new_block)[np.asarray(still)]
    assert not set(revealed.tolist()) & set(sampling.NEVER_IDS)


def test_tpu_kernel_race_detection(capfd):
  logits, block, still = inputs(13)
  params = pltpu.InterpretParams(detect_races=True)
  got = unmask_step(logits, block, still, 0.5, backend="tpu", interpret=params)
  assert_same(got, unmask_reference(logits, block, still, 0.5))
  assert "RACE DETECTED" not in capfd.readouterr().out


@pytest.mark.parametrize("platform,backend", [("cuda", "gpu"), ("tpu", "tpu")])
def test_cross_lowering(platform, backend):
  for rule in RULES:
    for block_size, dtype, given in ((8, jnp.bfloat16, False), (5, jnp.float32, True)):
      shapes = (jax.ShapeDtypeStruct((8, block_size, 260), dtype),
                jax.ShapeDtypeStruct((8, block_size), jnp.int32),
                jax.ShapeDtypeStruct((8, block_size), bool),
                jax.ShapeDtypeStruct((), jnp.float32),
                jax.ShapeDtypeStruct((8, block_size), jnp.int32))
      fn = lambda lg, b, s, t, tok: unmask_step(lg, b, s, t, rule=rule, backend=backend,
                                                tokens=tok if given else None)
      text = lowered_text(jax.jit(fn), *shapes, platform=platform)
      assert re.search(r"unmask_step", text), (rule, block_size)


def test_bad_arguments_are_named():
  logits, block, still = inputs(0)
  with pytest.raises(ValueError, match="rule 'top_k'"):
    unmask_step(logits, block, still, 0.5, rule="top_k")
  with pytest.raises(ValueError, match=r"must be \[rows, block_size\]"):
    unmask_step(logits, block[:, :3], still, 0.5, backend="gpu")
  # tokens of another shape were written into the block as garbage by the kernels
  for tokens in (block[:, :3], block.astype(jnp.float32)):
    with pytest.raises(ValueError, match=r"tokens .* must be integer ids \[rows, block_size\]"):
      unmask_step(logits, block, still, 0.0, tokens=tokens, backend="tpu", interpret=True)
  with pytest.raises(ValueError, match="runs the jnp reference on this platform"):
    unmask_step(logits, block, still, 0.5, interpret=True)
