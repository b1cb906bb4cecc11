"""`bltjax eval`: bits per byte of a trained workdir, per file and overall."""

import dataclasses
import json
import os
import re
import shutil

import jax
import pytest

from bltjax import cli
from bltjax import evaluate
from bltjax import patching
from conftest import tiny_blt_config, tiny_entropy_config, train_on_one_device


@pytest.fixture(scope="module")
def workdir(tiny_corpus, tmp_path_factory):
  """A tiny entropy model trained for 2 steps (one checkpoint)."""
  path = str(tmp_path_factory.mktemp("eval") / "run")
  config = tiny_entropy_config(tiny_corpus, train__steps=2, train__save_every=2,
                               train__eval_every=0, train__eval_batches=1)
  train_on_one_device(config, path)
  return path


def test_bpb_per_file_and_overall(workdir, tiny_corpus):
  a, b = (os.path.join(tiny_corpus, name) for name in ("bisect.py", "heapq.py"))
  result = evaluate.evaluate_workdir(workdir, f"{a},{b}")
  assert result.step == 2 and [r.file for r in result.files] == [a, b]
  # Every byte of a one-document file is predicted once, plus its end marker.
  assert [r.bytes for r in result.files] == [os.path.getsize(a) + 1, os.path.getsize(b) + 1]
  assert result.bytes == sum(r.bytes for r in result.files)
  weighted = sum(r.bpb * r.bytes for r in result.files) / result.bytes
  assert result.bpb == pytest.approx(weighted, rel=1e-12)
  assert 0 < result.bpb < 9
  # Files are scored independently, and a different file gives a different number.
  alone = evaluate.evaluate_workdir(workdir, a)
  assert alone.bpb == pytest.approx(result.files[0].bpb, rel=1e-6)
  assert abs(result.files[0].bpb - result.files[1].bpb) > 1e-3


def test_same_text_as_jsonl_gives_the_same_bpb(workdir, tiny_corpus, tmp_path):
  text_file = os.path.join(tiny_corpus, "bisect.py")
  with open(text_file, encoding="utf-8") as f:
    text = f.read()
  jsonl = tmp_path / "bisect.jsonl"
  jsonl.write_text(json.dumps({"text": text}) + "\n")
  as_text = evaluate.evaluate_workdir(workdir, text_file)
  as_jsonl = evaluate.evaluate_workdir(workdir, str(jsonl))
  assert as_jsonl.bytes == as_text.bytes
  assert as_jsonl.bpb == pytest.approx(as_text.bpb, rel=1e-6)


def test_cli_prints_a_table_and_writes_json(workdir, tiny_corpus, capsys, tmp_path):
  data = os.path.join(tiny_corpus, "*.py")
  assert cli.main(["eval", "--workdir", workdir, "--data", data, "--max_batches", "2",
                   "--seq_len", "64", "--batch_size", "8", "--name", "stdlib"]) == 0
  out = capsys.readouterr().out
  assert "overall" in out and "heapq.py" in out and "at step 2" in out
  with open(os.path.join(workdir, "eval", "stdlib.json")) as f:
    report = json.load(f)
  assert len(report["files"]) == 5 and report["seq_len"] == 64 and report["max_batches"] == 2
  # 2 batches x 8 rows x 64 bytes per file at most (the files are longer).
  assert all(r["bytes"] == 2 * 8 * 64 for r in report["files"])
  assert report["bytes"] == 5 * 2 * 8 * 64
  # The default name comes from --data and the step; a report of other data under the
  # same base name is kept (this one's name gets a hash of its paths).
  other = tmp_path / "other"
  other.mkdir()
  shutil.copy(os.path.join(tiny_corpus, "heapq.py"), other / "bisect.py")
  for data in (os.path.join(tiny_corpus, "bisect.py"), str(other / "bisect.py")):
    assert cli.main(["eval", "--workdir", workdir, "--data", data, "--max_batches", "1"]) == 0
  reports = sorted(n for n in os.listdir(os.path.join(workdir, "eval")) if "bisect" in n)
  assert len(reports) == 2 and reports[0] == "bisect_step2.json", reports
  assert re.fullmatch(r"bisect_step2_[0-9a-f]{8}\.json", reports[1]), reports
  datas = []
  for name in reports:
    with open(os.path.join(workdir, "eval", name)) as f:
      datas.append(json.load(f)["data"])
  assert datas == [os.path.join(tiny_corpus, "bisect.py"), str(other / "bisect.py")]
  # Run again, each data writes over its own report.
  assert cli.main(["eval", "--workdir", workdir, "--data", str(other / "bisect.py"),
                   "--max_batches", "1"]) == 0
  assert sorted(n for n in os.listdir(os.path.join(workdir, "eval")) if "bisect" in n) == reports


def test_workdir_without_checkpoints_is_a_clear_error(workdir, tiny_corpus, tmp_path, capsys):
  empty = tmp_path / "untrained"
  empty.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), empty / "config.json")
  with pytest.raises(evaluate.EvalError, match="has no checkpoints yet; train it first"):
    evaluate.evaluate_workdir(str(empty), tiny_corpus)
  assert cli.main(["eval", "--workdir", str(tmp_path / "nowhere"), "--data", tiny_corpus]) == 2
  assert "does not exist; pass the --workdir of a `bltjax train` run" in capsys.readouterr().err
  config = str(empty / "config.json")
  assert cli.main(["eval", "--workdir", config, "--data", tiny_corpus]) == 2
  assert (f"workdir {config!r} is a file, not a directory; pass the --workdir"
          in capsys.readouterr().err)


