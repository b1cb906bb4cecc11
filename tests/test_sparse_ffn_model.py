"""The activation-sparse FFN in the model (`model.ffn.impl = "pallas"`, issue 4).

On CPU the kernels run in interpret mode (`model.ffn.backend = gpu | tpu`,
`model.ffn.interpret = True`) or as the XLA reference (`backend = ""`: the kernel
package's choice on CPU). `dense_threshold = 1` keeps the sparse kernels on at any
occupancy (the default 0.5 would route these dense-ish random models to XLA matmuls).
"""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax import configs
from bltjax import objectives
from bltjax import sharding
from bltjax import train
from bltjax.model import layers
from conftest import (REPO, assert_runs_match, assert_trees_close, loss_and_grads,
                      lowered_text, packed_batch, shard_map_body_of_train_step,
                      tiny_blt_config, tiny_entropy_config, train_on_one_device,
                      two_train_steps)

KERNELS = {  # name -> model.ffn overrides
    "auto": dict(backend=""),
    "gpu_interpret": dict(backend="gpu", interpret=True, dense_threshold=1.0),
    "tpu_interpret": dict(backend="tpu", interpret=True, dense_threshold=1.0),
}


def _set_ffn(config, **ffn):
  for key, value in ffn.items():
    configs.set_value(config, f"model.ffn.{key}", value)
  return config


def _blt_batch(seed=0):
  return jax.tree.map(jnp.asarray, packed_batch(seed))


@pytest.fixture(scope="module")
def blt_xla_relu(tiny_corpus):
  """Params and (loss, metrics, grads) of the tiny static BLT, relu + L1, impl xla."""
  config = _set_ffn(tiny_blt_config(tiny_corpus), activation="relu", l1_coef=3e-3)
  batch = _blt_batch()
  init = jax.jit(objectives.make_objective(config).init)
  params = nn.meta.unbox(init(jax.random.PRNGKey(1), batch))
  return config, params, batch, loss_and_grads(config, params, batch)


@pytest.mark.parametrize("kernel", [
    "gpu_interpret", pytest.param("auto", marks=pytest.mark.slow),
    pytest.param("tpu_interpret", marks=pytest.mark.slow)])
