"""Layers: BLT's FFN width rule, interleaved RoPE, RMSNorm, logical axis names, fused
projections."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax.model import attention
from bltjax.model import layers


@pytest.mark.parametrize("d_model,hidden", [(768, 2048), (1024, 2816), (1280, 3584),
                                            (2048, 5632), (4096, 11008)])
def test_ffn_width_rule_matches_released_models(d_model, hidden):
  assert layers.blt_ffn_dim(d_model) == hidden


def test_rope_rotates_adjacent_pairs():
  """Pair (2i, 2i+1) is rotated by angle pos * theta^(-2i/d) (interleaved, not halves)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 2, 8))
  positions = jnp.arange(5)[None]
  out = np.asarray(layers.apply_rope(x, positions, theta=10000.0))
  x = np.asarray(x)
  for i in range(4):
    angle = np.arange(5)[:, None] * 10000.0 ** (-2 * i / 8)
    c, s = np.cos(angle), np.sin(angle)
    np.testing.assert_allclose(out[0, :, :, 2 * i], x[0, :, :, 2 * i] * c - x[0, :, :, 2 * i + 1] * s,
                               atol=1e-5)
    np.testing.assert_allclose(out[0, :, :, 2 * i + 1],
                               x[0, :, :, 2 * i] * s + x[0, :, :, 2 * i + 1] * c, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.PRNGKey(2), (1, 1, 1, 16))
  score = lambda pq, pk: float(jnp.sum(layers.apply_rope(q, jnp.array([[pq]]), 500000.0)
                                       * layers.apply_rope(k, jnp.array([[pk]]), 500000.0)))
  np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)


def test_rmsnorm_normalizes_in_float32():
  x = jnp.array([[3.0, 4.0]], jnp.bfloat16)
  out = layers.RMSNorm(eps=0.0, dtype=jnp.float32).apply(
      {"params": {"scale": jnp.ones(2)}}, x)
  np.testing.assert_allclose(out, [[3 / np.sqrt(12.5), 4 / np.sqrt(12.5)]], rtol=1e-3)


def test_every_parameter_has_logical_axis_names():
  cfg = layers.TransformerConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, window=8)
  x = jnp.zeros((1, 8, 32))
  pos = jnp.arange(8)[None]
  spec = attention.CausalSpec(pos, jnp.ones((1, 8), jnp.int32), window=8)
  boxed = jax.eval_shape(layers.Transformer(cfg).init, jax.random.PRNGKey(0), x, pos,
                         spec)["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
  names = {n for v in leaves for n in v.names}
  assert names <= {"embed", "heads", "kv_heads", "mlp"}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_fused_projections_compute_what_separate_ones_do(scan_layers):
  """`fuse_projections` turns a stack's params into the `fused_projections` layout (one
  qkv and one gate_up kernel per block, GQA included, scanned stacks too): same outputs
  and keys."""
  cfg = layers.TransformerConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, window=8,
                                 scan_layers=scan_layers)
  fused_cfg = dataclasses.replace(cfg, fused_projections=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 32))
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
  spec = attention.CausalSpec(pos, jnp.ones((2, 8), jnp.int32), window=8)
  params = nn.meta.unbox(layers.Transformer(cfg).init(jax.random.PRNGKey(1), x, pos,
                                                      spec))["params"]
  fused = layers.fuse_projections(params)
  block = fused["layers"] if scan_layers else fused["layer_0"]
  assert sorted(block["attn"]) == ["o", "qkv"] and sorted(block["ffn"]) == ["down", "gate_up"]
  assert block["attn"]["qkv"]["kernel"].shape[-2:] == (32, 32 + 2 * 16)
  jax.tree.map(np.testing.assert_array_equal, layers.fuse_projections(fused), fused)
  assert jax.tree.structure(fused) == jax.tree.structure(nn.meta.unbox(
      layers.Transformer(fused_cfg).init(jax.random.PRNGKey(1), x, pos, spec))["params"])
  out, kvs = layers.Transformer(cfg).apply({"params": params}, x, pos, spec)
  fused_out, fused_kvs = layers.Transformer(fused_cfg).apply({"params": fused}, x, pos, spec)
  np.testing.assert_allclose(fused_out, out, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), fused_kvs, kvs)
  # Cross-attention and ReLU FFNs have nothing to fuse: left as they are.
  other = {"cross": {p: {"kernel": jnp.ones((4, 4))} for p in "qkvo"},
           "ffn": {"up": {"kernel": jnp.ones((4, 8))}, "down": {"kernel": jnp.ones((8, 4))}}}
  jax.tree.map(np.testing.assert_array_equal, layers.fuse_projections(other), other)


def test_relu_ffn_records_sparsity_and_l1():
  cfg = layers.TransformerConfig(d_model=16, n_layers=1, n_heads=2, activation="relu",
                                 ffn_dim=64, l1_coef=0.1)
  ffn = layers.FeedForward(cfg)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
  params = nn.meta.unbox(ffn.init(jax.random.PRNGKey(1), x)["params"])
  _, state = ffn.apply({"params": params}, x, mutable=["intermediates"])
  penalty, metrics = layers.ffn_penalty(state["intermediates"], cfg.l1_coef)
  hidden = jax.nn.relu(x @ params["up"]["kernel"])
  # TwELL's L1: mean over positions of the sum over hidden units (one layer here).
  np.testing.assert_allclose(penalty, 0.1 * jnp.mean(jnp.sum(jnp.abs(hidden), -1)), rtol=1e-5)
  np.testing.assert_allclose(metrics["ffn_sparsity"], jnp.mean(hidden == 0), rtol=1e-5)


def test_bad_transformer_shapes_are_refused_with_the_fix():
  with pytest.raises(ValueError, match="not divisible by n_heads"):
    layers.TransformerConfig(d_model=30, n_layers=1, n_heads=4)
  with pytest.raises(ValueError, match="needs activation 'relu'"):
    layers.TransformerConfig(d_model=32, n_layers=1, n_heads=4, ffn_impl="pallas")
