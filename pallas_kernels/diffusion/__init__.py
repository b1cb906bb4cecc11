"""Kernels for block-diffusion (BLT-D) training and decoding: reference, Pallas GPU/TPU.

Public API:
  range_attention(q, k, v, ranges, *, backend=None, interpret=False, **tiles)
      attention where query row q sees keys [a0, a1) U [b0, b1); custom VJP
  range_attention_reference(q, k, v, ranges)   pure jnp ground truth
  tile_bounds, occupancy                        the key blocks each query tile visits
  unmask_step(logits, block, still_masked, threshold, *, rule, tokens=None, backend=None)
      one BLT-D decoder step's unmasking (confidence or entropy-bounded rule), fused
  unmask_reference(...)                         its pure jnp ground truth
  cached_attention(q, q_positions, q_valid, cache_k, cache_v, cache_positions,
                   new_k=None, new_v=None, new_positions=None, *, window, block_start)
      a decoding step's attention over a KV cache (+ its new keys), one kernel per layer
  cached_attention_reference(...)               its pure jnp ground truth
  kernel_cache_size(size)                       a cache size it takes (size rounded up)

See README.md in this directory.
"""

from ..platform import BACKENDS, default_backend
from .decode_attention import CACHE_MULTIPLE, cached_attention, kernel_cache_size
from .ops import range_attention
from .reference import (RULES, cached_attention_reference, range_attention_reference,
                        ranges_mask, unmask_reference)
from .tiles import occupancy, tile_bounds
from .unmask import unmask_step

__all__ = ["BACKENDS", "CACHE_MULTIPLE", "RULES", "cached_attention",
           "cached_attention_reference", "default_backend", "kernel_cache_size", "occupancy",
           "range_attention", "range_attention_reference", "ranges_mask", "tile_bounds",
           "unmask_reference", "unmask_step"]
