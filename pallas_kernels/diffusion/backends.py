"""Which kernel a call runs, and the padding rules the backends need."""

from __future__ import annotations

from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from ..platform import resolve


def pow2_at_least(n: int, lo: int = 16) -> int:
  """The smallest power of 2 >= max(n, lo) (Triton's block shapes)."""
  p = lo
  while p < n:
    p *= 2
  return p


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def compiler_params(backend: str, grid_rank: int, *, num_warps: int = 4, num_stages: int = 1):
  """pallas_call compiler params: every grid axis parallel on TPU (Mosaic); warps and
  pipeline stages on GPU (Triton)."""
  if backend == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * grid_rank)
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


__all__ = ["compiler_params", "pow2_at_least", "resolve", "round_up"]
