"""The default corpus: the text and source files of the Python standard library.

Used when `data.train` is "". About 30 MB of real, varied bytes (Python, C, reST, HTML,
JSON, ...) that every machine with Python already has. Files are sorted by their path
relative to the stdlib root; a file is in the validation split when a hash of that
relative path falls below `valid_fraction`, so the split is the same on every run and
every machine with the same Python version. site-packages, `__pycache__`, hidden names
and empty files are skipped.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig

SUFFIXES = (".py", ".pyi", ".txt", ".rst", ".c", ".h", ".html", ".htm", ".css", ".js",
            ".json", ".toml", ".cfg", ".ini", ".md", ".xml", ".csv")
_SKIPPED_DIRS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


@functools.lru_cache(maxsize=4)
def stdlib_files(root: str | None = None) -> tuple[str, ...]:
  """Relative paths (POSIX separators, sorted) of the corpus files under `root`."""
  root = root or stdlib_root()
  found = []
  for directory, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith(".")]
    for name in names:
      if name.startswith(".") or not name.lower().endswith(SUFFIXES):
        continue
      path = os.path.join(directory, name)
      if os.path.isfile(path) and os.path.getsize(path) > 0:
        found.append(os.path.relpath(path, root).replace(os.sep, "/"))
  return tuple(sorted(found))


def path_fraction(relative_path: str) -> float:
  """A stable pseudo-random number in [0, 1) from a relative path."""
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "little") / 2.0**64


def default_corpus_files(split: str, valid_fraction: float, root: str | None = None
                         ) -> list[str]:
  """Absolute paths of the default corpus' `split` ("train" or "valid"), sorted."""
  if split not in ("train", "valid"):
    raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
  root = root or stdlib_root()
  want_valid = split == "valid"
  return [os.path.join(root, rel) for rel in stdlib_files(root)
          if (path_fraction(rel) < valid_fraction) == want_valid]
