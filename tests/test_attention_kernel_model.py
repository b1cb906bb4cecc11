"""Training attention through the range-attention kernel (`model.attention.impl =
"pallas"`): every stack (entropy model, encoder, global, decoder, BLT-D's `[clean ;
noisy]`) gives the same loss and gradients as the XLA attention, on one device and
sharded, and the real kernels lower for GPU and TPU inside the sharded train step.

On CPU the kernels run in interpret mode (`model.attention.backend = gpu | tpu`,
`model.attention.interpret = True`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax import configs
from bltjax import objectives
from bltjax import sharding
from bltjax import train
from bltjax.model import attention
from bltjax.model import layers
from bltjax.model import range_attention
from conftest import (assert_runs_match, assert_trees_close, loss_and_grads, packed_batch,
                      shard_map_body_of_train_step, tiny_blt_config, tiny_entropy_config,
                      two_train_steps)


def _set_attention(config, impl="xla", backend="", interpret=False):
  for key, value in (("impl", impl), ("backend", backend), ("interpret", interpret)):
    configs.set_value(config, f"model.attention.{key}", value)
  return config


def _config(tiny_corpus, impl="xla", backend="", interpret=False, mesh=(1, 1, 1)):
  config = tiny_blt_config(
      tiny_corpus, "static,bltd4", model__diffusion__blocks_per_chunk=6,
      patcher__patch_size=3, model__blt__encoder__window=16, model__blt__decoder__window=24,
      train__batch_size=8, train__seq_len=48)
  _set_attention(config, impl, backend, interpret)
  for axis, size in zip(sharding.MESH_AXES, mesh):
    config.mesh[axis] = size
  return config


def _batch(seed=0, length=48):
  return packed_batch(seed, length=length)


@pytest.mark.parametrize("window", [0, 5, 16])
def test_causal_kernel_spec_equals_the_xla_spec(window):
  """Rows with several documents and padding, windows shorter and longer than them."""
  rng = np.random.default_rng(window)
  b, length, heads, groups, dim = 2, 40, 4, 2, 8
  segments = np.ones((b, length), np.int32)
  segments[0, 12:] = 2
  segments[0, 30:] = 3
  segments[1, 33:] = 0
  q = jnp.asarray(rng.normal(size=(b, length, heads, dim)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, length, groups, dim)), jnp.float32) for _ in "kv")
  positions = jnp.broadcast_to(jnp.arange(length), (b, length))
  want = attention.CausalSpec(positions, jnp.asarray(segments), window=window)(q, k, v)
  config = layers.TransformerConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                    attention_impl="pallas", attention_backend="gpu",
                                    attention_interpret=True)
  spec = range_attention.causal_spec(config, positions, jnp.asarray(segments), window=window)
  assert isinstance(spec, range_attention.RangeSpec)
  np.testing.assert_allclose(spec(q, k, v), want, atol=1e-5)


def test_entropy_model_through_the_kernel_equals_xla(tiny_corpus):
  config = tiny_entropy_config(tiny_corpus, model__entropy__window=8, train__seq_len=32)
  batch = jax.tree.map(lambda x: jnp.asarray(x[:4, :32]), _batch(length=32))
  params = nn.meta.unbox(jax.jit(objectives.make_objective(config).init)(
      jax.random.PRNGKey(1), batch))
  loss, _, grads = _loss_and_grads(config, params, batch)
  _set_attention(config, "pallas", "gpu", True)
  k_loss, _, k_grads = _loss_and_grads(config, params, batch)
  np.testing.assert_allclose(k_loss, loss, rtol=1e-5)
  assert_trees_close(grads, k_grads)


def _loss_and_grads(config, params, batch):
  return loss_and_grads(config, params, batch, seed=3)


@pytest.fixture(scope="module")
def xla_run(tiny_corpus):
  config = _config(tiny_corpus)
  batch = jax.tree.map(jnp.asarray, _batch())
  params = nn.meta.unbox(jax.jit(objectives.make_objective(config).init)(
      jax.random.PRNGKey(1), batch))
  return params, batch, _loss_and_grads(config, params, batch)


@pytest.mark.parametrize("backend", ["gpu", pytest.param("tpu", marks=pytest.mark.slow)])
def test_kernel_path_equals_the_chunked_xla_path(backend, xla_run, tiny_corpus):
  params, batch, (loss, metrics, grads) = xla_run
  config = _config(tiny_corpus, "pallas", backend, True)
  p_loss, p_metrics, p_grads = _loss_and_grads(config, params, batch)
  assert metrics["masked_ce_b4"] > 0   # the diffusion term is in the loss
  np.testing.assert_allclose(p_loss, loss, rtol=1e-5)
  for key in ("ce", "masked_ce_b4"):
    np.testing.assert_allclose(p_metrics[key], metrics[key], rtol=1e-5, err_msg=key)
  assert_trees_close(grads, p_grads)


def test_sharded_kernel_step_equals_the_one_device_xla_step(tiny_corpus, tmp_path):
  """data x fsdp x tensor = 2 x 2 x 2 with the kernel inside shard_map (rows over
  data+fsdp, heads over tensor) against one device with the chunked XLA attention."""
  assert jax.device_count() == 8
  one = train.Trainer(_config(tiny_corpus), str(tmp_path / "one"), devices=jax.devices()[:1])
  many = train.Trainer(_config(tiny_corpus, "pallas", "gpu", True, mesh=(2, 2, 2)),
                       str(tmp_path / "many"))
  rows_one, params_one = two_train_steps(one, _batch)
  rows_many, params_many = two_train_steps(many, _batch)
  assert_runs_match((rows_one, params_one), (rows_many, params_many),
                    ("loss", "ce", "masked_ce_b4", "grad_norm"))


@pytest.mark.parametrize("backend,platform,custom_call", [
    ("gpu", "cuda", "triton"), ("tpu", "tpu", "tpu_custom_call")])
def test_sharded_train_step_lowers_for_the_kernels_platform(backend, platform, custom_call,
                                                            tiny_corpus, tmp_path):
  config = _config(tiny_corpus, "pallas", backend, False, mesh=(2, 2, 2))
  trainer = train.Trainer(config, str(tmp_path))
  text = shard_map_body_of_train_step(trainer, 8, 48, platform)
  assert custom_call in text
  # every layer of the encoder, global model and decoder: fwd + dq + dkv
  n_layers = sum(config.model.blt[s].n_layers for s in ("encoder", "global_model", "decoder"))
  assert text.count("range_attention_dkv") >= n_layers


def test_unknown_impl_is_named(tiny_corpus):
  config = _config(tiny_corpus, "flash")
  with pytest.raises(ValueError, match="attention impl 'flash' is not one of"):
    objectives.make_objective(config)


def test_benchmark_runs_and_appends_its_tables(tmp_path):
  """bench/diffusion_kernels.py --small: the GPU suite's step, in interpret mode."""
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, REPO)
  from bench import diffusion_kernels as bench  # pylint: disable=g-import-not-at-top
  results = tmp_path / "RESULTS.md"
  rows = bench.main(["--small", "--results", str(results)])
  assert [r[0] for r in rows["range_attention"]] == ["fwd", "fwd+bwd"]
  assert [r[:2] for r in rows["unmask"]] == [["1", "confidence"], ["1", "entropy_bounded"],
                                             ["8", "confidence"], ["8", "entropy_bounded"]]
  assert all(r[-1] == "yes" for r in rows["unmask"])
  assert [r[0] for r in rows["cached_attention"]] == ["1"] * 3 + ["8"] * 3
  assert rows["cached_attention"][2][1] == "global patch (T=1), 100 of 512 slots"
  assert all(r[-1] == "yes" for r in rows["cached_attention"])
  text = results.read_text()
  assert "BLT-D range attention" in text and "kernel vs XLA" in text and ": ok." in text
  assert "BLT-D unmasking step" in text and "Decoding attention over a KV cache" in text
  assert "interpret mode" in text and "pairs computed" in text
