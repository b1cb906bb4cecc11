"""Kernels for block-diffusion (BLT-D) training and decoding: reference, Pallas GPU/TPU.

Public API:
  range_attention(q, k, v, ranges, *, backend=None, interpret=False, **tiles)
      attention where query row q sees keys [a0, a1) U [b0, b1); custom VJP
  range_attention_reference(q, k, v, ranges)   pure jnp ground truth
  tile_bounds, occupancy                        the key blocks each query tile visits
  unmask_step(logits, block, still_masked, threshold, *, rule, tokens=None, backend=None)
      one BLT-D decoder step's unmasking (confidence or entropy-bounded rule), fused
  unmask_reference(...)                         its pure jnp ground truth

See README.md in this directory.
"""

from .ops import BACKENDS, default_backend, range_attention
from .reference import RULES, range_attention_reference, ranges_mask, unmask_reference
from .tiles import occupancy, tile_bounds
from .unmask import unmask_step

__all__ = ["BACKENDS", "RULES", "default_backend", "occupancy", "range_attention",
           "range_attention_reference", "ranges_mask", "tile_bounds", "unmask_reference",
           "unmask_step"]
