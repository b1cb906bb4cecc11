"""Which implementation a kernel call runs, for every kernel package: "gpu" (Pallas
Triton), "tpu" (Pallas Mosaic) or "xla" (the package's pure-jnp reference)."""

from __future__ import annotations

from typing import Any

import jax

BACKENDS = ("gpu", "tpu", "xla")


def default_backend() -> str:
  """"gpu" or "tpu" on those platforms, else "xla" (the pure-jnp reference)."""
  b = jax.default_backend()
  return b if b in ("gpu", "tpu") else "xla"


def resolve(backend: str | None, interpret: Any = False) -> str:
  """`backend`, or the platform's default when None; unknown names are errors, and so is
  `interpret` without a kernel to interpret (the "xla" backend is the jnp reference)."""
  chosen = default_backend() if backend is None else backend
  if chosen not in BACKENDS:
    raise ValueError(f"backend {chosen!r} is not one of {BACKENDS} or None")
  if chosen == "xla" and interpret is not None and interpret is not False:
    raise ValueError(f"interpret={interpret!r} runs a Pallas kernel in interpret mode, but "
                     f"backend {backend!r} runs the jnp reference"
                     f"{' on this platform' if backend is None else ''}; pass backend='gpu' "
                     "or 'tpu' to interpret that kernel")
  return chosen
