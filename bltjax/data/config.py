"""The `data` section of an experiment config."""

from __future__ import annotations

import ml_collections

from bltjax.data.sources import FORMATS, DataError


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults for `config.data`. Shapes and seed come from `config.train`/`config.model`."""
  config = ml_collections.ConfigDict()
  # Training data: comma-separated files, directories (every file under it, sorted) and
  # globs. "" = the default corpus (the Python standard library's text files).
  config.train = ""
  # Validation data, same syntax. "" = the default corpus' validation split when
  # data.train is "", else a held-out valid_fraction of data.train's documents (which
  # training then skips).
  config.valid = ""
  # "auto" (by extension: .jsonl/.json -> jsonl, .arrayrecord/.array_record ->
  # arrayrecord, else text), "text" (a file is a document), "jsonl", "arrayrecord".
  config.format = "auto"
  # JSONL field that holds each document's text.
  config.text_field = "text"
  # Fraction of documents held out for validation when data.valid is "" (by a hash of
  # the default corpus' relative path, or of the document's index in data.train).
  config.valid_fraction = 0.02
  # Batches read ahead by background threads (0 = read on demand).
  config.prefetch = 4
  # Threads that read batches ahead (Python-bound: more than 1 rarely helps).
  config.read_threads = 1
  return config


def check_data_config(config) -> None:
  """Raises DataError on a value no data pipeline can use."""
  if config.format not in FORMATS:
    raise DataError(f"config.data.format={config.format!r} is not one of {list(FORMATS)}")
  if not 0.0 <= config.valid_fraction < 1.0:
    raise DataError(f"config.data.valid_fraction={config.valid_fraction} must be in [0, 1)")
  if config.prefetch < 0 or config.read_threads < 0:
    raise DataError("config.data.prefetch and config.data.read_threads must be >= 0")
