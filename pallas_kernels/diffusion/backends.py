"""Which kernel a call runs, and the padding rules the backends need."""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

BACKENDS = ("gpu", "tpu", "xla")


def default_backend() -> str:
  """"gpu" (Pallas Triton) or "tpu" (Pallas Mosaic) on those platforms, else "xla" (the
  pure-jnp reference)."""
  b = jax.default_backend()
  return b if b in ("gpu", "tpu") else "xla"


def resolve(backend: str | None, interpret: Any = False) -> str:
  """`backend`, or the platform's default when None; unknown names are errors, and so is
  `interpret` without a kernel to interpret (the "xla" backend is the jnp reference)."""
  chosen = default_backend() if backend is None else backend
  if chosen not in BACKENDS:
    raise ValueError(f"backend {chosen!r} is not one of {BACKENDS}")
  if chosen == "xla" and interpret is not None and interpret is not False:
    raise ValueError(f"interpret={interpret!r} runs a Pallas kernel in interpret mode, but "
                     f"backend {backend!r} runs the jnp reference"
                     f"{' on this platform' if backend is None else ''}; pass backend='gpu' "
                     "or 'tpu' to interpret that kernel")
  return chosen


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
