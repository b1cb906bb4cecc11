"""Concat-then-split packing of documents into fixed-length rows, with random access.

Each document becomes `[BOS] + (bytes + 4) + [EOS]`; the documents, in source order,
form one token stream of `stream_len` tokens. Row i is `stream[i*L : i*L + L + 1]`
(PAD past the end), `inputs = row[:-1]` and `targets = row[1:]`, so consecutive rows
overlap by one token and every stream token but the first is a target exactly once per
epoch (every document byte is an input exactly once and a target exactly once).
`segment_ids[t]` is the 1-based index, within the row, of the document that input t
belongs to, and 0 past the end of the stream: attention must stay within equal
segment ids. Targets cross document boundaries (EOS -> next BOS) like the stream does.

The loss mask is `targets != PAD_ID`. It differs from `segment_ids > 0` at one position
per epoch: the stream's final EOS can be an input of the last row with target PAD.

Only document offsets are held in memory (`[num_docs + 1]` int64); a row reads the byte
ranges it needs from the source.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bltjax import bytes as vocab
from bltjax.data.sources import DocumentSource

PADDING_ROW = -1  # A row index for an all-padding row (eval batches use it to fill up).
BATCH_KEYS = ("inputs", "targets", "segment_ids")  # every batch dict, each [rows, L] int32


class PackedRows:
  """Rows of `seq_len` tokens cut from the concatenated documents of a source.

  Attributes:
    source: the documents.
    seq_len: L, tokens per row.
    doc_starts: `[num_docs + 1]` int64, stream offset of each document's BOS (and the
      stream length last).
    stream_len: tokens in the stream, `sum(lengths) + 2 * num_docs`.
    num_rows: rows per epoch, `ceil((stream_len - 1) / L)`.
  """

  def __init__(self, source: DocumentSource, seq_len: int):
    if seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    self.source = source
    self.seq_len = seq_len
    self.doc_starts = np.concatenate([[0], np.cumsum(source.lengths + 2)]).astype(np.int64)
    self.stream_len = int(self.doc_starts[-1])
    self.num_rows = -(-(self.stream_len - 1) // seq_len) if self.stream_len > 1 else 0

  def __len__(self) -> int:
    return self.num_rows

  def tokens(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Stream tokens `[start, stop)` and their 1-based document index within the range.

    Returns:
      (tokens `[stop - start]` int32, segments `[stop - start]` int32); positions past
      the stream end are PAD with segment 0.
    """
    tokens = np.zeros(stop - start, np.int32)
    segments = np.zeros(stop - start, np.int32)
    self._fill(start, tokens, segments)
    return tokens, segments

  def _fill(self, start: int, tokens: np.ndarray, segments: np.ndarray) -> None:
    """Writes stream tokens from `start` into zeroed `tokens`/`segments` (`[n]` int32)."""
    end = min(start + len(tokens), self.stream_len)
    position = start
    doc = int(np.searchsorted(self.doc_starts, start, side="right")) - 1
    segment = 1
    while position < end:
      doc_start, doc_stop = int(self.doc_starts[doc]), int(self.doc_starts[doc + 1])
      num_bytes = doc_stop - doc_start - 2
      # Local token positions within the document: 0 = BOS, 1..n = bytes, n + 1 = EOS.
      lo, hi = position - doc_start, min(end, doc_stop) - doc_start
      out = position - start
      segments[out:out + hi - lo] = segment
      if lo == 0:
        tokens[out] = vocab.BOS_ID
      first_byte, stop_byte = max(lo, 1) - 1, min(hi, num_bytes + 1) - 1
      if stop_byte > first_byte:
        data = np.frombuffer(self.source.read(doc, first_byte, stop_byte), np.uint8)
        at = out + first_byte + 1 - lo
        np.add(data, vocab.OFFSET, out=tokens[at:at + len(data)], dtype=np.int32)
      if hi == num_bytes + 2:
        tokens[out + hi - 1 - lo] = vocab.EOS_ID
      position = doc_start + hi
      doc += 1
      segment += 1

  def row(self, index: int) -> dict[str, np.ndarray]:
    """Row `index` (or PADDING_ROW): `inputs`, `targets`, `segment_ids`, each `[L]` int32."""
    return {key: value[0] for key, value in self.rows([index]).items()}

  def rows(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Rows stacked: `inputs`, `targets`, `segment_ids`, each `[len(indices), L]` int32.

    A PADDING_ROW index gives a row of zeros (PAD, segment 0).
    """
    length = self.seq_len
    tokens = np.zeros((len(indices), length + 1), np.int32)
    segments = np.zeros((len(indices), length + 1), np.int32)
    for k, index in enumerate(indices):
      index = int(index)
      if index == PADDING_ROW:
        continue
      if not 0 <= index < self.num_rows:
        raise IndexError(f"row {index} is out of range [0, {self.num_rows})")
      self._fill(index * length, tokens[k], segments[k])
    return {"inputs": np.ascontiguousarray(tokens[:, :-1]),
            "targets": np.ascontiguousarray(tokens[:, 1:]),
            "segment_ids": np.ascontiguousarray(segments[:, :-1])}
