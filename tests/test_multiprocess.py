"""Multi-host training on one machine: N `jax.distributed` CPU processes on 127.0.0.1.

A 2-process run (2 x 4 devices, via launch/multiprocess.sh) has the losses of the
1-process run on 8 devices (same global batch), writes logs from process 0 only, and
its checkpoint resumes with another process count and mesh, going on with the losses
of the straight run, and `bltjax eval` on 2 processes gives the 1-process numbers.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bltjax import evaluate
from bltjax import metrics
from bltjax import train
from conftest import REPO, logged_train_steps, tiny_entropy_config

pytestmark = pytest.mark.multiprocess

LAUNCHER = os.path.join(REPO, "launch", "multiprocess.sh")
TIMEOUT_S = 150  # per launch; the launcher stops every process past it
# 6 steps, a checkpoint every 3. Warmup is longer than 6 steps, so the learning rate
# of a step does not depend on train.steps (3 or 6).
OVERRIDES = dict(train__steps=6, train__log_every=1, train__save_every=3,
                 train__eval_every=0, train__eval_batches=1)


def _cli_overrides(corpus, **overrides):
  args = [f"--config.data.train={corpus}", "--config.data.prefetch=0"]
  return args + [f"--config.{k.replace('__', '.')}={v}" for k, v in overrides.items()]


def start(n, devices_per_process, args, python=sys.executable):
  """Starts `launch/multiprocess.sh n ... args` in a session of its own; returns the
  Popen (stdout and stderr piped)."""
  env = dict(os.environ, PYTHON=python, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f)
  for name in [k for k in env if k.startswith("BLTJAX_")]:
    del env[name]
  cmd = ["bash", LAUNCHER, str(n), f"--devices_per_process={devices_per_process}",
         f"--timeout={TIMEOUT_S}", *args]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=REPO, start_new_session=True)


def finish(proc, returncode=0):
  """Waits for a launcher from `start`, checks its exit status; returns its stdout. If it
  hangs past its own timeout, the whole group (launcher and jax processes) is killed."""
  try:
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S + 30)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate()
  assert proc.returncode == returncode, f"launcher exit {proc.returncode}:\n{stdout}\n{stderr}"
  return stdout


def launch(n, devices_per_process, args, python=sys.executable):
  """Runs `launch/multiprocess.sh n ... args`; returns its stdout."""
  return finish(start(n, devices_per_process, args, python))


def _losses(workdir):
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


@pytest.fixture(scope="module")
def straight_losses(tiny_corpus, tmp_path_factory):
  """Losses of steps 1..6 of the 1-process run on the 8 test devices."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  train.train(tiny_entropy_config(tiny_corpus, **OVERRIDES), workdir, progress=False)
  return dict(_losses(workdir))


@pytest.fixture(scope="module")
def two_process_run(tiny_corpus, tmp_path_factory):
  """A 2-process x 4-device run of steps 1..3 (checkpoint at 3): (workdir, stdout)."""
  workdir = str(tmp_path_factory.mktemp("two_process") / "run")
  stdout = launch(2, 4, ["train", "--config", "experiments/entropy_tiny.py:runlocal",
                         "--workdir", workdir,
                         *_cli_overrides(tiny_corpus, **dict(OVERRIDES, train__steps=3))])
  return workdir, stdout


