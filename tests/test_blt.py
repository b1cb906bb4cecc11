"""The three-stage BLT: causality in every patching mode, patch alignment, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax import bytes as blt_bytes
from bltjax import sharding
from bltjax import train
from bltjax.model import attention
from bltjax.model import blt
from bltjax.model import decoder as decoder_lib
from bltjax.model import entropy_model
from bltjax.model import layers
from bltjax.model import patcher
from bltjax.model.blt_config import BltConfig
from conftest import init_variables, tiny_blt_config

LOCAL = layers.TransformerConfig(d_model=32, n_layers=2, n_heads=2, window=8, rope_theta=5e5)
CONFIG = BltConfig(encoder=dataclasses.replace(LOCAL, n_layers=1),
                   global_model=layers.TransformerConfig(d_model=48, n_layers=2, n_heads=4),
                   decoder=LOCAL, cross_attn_k=2, hash_table_size=101, ngram_sizes=(3, 4, 5))


def _tokens(seed, length=40, batch=2):
  rng = np.random.default_rng(seed)
  body = rng.integers(4, 260, (batch, length - 1))
  body[:, ::5] = ord(" ") + blt_bytes.OFFSET   # some spaces for space patching
  return jnp.asarray(np.concatenate([np.full((batch, 1), blt_bytes.BOS_ID), body], 1),
                     jnp.int32)


@pytest.fixture(scope="module")
def entropy():
  cfg = layers.TransformerConfig(d_model=16, n_layers=1, n_heads=2, window=8)
  module = entropy_model.EntropyModel(cfg)
  tokens = _tokens(0)
  params = init_variables(module, tokens, jnp.ones_like(tokens), seed=1)
  return lambda t, s: patcher.entropies_from_logits(module.apply(params, t, s))


PATCHERS = {
    "entropy_global": patcher.PatcherConfig(mode="entropy", threshold=5.55, max_patch_len=6,
                                            max_patches=40),
    "entropy_monotonic": patcher.PatcherConfig(mode="entropy", threshold=0.002,
                                               rule="monotonic", max_patches=40),
    "static": patcher.PatcherConfig(mode="static", patch_size=3, max_patches=40),
    "space": patcher.PatcherConfig(mode="space", max_patch_len=8, max_patches=40),
}


@pytest.mark.parametrize("mode", sorted(PATCHERS))
def test_next_byte_logits_never_depend_on_later_bytes(mode, entropy):
  config = PATCHERS[mode]
  model = blt.BLT(CONFIG)

  def forward(params, tokens):
    segments = jnp.ones_like(tokens)
    ent = entropy(tokens, segments) if config.mode == "entropy" else None
    patches = patcher.patch(config, tokens, segments, ent)
    return model.apply(params, tokens, segments, patches)[0], patches

  tokens = _tokens(1)
  params = init_variables(model, tokens, jnp.ones_like(tokens),
                          patcher.patch(PATCHERS["static"], tokens, jnp.ones_like(tokens)))
  logits, patches = jax.jit(forward)(params, tokens)
  lengths = np.diff(np.flatnonzero(np.asarray(patches.starts[0])))
  assert lengths.min() >= 1 and len(lengths) > 5, "the layout should have several patches"
  rng = np.random.default_rng(2)
  for t in (3, 11, 22, 33):
    changed = tokens.at[:, t + 1:].set(jnp.asarray(rng.integers(4, 260, (2, 39 - t))))
    other, _ = jax.jit(forward)(params, changed)
    np.testing.assert_allclose(other[:, :t + 1], logits[:, :t + 1], atol=1e-5)
    assert not np.allclose(other[:, t + 1:], logits[:, t + 1:], atol=1e-5)


def test_each_byte_reads_the_global_output_of_the_last_complete_patch():
  # The reference's worked example: [BOS, H, e, l, l, o, _, w] with patches [BOS][Hello][_w..
  starts = jnp.asarray([[1, 1, 0, 0, 0, 0, 1, 0, 0]], bool)
  layout = patcher.layout(starts, max_patches=4)
  read = decoder_lib.read_patch_ids(layout.next_patch_ids)
  assert read[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]

  dec = decoder_lib.LocalDecoder(CONFIG)
  states = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 32))
  global_out = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 48))
  positions = jnp.arange(8)[None]
  spec = attention.CausalSpec(positions, jnp.ones((1, 8), jnp.int32), window=8)

  def full(module, global_out):
    return module(states, positions, spec, module.patch_vectors(global_out), read)[0]

  params = init_variables(dec, global_out, method=full, seed=2)
  logits = lambda params, global_out: dec.apply(params, global_out, method=full)
  base = logits(params, global_out)
  for patch in range(3):
    changed = logits(params, global_out.at[:, patch].add(1.0))
    differs = np.abs(np.asarray(changed - base)).max(-1)[0] > 1e-6
    # A byte's output moves iff it reads the changed patch (or an earlier byte in its
    # window did, through self-attention).
    first_reader = int(np.argmax(np.asarray(read[0]) == patch)) if patch in read[0] else 8
    assert differs.tolist() == [t >= first_reader for t in range(8)], patch


def test_sharded_blt_step_equals_the_one_device_step(tiny_corpus, tmp_path):
  def first_losses(mesh, devices):
    config = tiny_blt_config(tiny_corpus, "static", train__seq_len=48)
    config.model.blt.encoder.n_heads = 2
    for axis, size in zip(sharding.MESH_AXES, mesh):
      config.mesh[axis] = size
    trainer = train.Trainer(config, str(tmp_path), devices=devices)
    state = trainer.init_state(jax.random.PRNGKey(0))
    tokens = np.asarray(_tokens(5, length=49, batch=8))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "segment_ids": np.ones((8, 48), np.int32)}
    out = []
    for _ in range(2):
      state, metrics = trainer.train_step(state, sharding.make_global_batch(batch, trainer.mesh),
                                          trainer.frozen)
      out.append(float(metrics["loss"]))
    return out

  one = first_losses((1, 1, 1), jax.devices()[:1])
  np.testing.assert_allclose(first_losses((2, 2, 2), None), one, rtol=2e-5)
  np.testing.assert_allclose(first_losses((4, 2, 1), None), one, rtol=2e-5)


def test_bfloat16_models_still_give_float32_logits_finer_than_bfloat16():
  # The output norm and head run in float32: bf16 logits would keep 8 significant bits,
  # tying near-equal bytes in greedy decoding.
  bf16 = lambda section: dataclasses.replace(section, dtype="bfloat16")
  config = dataclasses.replace(CONFIG, encoder=bf16(CONFIG.encoder),
                               global_model=bf16(CONFIG.global_model),
                               decoder=bf16(CONFIG.decoder))
  tokens = _tokens(0)
  segment_ids = jnp.ones_like(tokens)
  patches = patcher.patch(PATCHERS["static"], tokens, segment_ids)
  module = blt.BLT(config)
  params = init_variables(module, tokens, segment_ids, patches)
  entropy_module = entropy_model.EntropyModel(bf16(LOCAL))
  entropy_params = init_variables(entropy_module, tokens, segment_ids, seed=1)
  for logits in (module.apply(params, tokens, segment_ids, patches)[0],
                 entropy_module.apply(entropy_params, tokens, segment_ids)):
    assert logits.dtype == jnp.float32
    on_bf16_grid = np.asarray(logits.astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(np.asarray(logits) != on_bf16_grid) > 0.9
