"""Attention: the chunked sliding-window form equals the dense mask, and is causal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax.model import attention


def _inputs(key, batch, length, heads, kv_heads, head_dim):
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (batch, length, heads, head_dim))
  k = jax.random.normal(kk, (batch, length, kv_heads, head_dim))
  v = jax.random.normal(kv, (batch, length, kv_heads, head_dim))
  return q, k, v


def _reference(q, k, v, segment_ids, window):
  """Loop-free numpy reference with an explicit [T, T] mask and repeated kv heads."""
  q, k, v = map(np.asarray, (q, k, v))
  b, t, h, d = q.shape
  k = np.repeat(k, h // k.shape[2], axis=2)
  v = np.repeat(v, h // v.shape[2], axis=2)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  seg = np.asarray(segment_ids)
  mask = (j <= i)[None] & (seg[:, :, None] == seg[:, None, :])
  if window:
    mask &= (i - j < window)[None]
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
  scores = np.where(mask[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.mark.parametrize("length,window,heads,kv_heads", [
    (64, 16, 4, 4), (70, 16, 4, 2), (33, 8, 2, 1), (16, 32, 2, 2), (50, 0, 4, 2)])
def test_causal_attention_equals_dense_reference(length, window, heads, kv_heads):
  q, k, v = _inputs(jax.random.PRNGKey(length), 2, length, heads, kv_heads, 8)
  segment_ids = np.ones((2, length), np.int32)
  segment_ids[0, length // 3:] = 2          # two documents in row 0
  segment_ids[1, length - 5:] = 0           # padding tail in row 1
  positions = np.broadcast_to(np.arange(length), (2, length))
  out = attention.causal_attention(q, k, v, positions, segment_ids, window=window)
  np.testing.assert_allclose(out, _reference(q, k, v, segment_ids, window), atol=2e-5)


def test_chunked_attention_never_reads_future_keys():
  length, window = 48, 8
  q, k, v = _inputs(jax.random.PRNGKey(0), 1, length, 2, 2, 4)
  positions = np.arange(length)[None]
  segment_ids = np.ones((1, length), np.int32)
  out = attention.causal_attention(q, k, v, positions, segment_ids, window=window)
  t = 20
  k2 = k.at[:, t + 1:].set(100.0)
  v2 = v.at[:, t + 1:].set(-100.0)
  out2 = attention.causal_attention(q, k2, v2, positions, segment_ids, window=window)
  np.testing.assert_array_equal(out[:, :t + 1], out2[:, :t + 1])
  assert not np.allclose(out[:, t + 1:], out2[:, t + 1:])


def test_window_limits_what_a_query_sees():
  """A key exactly `window` positions back is invisible; `window - 1` back is visible."""
  window = 4
  mask = attention.attention_mask(np.arange(10)[:, None], np.arange(10)[None, :], 1, 1,
                                  window=window)
  assert mask[9, 6] and not mask[9, 5] and not mask[5, 6]
  assert mask.sum(axis=1).max() == window


def test_gradients_of_chunked_and_dense_forms_agree():
  length, window = 40, 8
  q, k, v = _inputs(jax.random.PRNGKey(3), 1, length, 2, 1, 4)
  positions = np.arange(length)[None]
  segment_ids = np.ones((1, length), np.int32)

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v, positions, segment_ids, window=window)))

  chunked = jax.grad(lambda *a: loss(attention.chunked_window_attention, *a), (0, 1, 2))(q, k, v)
  dense = jax.grad(lambda *a: loss(attention.dense_causal_attention, *a), (0, 1, 2))(q, k, v)
  for a, b in zip(chunked, dense):
    np.testing.assert_allclose(a, b, atol=2e-5)