def test_pallas_path_equals_the_xla_relu_path(kernel, blt_xla_relu):
  config, params, batch, (loss, metrics, grads) = blt_xla_relu
  config = _set_ffn(configs.from_json(configs.to_json(config)), impl="pallas", **KERNELS[kernel])
  p_loss, p_metrics, p_grads = loss_and_grads(config, params, batch)
  np.testing.assert_allclose(p_loss, loss, rtol=1e-5)
  assert set(p_metrics) == set(metrics) | {"ffn_occupancy"}
  assert {"ffn_sparsity", "ffn_sparsity_min", "ffn_sparsity/global_0", "ffn_l1"} <= set(metrics)
  for key, value in metrics.items():
    np.testing.assert_allclose(p_metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  assert_trees_close(grads, p_grads)
  # The global FFN's weight gradients include the L1 term (it is not zero here).
  assert float(jnp.max(jnp.abs(p_grads["global_model"]["transformer"]["layer_0"]["ffn"]
                               ["up"]["kernel"]))) > 0
  if kernel != "auto":   # dense_threshold 1: the sparse kernels did the work
    assert 0 < p_metrics["ffn_occupancy"] <= 1


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_l1_penalty_is_l1_coef_times_mean_l1_per_layer(impl):
  """penalty = l1_coef * mean over layers of (mean over real positions of sum_f |h|);
  the sparsity per layer is the fraction of zero units over the real positions."""
  l1_coef = 0.01
  cfg = layers.TransformerConfig(
      d_model=32, n_layers=2, n_heads=2, ffn_dim=96, activation="relu", l1_coef=l1_coef,
      ffn_impl=impl, ffn_backend="gpu" if impl == "pallas" else "", ffn_interpret=True,
      ffn_dense_threshold=1.0)
  stack = layers.Transformer(cfg)
  b, t = 3, 20
  x = jax.random.normal(jax.random.PRNGKey(0), (b, t, 32))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  from bltjax.model import attention  # pylint: disable=g-import-not-at-top
  spec = attention.CausalSpec(positions, jnp.ones((b, t), jnp.int32), window=0)
  params = nn.meta.unbox(jax.jit(stack.init)(jax.random.PRNGKey(1), x, positions, spec)["params"])
  # Push some units below zero on some layers so the sparsity differs per layer.
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v - 0.3 * ("layer_1" in jax.tree_util.keystr(p) and "up" in
                              jax.tree_util.keystr(p)), params)
  _, state = jax.jit(functools.partial(stack.apply, mutable=["intermediates"],
                                       capture_intermediates=True))(
                                           {"params": params}, x, positions, spec)
  inter = state["intermediates"]
  mask = jnp.arange(t)[None, :] < jnp.array([[20], [7], [13]])
  penalty, metrics = layers.ffn_penalty(inter, l1_coef, masks=mask)
  want_l1, want_zero = [], []
  for i in range(2):
    normed = inter[f"layer_{i}"]["ffn_norm"]["__call__"][0]
    h = jax.nn.relu(normed @ params[f"layer_{i}"]["ffn"]["up"]["kernel"])
    want_l1.append(jnp.sum(jnp.sum(jnp.abs(h), -1) * mask) / jnp.sum(mask))
    want_zero.append(jnp.sum(jnp.mean(h == 0, -1) * mask) / jnp.sum(mask))
    np.testing.assert_allclose(metrics[f"ffn_sparsity/layer_{i}"], want_zero[i], rtol=1e-5)
  np.testing.assert_allclose(penalty, l1_coef * (want_l1[0] + want_l1[1]) / 2, rtol=1e-5)
  np.testing.assert_allclose(metrics["ffn_sparsity"], np.mean(want_zero), rtol=1e-5)
  np.testing.assert_allclose(metrics["ffn_sparsity_min"], np.min(want_zero), rtol=1e-5)
  assert abs(float(want_zero[1] - want_zero[0])) > 0.05
  # The gradient of the penalty reaches the up projection (through the kernel's L1 output).
  def pen(p):
    _, st = stack.apply({"params": p}, x, positions, spec, mutable=["intermediates"])
    return layers.ffn_penalty(st["intermediates"], l1_coef, masks=mask)[0]
  g = jax.jit(jax.grad(pen))(params)
  assert float(jnp.max(jnp.abs(g["layer_1"]["ffn"]["up"]["kernel"]))) > 0
  if impl == "pallas":
    return
  # SwiGLU records nothing.
  swiglu = layers.Transformer(layers.TransformerConfig(d_model=32, n_layers=1, n_heads=2))
  sp = jax.jit(swiglu.init)(jax.random.PRNGKey(1), x, positions, spec)
  _, st = jax.jit(functools.partial(swiglu.apply, mutable=["intermediates"]))(
      sp, x, positions, spec)
  assert layers.ffn_penalty(st.get("intermediates", {}), l1_coef)[1] == {}


def test_sparsity_is_logged_in_training(tiny_corpus, tmp_path):
  config = tiny_entropy_config(tiny_corpus, train__steps=2, train__log_every=1,
                               train__eval_every=0, train__save_every=2, train__batch_size=4,
                               train__seq_len=32)
  _set_ffn(config, activation="relu", l1_coef=2e-5, impl="pallas")
  n_layers = config.model.entropy.n_layers
  train_on_one_device(config, tmp_path)
  with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if '"train/loss"' in line]
  assert len(rows) == 2
  keys = ["ffn_sparsity", "ffn_sparsity_min", "ffn_l1", "ffn_occupancy"] + [
      f"ffn_sparsity/layer_{i}" for i in range(n_layers)]
  for row in rows:
    for key in keys:
      assert 0 <= row[f"train/{key}"] and np.isfinite(row[f"train/{key}"]), key
    assert row["train/ffn_sparsity"] <= 1


def _entropy_config(tiny_corpus, mesh):
  config = tiny_entropy_config(
      tiny_corpus, model__entropy__d_model=64, model__entropy__n_heads=4,
      model__entropy__n_kv_heads=4, model__entropy__ffn_dim=256, model__entropy__window=8,
      train__batch_size=8, train__seq_len=32)
  _set_ffn(config, activation="relu", l1_coef=1e-3, impl="pallas", **KERNELS["gpu_interpret"])
  for axis, size in zip(sharding.MESH_AXES, mesh):
    config.mesh[axis] = size
  return config


def _entropy_batch(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, 260, (8, 33)).astype(np.int32)
  segment_ids = np.ones((8, 32), np.int32)
  segment_ids[::2, 20:] = 2
  segment_ids[1::4, 26:] = 0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids}


