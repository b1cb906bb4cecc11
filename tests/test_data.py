"""Specification of bltjax.data: sources, packing, the step -> batch pipeline, splits."""

import os

import numpy as np
import pytest

from bltjax import bytes as vocab
from bltjax import data
from bltjax.data import corpus, sources
from bltjax.data.packing import PackedRows

KEYS = ("inputs", "targets", "segment_ids")


def random_documents(rng, count, max_len):
  return [rng.integers(0, 256, rng.integers(0, max_len + 1), dtype=np.uint8).tobytes()
          for _ in range(count)]


def write_text_corpus(directory, documents):
  """One file per document, named so that sorted order is document order."""
  os.makedirs(directory, exist_ok=True)
  for i, document in enumerate(documents):
    with open(os.path.join(directory, f"doc{i:04d}.txt"), "wb") as f:
      f.write(document)
  return str(directory)


def data_config(**overrides):
  config = data.default_data_config()
  config.prefetch = 0
  config.update(overrides)
  return config


def byte_counts(arrays):
  """Histogram `[256]` of the byte tokens (ids >= OFFSET) in some token arrays."""
  counts = np.zeros(256, np.int64)
  for ids in arrays:
    ids = np.asarray(ids).ravel()
    counts += np.bincount(ids[ids >= vocab.OFFSET] - vocab.OFFSET, minlength=256)
  return counts


