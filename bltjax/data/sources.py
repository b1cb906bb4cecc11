"""Document sources: random access to documents as raw bytes.

A document source holds `lengths` (`[num_docs]` int64, bytes per document) and reads any
byte range of any document. Formats:

- text: each file is one document; read by seek, so large files never sit in RAM.
- jsonl: one document per non-blank line, its text in the field `text_field`; one parse
  pass at open time finds line offsets and lengths (cached per file size and mtime).
- arrayrecord: each record is one document's raw bytes (see `write_arrayrecord`).

`open_source(spec)` takes a comma-separated list of files, directories (every file under
it, sorted, hidden names skipped) and globs (`**` allowed); the same file named twice is
read once. `format="auto"` picks by extension: .jsonl/.json -> jsonl,
.arrayrecord/.array_record -> arrayrecord, anything else -> text.
"""

from __future__ import annotations

import abc
import functools
import glob
import json
import os
import threading
from typing import Sequence

import numpy as np

FORMATS = ("auto", "text", "jsonl", "arrayrecord")
_JSONL_SUFFIXES = (".jsonl", ".json")
_ARRAYRECORD_SUFFIXES = (".arrayrecord", ".array_record")
# Compressed, archive and columnar files: "auto" refuses them rather than train on their
# encoded bytes (a byte-level model would learn the compressor's output).
_ENCODED_SUFFIXES = (".gz", ".tgz", ".bz2", ".xz", ".zst", ".zstd", ".lz4", ".zip", ".tar",
                     ".7z", ".parquet", ".arrow")


class DataError(ValueError):
  """Bad data input. The one-line message names the problem and the fix."""


class DocumentSource(abc.ABC):
  """Documents with random access to byte ranges.

  Attributes:
    lengths: `[num_docs]` int64, the byte length of each document.
  """

  lengths: np.ndarray

  def __len__(self) -> int:
    return len(self.lengths)

  @abc.abstractmethod
  def read(self, index: int, start: int, stop: int) -> bytes:
    """Bytes `[start, stop)` of document `index` (0 <= start <= stop <= length)."""

  @abc.abstractmethod
  def name(self, index: int) -> str:
    """Where document `index` comes from, e.g. `path` or `path:line`."""

  def document(self, index: int) -> bytes:
    return self.read(index, 0, int(self.lengths[index]))


class InMemoryDocuments(DocumentSource):
  """Documents given as a list of str (stored as UTF-8) or bytes."""

  def __init__(self, documents: Sequence[str | bytes]):
    self.documents = [d.encode("utf-8") if isinstance(d, str) else bytes(d)
                      for d in documents]
    self.lengths = np.asarray([len(d) for d in self.documents], np.int64)

  def read(self, index, start, stop):
    return self.documents[index][start:stop]

  def name(self, index):
    return f"<document {index}>"