def test_missing_data_is_a_clear_error(workdir, tmp_path, capsys):
  missing = str(tmp_path / "missing.txt")
  with pytest.raises(evaluate.EvalError, match="matches no files"):
    evaluate.evaluate_workdir(workdir, missing)
  assert cli.main(["eval", "--workdir", workdir, "--data", missing]) == 2
  err = capsys.readouterr().err
  assert err.startswith("bltjax: error: data path") and "--data takes" in err
  assert len(err.strip().splitlines()) == 1


def test_files_without_bytes_are_listed_not_scored(workdir, tiny_corpus, tmp_path, capsys):
  """An empty text file, or JSONL of empty texts, has no bytes to score (only end markers):
  listed as empty, left out of the overall bpb; data that is all empty is an error."""
  a = os.path.join(tiny_corpus, "bisect.py")
  empty_text, empty_jsonl = tmp_path / "empty.txt", tmp_path / "blank.jsonl"
  empty_text.write_bytes(b"")
  empty_jsonl.write_text(json.dumps({"text": ""}) + "\n")
  alone = evaluate.evaluate_workdir(workdir, a)
  result = evaluate.evaluate_workdir(workdir, f"{empty_text},{a},{empty_jsonl}")
  assert [(r.bpb, r.bytes) for r in result.files] == [(None, 0), (alone.bpb, alone.bytes),
                                                      (None, 0)]
  assert (result.bpb, result.bytes) == (alone.bpb, alone.bytes)
  assert evaluate.format_table(result).splitlines()[3].split() == [str(empty_text), "empty", "0"]
  with pytest.raises(evaluate.EvalError, match="is empty .no document bytes"):
    evaluate.evaluate_workdir(workdir, f"{empty_text},{empty_jsonl}")
  bad = tmp_path / "bad.jsonl"
  bad.write_text("not json\n")
  assert cli.main(["eval", "--workdir", workdir, "--data", f"{a},{bad}"]) == 2
  assert "bad.jsonl" in capsys.readouterr().err


def test_patch_command_cuts_the_bytes_given(workdir, monkeypatch, capsys):
  """Non-UTF-8 bytes of the command line (surrogate-escaped by Python) reach the patcher
  as they were given."""
  texts = []
  patch_texts = patching.patch_texts
  monkeypatch.setattr(patching, "patch_texts",
                      lambda t, *args: texts.append(t) or patch_texts(t, *args))
  assert cli.main(["patch", "--workdir", workdir, "--text", "\udcff\udcfeab",
                   "--config.patcher.threshold=1.0"]) == 0
  assert texts == [[b"\xff\xfeab"]]
  assert "patches, mean patch length" in capsys.readouterr().out


def test_default_names():
  assert evaluate.default_name(__file__) == "test_evaluate"
  assert evaluate.default_name("/data/valid/,/x/notes.jsonl") == "valid+notes"
  assert evaluate.default_name("/data/*.txt") == "txt"


@pytest.fixture(scope="module")
def blt_workdir(tiny_corpus, tmp_path_factory):
  """A tiny BLT (static patches of 4 bytes) trained with a budget of 6 patches per
  48-byte row: rows need 13, so training leaves bytes out."""
  config = tiny_blt_config(tiny_corpus, "static", train__steps=1, train__save_every=1,
                           train__eval_every=0, train__eval_batches=1,
                           patcher__max_patches=6)
  path = str(tmp_path_factory.mktemp("eval") / "blt")
  train_on_one_device(config, path)
  return path


def test_eval_of_a_blt_workdir(blt_workdir, tiny_corpus):
  """Any model kind: a BLT goes through its objective's eval_sums the same way."""
  result = evaluate.evaluate_workdir(blt_workdir, os.path.join(tiny_corpus, "bisect.py"),
                                     max_batches=2, devices=jax.devices()[:1])
  assert result.bytes == 2 * 8 * 48 and 0 < result.bpb < 12


def test_a_blt_is_scored_on_every_byte_past_its_patch_budget(blt_workdir, tiny_corpus,
                                                             capsys):
  """Training's patcher.max_patches (6) bounds neither eval's rows of training's length
  nor longer ones: every target byte is scored, none reported dropped."""
  data = os.path.join(tiny_corpus, "bisect.py")
  for seq_len in (None, 96):
    result = evaluate.evaluate_workdir(blt_workdir, data, seq_len=seq_len, max_batches=1,
                                       devices=jax.devices()[:1])
    assert result.bytes == 8 * (seq_len or 48), seq_len
    assert result.dropped_bytes == 0 and result.files[0].dropped_bytes == 0
  assert "could not be scored" not in evaluate.format_table(result)
  dropped = dataclasses.replace(result, dropped_bytes=5)
  assert "5 target bytes could not be scored" in evaluate.format_table(dropped)


def test_out_of_memory_is_one_line_naming_what_to_lower(monkeypatch, capsys):
  def out_of_memory(args, overrides):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 240188025248 "
                                     "bytes.\nmore lines of XLA")
  monkeypatch.setattr(cli, "cmd_eval", out_of_memory)
  assert cli.main(["eval", "--workdir", "w", "--data", "d", "--seq_len", "100000"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("bltjax: error: out of memory (RESOURCE_EXHAUSTED: Out of memory "
                        "allocating 240188025248 bytes.); lower ")
  assert "--seq_len" in err and len(err.splitlines()) == 1
  # Other runtime errors are not dressed up as this one.
  monkeypatch.setattr(cli, "cmd_eval", lambda *a: (_ for _ in ()).throw(
      jax.errors.JaxRuntimeError("INTERNAL: something else")))
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    cli.main(["eval", "--workdir", "w", "--data", "d"])
