"""`bltjax sweep` and the continuation tasks of `bltjax eval`, on a tiny BLT-D.

The model is trained (static patching, 2 steps) by a one-run training sweep, then
loaded once; the decoding sweep, its restarts and `bltjax eval` reuse that Model's
compiled decoders (`bltjax.load` is patched to return it), so the whole module compiles
each decoding program once.
"""

import json
import os
import re

import jax
import pytest

import bltjax
from bltjax import cli
from bltjax import continuation
from bltjax import evaluate
from bltjax import sweep
from conftest import REPO

PNG = b"\x89PNG\r\n\x1a\n"


def write_file(path, text: str) -> str:
  path.write_text(text)
  return str(path)


TRAINING_SWEEP = """
from bltjax import sweep

def get_config(arg=None):
  return sweep.training_config(
      experiment={experiment!r},
      overrides=("data.train={corpus}", "data.prefetch=0", "train.steps=2",
                 "train.save_every=2", "train.eval_every=0", "train.eval_batches=1"))

def get_sweep(config):
  return sweep.product(sweep.fixed("optim.lr", 1e-3), sweep.sweep("config.optim.warmup_steps", [1]))
"""

DECODING_SWEEP = """
from bltjax import sweep

def get_config(arg=None):
  config = sweep.decoding_config(model={model!r}, prompts=2, prompt_bytes=16,
                                 continuation_bytes=8, fast_compile=True)
  return config

def get_sweep(config):
  return sweep.chain(
      sweep.fixed("method", "ar"),
      sweep.product(sweep.fixed("method", "blt_d"), sweep.fixed("block_size", 4),
                    sweep.sweep("alpha", [0.5, 0.9])){extra})
"""


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
  """A one-run training sweep: the tiny BLT-D-4 every other test decodes with."""
  root = tmp_path_factory.mktemp("sweep")
  spec = write_file(root / "train_sweep.py", TRAINING_SWEEP.format(
      experiment=os.path.join(REPO, "experiments", "blt_tiny.py:static,bltd4,runlocal"),
      corpus=tiny_corpus))
  report = sweep.run_sweep(spec, str(root / "training"), devices=jax.devices()[:1],
                           progress=False)
  return spec, report


@pytest.fixture(scope="module")
def model(trained):
  return bltjax.load(trained[1].rows[0]["workdir"], compiler_options=sweep.FAST_COMPILE)


@pytest.fixture
def shared_model(model, monkeypatch):
  """`bltjax.load` returns the module's Model (its compiled decoders are reused)."""
  def load(path, **kwargs):
    del kwargs
    assert os.path.samefile(path, model.workdir)
    return model
  monkeypatch.setattr(bltjax, "load", load)
  return model


@pytest.fixture
def count_runs(monkeypatch):
  """Counts `continuation.run` calls (each decodes every item with one setting)."""
  calls = []
  run = continuation.run

  def counting(*args, **kwargs):
    calls.append(kwargs.get("method"))
    return run(*args, **kwargs)
  monkeypatch.setattr(continuation, "run", counting)
  return calls


