"""`model.scan_layers`: a scanned stack computes what the unrolled one computes with the
same (stacked) params, in training, in cached generation and in the FFN metrics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax import bytes as blt_bytes
from bltjax import generate
from bltjax import train
from bltjax.model import attention
from bltjax.model import blt
from bltjax.model import entropy_model as entropy_lib
from bltjax.model import layers
from bltjax.model import patcher
import conftest

STACK = layers.TransformerConfig(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, window=6,
                                 activation="relu")


def _positions(x):
  return jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])


def _init(config, x, spec):
  return conftest.init_variables(layers.Transformer(config), x, _positions(x), spec)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_stack_equals_unrolled_stack(remat):
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 10, 32))
  positions = _positions(x)
  spec = attention.CausalSpec(positions, jnp.ones((2, 10), jnp.int32), window=6)
  unrolled = dataclasses.replace(STACK, remat=remat)
  scanned = dataclasses.replace(unrolled, scan_layers=True)
  params = _init(unrolled, x, spec)["params"]
  stacked = layers.stack_layers(params)
  assert jax.tree.leaves(stacked)[0].shape[0] == 3
  assert jax.tree.structure(stacked) == jax.tree.structure(
      _init(scanned, x, spec)["params"])
  # one spec per layer: the second splits each row into two segments
  split = dataclasses.replace(spec, segment_ids=jnp.where(positions < 4, 1, 2))
  per_layer = (spec, split, spec)
  for attend in (spec, per_layer):
    want, want_kv = layers.Transformer(unrolled).apply({"params": params}, x, positions, attend)
    got, got_kv = layers.Transformer(scanned).apply({"params": stacked}, x, positions, attend)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert len(got_kv) == 3
    for (gk, gv), (wk, wv) in zip(got_kv, want_kv):
      np.testing.assert_allclose(gk, wk, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(gv, wv, rtol=1e-5, atol=1e-5)


def test_scanned_stack_reports_ffn_sparsity_per_layer_like_the_unrolled_one():
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 32))
  spec = attention.CausalSpec(jnp.broadcast_to(jnp.arange(8), (2, 8)),
                              jnp.ones((2, 8), jnp.int32))
  params = _init(STACK, x, spec)["params"]

  def metrics(config, p):
    _, state = layers.Transformer(config).apply({"params": p}, x, _positions(x), spec,
                                                mutable=["intermediates"])
    return layers.ffn_penalty(state["intermediates"], 1e-3)

  want_penalty, want = metrics(STACK, params)
  got_penalty, got = metrics(dataclasses.replace(STACK, scan_layers=True),
                             layers.stack_layers(params))
  assert set(got) == set(want) >= {f"ffn_sparsity/layer_{i}" for i in range(3)}
  np.testing.assert_allclose(got_penalty, want_penalty, rtol=1e-5)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_scanned_stack_refuses_per_layer_specs_of_different_kinds():
  x = jnp.ones((1, 4, 32))
  positions = _positions(x)
  spec = attention.CausalSpec(positions, jnp.ones((1, 4), jnp.int32), window=6)
  scanned = dataclasses.replace(STACK, scan_layers=True)
  params = _init(scanned, x, spec)
  with pytest.raises(ValueError, match="scan_layers"):
    layers.Transformer(scanned).apply(params, x, positions,
                                      (spec, dataclasses.replace(spec, window=2), spec))


def test_stack_layers_refuses_other_params():
  with pytest.raises(ValueError, match="layer_0, layer_1"):
    layers.stack_layers({"layer_0": {}, "norm": {}})


def test_unstack_layers_inverts_stack_layers():
  x = jnp.ones((2, 5, 32))
  params = _init(STACK, x, attention.CausalSpec(_positions(x), jnp.ones((2, 5), jnp.int32)))
  stack = params["params"]
  back = layers.unstack_layers(layers.stack_layers(stack))
  assert jax.tree.structure(back) == jax.tree.structure(stack)
  jax.tree.map(np.testing.assert_array_equal, back, stack)
  assert layers.unstack_layers(stack) is stack   # already unrolled: as it is


def test_scanned_global_model_generates_the_same_bytes():
  local = layers.TransformerConfig(d_model=32, n_layers=2, n_heads=2, window=8)
  config = blt.BltConfig(encoder=dataclasses.replace(local, n_layers=1),
                         global_model=layers.TransformerConfig(d_model=48, n_layers=3,
                                                               n_heads=4),
                         decoder=local, cross_attn_k=2, hash_table_size=101,
                         ngram_sizes=(3, 4))
  scanned = dataclasses.replace(config, global_model=dataclasses.replace(
      config.global_model, scan_layers=True))
  tokens = jnp.ones((1, 16), jnp.int32)
  static = patcher.PatcherConfig(mode="static", patch_size=3, max_patches=16)
  params = conftest.init_variables(blt.BLT(config), tokens, tokens,
                                   patcher.patch(static, tokens, tokens))["params"]
  stacked = dict(params, global_model=dict(
      params["global_model"], transformer=layers.stack_layers(
          params["global_model"]["transformer"])))
  ids, lengths = blt_bytes.encode_batch(["Hello world, this is", "ab"])
  # By default a scanned stack decodes unrolled: the unrolled model's engine, its params
  # unstacked (so the same program as the unrolled model's; every stack's projections
  # fused, as for any model).
  default = generate.DecodeConfig(max_bytes=24)
  engine = generate.make_engine(scanned, static, None, ids.shape[1], default)
  assert engine == generate.make_engine(config, static, None, ids.shape[1], default)
  jax.tree.map(np.testing.assert_array_equal, engine.layout_params({"blt": stacked}),
               {"blt": layers.fuse_projections(params)})
  # ... and so does a scanned entropy model (entropy patching)
  entropy_config = layers.TransformerConfig(d_model=32, n_layers=2, n_heads=2, window=8)
  entropy_params = conftest.init_variables(entropy_lib.EntropyModel(entropy_config), tokens,
                                           tokens, seed=1)["params"]
  entropy_stacked = dict(entropy_params,
                         transformer=layers.stack_layers(entropy_params["transformer"]))
  engine = generate.make_engine(
      scanned, patcher.PatcherConfig(), dataclasses.replace(entropy_config, scan_layers=True),
      ids.shape[1], default)
  assert not engine.entropy_config.scan_layers
  jax.tree.map(np.testing.assert_array_equal,
               engine.layout_params({"blt": stacked, "entropy": entropy_stacked}),
               layers.fuse_projections({"blt": params, "entropy": entropy_params}))
  # unroll_layers=False keeps it scanned
  outputs = []
  for model_config, model_params in ((config, params), (scanned, stacked)):
    for method in ("ar", "blt_s"):
      decode = generate.DecodeConfig(method=method, max_bytes=24, draft_len=4,
                                     unroll_layers=False)
      engine = generate.make_engine(model_config, static, None, ids.shape[1], decode)
      assert engine.config.global_model.scan_layers == model_config.global_model.scan_layers
      result = generate.jitted_decode(engine, decode)(
          {"blt": model_params}, jnp.asarray(ids), jnp.asarray(lengths),
          jax.random.PRNGKey(3))
      outputs.append(np.asarray(result.tokens))
  np.testing.assert_array_equal(outputs[2], outputs[0])   # scanned AR == unrolled AR
  np.testing.assert_array_equal(outputs[3], outputs[1])   # scanned BLT-S == unrolled


def test_scan_layers_trains_a_blt_with_stacked_global_params(tiny_corpus, tmp_path):
  config = conftest.tiny_blt_config(tiny_corpus, model__scan_layers=True, train__steps=2)
  metrics = conftest.train_on_one_device(config, tmp_path)
  assert np.isfinite(metrics["bpb"])
  trainer = train.Trainer(config, str(tmp_path))
  stack = trainer.abstract_state.params["global_model"]["transformer"]
  assert set(stack) == {"layers"}
  n_layers = config.model.blt.global_model.n_layers
  assert {leaf.shape[0] for leaf in jax.tree.leaves(stack)} == {n_layers}
  # the local stacks never scan (the decoder runs cross-attention between blocks)
  assert "layer_0" in trainer.abstract_state.params["decoder"]["layers"]
