"""Where a Pallas kernel's operands are split when it runs under a mesh.

Pallas kernels are custom calls XLA cannot partition: the model calls them inside
`jax.shard_map`, splitting each operand along the mesh axes its logical axis maps to
under the flax rules in effect (`bltjax.sharding.RULES` under `use_mesh`). Without rules
nothing is split; a dimension that does not divide its mesh axes is not split there
(computed redundantly on those devices).
"""

from __future__ import annotations

import math

import flax.linen as nn


def mesh_axes(logical: str | None) -> tuple[str, ...]:
  """Mesh axes a logical axis maps to under the current flax rules (() if none)."""
  if logical is None:
    return ()
  spec = nn.logical_to_mesh_axes((logical,))
  if spec is None or not len(spec) or spec[0] is None:
    return ()
  axes = spec[0]
  return (axes,) if isinstance(axes, str) else tuple(axes)


def split(dims, axes: tuple[str, ...], mesh) -> tuple[str, ...]:
  """`axes` (those in the mesh) if every dim in `dims` (an int or ints) divides their
  size, else () (not split)."""
  dims = (dims,) if isinstance(dims, int) else tuple(dims)
  axes = tuple(a for a in axes if a in mesh.axis_names)
  size = math.prod(mesh.shape[a] for a in axes)
  return axes if axes and all(d % size == 0 for d in dims) else ()


def spec_entry(axes: tuple[str, ...]):
  """A PartitionSpec entry for `axes`."""
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes
