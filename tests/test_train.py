"""The training loop: exact resume, NaN stops keep the last good checkpoint, workdirs."""

import json
import math
import os
import re
import signal
import threading
import time

import jax
import numpy as np
import pytest

from bltjax import bytes as bytes_lib
from bltjax import checkpoint
from bltjax import cli
from bltjax import configs
from bltjax import data as data_lib
from bltjax import metrics
from bltjax import sharding
from bltjax import train
from conftest import (REPO, logged_train_steps, tiny_blt_config, tiny_entropy_config,
                      train_on_one_device)


def _losses(workdir):
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_resume_continues_with_exactly_the_losses_of_a_straight_run(tiny_corpus, tmp_path):
  overrides = dict(train__steps=6, train__log_every=1, train__save_every=3,
                   train__eval_every=0, train__eval_batches=1)
  straight = str(tmp_path / "straight")
  train_on_one_device(tiny_entropy_config(tiny_corpus, **overrides), straight)

  resumed = str(tmp_path / "resumed")
  train_on_one_device(tiny_entropy_config(tiny_corpus, **dict(overrides, train__steps=3)),
                      resumed)
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["3"]
  # Rows a killed run logged past its last checkpoint (the resumed run logs them again),
  # the last one half written.
  with open(os.path.join(resumed, "metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps({"step": 4, "train/loss": 9.0}) + "\n" + '{"step": 5, "tra')
  # Same command with the full step count: resumes at 3 (the schedule is that of 6 steps).
  train_on_one_device(tiny_entropy_config(tiny_corpus, **overrides), resumed)

  a, b = _losses(straight), _losses(resumed)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  assert logged_train_steps(resumed) == [1, 2, 3, 4, 5, 6]   # each step once
  # Run again once finished: it evaluates and says so, and records nothing new.
  rows = metrics.read_jsonl(os.path.join(resumed, "metrics.jsonl"))
  train_on_one_device(tiny_entropy_config(tiny_corpus, **overrides), resumed)
  assert metrics.read_jsonl(os.path.join(resumed, "metrics.jsonl")) == rows
  np.testing.assert_array_equal([a[s] for s in (4, 5, 6)], [b[s] for s in (4, 5, 6)])


def test_a_diverged_run_stops_and_resumes_from_a_good_checkpoint(tiny_corpus, tmp_path):
  """lr=1e30 wrecks the params in one update: the run stops before saving them, and
  re-running with a sane lr, as the message says, trains (a checkpoint holding the wrecked
  params used to be called good, and resuming from it diverged again)."""
  workdir = str(tmp_path / "nan")
  overrides = dict(train__steps=6, train__log_every=3, train__save_every=1,
                   train__eval_every=0, train__eval_batches=1, optim__warmup_steps=0)
  with pytest.raises(train.NonFiniteLossError, match="lower optim.lr or check the data"):
    train_on_one_device(tiny_entropy_config(tiny_corpus, optim__lr=1e30, **overrides),
                        workdir)
  result = train_on_one_device(tiny_entropy_config(tiny_corpus, optim__lr=1e-3, **overrides),
                               workdir)
  assert math.isfinite(result["bpb"]) and max(_losses(workdir)) == 6


def test_non_finite_message_names_the_checkpoint_to_resume_from():
  message = lambda bad, saved: train._non_finite_message(bad, saved, "W/checkpoints")
  # A NaN loss at step 5 comes from the params of step 4.
  assert ("Checkpoint 4 holds the params that did it: move W/checkpoints/4 aside to resume "
          "from step 2") in message((5, "loss", math.nan), [2, 4])
  assert "The last good checkpoint is step 4 in W/checkpoints" in message(
      (6, "loss", math.nan), [2, 4])
  # Params made non-finite by the update of step 3 were never saved.
  assert message((3, "param_norm", math.inf), [2]).startswith(
      "the update of step 3 made the params inf (param_norm); training stopped before saving "
      "it. The last good checkpoint is step 2")
  assert "No checkpoint was saved before it" in message((1, "param_norm", math.inf), [])
  assert "no earlier one exists: start again in a new workdir" in message(
      (2, "loss", math.nan), [1])


def test_time_budget_stops_after_training_time_and_saves_the_last_step(tiny_corpus, tmp_path,
                                                                      capsys):
  workdir = str(tmp_path / "budget")
  # Compiling the first step takes seconds here: the budget must not count it, so the run
  # trains beyond that step, then stops on time long before `steps` and saves where it was.
  config = tiny_entropy_config(tiny_corpus, train__steps=100_000, train__time_budget_s=0.5,
                               train__log_every=100_000, train__save_every=100_000,
                               train__eval_every=0, train__eval_batches=1)
  train_on_one_device(config, workdir)
  last = max(_losses(workdir))
  assert 2 <= last < 100_000
  assert (f"train.time_budget_s=0.5 spent at step {last} of 100000; step {last} is saved"
          in capsys.readouterr().out)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(last)]


def test_sigterm_saves_the_next_step_and_stops_and_the_run_resumes_from_it(tiny_corpus,
                                                                            tmp_path, capsys):
  workdir = str(tmp_path / "preempted")
  # No periodic checkpoint and no evaluation; the time budget only ends a failing run.
  overrides = dict(train__steps=100_000, train__time_budget_s=120.0, train__log_every=1,
                   train__save_every=100_000, train__eval_every=0, train__eval_batches=1)
  notice_after = {}

  def send_notice_once_training():   # a scheduler's preemption notice, mid-run
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
      trained = logged_train_steps(workdir)
      if trained and max(trained) >= 2:
        notice_after["step"] = max(trained)
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.05)

  handler_before = signal.getsignal(signal.SIGTERM)
  notifier = threading.Thread(target=send_notice_once_training, daemon=True)
  notifier.start()
  with pytest.raises(train.TrainingPreempted, match="re-run the same command") as info:
    train_on_one_device(tiny_entropy_config(tiny_corpus, **overrides), workdir)
  notifier.join(timeout=10)

  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
  assert saved == [info.value.step] and notice_after["step"] <= info.value.step < 100_000
  assert max(_losses(workdir)) == info.value.step      # stopped at the step it saved
  assert f"saved step {info.value.step} in" in str(info.value)
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert not [r for r in rows if "valid/bpb" in r]     # no evaluation in the grace period
  assert signal.getsignal(signal.SIGTERM) == handler_before
  capsys.readouterr()

  # The same command resumes from the saved step.
  train_on_one_device(tiny_entropy_config(tiny_corpus, **dict(overrides,
                                                               train__steps=saved[0] + 1)),
                      workdir)
  assert f"resuming at step {saved[0]}" in capsys.readouterr().out
  assert max(_losses(workdir)) == saved[0] + 1


def test_learning_rate_schedules_warm_up_then_hold_or_decay():
  optim = configs.base_config().optim
  optim.update(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
  rates = lambda steps: [float(schedule(s)) for s in steps]
  optim.schedule = "wsd"     # warmup, stable until step 80 of 100, linear decay to 0.1
  schedule = train.make_schedule(optim, total_steps=100)
  np.testing.assert_allclose(rates([0, 5, 10, 50, 80, 90, 100]),
                             [0, 0.5, 1, 1, 1, 0.55, 0.1], atol=1e-6)
  optim.schedule = "constant"
  schedule = train.make_schedule(optim, total_steps=100)
  np.testing.assert_allclose(rates([5, 10, 100]), [0.5, 1, 1], atol=1e-6)
  optim.schedule = "cosine"  # halfway through the decay: halfway between 1 and 0.1
  schedule = train.make_schedule(optim, total_steps=110)
  np.testing.assert_allclose(rates([5, 10, 60, 110]), [0.5, 1, 0.55, 0.1], atol=1e-6)
  optim.schedule = "linear"
  with pytest.raises(configs.ConfigError, match="schedule='linear' is not one of"):
    train.make_schedule(optim, total_steps=100)


def _one_step(config, batch):
  """(metrics, optimizer state) after one train step from the config's initial params on
  the 8 test devices. (The first step's learning rate is 0: its gradient is in the Adam
  moments, not yet in the params.)"""
  trainer = train.Trainer(config, workdir="unused")
  state = trainer.init_state(jax.random.PRNGKey(config.seed))
  state, step_metrics = trainer.train_step(state, sharding.make_global_batch(
      batch, trainer.mesh), trainer.frozen)
  return jax.device_get(step_metrics), jax.device_get(state.opt_state)


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2)])   # (data, fsdp, tensor)
def test_gradient_accumulation_takes_the_step_of_the_whole_batch(tiny_corpus, mesh):
  config = tiny_entropy_config(tiny_corpus, train__batch_size=32, mesh__data=mesh[0],
                               mesh__fsdp=mesh[1], mesh__tensor=mesh[2])
  batch = data_lib.train_dataset(config.data, seq_len=config.train.seq_len, global_batch=32,
                                 seed=config.seed)[0]
  # Microbatch j holds rows j, j + k, ...: equal target counts make the mean of the
  # microbatch losses the whole batch's loss (packed rows: every row is full).
  assert (batch["targets"] != bytes_lib.PAD_ID).all()
  whole_metrics, whole_moments = _one_step(config, batch)
  for microbatches in (2, 4):
    config.train.grad_accum_steps = microbatches
    step_metrics, moments = _one_step(config, batch)
    for name in ("loss", "grad_norm"):
      np.testing.assert_allclose(step_metrics[name], whole_metrics[name], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9),
                 moments, whole_moments)


