"""Kernels for block-diffusion (BLT-D) training and decoding: reference, Pallas GPU/TPU.

Public API:
  range_attention(q, k, v, ranges, *, backend=None, interpret=False, **tiles)
      attention where query row q sees keys [a0, a1) U [b0, b1); custom VJP
  range_attention_reference(q, k, v, ranges)   pure jnp ground truth
  tile_bounds, occupancy                        the key blocks each query tile visits

See README.md in this directory.
"""

from .ops import BACKENDS, default_backend, range_attention
from .reference import range_attention_reference, ranges_mask
from .tiles import occupancy, tile_bounds

__all__ = ["BACKENDS", "default_backend", "occupancy", "range_attention",
           "range_attention_reference", "ranges_mask", "tile_bounds"]
