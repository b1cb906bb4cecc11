"""The model's activation-sparse ReLU FFN (`ffn.impl = "pallas"`), sharded over a mesh.

`relu_ffn(x, w_up, w_down, options)` runs `relu(x @ w_up) @ w_down` through
`pallas_kernels.sparse_ffn.sparse_relu_ffn(..., return_stats=True)` and returns the
output with the per-position statistics the model logs and penalises (L1 of the hidden
activation and its number of nonzeros), so the model never recomputes `relu(x @ w_up)`.
Which kernel runs (Triton on GPU, Mosaic on TPU, the XLA reference elsewhere) is the
kernel package's choice unless `options.backend` names one.

The kernels are custom calls XLA cannot partition. Under a mesh of more than one device
(`jax.set_mesh`, as `bltjax.sharding.use_mesh` does for the trainer) the call runs inside
`jax.shard_map` (`kernel_sharding`):
- positions split like the activations (logical axes `batch`, `length`), d_model whole;
- hidden units split like the weights' `mlp` axis (tensor parallelism: ReLU acts per
  unit, so each shard runs the kernel on its slice of units and the partial outputs (in
  the compute dtype) and statistics are summed over those mesh axes); the weights'
  `embed` axis is gathered.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

from bltjax.model.kernel_sharding import mesh_axes, spec_entry, split


@dataclasses.dataclass(frozen=True)
class KernelOptions:
  """What `pallas_kernels.sparse_ffn.sparse_relu_ffn` is called with (see its docstring)."""
  backend: str | None = None        # None: the kernel package picks (gpu | tpu | xla)
  interpret: bool = False           # Pallas interpret mode (CPU tests of the kernels)
  dense_threshold: float | None = 0.5   # None: always the sparse kernels


def _kernel_call(x, w_up, w_down, options: KernelOptions):
  """Unsharded: x [..., d] -> (out [..., d], l1 [...], nonzeros [...], occupancy [])."""
  from pallas_kernels import sparse_ffn  # pylint: disable=g-import-not-at-top
  lead, d = x.shape[:-1], x.shape[-1]
  out, st = sparse_ffn.sparse_relu_ffn(
      x.reshape(-1, d), w_up, w_down, backend=options.backend, interpret=options.interpret,
      return_stats=True, dense_threshold=options.dense_threshold)
  return (out.reshape(*lead, w_down.shape[1]), st.l1.reshape(lead),
          st.nonzeros.reshape(lead), st.occupancy)


def relu_ffn(x, w_up, w_down, options: KernelOptions = KernelOptions()) -> tuple[Any, ...]:
  """x [batch, len, d_model] (compute dtype), w_up [d_model, d_ff], w_down [d_ff, d_model].

  Returns (out [batch, len, d_model], l1 [batch, len] float32 (sum over the hidden units
  of |h|, differentiable), nonzeros [batch, len] float32 (no gradient), occupancy []
  (fraction of the down-projection work the kernel did; 1.0 on the dense paths)).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or x.ndim != 3:
    return _kernel_call(x, w_up, w_down, options)

  b, length, _ = x.shape
  batch = split(b, mesh_axes("batch"), mesh)
  seq = split(length, tuple(a for a in mesh_axes("length") if a not in batch), mesh)
  hidden = split(w_up.shape[1], tuple(a for a in mesh_axes("mlp") if a not in batch + seq),
                  mesh)
  tokens_spec = (spec_entry(batch), spec_entry(seq))
  everything = tuple(mesh.axis_names)

  def local(x, w_up, w_down):
    out, l1, nnz, occ = _kernel_call(x, w_up, w_down, options)
    if hidden:
      out = lax.psum(out, hidden)
      l1 = lax.psum(l1, hidden)
      nnz = lax.psum(nnz, hidden)
    return out, l1, nnz, lax.pmean(occ, everything)

  # check_vma=False: pallas_call outputs carry no varying-manual-axes annotation (jax asks
  # for one per output under check_vma=True); the gradients are checked against one device
  # in tests/test_sparse_ffn_model.py.
  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(P(*tokens_spec, None), P(None, spec_entry(hidden)),
                P(spec_entry(hidden), None)),
      out_specs=(P(*tokens_spec, None), P(*tokens_spec), P(*tokens_spec), P()),
      check_vma=False)(x, w_up, w_down)