def test_two_processes_match_one_process_and_only_process_0_writes(
    two_process_run, straight_losses):
  workdir, stdout = two_process_run
  assert "process 0/2" in stdout and "8 global devices" in stdout
  losses = _losses(workdir)
  assert [s for s, _ in losses] == [1, 2, 3]  # one row per step: process 0 only
  np.testing.assert_allclose([l for _, l in losses], [straight_losses[s] for s in (1, 2, 3)],
                             rtol=1e-5)
  with open(os.path.join(workdir, "logs", "process_1.log")) as f:
    log_1 = f.read()
  assert "process 1/2" in log_1 and "[train" not in log_1
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["kind"] == "entropy"
  data_state = os.listdir(os.path.join(workdir, "checkpoints", "3", "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_state)


def test_two_process_checkpoint_resumes_on_one_process_and_another_mesh(
    two_process_run, straight_losses, tiny_corpus, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(two_process_run[0], workdir)
  # 1 process x 8 devices, mesh data=4 x tensor=2 (was data=8): the grain state of 2
  # processes does not apply, the iterator is positioned by the step.
  train.train(tiny_entropy_config(tiny_corpus, mesh__data=4, mesh__tensor=2, **OVERRIDES),
              workdir, progress=False)
  losses = dict(_losses(workdir))
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([losses[s] for s in (4, 5, 6)],
                             [straight_losses[s] for s in (4, 5, 6)], rtol=1e-5)


def test_eval_on_two_processes_equals_one_process(two_process_run, tiny_corpus):
  workdir = two_process_run[0]
  data = ",".join(os.path.join(tiny_corpus, n) for n in ("bisect.py", "heapq.py"))
  launch(2, 4, ["eval", "--workdir", workdir, "--data", data, "--max_batches", "3",
                "--name", "two_process"])
  with open(os.path.join(workdir, "eval", "two_process.json")) as f:
    report = json.load(f)
  single = evaluate.evaluate_workdir(workdir, data, max_batches=3)
  assert report["step"] == single.step == 3
  assert [r["bytes"] for r in report["files"]] == [r.bytes for r in single.files]
  np.testing.assert_allclose([r["bpb"] for r in report["files"]],
                             [r.bpb for r in single.files], rtol=1e-5)


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_four_processes(
    two_process_run, straight_losses, tiny_corpus, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(two_process_run[0], workdir)
  launch(4, 2, ["train", "--config", "experiments/entropy_tiny.py:runlocal",
                "--workdir", workdir, "--config.mesh.fsdp=2",
                *_cli_overrides(tiny_corpus, **OVERRIDES)])
  losses = dict(_losses(workdir))
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([losses[s] for s in (4, 5, 6)],
                             [straight_losses[s] for s in (4, 5, 6)], rtol=1e-5)


# A Python for the launcher that runs `-m bltjax.cli ARGS` with process 1 tracing the
# train step 40 s late (and any other command as it is).
LATE_PEER_PYTHON = """#!/usr/bin/env bash
[[ "$1" == "-m" ]] || exec {python} "$@"
shift 2  # -m bltjax.cli
exec {python} -c '
import os, runpy, sys, time
from bltjax import train
if os.environ["BLTJAX_PROCESS_ID"] == "1":
  on_time = train.Trainer._train_step
  def late(self, *args):
    time.sleep(40)
    return on_time(self, *args)
  train.Trainer._train_step = late
sys.argv[0] = "bltjax"
runpy.run_module("bltjax.cli", run_name="__main__")
' "$@"
"""


@pytest.mark.slow
def test_a_process_compiling_40s_late_does_not_break_the_first_step(tiny_corpus, tmp_path):
  # Gloo gives the peers of a collective's first run 30 s; processes on a loaded host
  # finish compiling further apart than that, so they wait for each other before it.
  python = tmp_path / "late_peer_python"
  python.write_text(LATE_PEER_PYTHON.format(python=sys.executable))
  python.chmod(0o755)
  workdir = str(tmp_path / "run")
  stdout = launch(2, 4, ["train", "--config", "experiments/entropy_tiny.py:runlocal",
                         "--workdir", workdir,
                         *_cli_overrides(tiny_corpus, **dict(OVERRIDES, train__steps=2))],
                  python=str(python))
  assert "process 0/2" in stdout
  assert [s for s, _ in _losses(workdir)] == [1, 2]


def _child_with_env(parent_pid: int, entry: str) -> int | None:
  """The pid of a child of `parent_pid` whose environment holds `entry` ("NAME=value")."""
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat") as f:
        parent = int(f.read().rsplit(")", 1)[1].split()[1])
      with open(f"/proc/{name}/environ", "rb") as f:
        environ = f.read().split(b"\0")
    except OSError:   # gone meanwhile
      continue
    if parent == parent_pid and entry.encode() in environ:
      return int(name)
  return None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the processes through /proc")
@pytest.mark.parametrize("notified", ["process 1", "launcher"])
def test_sigterm_saves_the_same_step_on_every_process(notified, tiny_corpus, tmp_path):
  # A scheduler may warn one host only (process 1), or the launcher, which passes the
  # notice on to every process. Either way the run exits 143 (terminated) once saved.
  workdir = str(tmp_path / "run")
  # Steps enough to outlast the notice; no periodic checkpoint, no evaluation.
  overrides = dict(OVERRIDES, train__steps=100_000, train__save_every=100_000,
                   train__time_budget_s=120.0)
  proc = start(2, 4, ["train", "--config", "experiments/entropy_tiny.py:runlocal",
                      "--workdir", workdir, *_cli_overrides(tiny_corpus, **overrides)])
  notice_after = None
  deadline = time.monotonic() + TIMEOUT_S
  while notice_after is None and time.monotonic() < deadline and proc.poll() is None:
    trained = logged_train_steps(workdir)
    if trained and max(trained) >= 2:
      notice_after = max(trained)
      os.kill(_child_with_env(proc.pid, "BLTJAX_PROCESS_ID=1") if notified == "process 1"
              else proc.pid, signal.SIGTERM)
    time.sleep(0.05)
  stdout = finish(proc, returncode=143)
  assert notice_after is not None, stdout

  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
  assert len(saved) == 1 and notice_after <= saved[0] < 100_000
  assert f"preemption notice (SIGTERM): saved step {saved[0]}" in stdout
  assert max(s for s, _ in _losses(workdir)) == saved[0]
  data_state = os.listdir(os.path.join(workdir, "checkpoints", str(saved[0]), "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_state)