def test_gradient_accumulation_trains_blt_d_with_its_own_noise_per_microbatch(tiny_corpus,
                                                                              tmp_path):
  config = tiny_blt_config(tiny_corpus, "static,bltd4", train__steps=2, train__batch_size=4,
                           train__grad_accum_steps=2, train__eval_every=0,
                           train__eval_batches=1, train__log_every=1)
  train_on_one_device(config, str(tmp_path / "bltd"))
  rows = metrics.read_jsonl(str(tmp_path / "bltd" / "metrics.jsonl"))
  trained = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in trained] == [1, 2]
  assert all(np.isfinite(r["train/loss"]) and r["train/masked_ce_b4"] > 0 for r in trained)


def test_microbatches_that_do_not_split_over_the_devices_are_refused(tiny_corpus):
  # 16 rows over 8 batch shards: 2 microbatches of 8 rows fit, 4 of 4 rows do not.
  config = tiny_entropy_config(tiny_corpus, train__batch_size=16, train__grad_accum_steps=4)
  with pytest.raises(sharding.ShardingError, match="grad_accum_steps=4 .* divisor of 2"):
    train.Trainer(config, workdir="unused")


def test_steps_compiled_ahead_are_the_executables_the_steps_run(tiny_corpus, tmp_path,
                                                                 caplog):
  # Multi-process runs compile both steps before any process runs one (see
  # Trainer.compile_steps); a call that compiled again would defeat that.
  config = tiny_entropy_config(tiny_corpus)
  trainer = train.Trainer(config, str(tmp_path), jax.devices()[:2])
  state = trainer.init_state(jax.random.PRNGKey(0))
  trainer.compile_steps()
  shape = (config.train.batch_size, config.train.seq_len)
  batch = sharding.make_global_batch(
      {k: np.zeros(shape, np.int32) for k in data_lib.BATCH_KEYS}, trainer.mesh)
  with jax.log_compiles(), caplog.at_level("WARNING"):
    state, _ = trainer.train_step(state, batch, trainer.frozen)
    jax.block_until_ready(trainer.eval_step(state.params, batch, trainer.frozen))
  compiled = [r.getMessage() for r in caplog.records if "XLA compilation" in r.getMessage()]
  assert not [m for m in compiled if "_train_step" in m or "eval_sums" in m], compiled


def test_workdir_of_another_model_is_refused(tiny_corpus, tmp_path):
  workdir = str(tmp_path / "run")
  train_on_one_device(tiny_entropy_config(tiny_corpus, train__steps=1, train__eval_every=0),
                      workdir)
  other = tiny_entropy_config(tiny_corpus, train__steps=2, model__entropy__d_model=64)
  with pytest.raises(configs.ConfigError, match=r"another model \(model\.entropy\.d_model: "
                     r"32 \(saved\) vs 64 \(given\) in "):
    train_on_one_device(other, workdir)


def test_a_resume_keeps_the_data_batches_and_patches_of_its_first_run(tiny_corpus, tmp_path):
  """The batch of step s is a function of the seed, the data and the batch shape: a resume
  that changes them would not continue the run, so it is refused, naming the keys; how a
  step computes (remat, compute dtype, kernels) may change."""
  workdir = str(tmp_path / "run")
  first = dict(train__steps=1, train__eval_every=0, train__eval_batches=1)
  train_on_one_device(tiny_entropy_config(tiny_corpus, **first), workdir)
  for change, shown in [(dict(seed=7), "seed: 0 (saved) vs 7 (given)"),
                        (dict(train__batch_size=16), "train.batch_size: 8 (saved) vs 16"),
                        (dict(data__valid_fraction=0.5), "data.valid_fraction: 0.02 (saved)"),
                        (dict(patcher__mode="static"), "patcher.mode: ")]:
    again = tiny_entropy_config(tiny_corpus, **dict(first, train__steps=2, **change))
    with pytest.raises(configs.ConfigError, match=re.escape(shown) + ".*init_params_from="):
      train_on_one_device(again, workdir)
  assert checkpoint.saved_steps(workdir) == [1]
  assert checkpoint.read_config(workdir).seed == 0
  faster = tiny_entropy_config(tiny_corpus, **dict(first, train__steps=2, model__remat=True,
                                                   model__dtype="bfloat16"))
  train_on_one_device(faster, workdir)
  assert checkpoint.saved_steps(workdir) == [1, 2]


def test_a_workdir_without_checkpoints_takes_a_new_config(tiny_corpus, tmp_path):
  # A first run that failed before its first checkpoint (here: its config.json alone) does
  # not bind the workdir to its model: the corrected command trains, and its config stays.
  workdir = tmp_path / "run"
  workdir.mkdir()
  failed = tiny_entropy_config(tiny_corpus, model__entropy__d_model=64)
  (workdir / "config.json").write_text(configs.to_json(failed))
  train_on_one_device(tiny_entropy_config(tiny_corpus, train__steps=1, train__eval_every=0,
                                          train__eval_batches=1), str(workdir))
  assert checkpoint.read_config(str(workdir)).model.entropy.d_model == 32
  assert os.listdir(workdir / "checkpoints") == ["1"]


def test_an_empty_latest_step_folder_is_named_and_the_run_resumes_once_it_is_gone(
    tiny_corpus, tmp_path):
  """A step folder without a saved state (made or emptied by hand, a copy cut short) used
  to stop the resume with orbax's KeyError; it is named, with the step to resume from."""
  workdir = str(tmp_path / "run")
  overrides = dict(train__steps=1, train__save_every=1, train__eval_every=0,
                   train__eval_batches=1)
  train_on_one_device(tiny_entropy_config(tiny_corpus, **overrides), workdir)
  empty = os.path.join(workdir, "checkpoints", "5")
  os.makedirs(os.path.join(empty, "state"))
  more = tiny_entropy_config(tiny_corpus, **dict(overrides, train__steps=2))
  with pytest.raises(FileNotFoundError, match=r"checkpoints/5 is incomplete \(no saved state "
                     r"in it\), so the run cannot resume from it; remove that folder and run "
                     r"again to resume from step 1$"):
    train_on_one_device(more, workdir)
  assert checkpoint.saved_steps(workdir) == [1]
  os.rmdir(os.path.join(empty, "state"))
  os.rmdir(empty)
  train_on_one_device(more, workdir)
  assert checkpoint.saved_steps(workdir) == [1, 2]
  assert logged_train_steps(workdir) == [1, 2]


def test_params_of_another_model_are_named_not_restored(tmp_path):
  """load_params: a checkpoint lacking a param, or holding it in another shape, is an
  error naming the checkpoint (a partial restore used to hand back abstract leaves)."""
  checkpoint.save_params(str(tmp_path), {"a": np.ones((4, 3), np.float32)})
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32, sharding=device)
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"\['b'\] not in it"):
    checkpoint.load_params(str(tmp_path), {"a": spec(4, 3), "b": spec(2)})
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"Requested shape: \(5, 3\) .*stored shape: \(4, 3\)\); load it"):
    checkpoint.load_params(str(tmp_path), {"a": spec(5, 3)})


def test_init_params_from_another_model_fails_before_anything_is_written(tiny_corpus,
                                                                          tmp_path):
  entropy_dir = str(tmp_path / "entropy")
  train_on_one_device(tiny_entropy_config(tiny_corpus, train__steps=1, train__eval_every=0,
                                          train__eval_batches=1), entropy_dir)
  config = tiny_blt_config(tiny_corpus, "static", train__steps=1,
                           train__init_params_from=entropy_dir)
  with pytest.raises(configs.ConfigError, match=r"^config.train.init_params_from=.*entropy: "
                     r"checkpoint .* holds another model's params"):
    train_on_one_device(config, str(tmp_path / "blt"))
  assert not (tmp_path / "blt").exists()


def _one_file(tmp_path, text: str) -> str:
  path = tmp_path / "one.txt"
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize("text", ["def f():\n  return 1\n" * 50, ""], ids=["one_file", "empty"])
def test_no_validation_documents_fail_before_anything_is_written(tmp_path, text):
  config = tiny_entropy_config(_one_file(tmp_path, text), train__steps=1,
                               train__eval_every=0)
  workdir = tmp_path / "run"
  with pytest.raises(data_lib.DataError, match="no validation documents: data.valid is empty "
                     "and holding out valid_fraction=0.02 of data.train's 1 document"):
    train_on_one_device(config, str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize("key, value, message", [
    ("log_every", 0, "config.train.log_every=0 must be >= 1"),
    ("save_every", 0, "config.train.save_every=0 must be >= 1"),
    ("keep", 0, "config.train.keep=0 must be >= 1"),
    ("eval_every", -1, r"config.train.eval_every=-1 must be >= 0 \(0: only at the end\)"),
    ("eval_batches", -1, "config.train.eval_batches=-1 must be >= 0"),
])
def test_train_intervals_out_of_range_fail_before_anything_is_written(tiny_corpus, tmp_path,
                                                                      key, value, message):
  config = tiny_entropy_config(tiny_corpus, train__steps=2, **{f"train__{key}": value})
  workdir = tmp_path / "run"
  with pytest.raises(configs.ConfigError, match=message):
    train_on_one_device(config, str(workdir))
  assert not workdir.exists()


def test_cli_train_errors_are_one_line_and_leave_no_workdir(tiny_corpus, tmp_path, capsys):
  workdir = tmp_path / "run"
  base = ["train", "--config", os.path.join(REPO, "experiments", "entropy_tiny.py:runlocal"),
          "--workdir", str(workdir), "--config.data.prefetch=0", "--config.train.steps=2"]
  cases = [
      ([f"--config.data.train={_one_file(tmp_path, 'x = 1')}"], "no validation documents"),
      ([f"--config.data.train={tiny_corpus}", "--config.train.log_every=0"],
       "config.train.log_every=0 must be >= 1"),
  ]
  for overrides, message in cases:
    assert cli.main(base + overrides) == 2, overrides
    err = capsys.readouterr().err
    assert err.startswith("bltjax: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and not workdir.exists()


def test_workdir_saved_before_a_config_key_existed_still_resumes_and_loads(tiny_corpus,
                                                                          tmp_path):
  workdir = str(tmp_path / "run")
  train_on_one_device(tiny_entropy_config(tiny_corpus, train__steps=1, train__eval_every=0),
                      workdir)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    saved = json.load(f)
  del saved["model"]["scan_layers"]   # as written by a bltjax without that key
  with open(path, "w") as f:
    json.dump(saved, f)
  assert checkpoint.read_config(workdir).model.scan_layers is False
  train_on_one_device(tiny_entropy_config(tiny_corpus, train__steps=2, train__eval_every=0),
                      workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "2"


def test_a_data_mixture_trains_and_validates_each_source(tiny_corpus, tmp_path, capsys):
  # Two sources of two documents each (each holds one out for validation).
  names = (("argparse.py", "textwrap.py"), ("heapq.py", "bisect.py"))
  sources = ";".join(",".join(os.path.join(tiny_corpus, n) for n in pair) for pair in names)
  config = tiny_entropy_config(tiny_corpus, data__train=sources, data__train_weights="3,1",
                               data__valid_fraction=0.5, train__batch_size=8,
                               train__steps=1, train__eval_batches=1)
  result = train_on_one_device(config, str(tmp_path / "mixture"))
  out = capsys.readouterr().out
  assert "data mixture: 6 + 2 rows of each 8-row batch" in out
  assert re.search(r"data: 2 train documents \(0\.\d\d MB\), 2 valid documents", out)
  assert max(_losses(str(tmp_path / "mixture"))) == 1
  assert {"bpb", "source_0/bpb", "source_1/bpb"} <= set(result)
  assert result["source_0/bpb"] != result["source_1/bpb"]
  # Overall: the bytes of every source (with eval_batches, not the first source's alone).
  by_source = sorted((result["source_0/bpb"], result["source_1/bpb"]))
  assert by_source[0] < result["bpb"] < by_source[1]


def test_profile_steps_write_a_trace_of_those_steps(tiny_corpus, tmp_path, capsys):
  workdir = tmp_path / "profiled"
  config = tiny_entropy_config(tiny_corpus, train__steps=4, train__profile_steps=2,
                               train__profile_skip=1, train__eval_every=0,
                               train__eval_batches=1)
  train_on_one_device(config, str(workdir))
  traces = list((workdir / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and b"jit__train_step" in traces[0].read_bytes()
  assert f"profile of steps 2..3 written to {workdir / 'profile'}" in capsys.readouterr().out


def test_workdir_records_config_metrics_and_tensorboard(tiny_corpus, tmp_path):
  workdir = str(tmp_path / "run")
  result = train_on_one_device(tiny_entropy_config(tiny_corpus), workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["kind"] == "entropy"
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  keys = set().union(*rows)
  assert {"train/loss", "train/bpb", "train/grad_norm", "train/lr", "train/bytes_per_s",
          "train/step_time", "valid/bpb"} <= keys
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(
      os.path.join(workdir, "tb")))
  assert 0 < result["bpb"] < 9
