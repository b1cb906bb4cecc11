"""TwELL-style activation-sparse ReLU FFN: reference, Pallas GPU/TPU kernels, custom VJP.

    out = relu(x @ w_up) @ w_down          x [tokens, d_model]

Public API:
  relu_ffn_reference(x, w_up, w_down)        pure jnp ground truth
  sparse_relu_ffn(x, w_up, w_down, *, backend=None, interpret=False, return_stats=False,
                  dense_threshold=None, up_impl="xla", **tiles)
  FFNStats                                   (l1 [T], nonzeros [T], occupancy [])
  activation_sparsity(h, mask=None)          fraction of zeros of a hidden activation
  neuron_order, permute_ffn_weights          frequency reordering of the hidden units

See README.md in this directory for the design and the tile choices.
"""

from .format import neuron_order, permute_ffn_weights
from ..platform import BACKENDS, default_backend
from .ops import sparse_relu_ffn
from .reference import (FFNStats, activation_sparsity, hidden_reference,
                        relu_ffn_reference, relu_ffn_reference_with_stats)

__all__ = [
    "BACKENDS", "FFNStats", "activation_sparsity", "default_backend", "hidden_reference",
    "neuron_order", "permute_ffn_weights", "relu_ffn_reference",
    "relu_ffn_reference_with_stats", "sparse_relu_ffn",
]
