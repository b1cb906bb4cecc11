"""JAX's persistent compilation cache for the `bltjax` commands.

Compiling is much of a short run's time: on an H200 a 185M BLT's train step takes ~11 s
and each generation method's program 13-26 s (bench/RESULTS.md). With the cache on, a
command run again with the same model and shapes (a resumed job, another `bltjax
generate`) reads the compiled programs from disk instead.

`BLTJAX_COMPILE_CACHE` picks the directory (default `~/.cache/bltjax/xla`, under
`$XDG_CACHE_HOME` when set); `off` leaves the cache off. JAX's own
`JAX_COMPILATION_CACHE_DIR`, when set, wins. Python API users turn it on with `enable()`
or `jax.config.update("jax_compilation_cache_dir", path)`.
"""

from __future__ import annotations

import os

import jax

ENV = "BLTJAX_COMPILE_CACHE"


def default_dir() -> str:
  """`$XDG_CACHE_HOME/bltjax/xla`, or `~/.cache/bltjax/xla`."""
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                ".cache")
  return os.path.join(cache_home, "bltjax", "xla")


def enable(path: str | None = None) -> str | None:
  """Turns the persistent compilation cache on, before the first compile.

  Args:
    path: the cache directory; None: `$BLTJAX_COMPILE_CACHE`, else `default_dir()`.
      `off` (or an empty string) leaves the cache off.

  Returns:
    The directory in use, or None when the cache stays off.
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]   # JAX reads it itself
  if path is None:
    path = os.environ.get(ENV, default_dir())
  if not path or path.lower() == "off":
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  return path
