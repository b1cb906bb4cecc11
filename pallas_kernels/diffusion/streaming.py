"""Streaming an operand through a kernel one visited block at a time, on GPU and TPU.

A kernel that loops over blocks of a long operand (keys of a row, query tiles, slots of
a KV cache) reads them through `block_loop`. On TPU the operand is left in HBM
(`streamed_spec`: `memory_space=ANY`) and each visited block is DMA'd into one of two
VMEM slots while the previous block is computed (`stream_scratch`), so VMEM holds a few
blocks however long the operand; on GPU the kernel gets the operand's row as a block and
Triton loads each visited block from global memory. The blocks to visit are data: the
kernels read them from scalar tables (`call_with_scalars`: scalar prefetch into SMEM on
TPU, a plain global-memory input on GPU, where Triton has no scalar prefetch).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def kv_group(head, heads_per_group: int):
  """kv head of a query head (truncating division: floor division lowers to `sign`, which
  Mosaic resolves against the local TPU generation and so cannot cross-lower)."""
  return lax.div(head, heads_per_group) if heads_per_group > 1 else head


def streamed_spec(backend: str, row_block: tuple, index_map: Callable) -> pl.BlockSpec:
  """The BlockSpec of a streamed operand: on TPU the whole array, left in HBM; on GPU the
  block `row_block` at `index_map` (the row the kernel streams from)."""
  if backend == "tpu":
    return pl.BlockSpec(memory_space=pl.ANY)
  return pl.BlockSpec(row_block, index_map)


def row(ref, backend: str, *index):
  """The row at `index` (leading indices, e.g. batch and head) of a streamed operand: on
  TPU the kernel holds the whole array, on GPU the row's block already."""
  return ref.at[index] if backend == "tpu" else ref


def stream_scratch(blocks: Sequence[tuple]) -> list:
  """TPU scratch of `block_loop` for streams of blocks `(shape, dtype)`: two VMEM slots
  per stream and a DMA semaphore per slot (last)."""
  return ([pltpu.VMEM((2, *shape), dtype) for shape, dtype in blocks]
          + [pltpu.SemaphoreType.DMA((len(blocks), 2))])


def block_loop(n, block_of: Callable, sources: Sequence[Callable], scratch: Sequence[Any],
               body: Callable, carry):
  """carry = body(t, views, carry) for t in [0, n), where views[c] is a ref view of block
  `block_of(t)` of stream c (`sources[c](idx)` is that block in the source); body loads
  what it reads, so a block it skips (under a `lax.cond`) is never loaded into registers.

  `scratch`: the kernel's scratch refs, `stream_scratch`'s on TPU (the views are the
  VMEM slots the blocks are DMA'd into, step t + 1's copies running under step t's
  compute), empty on GPU (the views are the sources: Triton loads from global memory)."""
  if not scratch:
    step = lambda t, c: body(t, [src(block_of(t)) for src in sources], c)
    return lax.fori_loop(0, n, step, carry)
  buffers, sems = scratch[:-1], scratch[-1]

  def copies(t, slot):
    idx = block_of(t)
    return [pltpu.make_async_copy(src(idx), buf.at[slot], sems.at[c, slot])
            for c, (src, buf) in enumerate(zip(sources, buffers))]

  @pl.when(n > 0)
  def _():
    for copy in copies(0, 0):
      copy.start()

  def step(t, carry):
    slot = lax.rem(t, 2)

    @pl.when(t + 1 < n)
    def _():
      for copy in copies(t + 1, 1 - slot):
        copy.start()

    for copy in copies(t, slot):
      copy.wait()
    return body(t, [buf.at[slot] for buf in buffers], carry)

  return lax.fori_loop(0, n, step, carry)


def call_with_scalars(kernel, backend: str, *, n_scalars: int, grid: tuple, in_specs: list,
                      out_specs, out_shape, compiler_params, interpret, name: str,
                      scratch_shapes: Sequence[Any] = ()):
  """pallas_call whose first `n_scalars` inputs are int32 scalar tables: scalar prefetch
  (SMEM) on TPU, plain global-memory inputs on GPU. `scratch_shapes`: TPU only."""
  if backend == "tpu":
    spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=n_scalars, grid=grid,
                                        in_specs=in_specs, out_specs=out_specs,
                                        scratch_shapes=scratch_shapes)
    return pl.pallas_call(kernel, grid_spec=spec, out_shape=out_shape,
                          compiler_params=compiler_params, interpret=interpret, name=name)
  return pl.pallas_call(kernel, grid=grid, in_specs=[pl.no_block_spec] * n_scalars + in_specs,
                        out_specs=out_specs, out_shape=out_shape,
                        compiler_params=compiler_params, interpret=interpret, name=name)