class TextFiles(DocumentSource):
  """Each file is one document; byte ranges are read by seek."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)
    lengths = []
    for path in self.paths:
      try:
        lengths.append(os.stat(path).st_size)
      except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); check the path and its "
                        "permissions") from None
    self.lengths = np.asarray(lengths, np.int64)

  def read(self, index, start, stop):
    path = self.paths[index]
    try:
      with open(path, "rb") as f:
        f.seek(start)
        data = f.read(stop - start)
    except OSError as e:
      raise DataError(f"cannot read {path} ({e.strerror}); check the file and its "
                      "permissions") from None
    if len(data) != stop - start:
      raise DataError(f"{path} changed while training (shorter than its size at start); "
                      "do not modify data files during a run")
    return data

  def name(self, index):
    return self.paths[index]


def _encode_text(text: str) -> bytes:
  # Lone surrogates (legal in JSON strings) become '?' so lengths stay consistent.
  return text.encode("utf-8", errors="replace")


def _jsonl_text(path: str, line_number: int, line: bytes, text_field: str) -> bytes:
  """The UTF-8 bytes of `text_field` in one JSONL line."""
  try:
    record = json.loads(line)
  except ValueError as e:
    raise DataError(
        f"{path}:{line_number} is not valid JSON ({e}); write one JSON object per line, "
        "or set data.format=text to read the file as plain text") from None
  if not isinstance(record, dict) or text_field not in record:
    found = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
    raise DataError(
        f"{path}:{line_number} has no field {text_field!r} (found: {found}); set "
        "data.text_field to the field that holds the text")
  text = record[text_field]
  if not isinstance(text, str):
    raise DataError(
        f"{path}:{line_number} field {text_field!r} is a {type(text).__name__}, not a "
        "string; set data.text_field to a field that holds text")
  return _encode_text(text)


@functools.lru_cache(maxsize=64)
def _index_jsonl(path: str, text_field: str, size: int, mtime_ns: int):
  """One parse pass: `(line_offsets, line_numbers, text_lengths)` of non-blank lines.

  `size` and `mtime_ns` key the cache, so an edited file is parsed again.
  """
  del size, mtime_ns
  offsets, numbers, lengths = [], [], []
  offset = 0
  with open(path, "rb") as f:
    for line_number, line in enumerate(f, start=1):
      if line.strip():
        offsets.append(offset)
        numbers.append(line_number)
        lengths.append(len(_jsonl_text(path, line_number, line, text_field)))
      offset += len(line)
  return (np.asarray(offsets, np.int64), np.asarray(numbers, np.int64),
          np.asarray(lengths, np.int64))


class JsonlFile(DocumentSource):
  """One document per non-blank line of a JSONL file: the string in `text_field`.

  A read parses the line again, so documents of many MB read slowly under shuffling;
  store such corpora as text files or ArrayRecord.
  """

  def __init__(self, path: str, text_field: str = "text"):
    self.path = path
    self.text_field = text_field
    try:
      stat = os.stat(path)
      self._offsets, self._line_numbers, self.lengths = _index_jsonl(
          path, text_field, stat.st_size, stat.st_mtime_ns)
    except OSError as e:
      raise DataError(f"cannot read {path} ({e.strerror}); check the path and its "
                      "permissions") from None

  def read(self, index, start, stop):
    with open(self.path, "rb") as f:
      f.seek(int(self._offsets[index]))
      line = f.readline()
    text = _jsonl_text(self.path, int(self._line_numbers[index]), line, self.text_field)
    if len(text) != self.lengths[index]:
      raise DataError(f"{self.name(index)} changed while training; do not modify data "
                      "files during a run")
    return text[start:stop]

  def name(self, index):
    return f"{self.path}:{int(self._line_numbers[index])}"


def _open_arrayrecord_reader(path: str):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(path)
  if not reader.ok():
    try:
      reader.read_all()  # Raises with the reason.
      reason = "not an ArrayRecord file"
    except RuntimeError as e:
      reason = str(e).splitlines()[0]
    raise DataError(
        f"cannot read ArrayRecord file {path} ({reason}); write it with "
        "bltjax.data.write_arrayrecord, or set data.format to the file's real format")
  return reader


@functools.lru_cache(maxsize=64)
def _arrayrecord_lengths(path: str, size: int, mtime_ns: int) -> np.ndarray:
  """Byte length of every record (one read pass, in chunks); an empty file has none."""
  del mtime_ns
  if not size:   # the ArrayRecord reader refuses it ("should be at least 64KB big")
    return np.zeros(0, np.int64)
  reader = _open_arrayrecord_reader(path)
  count = reader.num_records()
  lengths = np.zeros(count, np.int64)
  chunk = 4096
  for begin in range(0, count, chunk):
    records = reader.read(list(range(begin, min(begin + chunk, count))))
    lengths[begin:begin + len(records)] = [len(r) for r in records]
  reader.close()
  return lengths


class ArrayRecordFile(DocumentSource):
  """One document per record of an ArrayRecord file (the record is the raw bytes)."""

  def __init__(self, path: str):
    self.path = path
    try:
      stat = os.stat(path)
    except OSError as e:
      raise DataError(f"cannot read {path} ({e.strerror}); check the path and its "
                      "permissions") from None
    self.lengths = _arrayrecord_lengths(path, stat.st_size, stat.st_mtime_ns)
    self._reader = None
    self._lock = threading.Lock()

  def read(self, index, start, stop):
    if self._reader is None:  # Opened lazily; one reader serves many threads.
      with self._lock:
        if self._reader is None:
          self._reader = _open_arrayrecord_reader(self.path)
    return self._reader.read([index])[0][start:stop]

  def name(self, index):
    return f"{self.path}#{index}"

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_reader"] = state["_lock"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


def write_arrayrecord(documents, path: str) -> int:
  """Writes each document (str as UTF-8, or bytes) as one record; returns the count."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  count = 0
  try:
    for document in documents:
      writer.write(document.encode("utf-8") if isinstance(document, str) else bytes(document))
      count += 1
  finally:
    writer.close()
  return count


class Concatenated(DocumentSource):
  """The documents of several sources, one after the other."""

  def __init__(self, sources: Sequence[DocumentSource]):
    self.sources = list(sources)
    self._first = np.cumsum([0] + [len(s) for s in self.sources])
    self.lengths = (np.concatenate([s.lengths for s in self.sources]) if self.sources
                    else np.zeros(0, np.int64))

  def _locate(self, index):
    part = int(np.searchsorted(self._first, index, side="right")) - 1
    return self.sources[part], index - int(self._first[part])

  def read(self, index, start, stop):
    source, local = self._locate(index)
    return source.read(local, start, stop)

  def name(self, index):
    source, local = self._locate(index)
    return source.name(local)


