"""The `data` section of an experiment config."""

from __future__ import annotations

import ml_collections

from bltjax.data.sources import FORMATS, DataError


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults for `config.data`. Shapes and seed come from `config.train`/`config.model`."""
  config = ml_collections.ConfigDict()
  # Training data: comma-separated files, directories (every file under it, sorted) and
  # globs. "" = the default corpus (the Python standard library's text files). A mixture:
  # sources separated by ";" ("web/*.jsonl; code/"), each weighted by train_weights.
  config.train = ""
  # A mixture's weights, comma-separated, one per source of data.train ("0.7,0.3"): each
  # global batch takes round(batch_size * weight / sum) rows from each source.
  config.train_weights = ""
  # Validation data: files, directories and globs as data.train, one source (no ";"
  # mixture). "" = the default corpus' validation split when
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
  if ";" in config.valid:
    raise DataError(
        f"config.data.valid={config.valid!r} holds a ';': validation data is one source "
        "(comma-separated files, directories and globs); a data.train mixture with an empty "
        "data.valid holds out validation documents of each of its sources")
  mixture_weights(config)


def train_specs(config) -> list[str]:
  """The sources of `data.train` (one spec per ";"-separated part); [] = default corpus."""
  return [spec.strip() for spec in config.train.split(";") if spec.strip()]


def mixture_weights(config) -> list[float]:
  """One positive weight per source of `data.train` (normalised to sum to 1).

  Raises:
    DataError: a mixture without weights, a weight count that differs from the source
      count, or a weight that is not a positive number.
  """
  specs = train_specs(config)
  parts = [w.strip() for w in config.train_weights.split(",") if w.strip()]
  if not parts:
    if len(specs) > 1:
      raise DataError(
          f"config.data.train has {len(specs)} sources separated by ';'; set "
          f"config.data.train_weights to one weight per source, e.g. "
          f"'{','.join(['1'] * len(specs))}'")
    return [1.0]
  if len(parts) != max(len(specs), 1):
    raise DataError(
        f"config.data.train_weights={config.train_weights!r} has {len(parts)} weights for "
        f"{len(specs)} source(s) of config.data.train; give one per ';'-separated source")
  try:
    weights = [float(w) for w in parts]
  except ValueError:
    raise DataError(f"config.data.train_weights={config.train_weights!r} must be "
                    "comma-separated numbers") from None
  if not all(w > 0 for w in weights):
    raise DataError(f"config.data.train_weights={config.train_weights!r}: every weight must "
                    "be > 0 (drop a source from data.train instead)")
  return [w / sum(weights) for w in weights]


def rows_per_source(global_batch: int, weights: list[float]) -> list[int]:
  """Rows of each source in a global batch: largest remainders of batch * weight.

  Raises:
    DataError: a source that would get no row.
  """
  exact = [global_batch * w for w in weights]
  rows = [int(x) for x in exact]
  by_remainder = sorted(range(len(weights)), key=lambda i: rows[i] - exact[i])
  for i in by_remainder[:global_batch - sum(rows)]:
    rows[i] += 1
  if min(rows) == 0:
    raise DataError(
        f"a mixture source of weight {weights[rows.index(0)]:.3g} gets no row of a "
        f"{global_batch}-row batch; raise config.train.batch_size or its weight")
  return rows
