"""Pure-jnp reference of the ReLU FFN and its activation statistics.

`relu_ffn_reference` is the ground truth for every kernel in this package:
`h = relu(x @ w_up)` accumulated in f32 and rounded to `x.dtype` (what every kernel
stores), then `out = h @ w_down` accumulated in f32 and returned in `x.dtype`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class FFNStats(NamedTuple):
  """Per-token activation statistics of one FFN call (all float32).

  l1:        [tokens] sum over the hidden units of |h| (= sum of h, h >= 0). Differentiable:
             the L1 activation penalty of TwELL is `l1_coef * mean(l1 over real tokens)`.
  nonzeros:  [tokens] number of nonzero hidden units per token (no gradient). The fraction
             of zeros of a layer is `1 - sum(nonzeros * mask) / (sum(mask) * d_ff)`.
  occupancy: [] fraction of the down-projection work the sparse kernel actually did
             (active (token tile, neuron) pairs over all pairs; 1.0 on the dense paths).
  """
  l1: jax.Array
  nonzeros: jax.Array
  occupancy: jax.Array


def hidden_reference(x, w_up):
  """`relu(x @ w_up)` with an f32 accumulator, rounded to x.dtype: [tokens, d_ff].

  jax.nn.relu has derivative 0 at 0 (jnp.maximum would give 1/2), as the kernels do."""
  a = jnp.dot(x, w_up, preferred_element_type=jnp.float32)
  return jax.nn.relu(a).astype(x.dtype)


def relu_ffn_reference(x, w_up, w_down):
  """`relu(x @ w_up) @ w_down`; x [tokens, d_model], w_up [d_model, d_ff], w_down [d_ff, d_model]."""
  h = hidden_reference(x, w_up)
  return jnp.dot(h, w_down, preferred_element_type=jnp.float32).astype(x.dtype)


def hidden_stats(h):
  """(l1, nonzeros) per token of a hidden activation h [tokens, d_ff] (f32)."""
  hf = h.astype(jnp.float32)
  l1 = jnp.sum(jnp.abs(hf), axis=-1)
  nnz = jax.lax.stop_gradient(jnp.sum((hf != 0).astype(jnp.float32), axis=-1))
  return l1, nnz


def relu_ffn_reference_with_stats(x, w_up, w_down):
  """Reference FFN output and its FFNStats (occupancy 1: the dense path does all the work)."""
  h = hidden_reference(x, w_up)
  out = jnp.dot(h, w_down, preferred_element_type=jnp.float32).astype(x.dtype)
  l1, nnz = hidden_stats(h)
  return out, FFNStats(l1, nnz, jnp.ones((), jnp.float32))


def activation_sparsity(h, mask=None):
  """Fraction of exact zeros in h [..., d_ff], over the positions where mask [...] is true.

  Cheap (one reduction); no gradient. For the model's own `relu(x @ w_up)` on the XLA path;
  `sparse_relu_ffn(..., return_stats=True)` returns the same number via FFNStats.nonzeros.
  """
  h = jax.lax.stop_gradient(h)
  zero = (h == 0).astype(jnp.float32)
  if mask is None:
    return jnp.mean(zero)
  m = mask.astype(jnp.float32)
  per_pos = jnp.mean(zero, axis=-1)
  return jnp.sum(per_pos * m) / jnp.maximum(jnp.sum(m), 1.0)
