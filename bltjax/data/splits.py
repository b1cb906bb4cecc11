"""Which documents each split reads.

- `data.train` = "": train and valid are the default corpus' splits (by a hash of each
  file's relative path, see corpus.py); `data.valid`, if set, replaces its valid split.
- `data.train` set, `data.valid` set: each split reads its own data.
- `data.train` set, `data.valid` = "": the valid split is a held-out `valid_fraction`
  of data.train's documents, picked by a hash of the document's index in data.train
  (stable while the list of documents is unchanged); training skips them. At least one
  document is held out (and one kept) when data.train has two or more documents. A
  mixture (sources separated by ";") holds out that fraction of each source.
"""

from __future__ import annotations

import os

import numpy as np

from bltjax.data import corpus
from bltjax.data.config import check_data_config, train_specs
from bltjax.data.sources import (Concatenated, DataError, DocumentSource, Subset, TextFiles,
                                 expand_paths, open_source)

SPLITS = ("train", "valid")


def index_fraction(indices: np.ndarray) -> np.ndarray:
  """A stable pseudo-random number in [0, 1) per index (splitmix64), `[n]` float64."""
  x = np.asarray(indices, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  x = x ^ (x >> np.uint64(31))
  return (x >> np.uint64(11)).astype(np.float64) / 2.0**53


def held_out_mask(num_docs: int, valid_fraction: float) -> np.ndarray:
  """`[num_docs]` bool, True for the documents held out for validation."""
  fraction = index_fraction(np.arange(num_docs))
  mask = fraction < valid_fraction
  if valid_fraction > 0 and num_docs >= 2:
    if not mask.any():
      mask[np.argmin(fraction)] = True
    if mask.all():
      mask[np.argmax(fraction)] = False
  return mask


def check_disjoint(data_cfg) -> None:
  """Raises DataError when a file is named by two sources of a data.train mixture, or by
  data.train and data.valid: its documents would be trained on twice, or validated on
  after training on them. What training checks (evaluating a trained model on its
  training files, or where they are gone, is fine)."""
  named = [(f"source {i} of data.train", spec) for i, spec in enumerate(train_specs(data_cfg))]
  if named and data_cfg.valid:
    named.append(("data.valid", data_cfg.valid))
  if len(named) < 2:
    return
  owner = {}
  for name, spec in named:
    for path in expand_paths(spec):
      first = owner.setdefault(os.path.realpath(path), name)
      if first != name:
        raise DataError(
            f"{path} is in {first} and in {name}; name each file in one of them (narrow a "
            "glob or directory, or move the file)")


def split_sources(data_cfg, split: str) -> list[DocumentSource]:
  """The documents of `split` ("train" or "valid") under the rules above, one source per
  ";"-separated source of a `data.train` mixture (each holds out its own fraction: the
  valid split has one per source too, unless `data.valid` replaces it), or one source.

  Raises:
    DataError: bad paths or files, or a valid split with no documents.
  """
  if split not in SPLITS:
    raise DataError(f"split must be one of {list(SPLITS)}, got {split!r}")
  check_data_config(data_cfg)
  read = lambda spec: open_source(spec, format=data_cfg.format,
                                  text_field=data_cfg.text_field)
  if split == "valid" and data_cfg.valid:
    return [read(data_cfg.valid)]
  if not data_cfg.train:
    files = corpus.default_corpus_files(split, data_cfg.valid_fraction)
    if not files:
      raise DataError(
          f"the default corpus has no {split} files (config.data.valid_fraction="
          f"{data_cfg.valid_fraction}); set config.data.valid_fraction in (0, 1) or "
          "config.data.train/valid")
    return [TextFiles(files)]
  specs = train_specs(data_cfg)
  sources = [read(spec) for spec in specs]
  if data_cfg.valid:
    return sources
  parts = []
  for spec, source in zip(specs, sources):
    held_out = held_out_mask(len(source), data_cfg.valid_fraction)
    if split == "train":
      parts.append(Subset(source, np.flatnonzero(~held_out)) if held_out.any() else source)
    elif held_out.any():
      parts.append(Subset(source, np.flatnonzero(held_out)))
    elif len(sources) > 1:   # a mixture's validation covers every source
      raise DataError(
          f"mixture source {spec!r} of data.train ({len(source)} document(s)) holds out "
          f"no validation documents at valid_fraction={data_cfg.valid_fraction}; give it "
          "two or more documents, or set config.data.valid")
  if not parts:
    raise DataError(
        f"no validation documents: data.valid is empty and holding out "
        f"valid_fraction={data_cfg.valid_fraction} of data.train's "
        f"{sum(len(s) for s in sources)} document(s) leaves none; set config.data.valid "
        "or config.data.valid_fraction")
  return parts


def as_one_source(parts: list[DocumentSource]) -> DocumentSource:
  """`split_sources`' parts as one source (a mixture's sources concatenated)."""
  return parts[0] if len(parts) == 1 else Concatenated(parts)


def split_source(data_cfg, split: str) -> DocumentSource:
  """The documents of `split` as one source (a mixture's sources concatenated)."""
  return as_one_source(split_sources(data_cfg, split))
