"""Data: document sources, the default corpus, packing and grain pipelines.

Training reads `train_dataset(...)` (element s = this process's batch of step s) through
`train_iterator(...)`; evaluation reads `eval_batches(...)`. See pipeline.py for the
batch format and splits.py for which documents each split reads.
"""

from bltjax.data.config import check_data_config, default_data_config
from bltjax.data.corpus import default_corpus_files
from bltjax.data.packing import BATCH_KEYS, PackedRows
from bltjax.data.pipeline import (EvalBatches, eval_batches, mixture_rows, train_dataset,
                                  train_iterator)
from bltjax.data.sources import (
    DataError, DocumentSource, InMemoryDocuments, open_source, write_arrayrecord)
from bltjax.data.splits import as_one_source, check_disjoint, split_source, split_sources

__all__ = [
    "BATCH_KEYS", "DataError", "DocumentSource", "EvalBatches", "InMemoryDocuments", "PackedRows",
    "as_one_source", "check_data_config", "check_disjoint", "default_corpus_files",
    "default_data_config", "eval_batches", "mixture_rows", "open_source", "split_source",
    "split_sources", "train_dataset", "train_iterator", "write_arrayrecord",
]