class Subset(DocumentSource):
  """The documents `indices` (`[n]` int) of a source, in that order."""

  def __init__(self, source: DocumentSource, indices: np.ndarray):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    self.lengths = source.lengths[self.indices]

  def read(self, index, start, stop):
    return self.source.read(int(self.indices[index]), start, stop)

  def name(self, index):
    return self.source.name(int(self.indices[index]))


def _files_under(directory: str) -> list[str]:
  """Every file under `directory`, sorted; hidden names skipped. Links to directories are
  followed, each real directory once (a link to `.` or a parent does not loop)."""
  files, seen = [], {os.path.realpath(directory)}
  for root, dirs, names in os.walk(directory, followlinks=True):
    kept = []
    for d in sorted(dirs):   # sorted: which name of a linked directory is walked is fixed
      real = os.path.realpath(os.path.join(root, d))
      if not d.startswith(".") and real not in seen:
        seen.add(real)
        kept.append(d)
    dirs[:] = kept
    files.extend(os.path.join(root, n) for n in names if not n.startswith("."))
  return sorted(files)


def expand_paths(spec: str) -> list[str]:
  """A comma-separated list of files, directories and globs -> files, in order."""
  files = []
  for item in (p.strip() for p in spec.split(",")):
    if not item:
      continue
    item = os.path.expanduser(item)
    if glob.has_magic(item):
      matches = []
      for match in sorted(glob.glob(item, recursive=True)):
        matches.extend(_files_under(match) if os.path.isdir(match) else [match])
    elif os.path.isdir(item):
      matches = _files_under(item)
    else:
      matches = [item] if os.path.exists(item) else []
    if not matches:
      raise DataError(f"data path {item!r} matches no files; check the path or glob "
                      "(data.train and data.valid take a comma-separated list)")
    files.extend(matches)
  first = {}   # The first spelling of each file (by its real path), in order.
  for path in files:
    first.setdefault(os.path.realpath(path), path)
  return list(first.values())


def file_format(path: str, format: str = "auto") -> str:  # pylint: disable=redefined-builtin
  """The format a file is read as: `format`, or by extension when "auto"."""
  if format not in FORMATS:
    raise DataError(f"data.format={format!r} is not one of {list(FORMATS)}")
  if format != "auto":
    return format
  lowered = path.lower()
  if lowered.endswith(_JSONL_SUFFIXES):
    return "jsonl"
  if lowered.endswith(_ARRAYRECORD_SUFFIXES):
    return "arrayrecord"
  if lowered.endswith(_ENCODED_SUFFIXES):
    raise DataError(
        f"{path} is a compressed, archive or columnar file, whose encoded bytes a byte-level "
        "model would train on as text; decompress or convert it (text, JSONL or "
        "ArrayRecord), or set data.format=text to train on its bytes as they are")
  return "text"


def open_source(spec: str, *, format: str = "auto",  # pylint: disable=redefined-builtin
                text_field: str = "text", require_documents: bool = True) -> DocumentSource:
  """Opens every file of a comma-separated path/dir/glob list as one source.

  Raises:
    DataError: a path matches nothing, a file is unreadable or malformed, or (with
      `require_documents`) the files hold no documents.
  """
  if not spec.strip():
    raise DataError("empty data path; set data.train (or data.valid) to files, "
                    "directories or globs")
  named = {os.path.abspath(os.path.expanduser(item.strip())) for item in spec.split(",")}
  sources, text_run = [], []
  for path in expand_paths(spec):
    try:
      kind = file_format(path, format)
      if kind == "text":
        text_run.append(path)
        continue
      if text_run:
        sources.append(TextFiles(text_run))
        text_run = []
      sources.append(JsonlFile(path, text_field) if kind == "jsonl" else ArrayRecordFile(path))
    except DataError as e:
      if os.path.abspath(path) in named:
        raise
      # Found in a directory or by a glob: it may be no data at all (a dataset's metadata).
      raise DataError(f"{e}. {path} was found under data path {spec!r}: if it is not "
                      "training data, move it out, or name the data files alone (a glob such "
                      "as DIR/*.jsonl)") from None
  if text_run:
    sources.append(TextFiles(text_run))
  source = sources[0] if len(sources) == 1 else Concatenated(sources)
  if require_documents and len(source) == 0:
    raise DataError(f"data {spec!r} holds no documents (empty JSONL/ArrayRecord files); "
                    "point data.train/data.valid at non-empty data")
  return source