def assert_batches_equal(a, b):
  for key in KEYS:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_packing_never_mixes_documents_within_a_segment(seq_len):
  rng = np.random.default_rng(seq_len)
  documents = random_documents(rng, 40, 50)
  rows = PackedRows(sources.InMemoryDocuments(documents), seq_len)
  stream = np.concatenate([vocab.encode(d) for d in documents])
  assert rows.stream_len == len(stream)
  assert rows.num_rows == -(-(len(stream) - 1) // seq_len)

  batch = rows.rows(range(rows.num_rows))
  rebuilt = []  # Documents rebuilt from (inputs, segment_ids) alone.
  for inputs, segment_ids in zip(batch["inputs"], batch["segment_ids"]):
    real = segment_ids > 0
    assert np.all(np.diff(segment_ids[real]) >= 0) and np.all(inputs[~real] == vocab.PAD_ID)
    ids = np.unique(segment_ids[real])
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    for k in ids:
      piece = inputs[segment_ids == k]
      if piece[0] == vocab.BOS_ID:
        rebuilt.append(list(piece))
      else:  # Only a row's first segment may continue the previous row's document.
        assert k == 1
        rebuilt[-1].extend(piece)
  expected = [list(vocab.encode(d)) for d in documents]
  # The stream's final EOS is never an input when the rows end exactly there.
  if len(rebuilt[-1]) == len(expected[-1]) - 1:
    rebuilt[-1].append(vocab.EOS_ID)
  assert rebuilt == expected

  # Targets are the next token of the same stream, PAD past its end.
  padded = np.concatenate([stream, np.zeros(rows.num_rows * seq_len + 1 - len(stream),
                                            np.int32)])
  for i in range(rows.num_rows):
    np.testing.assert_array_equal(batch["inputs"][i], padded[i * seq_len:(i + 1) * seq_len])
    np.testing.assert_array_equal(batch["targets"][i],
                                  padded[i * seq_len + 1:(i + 1) * seq_len + 1])


def test_padding_row_is_all_zeros():
  rows = PackedRows(sources.InMemoryDocuments(["abc"]), 8)
  batch = rows.rows([0, data.packing.PADDING_ROW])
  for key in KEYS:
    assert batch[key].shape == (2, 8) and batch[key].dtype == np.int32
    assert not batch[key][1].any()


def test_every_byte_of_every_file_is_seen_once_per_epoch(tmp_path):
  rng = np.random.default_rng(0)
  documents = random_documents(rng, 30, 300)
  config = data_config(train=write_text_corpus(tmp_path / "corpus", documents),
                       valid_fraction=0.0)
  seq_len, batch = 16, 4
  num_rows = PackedRows(data.split_source(config, "train"), seq_len).num_rows
  dataset = data.train_dataset(config, seq_len=seq_len, global_batch=batch, seed=3)
  steps = -(-num_rows // batch)
  epoch = np.concatenate([dataset[s]["inputs"] for s in range(steps)])[:num_rows]
  np.testing.assert_array_equal(byte_counts(epoch), byte_counts(
      [np.frombuffer(d, np.uint8).astype(np.int32) + vocab.OFFSET for d in documents]))
  assert (epoch == vocab.BOS_ID).sum() == len(documents)


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(name="small_config")
def fixture_small_config(tmp_path):
  documents = random_documents(np.random.default_rng(1), 20, 120)
  return data_config(train=write_text_corpus(tmp_path / "small", documents),
                     valid_fraction=0.0)


def test_batches_are_deterministic_by_seed_and_reshuffled_each_epoch(small_config):
  seq_len, batch = 8, 4
  num_rows = PackedRows(data.split_source(small_config, "train"), seq_len).num_rows
  make = lambda seed: data.train_dataset(small_config, seq_len=seq_len, global_batch=batch,
                                         seed=seed)
  a, b, c = make(0), make(0), make(1)
  for step in (0, 1, 17):
    assert_batches_equal(a[step], b[step])
  assert any(not np.array_equal(a[s]["inputs"], c[s]["inputs"]) for s in range(3))

  # Epoch e is rows [e*R, (e+1)*R) of the flattened batch sequence: the same rows,
  # in a different order.
  steps = -(-2 * num_rows // batch)
  flat = np.concatenate([a[s]["inputs"] for s in range(steps)])
  first, second = flat[:num_rows], flat[num_rows:2 * num_rows]
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(np.unique(first, axis=0), np.unique(second, axis=0))


def test_each_epoch_is_a_permutation_of_all_rows(small_config):
  seq_len, batch = 8, 3
  rows = PackedRows(data.split_source(small_config, "train"), seq_len)
  step_batch = data.pipeline.StepBatch(rows, seed=5, global_batch=batch, process_index=0,
                                       process_count=1)
  steps = -(-3 * rows.num_rows // batch)
  order = np.concatenate([step_batch.row_indices(s) for s in range(steps)])
  epochs = [order[e * rows.num_rows:(e + 1) * rows.num_rows] for e in range(3)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(rows.num_rows))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_process_batches_concatenate_to_the_global_batch(small_config, process_count):
  seq_len, global_batch = 8, 12
  num_rows = PackedRows(data.split_source(small_config, "train"), seq_len).num_rows
  assert num_rows % global_batch  # So that one step holds the end of epoch 0 and epoch 1.
  single = data.train_dataset(small_config, seq_len=seq_len, global_batch=global_batch,
                              seed=7)
  local = [data.train_dataset(small_config, seq_len=seq_len, global_batch=global_batch,
                              seed=7, process_index=p, process_count=process_count)
           for p in range(process_count)]
  for step in (0, 1, num_rows // global_batch, num_rows // global_batch + 1):
    parts = [ds[step] for ds in local]
    for part in parts:
      assert part["inputs"].shape == (global_batch // process_count, seq_len)
    for key in KEYS:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                    single[step][key])


def test_global_batch_must_divide_by_process_count(small_config):
  with pytest.raises(data.DataError, match="multiple of the process count 4"):
    data.train_dataset(small_config, seq_len=8, global_batch=6, seed=0, process_index=0,
                       process_count=4)


def test_iterator_state_round_trips_through_orbax(small_config, tmp_path):
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  dataset = data.train_dataset(small_config, seq_len=8, global_batch=4, seed=0)
  iterator = data.train_iterator(dataset, prefetch=2, read_threads=2)
  for _ in range(3):
    next(iterator)
  manager = ocp.CheckpointManager(
      tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2))
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = [next(iterator) for _ in range(3)]

  fresh = data.train_iterator(dataset, prefetch=2, read_threads=2)
  restored = manager.restore(3, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(fresh)))["data"]
  assert restored.get_state() == {"next_index": 3}
  for want in expected:
    assert_batches_equal(next(restored), want)
  manager.close()


def test_start_step_equals_skipping_steps(small_config):
  dataset = data.train_dataset(small_config, seq_len=8, global_batch=4, seed=2)
  skipped = data.train_iterator(dataset, prefetch=0)
  for _ in range(5):
    next(skipped)
  started = data.train_iterator(dataset, start_step=5, prefetch=2)
  assert started.get_state() == {"next_index": 5}
  for step in range(5, 8):
    want = dataset[step]
    assert_batches_equal(next(skipped), want)
    assert_batches_equal(next(started), want)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_row_once_in_order(tmp_path, process_count):
  documents = random_documents(np.random.default_rng(4), 10, 60)
  config = data_config(valid=write_text_corpus(tmp_path / "valid", documents))
  seq_len, global_batch = 8, 4
  rows = PackedRows(data.split_source(config, "valid"), seq_len)
  per_process = [list(data.eval_batches(config, seq_len=seq_len, global_batch=global_batch,
                                        process_index=p, process_count=process_count))
                 for p in range(process_count)]
  assert {len(b) for b in per_process} == {-(-rows.num_rows // global_batch)}
  merged = {key: np.concatenate([np.concatenate([batches[s][key] for batches in per_process])
                                 for s in range(len(per_process[0]))]) for key in KEYS}
  want = rows.rows(range(rows.num_rows))
  for key in KEYS:
    np.testing.assert_array_equal(merged[key][:rows.num_rows], want[key])
    assert not merged[key][rows.num_rows:].any()  # Filler rows are all padding.
  limited = data.eval_batches(config, seq_len=seq_len, global_batch=global_batch,
                              max_batches=1)
  assert len(limited) == 1 and len(list(limited)) == 1


# ----------------------------------------------------------------------------- splits


def _mixture_config(tmp_path, weights="3,1", **overrides):
  """Two sources: 40 documents of 'a' bytes and 40 of 'b' bytes (one row each)."""
  a = write_text_corpus(tmp_path / "a", [b"a" * 6] * 40)
  b = write_text_corpus(tmp_path / "b", [b"b" * 6] * 40)
  return data_config(train=f"{a}; {b}", train_weights=weights, **overrides)


def test_a_mixture_gives_each_source_its_share_of_every_batch(tmp_path):
  config = _mixture_config(tmp_path)
  dataset = data.train_dataset(config, seq_len=8, global_batch=8, seed=0)
  a, b = vocab.OFFSET + ord("a"), vocab.OFFSET + ord("b")
  for step in range(12):   # past the end of source a's first epoch (39 rows, 6 a step)
    inputs = dataset[step]["inputs"]
    from_a = (inputs == a).any(axis=1)
    assert from_a.sum() == 6 and (inputs[~from_a] == b).any(axis=1).all()
    assert not ((inputs == a).any(axis=1) & (inputs == b).any(axis=1)).any()
  # Same steps, same batches (a pure function of the step); 2 processes split them.
  again = data.train_dataset(config, seq_len=8, global_batch=8, seed=0)
  halves = [data.train_dataset(config, seq_len=8, global_batch=8, seed=0, process_index=p,
                               process_count=2) for p in range(2)]
  for step in (0, 11):
    assert_batches_equal(again[step], dataset[step])
    for key in KEYS:
      np.testing.assert_array_equal(
          np.concatenate([h[step][key] for h in halves]), dataset[step][key])


def test_a_mixture_holds_out_validation_documents_of_each_source(tmp_path):
  config = _mixture_config(tmp_path, valid_fraction=0.1)
  valid = data.split_source(config, "valid")
  texts = {valid.document(i)[:1] for i in range(len(valid))}
  assert texts == {b"a", b"b"}
  train = data.split_sources(config, "train")
  assert len(train) == 2 and len(train[0]) + len(train[1]) + len(valid) == 80


def test_a_mixture_source_without_validation_documents_is_named(tmp_path):
  config = _mixture_config(tmp_path)
  config.train += "; " + write_text_corpus(tmp_path / "c", [b"only one"])
  config.train_weights = "3,1,1"
  assert len(data.split_sources(config, "train")) == 3
  with pytest.raises(data.DataError, match="mixture source '.*c' .*1 document.*data.valid"):
    data.split_sources(config, "valid")


@pytest.mark.parametrize("weights, error", [
    ("", "2 sources separated by ';'.*train_weights"),
    ("1,2,3", "3 weights for 2 source"),
    ("1,0", "every weight must be > 0"),
    ("1,x", "comma-separated numbers"),
    ("99,1", "gets no row of a 8-row batch"),
])
def test_bad_mixture_weights_are_refused_with_the_fix(tmp_path, weights, error):
  with pytest.raises(data.DataError, match=error):
    data.train_dataset(_mixture_config(tmp_path, weights=weights), seq_len=8,
                       global_batch=8, seed=0)


def test_held_out_validation_documents_are_excluded_from_training(tmp_path):
  documents = [f"document {i}\n".encode() for i in range(200)]
  config = data_config(train=write_text_corpus(tmp_path / "c", documents),
                       valid_fraction=0.1)
  train, valid = data.split_source(config, "train"), data.split_source(config, "valid")
  train_docs = {train.document(i) for i in range(len(train))}
  valid_docs = {valid.document(i) for i in range(len(valid))}
  assert not train_docs & valid_docs and train_docs | valid_docs == set(documents)
  assert 5 <= len(valid_docs) <= 40
  again = data.split_source(config, "valid")
  assert [again.name(i) for i in range(len(again))] == [valid.name(i) for i in
                                                        range(len(valid))]


def test_data_valid_replaces_the_held_out_split(tmp_path):
  config = data_config(train=write_text_corpus(tmp_path / "t", [b"a", b"b", b"c"]),
                       valid=write_text_corpus(tmp_path / "v", [b"zz"]))
  assert len(data.split_source(config, "train")) == 3
  assert data.split_source(config, "valid").document(0) == b"zz"


def test_one_document_cannot_be_split(tmp_path):
  config = data_config(train=write_text_corpus(tmp_path / "one", [b"only"]))
  assert len(data.split_source(config, "train")) == 1
  with pytest.raises(data.DataError, match="no validation documents"):
    data.split_source(config, "valid")


def test_default_corpus_split_is_deterministic_and_disjoint():
  all_files = corpus.stdlib_files()
  train = data.default_corpus_files("train", 0.02)
  valid = data.default_corpus_files("valid", 0.02)
  assert len(all_files) > 100 and valid
  assert train == sorted(train) and valid == sorted(valid)
  assert not set(train) & set(valid) and len(train) + len(valid) == len(all_files)
  assert valid == data.default_corpus_files("valid", 0.02)
  assert 0.005 < len(valid) / len(all_files) < 0.06
  assert not any("site-packages" in path for path in train)


def test_default_corpus_feeds_the_pipeline():
  config = data_config()
  batch = data.train_dataset(config, seq_len=32, global_batch=2, seed=0)[0]
  assert batch["inputs"].shape == (2, 32) and (batch["segment_ids"] > 0).any()
  valid = data.eval_batches(config, seq_len=32, global_batch=2, max_batches=1)
  assert next(valid)["targets"].shape == (2, 32)


# ----------------------------------------------------------------------------- sources


def test_jsonl_reads_the_named_field_and_skips_blank_lines(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text('{"body": "héllo", "id": 1}\n\n{"body": "", "id": 2}\n'
                  '{"body": "line\\nbreak"}\n', encoding="utf-8")
  source = data.open_source(str(path), text_field="body")
  assert [source.document(i) for i in range(len(source))] == [
      "héllo".encode(), b"", b"line\nbreak"]
  assert source.name(2) == f"{path}:4"
  assert source.read(0, 1, 3) == "héllo".encode()[1:3]


def test_arrayrecord_round_trip(tmp_path):
  documents = [b"first", b"", bytes(range(256)), "ünïcode"]
  path = str(tmp_path / "docs.arrayrecord")
  assert data.write_arrayrecord(documents, path) == 4
  source = data.open_source(path)
  assert [source.document(i) for i in range(4)] == [
      b"first", b"", bytes(range(256)), "ünïcode".encode()]
  np.testing.assert_array_equal(source.lengths, [5, 0, 256, len("ünïcode".encode())])


def test_text_directories_globs_and_lists(tmp_path):
  (tmp_path / "a" / "sub").mkdir(parents=True)
  (tmp_path / "a" / "2.txt").write_bytes(b"two")
  (tmp_path / "a" / "1.md").write_bytes(b"one")
  (tmp_path / "a" / "sub" / "3.txt").write_bytes(b"three")
  (tmp_path / "a" / ".hidden").write_bytes(b"skip")
  (tmp_path / "b.jsonl").write_text('{"text": "four"}\n')
  documents = lambda source: [source.document(i) for i in range(len(source))]
  assert documents(data.open_source(str(tmp_path / "a"))) == [b"one", b"two", b"three"]
  assert documents(data.open_source(str(tmp_path / "a" / "**" / "*.txt"))) == [
      b"two", b"three"]
  mixed = data.open_source(f"{tmp_path / 'b.jsonl'}, {tmp_path / 'a' / '*.txt'},"
                           f"{tmp_path / 'a' / '2.txt'}")
  assert documents(mixed) == [b"four", b"two"]  # Auto format per file; no duplicates.
  as_text = data.open_source(str(tmp_path / "b.jsonl"), format="text")
  assert documents(as_text) == [b'{"text": "four"}\n']


def test_a_file_is_read_once_however_it_is_named_and_linked_directories_do_not_loop(
    tmp_path, monkeypatch):
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "a.txt").write_bytes(b"a")
  os.symlink(".", tmp_path / "c" / "self")
  os.symlink("..", tmp_path / "c" / "parent")   # the parent holds c again
  os.symlink(tmp_path / "c", tmp_path / "c_link")
  monkeypatch.chdir(tmp_path)
  assert sources.expand_paths("c") == ["c/a.txt"]
  assert sources.expand_paths(f"c, ./c, {tmp_path}/c/a.txt, c_link/a.txt") == ["c/a.txt"]


def test_a_file_in_two_sources_or_in_train_and_valid_is_refused_for_training(tmp_path):
  """Documents named twice would be trained on twice, or validated on after training."""
  corpus_dir = write_text_corpus(tmp_path / "c", [b"a", b"b", b"c"])
  one = os.path.join(corpus_dir, os.listdir(corpus_dir)[0])
  config = data_config(train=f"{corpus_dir}; {one}", train_weights="1,1")
  with pytest.raises(data.DataError, match=r"is in source 0 of data.train and in source 1"):
    data.check_disjoint(config)
  config = data_config(train=corpus_dir, valid=one)
  with pytest.raises(data.DataError, match=r"is in source 0 of data.train and in data.valid"):
    data.check_disjoint(config)
  # What training checks: evaluating on a training file reads it.
  assert data.split_source(config, "valid").document(0) in (b"a", b"b", b"c")
  config = data_config(train=corpus_dir, valid=f"{one}; {one}")
  with pytest.raises(data.DataError, match=r"holds a ';': validation data is one source"):
    data.split_sources(config, "valid")


def test_an_empty_file_holds_no_documents_in_every_format(tmp_path):
  for name in ("empty.jsonl", "empty.arrayrecord"):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(data.DataError, match="holds no documents"):
      data.open_source(str(tmp_path / name))
  (tmp_path / "text.txt").write_bytes(b"text")
  assert len(data.open_source(str(tmp_path))) == 1


def test_large_text_files_are_read_by_range(tmp_path):
  path = tmp_path / "big.txt"
  content = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
  path.write_bytes(content)
  source = data.open_source(str(path))
  assert source.read(0, 500_000, 500_100) == content[500_000:500_100]
  rows = PackedRows(source, 1024)
  row = rows.row(400)
  np.testing.assert_array_equal(row["inputs"],
                                vocab.encode(content)[400 * 1024:401 * 1024])


def test_errors_name_the_file_and_the_fix(tmp_path):
  with pytest.raises(data.DataError, match=r"nothing_here/\*\.txt' matches no files"):
    data.open_source(str(tmp_path / "nothing_here" / "*.txt"))

  bad_json = tmp_path / "bad.jsonl"
  bad_json.write_text('{"text": "ok"}\n{"text": oops}\n')
  with pytest.raises(data.DataError, match=r"bad\.jsonl:2 is not valid JSON"):
    data.open_source(str(bad_json))

  no_field = tmp_path / "nofield.jsonl"
  no_field.write_text('{"text": "ok"}\n\n{"content": "x"}\n')
  with pytest.raises(data.DataError,
                     match=r"nofield\.jsonl:3 has no field 'text' \(found: content\); "
                     "set data.text_field"):
    data.open_source(str(no_field))

  bad_record = tmp_path / "bad.arrayrecord"
  bad_record.write_bytes(b"not an array record" * 10)
  with pytest.raises(data.DataError, match=r"cannot read ArrayRecord file .*bad\.arrayrecord"):
    data.open_source(str(bad_record))

  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(data.DataError, match="holds no documents"):
    data.open_source(str(empty))

  with pytest.raises(data.DataError, match="data.format='csv'"):
    data.split_source(data_config(train=str(empty), format="csv"), "train")


def test_a_file_in_a_data_directory_that_is_not_data_is_named_with_how_to_leave_it_out(
    tmp_path):
  (tmp_path / "train.jsonl").write_text('{"text": "a document"}\n')
  (tmp_path / "dataset_info.json").write_text('{\n  "name": "my corpus"\n}\n')
  with pytest.raises(data.DataError, match=r"dataset_info\.json:1 is not valid JSON .*"
                     r"dataset_info\.json was found under data path '.*': if it is not training "
                     r"data, move it out, or name the data files alone \(a glob such as "
                     r"DIR/\*\.jsonl\)$"):
    data.open_source(str(tmp_path))
  assert len(data.open_source(str(tmp_path / "*.jsonl"))) == 1


@pytest.mark.parametrize("name", ["corpus.txt.gz", "shard-0.parquet", "dump.tar"])
def test_compressed_or_columnar_files_are_not_read_as_text(tmp_path, name):
  (tmp_path / name).write_bytes(b"\x1f\x8b\x08\x00 encoded bytes")
  with pytest.raises(data.DataError, match=f"{name} is a compressed, archive or columnar "
                     "file.*decompress or convert it.*or set data.format=text"):
    data.open_source(str(tmp_path / name))
  # Asked for by name as text, its bytes are read as they are.
  source = data.open_source(str(tmp_path / name), format="text")
  assert source.document(0) == b"\x1f\x8b\x08\x00 encoded bytes"


def test_default_data_config_keys():
  config = data.default_data_config()
  assert set(config.keys()) == {"train", "train_weights", "valid", "format", "text_field",
                                "valid_fraction", "prefetch", "read_threads"}
  assert config.train == "" and config.format == "auto" and config.text_field == "text"


def test_documents_reach_rows_unchanged_from_every_format(tmp_path):
  documents = ["alpha", "", "gamma δ", "x" * 40]
  jsonl = tmp_path / "d.jsonl"
  jsonl.write_text("".join(f'{{"text": {d!r}}}\n'.replace("'", '"') for d in documents),
                   encoding="utf-8")
  record = str(tmp_path / "d.array_record")
  data.write_arrayrecord(documents, record)
  text_dir = write_text_corpus(tmp_path / "t", [d.encode() for d in documents])
  targets = []
  for spec in (str(jsonl), record, text_dir):
    rows = PackedRows(data.open_source(spec), 16)
    targets.append(rows.rows(range(rows.num_rows))["targets"])
  np.testing.assert_array_equal(targets[0], targets[1])
  np.testing.assert_array_equal(targets[0], targets[2])
