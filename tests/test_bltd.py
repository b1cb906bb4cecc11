"""BLT-D: the clean copy is exactly BLT, noisy blocks see only their prefix and
themselves, the chunked attention equals the dense two-range mask, and it learns."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax import cli
from bltjax import configs
from bltjax import diffusion
from bltjax import objectives
from bltjax import train
from bltjax.model import attention
from conftest import REPO, tiny_blt_config, train_on_one_device, unigram_bpb


def _batch(seed, batch=2, length=48):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, 260, (batch, length + 1)).astype(np.int32)
  tokens[:, 0] = 1
  segments = np.ones((batch, length), np.int32)
  segments[1, 30:] = 2
  tokens[1, 30] = 1
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
          "segment_ids": jnp.asarray(segments)}


@pytest.fixture(scope="module")
def setup(tiny_corpus):
  config = tiny_blt_config(tiny_corpus, "static,bltd4", model__diffusion__blocks_per_chunk=6,
                           patcher__patch_size=3)
  objective = objectives.make_objective(config)
  batch = _batch(0)
  params = jax.jit(objective.init)(jax.random.PRNGKey(0), batch)   # one program, not eager
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                        is_leaf=lambda x: hasattr(x, "value"))
  return objective, params, batch


def _forward(objective, params, batch, noisy):
  patches = objective.patches(batch, None)
  return objective.module.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                                patches, noisy)


def test_clean_copy_is_exactly_the_plain_blt(setup):
  objective, params, batch = setup
  patches = objective.patches(batch, None)
  noisy, _, corruption, blocks = objective.noisy_blocks(batch, patches, jax.random.PRNGKey(1))
  assert int(jnp.sum(blocks.valid)) > 4 and int(jnp.sum(corruption.is_masked)) > 0
  plain, _ = _forward(objective, params, batch, None)
  clean, noisy_logits = _forward(objective, params, batch, noisy)
  np.testing.assert_allclose(clean, plain, atol=1e-5)
  assert noisy_logits.shape[1] == noisy.tokens.shape[1] * noisy.tokens.shape[2]


def test_noisy_block_sees_its_prefix_and_itself_only(setup):
  objective, params, batch = setup
  patches = objective.patches(batch, None)
  noisy, _, _, blocks = objective.noisy_blocks(batch, patches, jax.random.PRNGKey(2))
  _, base = _forward(objective, params, batch, noisy)
  size = blocks.positions.shape[-1]
  row = 0
  slots = [k for k in range(blocks.anchors.shape[1]) if bool(blocks.valid[row, k])]
  k = slots[len(slots) // 2]
  s = int(blocks.anchors[row, k])
  logits_of = lambda out, k: out[row, k * size:(k + 1) * size]
  valid = np.asarray(blocks.in_block[row, k])

  # Its own clean bytes and everything after them: invisible.
  later = dict(batch, inputs=batch["inputs"].at[row, s:].set(77))
  _, out = _forward(objective, params, later, noisy)
  np.testing.assert_allclose(logits_of(out, k)[valid], logits_of(base, k)[valid], atol=1e-5)

  # Another block: invisible. Its own later noisy bytes: visible (bidirectional).
  other = next(j for j in slots if j != k)
  flat = noisy.tokens.reshape(noisy.tokens.shape[0], -1)
  changed = flat.at[row, other * size:(other + 1) * size].set(99)
  _, out = _forward(objective, params, batch,
                    noisy._replace(tokens=changed.reshape(noisy.tokens.shape)))
  np.testing.assert_allclose(logits_of(out, k)[valid], logits_of(base, k)[valid], atol=1e-5)
  last = int(np.sum(valid)) - 1
  assert last >= 1
  changed = flat.at[row, k * size + last].set(99)
  _, out = _forward(objective, params, batch,
                    noisy._replace(tokens=changed.reshape(noisy.tokens.shape)))
  assert not np.allclose(logits_of(out, k)[0], logits_of(base, k)[0], atol=1e-5)

  # The clean prefix just before the anchor: visible.
  earlier = dict(batch, inputs=batch["inputs"].at[row, s - 1].set(77))
  _, out = _forward(objective, params, earlier, noisy)
  assert not np.allclose(logits_of(out, k)[0], logits_of(base, k)[0], atol=1e-5)


@pytest.mark.parametrize("window,length", [(8, 40), (0, 24), (16, 16)])
def test_chunked_noisy_attention_equals_the_dense_two_range_mask(window, length):
  rng = np.random.default_rng(window)
  b, size, per_chunk, heads, dim = 2, 3, 4, 2, 4
  segments = np.ones((b, length), np.int32)
  segments[1, length // 2:] = 2
  starts = np.zeros((b, length + 1), bool)
  starts[:, rng.integers(0, length, 3 * length // 4)] = True
  starts[:, :2] = True
  chunk = attention.noisy_chunk_size(length, window)
  blocks = diffusion.anchor_blocks_per_chunk(
      jnp.asarray(starts), jnp.asarray(segments), block_size=size, chunk=chunk,
      blocks_per_chunk=per_chunk, rng=jax.random.PRNGKey(0))
  total = length + blocks.anchors.shape[1] * size
  q = jnp.asarray(rng.normal(size=(b, total, heads, dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, total, 1, dim)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, total, 1, dim)), jnp.float32)
  info = diffusion.chunked_attention_info(blocks, jnp.asarray(segments),
                                         blocks_per_chunk=per_chunk)
  positions = jnp.broadcast_to(jnp.arange(length), (b, length))
  spec = attention.CleanNoisySpec(attention.CausalSpec(positions, jnp.asarray(segments),
                                                       window=window), info, chunk=chunk)
  out = spec(q, k, v)
  ranges = diffusion.bltd_attention_ranges(
      blocks.anchors, blocks.valid, jnp.asarray(segments), seq_len=length, block_size=size,
      window=window, in_block=blocks.in_block)
  mask = diffusion.ranges_to_mask(ranges, total)
  expected = attention.masked_attention(q, k, v, mask)
  real = np.concatenate([np.ones((b, length), bool),
                         np.asarray(blocks.in_block).reshape(b, -1)], axis=1)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(expected)[real], atol=1e-5)


@pytest.mark.slow
def test_tiny_bltd_learns_far_below_the_unigram_bpb(package_corpus, tmp_path):
  config = tiny_blt_config(package_corpus, "static,bltd4", train__steps=300,
                           train__log_every=100, train__eval_every=0, train__save_every=300,
                           train__eval_batches=0, train__seq_len=128, optim__lr=3e-3,
                           optim__warmup_steps=20, data__valid_fraction=0.2)
  config.model.blt.encoder.window = 64
  config.model.blt.decoder.window = 64
  result = train_on_one_device(config, str(tmp_path / "bltd"))
  unigram = unigram_bpb(config.data)
  # Measured: ~3.2 bpb against a unigram entropy of ~4.7 bits after 300 steps.
  assert result["bpb"] < 0.8 * unigram, (result["bpb"], unigram)


@pytest.mark.parametrize("block_size", [0, -4, 47, 1000])
def test_a_block_size_a_row_cannot_hold_is_refused(tiny_corpus, capsys, block_size):
  # Runlocal rows hold 48 bytes and a block starts 2 or more bytes into its row.
  config = tiny_blt_config(tiny_corpus, "static,bltd4", model__diffusion__block_size=block_size)
  message = (f"config.model.diffusion.block_size={block_size} must be in [1, 46]: a "
             "48-byte row (config.train.seq_len) holds blocks of at most 46 bytes")
  with pytest.raises(configs.ConfigError, match=re.escape(message)):
    train.check_config(config)   # what train() checks before anything else
  spec = os.path.join(REPO, "experiments", "blt_tiny.py:static,bltd4,runlocal")
  assert cli.main(["params", "--config", spec,
                   f"--config.model.diffusion.block_size={block_size}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("bltjax: error: ") and message in err, err


def test_training_with_a_zero_block_size_fails_before_anything_is_written(tiny_corpus,
                                                                          tmp_path):
  config = tiny_blt_config(tiny_corpus, "static,bltd4", model__diffusion__block_size=0,
                           train__steps=1, train__eval_every=0, train__eval_batches=1)
  with pytest.raises(configs.ConfigError, match="block_size=0 must be in"):
    train_on_one_device(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_the_longest_block_a_row_holds_is_accepted(tiny_corpus):
  train.check_config(tiny_blt_config(tiny_corpus, "static,bltd4",
                                     model__diffusion__block_size=46))
