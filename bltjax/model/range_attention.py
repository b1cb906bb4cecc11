"""Training attention through the range-attention kernel (`model.attention.impl =
"pallas"`), sharded over a mesh.

`RangeSpec` is an attention spec (called as `spec(q, k, v)`, like `attention.CausalSpec`)
where query row q sees the keys `[a0, a1) U [b0, b1)`
(`pallas_kernels.diffusion.range_attention`: flash attention over exactly those key
blocks): a causal (windowed) row (`attention.causal_ranges`, what `CausalSpec` computes
with chunked frames or a dense mask), or BLT-D's `[clean ; noisy blocks]`
(`bltjax.diffusion.bltd_attention_ranges`, what `attention.CleanNoisySpec` computes).
`causal_spec` picks the spec a stack's config asks for. Which kernel runs (Triton on
GPU, Mosaic on TPU, the dense reference elsewhere) is the kernel package's choice unless
`backend` names one.

Under a mesh the kernel runs inside `jax.shard_map` (`kernel_sharding`): rows split like
the activations' `batch` axis, heads like `heads` when both the query and the kv heads
divide it; positions whole (a row's ranges reach across it).
"""

from __future__ import annotations

import flax.struct
import jax
from jax.sharding import PartitionSpec as P

from bltjax.model import attention
from bltjax.model.kernel_sharding import mesh_axes, spec_entry, split


def _kernel_call(q, k, v, ranges, backend, interpret):
  from pallas_kernels import diffusion  # pylint: disable=g-import-not-at-top
  return diffusion.range_attention(q, k, v, ranges, backend=backend, interpret=interpret)


@flax.struct.dataclass
class RangeSpec:
  """Attention where row q sees keys `[a0, a1) U [b0, b1)` (each `[batch, len]` int32)."""
  a0: jax.Array
  a1: jax.Array
  b0: jax.Array
  b1: jax.Array
  backend: str | None = flax.struct.field(pytree_node=False, default=None)
  interpret: bool = flax.struct.field(pytree_node=False, default=False)

  def __call__(self, q, k, v):
    """q `[B, T, H, D]`, k/v `[B, T, G, D]` -> `[B, T, H, D]`."""
    ranges = (self.a0, self.a1, self.b0, self.b1)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
      return _kernel_call(q, k, v, ranges, self.backend, self.interpret)
    batch = split(q.shape[0], mesh_axes("batch"), mesh)
    heads = split((q.shape[2], k.shape[2]),
                  tuple(a for a in mesh_axes("heads") if a not in batch), mesh)
    heads_spec = P(spec_entry(batch), None, spec_entry(heads), None)
    rows_spec = P(spec_entry(batch), None)
    local = lambda q, k, v, *r: _kernel_call(q, k, v, r, self.backend, self.interpret)
    # check_vma=False: pallas_call outputs carry no varying-manual-axes annotation.
    return jax.shard_map(local, mesh=mesh, in_specs=(heads_spec,) * 3 + (rows_spec,) * 4,
                         out_specs=heads_spec, check_vma=False)(q, k, v, *ranges)


def kernel_spec(config, ranges) -> RangeSpec:
  """A `RangeSpec` over `ranges` (a0, a1, b0, b1) with a stack config's kernel options."""
  return RangeSpec(*ranges, backend=config.attention_backend or None,
                   interpret=config.attention_interpret)


def causal_spec(config, positions, segment_ids, *, window: int):
  """How a stack (`layers.TransformerConfig`) attends over whole rows in training and
  scoring: causal within segments, windowed when `window > 0`. positions, segment_ids
  `[batch, len]` (positions 0, 1, ... along each row)."""
  if config.attention_impl == "pallas":
    return kernel_spec(config, attention.causal_ranges(segment_ids, window=window))
  return attention.CausalSpec(positions, segment_ids, window=window)