def test_sharded_step_equals_the_one_device_step(tiny_corpus, tmp_path):
  """data x fsdp x tensor = 2 x 2 x 2: tokens split over data+fsdp, hidden units over
  tensor (partial outputs summed), weights gathered over fsdp inside shard_map."""
  assert jax.device_count() == 8
  one = train.Trainer(_entropy_config(tiny_corpus, (1, 1, 1)), str(tmp_path / "one"),
                      devices=jax.devices()[:1])
  many = train.Trainer(_entropy_config(tiny_corpus, (2, 2, 2)), str(tmp_path / "many"))
  # The kernel call runs inside shard_map on the mesh, directly on one device.
  for trainer, wanted in ((one, False), (many, True)):
    batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                        sharding=trainer.batch_sharding),
                         train.abstract_batch(8, 32))
    with sharding.use_mesh(trainer.mesh):
      jaxpr = str(trainer._jit_train_step.trace(trainer.abstract_state, batch, None).jaxpr)
    assert ("shard_map" in jaxpr) == wanted
  rows_one, params_one = two_train_steps(one, _entropy_batch)
  rows_many, params_many = two_train_steps(many, _entropy_batch)
  assert_runs_match((rows_one, params_one), (rows_many, params_many),
                    ("loss", "ce", "grad_norm", "ffn_sparsity", "ffn_sparsity/layer_0", "ffn_l1"))


@pytest.mark.parametrize("backend,platform,custom_call", [
    ("gpu", "cuda", "triton"), ("tpu", "tpu", "tpu_custom_call")])
def test_sharded_train_step_lowers_for_the_kernels_platform(backend, platform, custom_call,
                                                            tiny_corpus, tmp_path):
  """The real kernels (not interpret mode) in the 2 x 2 x 2 sharded train step lower for
  GPU (Triton) and TPU (Mosaic), inside the shard_map's manual computation."""
  config = _entropy_config(tiny_corpus, (2, 2, 2))
  _set_ffn(config, backend=backend, interpret=False)
  trainer = train.Trainer(config, str(tmp_path))
  assert custom_call in shard_map_body_of_train_step(trainer, 8, 32, platform)


def test_gpu_preset_train_step_lowers_for_cuda():
  """The GPU benchmark's model (bf16, global 768 x 12, relu in global and local FFNs)
  with the Triton kernels lowers for CUDA: what bench/sparse_ffn_train.py --preset gpu runs."""
  config = configs.load(os.path.join(REPO, "experiments", "blt_sparse_ffn.py:relu,local,gpu"))
  _set_ffn(config, backend="gpu")
  objective = objectives.make_objective(config)
  batch = {k: jax.ShapeDtypeStruct((2, config.train.seq_len), jnp.int32)
           for k in ("inputs", "targets", "segment_ids")}
  params = jax.eval_shape(lambda r: nn.meta.unbox(objective.init(
      r, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch))), jax.random.PRNGKey(0))
  step = jax.jit(jax.value_and_grad(lambda p, b: objective.loss(p, b, jax.random.PRNGKey(0)),
                                    has_aux=True))
  text = lowered_text(step, params, batch, platform="cuda")
  n_layers = sum(config.model.blt[s].n_layers for s in ("encoder", "global_model", "decoder"))
  assert text.count("triton") >= 3 * n_layers   # forward + backward kernels of every FFN


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "quick"])
def test_training_benchmark_runs(mode, tiny_corpus, tmp_path):
  """bench/sparse_ffn_train.py end to end on the tiny model (both modes)."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, REPO)
  from bench import sparse_ffn_train  # pylint: disable=g-import-not-at-top
  results = tmp_path / "RESULTS.md"
  argv = ["--smoke", "--workdir", str(tmp_path / "runs"), "--results", str(results),
          "--timing_steps", "1", "--timing_rounds", "1", "--set", f"data.train={tiny_corpus}",
          "--set", "data.prefetch=0"]
  if mode == "quick":
    argv += ["--quick", "--train_seconds", "0"]
  else:
    argv += ["--variants", "dense,relu", "--occupancy_batches", "1"]
  sparse_ffn_train.main(argv)
  text = results.read_text()
  assert "Sparse FFN training, issue 4" in text and "relu/pallas" in text
  if mode == "full":
    assert "| dense |" in text and "global_0" in text and "(interpret)" in text
