"""Device mesh, logical-axis rules and shardings.

Parameters and activations carry logical axis names; `RULES` maps them onto the mesh
axes `("data", "fsdp", "tensor")`. Changing how a model is laid out means editing this
table, never model code.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis   -> mesh axes
RULES = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", None),
    ("hash_vocab", None),
    ("layers", None),          # the stacked axis of scanned blocks
)


class ShardingError(ValueError):
  """A mesh or batch that does not fit the devices or the model. Names the fix."""


def mesh_shape(mesh_cfg: Mapping[str, int], n_devices: int) -> tuple[int, int, int]:
  """Sizes of (data, fsdp, tensor); one of them may be -1 (filled with what is left)."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ShardingError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ShardingError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: sizes must be >= 1 or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % known:
      raise ShardingError(
          f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide {n_devices} devices; "
          "make the product of the fixed axes divide the device count")
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ShardingError(
        f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
        f"{n_devices} are present; set one axis to -1 or change the sizes")
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices=None) -> Mesh:
  """A mesh over all (or the given) devices with Auto axes (linen needs Auto)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
  """Sets the mesh and the logical rules for model code traced inside."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield


def logical_to_sharding(logical_spec: PartitionSpec, mesh: Mesh) -> NamedSharding:
  return nn.logical_to_mesh_sharding(logical_spec, mesh, RULES)


def param_shardings(boxed_params: Any, mesh: Mesh) -> Any:
  """Shardings of a tree of (abstract) params boxed with logical names.

  Raises ShardingError when a dimension does not divide its mesh axes.
  """
  logical = nn.get_partition_spec(boxed_params)
  shardings = nn.logical_to_mesh_sharding(logical, mesh, RULES)
  unboxed = nn.meta.unbox(boxed_params)
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(unboxed),
                                    jax.tree_util.tree_leaves(
                                        shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
    check_divisible(jax.tree_util.keystr(path), leaf.shape, sharding)
  return shardings


def check_divisible(name: str, shape, sharding: NamedSharding) -> None:
  for dim, axes in zip(shape, sharding.spec):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    size = math.prod(sharding.mesh.shape[a] for a in axes)
    if dim % size:
      raise ShardingError(
          f"{name} has a dimension of {dim} that does not divide mesh axes {axes} of size "
          f"{size}; change config.mesh or the model width")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split over (data, fsdp) and replicated over tensor."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_shard_processes(devices: np.ndarray) -> dict[int, set[int]]:
  """For a mesh's `[data, fsdp, tensor]` device array: batch shard -> the processes
  whose devices hold it."""
  owners = {}
  for (d, f, _), device in np.ndenumerate(devices):
    owners.setdefault(d * devices.shape[1] + f, set()).add(device.process_index)
  return owners


def check_batch(global_batch: int, mesh: Mesh, microbatches: int = 1) -> None:
  """The global batch must split evenly over the batch shards and the processes, and
  each of its `microbatches` over the batch shards; each batch shard must sit on the
  devices of one process (each process loads the rows of its own shards)."""
  shards = batch_shards(mesh)
  shared = {s: p for s, p in batch_shard_processes(mesh.devices).items() if len(p) > 1}
  if shared:
    shard, procs = min(shared.items())
    sizes = " x ".join(str(mesh.shape[a]) for a in MESH_AXES)
    processes = len({d.process_index for d in mesh.devices.flat})
    raise ShardingError(
        f"config.mesh (data x fsdp x tensor = {sizes}) puts batch shard {shard} on the "
        f"devices of processes {sorted(procs)}, but each process loads rows of its own: "
        f"make mesh.data x mesh.fsdp a multiple of the {processes} processes (mesh.tensor "
        "at most the devices of one process)")
  if global_batch % shards:
    raise ShardingError(
        f"train.batch_size={global_batch} does not divide over {shards} batch shards "
        f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); use a multiple "
        f"of {shards}")
  if microbatches < 1 or global_batch % (microbatches * shards):
    raise ShardingError(
        f"train.grad_accum_steps={microbatches} does not split train.batch_size="
        f"{global_batch} into microbatches that divide over {shards} batch shards; use a "
        f"divisor of {global_batch // shards} (batch_size / (data x fsdp))")
  if global_batch % jax.process_count():
    raise ShardingError(
        f"train.batch_size={global_batch} does not divide over {jax.process_count()} "
        "processes; use a multiple of the process count")


def split_microbatches(batch, microbatches: int, mesh: Mesh):
  """`[batch, ...]` arrays -> `[microbatches, batch / microbatches, ...]`, microbatch j
  holding rows j, j + microbatches, ...: every batch shard keeps its own rows, so each
  microbatch is split over all the batch shards (call under jit)."""
  def split(x):
    rows = x.shape[0] // microbatches
    x = x.reshape((rows, microbatches) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"))))
  return jax.tree.map(split, batch)


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local numpy rows -> global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