def test_product_zipit_chain():
  assert sweep.product(sweep.sweep("a", [1, 2]), sweep.sweep("b", ["x", "y"])) == [
      {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
  assert sweep.zipit(sweep.sweep("a", [1, 2]), sweep.sweep("b", [3, 4])) == [
      {"a": 1, "b": 3}, {"a": 2, "b": 4}]
  assert sweep.chain(sweep.fixed("a", 0), sweep.sweep("a", [1])) == [{"a": 0}, {"a": 1}]
  nested = sweep.product(sweep.fixed("m", "d"), sweep.zipit(sweep.sweep("B", [4, 8]),
                                                           sweep.sweep("a", [0.5, 0.7])))
  assert nested == [{"m": "d", "B": 4, "a": 0.5}, {"m": "d", "B": 8, "a": 0.7}]
  with pytest.raises(sweep.SweepError, match="different lengths"):
    sweep.zipit(sweep.sweep("a", [1, 2]), sweep.sweep("b", [1]))
  with pytest.raises(sweep.SweepError, match="key 'a' is set by two parts"):
    sweep.product(sweep.fixed("a", 1), sweep.fixed("a", 2))
  with pytest.raises(sweep.SweepError, match="takes a list of values"):
    sweep.sweep("a", "abc")


def test_a_sweep_file_expands_into_checked_runs(tmp_path):
  spec = write_file(tmp_path / "s.py", """
from bltjax import sweep

def get_config(arg=None):
  config = sweep.decoding_config(model="some/model", prompts=8)
  config.batch_sizes = (1, 4)
  return config

def get_sweep(config):
  methods = sweep.chain(
      sweep.product(sweep.sweep("method", ["ar", "blt_s"]), sweep.sweep("draft_len", [4, 8])),
      sweep.product(sweep.fixed("method", "blt_d"),
                    sweep.zipit(sweep.sweep("block_size", [4, 8]), sweep.sweep("alpha", [0.5, 1])),
                    sweep.fixed("gate", 0.3)))
  return sweep.product(sweep.sweep("batch_size", list(config.batch_sizes)), methods)
""")
  sw = sweep.load_sweep(spec)
  # ar ignores draft_len (its 2 entries are one run), blt_d ignores gate: 2 x (1 + 2 + 2).
  assert [r.settings for r in sw.runs[:5]] == [
      {"method": "ar", "batch_size": 1},
      {"method": "blt_s", "draft_len": 4, "batch_size": 1},
      {"method": "blt_s", "draft_len": 8, "batch_size": 1},
      {"method": "blt_d", "block_size": 4, "alpha": 0.5, "batch_size": 1},
      {"method": "blt_d", "block_size": 8, "alpha": 1.0, "batch_size": 1}]
  assert len(sw.runs) == 10 and sw.duplicates == 2
  assert [r.settings["batch_size"] for r in sw.runs] == [1] * 5 + [4] * 5
  assert sw.runs[3].id.startswith("blt_d-B4-a0.5-bs1-")
  assert "gate" not in sw.runs[3].settings
  assert [r.id for r in sweep.load_sweep(spec).runs] == [r.id for r in sw.runs]
  assert len({r.id for r in sw.runs}) == 10
  # Overrides reach get_sweep.
  small = sweep.load_sweep(spec, ["--config.batch_sizes=(2,)"])
  assert {r.settings["batch_size"] for r in small.runs} == {2} and len(small.runs) == 5
  out = sweep.describe(small)
  assert out.startswith("5 runs (decoding), 1 duplicate entries dropped")


def test_the_shipped_sweep_files_expand(capsys):
  decoding = os.path.join(REPO, "experiments", "sweeps", "decoding.py")
  runs = sweep.load_sweep(decoding).runs
  methods = [r.settings["method"] for r in runs]
  assert len(runs) == 17 and methods.count("blt_d") == 11 and methods.count("blt_s") == 3
  assert {r.settings["batch_size"] for r in runs} == {1}
  assert len(sweep.load_sweep(decoding + ":batch8").runs) == 34
  assert len(sweep.load_sweep(decoding + ":quick").runs) == 5
  training = os.path.join(REPO, "experiments", "sweeps", "training.py")
  runs = sweep.load_sweep(training).runs
  assert [(r.settings["model.diffusion.block_size"], r.settings["optim.lr"]) for r in runs] == [
      (4, 1e-3), (4, 3e-3), (8, 1e-3), (8, 3e-3)]
  assert cli.main(["sweep", "--config", training + ":runlocal", "--workdir", "/nonexistent",
                   "--dry_run"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("4 runs (training)") and out.count("[todo]") == 4


@pytest.mark.parametrize("entry, message", [
    ('{"method": "blt_d", "alhpa": 0.5}', "unknown key 'alhpa'; decoding runs take method"),
    ('{"method": "blt_x"}', "method 'blt_x' is not one of"),
    ('{"method": "blt_d", "alpha": "0.5"}', "alpha='0.5' must be a float"),
    ('{"method": "blt_s", "draft_len": 1}', "draft_len >= 2"),
    ('{"method": "ar", "batch_size": 4}', "batch_size=4 is more than prompts=2"),
])
def test_a_bad_entry_fails_before_any_run(tmp_path, count_runs, capsys, entry, message):
  spec = write_file(tmp_path / "bad.py", DECODING_SWEEP.format(
      model=str(tmp_path / "no_model"), extra=f",\n      [{entry}]"))
  workdir = str(tmp_path / "out")
  with pytest.raises(sweep.SweepError, match="sweep entry 3 ") as e:
    sweep.run_sweep(spec, workdir)
  assert message in str(e.value)
  assert count_runs == [] and not os.path.exists(workdir)
  assert cli.main(["sweep", "--config", spec, "--workdir", workdir]) == 2
  err = capsys.readouterr().err
  assert err.startswith("bltjax: error: ") and len(err.strip().splitlines()) == 1


def test_a_sweep_file_that_is_not_python_names_the_fix(monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(sweep.SweepError, match="README.md is not a sweep file: sweep files are "
                     "Python files with get_config"):
    sweep.load_sweep("README.md")


def test_a_bad_training_key_fails_before_any_run(tmp_path):
  spec = write_file(tmp_path / "bad_train.py", """
from bltjax import sweep

def get_config(arg=None):
  return sweep.training_config(experiment={experiment!r})

def get_sweep(config):
  return [{{"optim.lr": 1e-3}}, {{"optim.lrr": 1e-3}}]
""".format(experiment=os.path.join(REPO, "experiments", "blt_tiny.py:static,runlocal")))
  with pytest.raises(sweep.SweepError, match="sweep entry 1 .*config key 'optim.lrr' does not"):
    sweep.run_sweep(spec, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("entry, message", [
    ({"optim.lr": -1e-3}, r"config\.optim\.lr=-0\.001 must be >= 0"),
    ({"model.blt.global_model.n_heads": 3}, r"d_model=\d+ is not divisible by n_heads=3"),
    ({"model.diffusion.block_size": 512}, r"block_size=512 must be in \[1, "),
    ({"train.save_every": 0}, r"config\.train\.save_every=0 must be >= 1"),
])
def test_a_value_no_run_can_train_with_fails_before_any_run(tmp_path, entry, message):
  # The bad value is in the last entry: the first run would have trained before it.
  spec = write_file(tmp_path / "bad_value.py", """
from bltjax import sweep

def get_config(arg=None):
  return sweep.training_config(experiment={experiment!r})

def get_sweep(config):
  return [{{"optim.lr": 1e-3}}, {entry!r}]
""".format(experiment=os.path.join(REPO, "experiments", "blt_tiny.py:static,bltd4,runlocal"),
           entry=entry))
  with pytest.raises(sweep.SweepError, match=r"sweep entry 1 .*" + message):
    sweep.run_sweep(spec, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_a_sweep_with_no_finished_run_takes_a_corrected_config(tiny_corpus, tmp_path):
  # The first sweep's run fails when it starts (no params to start from, which the checks
  # before the first run do not read): its workdir holds no result, so the corrected sweep
  # config is taken (here it fails the same way, on its own path) and replaces the saved
  # one; the stale AR references of the old config are dropped.
  experiment = os.path.join(REPO, "experiments", "entropy_tiny.py:runlocal")
  workdir = str(tmp_path / "out")
  for i in (1, 2):
    spec = write_file(tmp_path / f"sweep_{i}.py", TRAINING_SWEEP.format(
        experiment=experiment, corpus=tiny_corpus).replace(
            '"data.prefetch=0"', f'"data.prefetch=0", "train.init_params_from={tmp_path}/no_{i}"'))
    with pytest.raises(ValueError, match=f"no_{i}"):
      sweep.run_sweep(spec, workdir, devices=jax.devices()[:1], progress=False)
    with open(os.path.join(workdir, sweep.SWEEP_CONFIG)) as f:
      assert f"no_{i}" in json.load(f)["overrides"][2]
    assert not os.path.exists(os.path.join(workdir, sweep.REFERENCE))
    write_file(tmp_path / "out" / sweep.REFERENCE, "{}")


@pytest.mark.parametrize("entry, message", [
    ({"train.batch_size": 6}, r"train\.batch_size=6 does not divide over 8 batch shards"),
    ({"data.train": "/no/such/corpus"}, r"data path '/no/such/corpus' matches no files"),
    ({"model.entropy.ffn_dim": 100, "mesh.tensor": 8, "mesh.data": 1},
     r"dimension of 100 that does not divide mesh axes"),
])
def test_a_run_its_devices_or_data_cannot_train_fails_before_any_run(
    tiny_corpus, tmp_path, capsys, entry, message):
  """Checked with the devices and the data before the first run, and by --dry_run."""
  spec = write_file(tmp_path / "bad_run.py", """
from bltjax import sweep

def get_config(arg=None):
  return sweep.training_config(experiment={experiment!r}, overrides=("data.train={corpus}",))

def get_sweep(config):
  return [{{"train.batch_size": 8}}, {entry!r}]
""".format(experiment=os.path.join(REPO, "experiments", "entropy_tiny.py:runlocal"),
           corpus=tiny_corpus, entry=entry))
  assert len(jax.devices()) == 8
  with pytest.raises(sweep.SweepError, match=r"^run .*" + message):
    sweep.run_sweep(spec, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
  assert cli.main(["sweep", "--config", spec, "--workdir", str(tmp_path / "out"),
                   "--dry_run"]) == 2
  assert re.search(message, capsys.readouterr().err)


def test_training_sweep_records_runs_and_skips_them_on_restart(trained):
  spec, report = trained
  (record,) = report.rows
  assert report.executed == [record["id"]] and record["id"].startswith("lr=0.001-warmup_steps=1-")
  assert record["settings"] == {"optim.lr": 1e-3, "optim.warmup_steps": 1}
  assert record["steps"] == 2 and 0 < record["valid_bpb"] < 12
  assert os.path.isdir(os.path.join(record["workdir"], "checkpoints", "2"))
  with open(os.path.join(report.workdir, sweep.TABLE)) as f:
    table = f.read()
  assert "| optim.lr | optim.warmup_steps | steps | valid bpb |" in table
  assert "1 of 1 runs finished" in table
  with open(os.path.join(report.workdir, "valid_bpb.png"), "rb") as f:
    assert f.read(8) == PNG
  again = sweep.run_sweep(spec, report.workdir, progress=False)
  assert again.executed == [] and again.skipped == [record["id"]]


ENDINGS_SWEEP = """
from bltjax import sweep

def get_config(arg=None):
  return sweep.training_config(
      experiment={experiment!r},
      overrides=("data.train={corpus}", "data.prefetch=0", "train.steps=40",
                 "train.save_every=1", "train.eval_every=0", "train.eval_batches=1",
                 "optim.warmup_steps=0", "optim.schedule=constant"))

def get_sweep(config):
  return sweep.chain(
      sweep.product(sweep.fixed("optim.lr", 1e30), sweep.fixed("train.steps", 3)),
      sweep.product(sweep.fixed("optim.lr", 1e-3), sweep.fixed("train.time_budget_s", 1e-9)),
      sweep.product(sweep.fixed("optim.lr", 1e-3), sweep.fixed("train.steps", 2)))
"""


def test_a_diverged_or_out_of_time_run_is_recorded_and_the_sweep_goes_on(tiny_corpus,
                                                                         tmp_path):
  """A learning rate that diverges is a sweep result, not the end of the sweep; a run
  stopped by its time budget is recorded at the step it reached, not at train.steps."""
  spec = write_file(tmp_path / "endings.py", ENDINGS_SWEEP.format(
      experiment=os.path.join(REPO, "experiments", "entropy_tiny.py:runlocal"),
      corpus=tiny_corpus))
  report = sweep.run_sweep(spec, str(tmp_path / "out"), devices=jax.devices()[:1],
                           progress=False)
  diverged, timed, full = report.rows
  assert len(report.executed) == 3
  assert diverged["stopped"] == sweep.DIVERGED and diverged["valid_bpb"] is None
  assert diverged["steps"] < 3
  assert timed["stopped"] == sweep.OUT_OF_TIME and 1 <= timed["steps"] < 40
  assert timed["valid_bpb"] > 0
  assert full["stopped"] is None and full["steps"] == 2 and full["valid_bpb"] > 0
  with open(os.path.join(report.workdir, sweep.TABLE)) as f:
    table = f.read()
  assert f"| {timed['steps']} (time budget) |" in table and " (diverged) |" in table
  again = sweep.run_sweep(spec, report.workdir, progress=False)
  assert again.executed == [] and len(again.skipped) == 3


def test_decoding_sweep_writes_table_and_plots_and_resumes(shared_model, tmp_path, count_runs,
                                                           capsys):
  spec = write_file(tmp_path / "dec.py", DECODING_SWEEP.format(model=shared_model.workdir,
                                                               extra=""))
  workdir = str(tmp_path / "out")
  report = sweep.run_sweep(spec, workdir, progress=False)
  assert len(report.executed) == 3
  assert count_runs == ["ar", "ar", "blt_d", "blt_d"]   # the AR reference, then the runs
  rows = sweep.read_results(workdir)
  assert set(rows) == set(report.executed)
  ar, d5, d9 = report.rows
  assert ar["label"] == "ar" and d5["label"] == "blt_d B=4 a=0.5"
  assert ar["agreement"] == 1.0 and ar["model_step"] == 2
  for row in report.rows:
    assert row["bytes_per_s"] > 0 and row["traffic_per_byte"] > 0 and row["nfe_decoder"] > 0
    assert 0 <= row["exact_match"] <= 1 and 0 <= row["agreement"] <= 1 and row["bpb"] > 0
  with open(os.path.join(workdir, sweep.TABLE)) as f:
    table = f.read()
  assert "3 of 3 runs finished" in table and "| blt_d B=4 a=0.9 | 1 |" in table
  assert "![quality_vs_traffic](quality_vs_traffic.png)" in table
  for name in sweep.DECODING_PLOTS:
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == PNG

  # Stopped after the first run (the last line cut off mid-write): the restart, through the
  # CLI, runs the other two only, the AR reference coming from reference.json.
  path = os.path.join(workdir, sweep.RESULTS)
  with open(path) as f:
    lines = f.readlines()
  with open(path, "w") as f:
    f.write(lines[0] + lines[1][:20])
  del count_runs[:]
  assert cli.main(["sweep", "--config", spec, "--workdir", workdir]) == 0
  assert count_runs == ["blt_d", "blt_d"]
  out = capsys.readouterr().out
  assert "[done] ar-bs1-" in out and "[todo] blt_d-B4-a0.9-bs1-" in out
  assert "2 run(s) done now, 1 finished before" in out
  assert len(sweep.read_results(workdir)) == 3

  # Finished: nothing runs, not even a model load.
  del count_runs[:]
  again = sweep.run_sweep(spec, workdir, progress=False)
  assert count_runs == [] and again.executed == [] and len(again.skipped) == 3
  # Another sweep config in the same workdir is refused.
  with pytest.raises(sweep.SweepError, match="holds a sweep with another config .*prompts"):
    sweep.run_sweep(spec, workdir, overrides=["--config.prompts=3"])


def test_eval_continuation_tasks(shared_model, capsys):
  workdir = shared_model.workdir
  assert cli.main(["eval", "--workdir", workdir, "--continuation_bytes", "8",
                   "--prompt_bytes", "16", "--prompts", "2", "--methods", "blt_d,ar",
                   "--block_size", "4", "--alpha", "0.5", "--name", "cont"]) == 0
  out = capsys.readouterr().out
  assert "2 prompts of 16 bytes from the validation split, 8 bytes generated each" in out
  assert "| method | batch | bytes/s |" in out and "| blt_d B=4 a=0.5 | 1 |" in out
  with open(os.path.join(workdir, "eval", "cont.json")) as f:
    report = json.load(f)
  cont = report["continuation"]
  assert report["step"] == 2 and len(cont["items"]) == 2
  blt_d, ar = cont["rows"]          # in the order asked; AR ran first as the reference
  assert blt_d["options"] == {"block_size": 4, "alpha": 0.5}
  assert ar["options"] == {} and ar["agreement"] == 1.0   # block_size, alpha: not read by ar
  for row in (blt_d, ar):
    assert len(row["outputs"]) == 2
    for key in ("exact_match", "bpb", "agreement", "bytes_per_s", "nfe_decoder",
                "traffic_per_byte"):
      assert row[key] is not None


def test_blt_d_decodes_with_the_block_size_it_was_trained_with(model):
  assert model.config.model.diffusion.block_size == 4 and model.trained_block_size == 4
  assert model.decode_config("blt_d").block_size == 4
  assert model.decode_config("blt_h").block_size == 4
  assert model.decode_config("blt_d", block_size=8).block_size == 8   # another B, if asked


def test_sampled_agreement_is_against_ar_in_the_same_batch_layout(model):
  """Sampled draws are keyed by row and position: BLT-S at batch 4 equals AR at batch 4
  (agreement 1), not AR decoded a prompt at a time."""
  items = continuation.ContinuationSet(
      prompts=[b"def ", b"import os\n", b"class A:\n", b"x = 1\n"], references=[b"a" * 12] * 4)
  (blt_s,) = continuation.run_methods(model, items, [("blt_s", dict(temperature=1.0))],
                                      batch_size=4, seed=3)
  assert blt_s.agreement == 1.0


def test_continuation_items_come_from_data(model, tiny_corpus):
  path = os.path.join(tiny_corpus, "heapq.py")
  report = continuation.evaluate_workdir(
      model.workdir, path, methods=[("ar", {"draft_len": 4})], prompts=2, prompt_bytes=16,
      continuation_bytes=8, model=model)
  with open(path) as f:
    text = f.read()
  assert report["data"] == path and len(report["items"]) == 2
  for item in report["items"]:
    assert item["prompt"] + item["reference"] in text
  (row,) = report["rows"]
  assert row["method"] == "ar" and row["options"] == {} and row["agreement"] == 1.0


def test_eval_continuation_errors(shared_model, capsys):
  workdir = shared_model.workdir
  cases = [
      (["--prompts", "2"], "--prompts is an option of continuation tasks; pass "
                           "--continuation_bytes N too"),
      ([], "nothing to evaluate; pass --data FILES"),
      (["--continuation_bytes", "8", "--methods", "ar,nope"], "method 'nope' is not one of"),
      (["--continuation_bytes", "8", "--prompts", "2", "--batch_size", "3"],
       "batch_size=3 is more than prompts=2"),
      (["--continuation_bytes", "8", "--data", "/no/such/file.txt"], "matches no files"),
  ]
  for args, message in cases:
    assert cli.main(["eval", "--workdir", workdir, *args]) == 2, args
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_eval_checks_continuation_options_before_the_bits_per_byte_eval(
    shared_model, tiny_corpus, monkeypatch, capsys):
  def no_eval(*args, **kwargs):
    raise AssertionError("the bits-per-byte eval ran before the options were checked")
  monkeypatch.setattr(evaluate, "evaluate_workdir", no_eval)
  data = ["--data", os.path.join(tiny_corpus, "heapq.py"), "--continuation_bytes", "8"]
  cases = [
      (["--methods", "beam"], "method 'beam' is not one of"),
      (["--methods", "blt_s", "--draft_len", "1"], "draft_len=1: need draft_len >= 2"),
      (["--draft_len", "4"], "draft_len is read by blt_s, blt_dv, not by the methods asked "
       "for (ar); leave it out, or add one of those methods"),
      (["--methods", "ar,blt_d", "--alpha", "0.5", "--gamma", "1"], "both given"),
      (["--top_p", "0.9"], "top_p 0.9 applies to sampling"),
      (["--seed", "3"], "seed 3 applies to sampling"),
      (["--methods", "blt_d", "--alpha", "-0.5"], "alpha=-0.5: need alpha >= 0"),
      (["--temperature", "-1"], "need temperature >= 0"),
      (["--prompt_bytes", "16", "--max_len", "20"],
       "need 25 positions (BOS included) > max_len=20; lower them or raise max_len to 25 "
       "(--max_len 25)"),
  ]
  for args, message in cases:
    assert cli.main(["eval", "--workdir", shared_model.workdir, *data, *args]) == 2, args
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
  assert cli.main(["eval", "--workdir", shared_model.workdir, *data[:2], "--max_len", "99"]) == 2
  assert "--max_len is an option of continuation tasks" in capsys.readouterr().err
  assert cli.main(["eval", "--workdir", shared_model.workdir, *data[:2], "--seed", "1"]) == 2
  assert "--seed is an option of continuation tasks" in capsys.readouterr().err
