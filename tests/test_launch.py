"""Launch scripts (syntax, dry runs, early errors) and the multi-host environment."""

import glob
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from bltjax import distributed
from conftest import REPO

LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")) + glob.glob(os.path.join(LAUNCH, "*.sbatch")))


def run(script, *args, env=None, timeout=60):
  """A launcher run with none of the launchers' settings inherited (`make test PYTHON=...`
  exports PYTHON), only those in `env`."""
  full_env = {k: v for k, v in os.environ.items()
              if k != "PYTHON" and not k.startswith(("BLTJAX_", "SLURM_", "TPU_"))}
  full_env.update(env or {})
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=full_env,
                        capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_all_launchers_exist_and_parse():
  names = {os.path.basename(s) for s in SCRIPTS}
  assert {"local.sh", "multiprocess.sh", "tpu_pod.sh", "slurm_gpu.sbatch"} <= names
  for script in SCRIPTS:
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0, f"{script}: {proc.stderr}"
    with open(script) as f:
      head = f.read(3000)
    assert "Usage" in head and "--dry_run" in head, f"{script} documents no usage"


# --- local.sh -------------------------------------------------------------------------


@pytest.mark.parametrize("script, args", [("local.sh", ["--help"]), ("local.sh", ["-h"]),
                                          ("multiprocess.sh", ["--help"]),
                                          ("tpu_pod.sh", ["-h"]),
                                          ("slurm_gpu.sbatch", ["--help"])])
def test_launcher_help_prints_its_usage(script, args):
  proc = run(script, *args)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("Runs a bltjax command") and "Usage" in proc.stdout
  assert "--dry_run" in proc.stdout and "set -euo" not in proc.stdout
  assert "#" not in proc.stdout.splitlines()[0]


def test_a_dry_run_after_sweep_is_the_sweeps_own():
  proc = run("local.sh", "--dry_run", "sweep", "--config", "s.py", "--workdir", "w",
             "--dry_run")
  assert proc.stdout.strip() == ("env BLTJAX_DISTRIBUTED=off python3 -m bltjax.cli sweep "
                                 "--config s.py --workdir w --dry_run")
  # After another command, or before it, --dry_run is the launcher's; --help after one is
  # the command's.
  proc = run("local.sh", "eval", "--workdir", "w", "--dry_run", "--help")
  assert proc.stdout.strip() == ("env BLTJAX_DISTRIBUTED=off python3 -m bltjax.cli eval "
                                 "--workdir w --help")




def test_local_dry_run():
  proc = run("local.sh", "--dry_run", "--config", "experiments/entropy_tiny.py",
             "--workdir", "runs/x")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == ("env BLTJAX_DISTRIBUTED=off python3 -m bltjax.cli train "
                                 "--config experiments/entropy_tiny.py --workdir runs/x")
  proc = run("local.sh", "eval", "--workdir", "runs/x", "--data", "a b.txt",
             "--cpu_devices=8", "--dry_run", env={"PYTHON": "py"})
  assert proc.stdout.strip() == ("env BLTJAX_DISTRIBUTED=off JAX_NUM_CPU_DEVICES=8 "
                                 "JAX_PLATFORMS=cpu py -m bltjax.cli eval --workdir runs/x "
                                 "--data 'a b.txt'")


def test_local_missing_python_is_a_clear_error():
  proc = run("local.sh", "--config", "x.py", env={"PYTHON": "/nonexistent/python"})
  assert proc.returncode == 2
  assert "python interpreter '/nonexistent/python' not found" in proc.stderr


# --- multiprocess.sh ------------------------------------------------------------------


def test_multiprocess_dry_run_prints_one_command_per_process():
  proc = run("multiprocess.sh", "3", "--port=12345", "--devices_per_process", "2",
             "--config", "experiments/entropy_tiny.py:runlocal", "--workdir", "/tmp/w",
             "--dry_run", env={"PYTHON": "python"})
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert lines[0] == "mkdir -p /tmp/w/logs"   # pasted as a script, the logs have a folder
  assert lines[-1] == "wait"
  assert lines[1:4] == [
      f"env BLTJAX_COORDINATOR=127.0.0.1:12345 BLTJAX_NUM_PROCESSES=3 BLTJAX_PROCESS_ID={i} "
      "JAX_NUM_CPU_DEVICES=2 JAX_PLATFORMS=cpu python -m bltjax.cli train --config "
      "experiments/entropy_tiny.py:runlocal --workdir /tmp/w "
      f"> /tmp/w/logs/process_{i}.log 2>&1 &" for i in range(3)]


@pytest.mark.parametrize("args, message", [
    ([], "missing N"),
    (["0"], "N must be a positive number"),
    (["2", "--timeout=soon"], "--timeout must be a number"),
])
def test_multiprocess_bad_arguments(args, message):
  proc = run("multiprocess.sh", *args)
  assert proc.returncode == 2 and message in proc.stderr


def _fake_python(tmp_path, body):
  """A `python` that runs `-c` snippets for real and `body` for `-m bltjax.cli`."""
  path = tmp_path / "python"
  path.write_text(f'#!/bin/bash\nif [[ "$1" == "-c" ]]; then exec {sys.executable} "$@"; fi\n'
                  + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return str(path)


def test_multiprocess_stops_everything_when_one_process_fails(tmp_path):
  python = _fake_python(tmp_path, 'if [[ "$BLTJAX_PROCESS_ID" == 1 ]]; then\n'
                        '  echo "process 1 broke"; exit 3\nfi\nexec sleep 60\n')
  start = time.time()
  proc = run("multiprocess.sh", "3", f"--log_dir={tmp_path}/logs", "--config", "x.py",
             env={"PYTHON": python})
  assert proc.returncode == 3
  assert time.time() - start < 30  # processes 0 and 2 were stopped, not waited for
  assert "process 1 failed (exit 3)" in proc.stderr and "process 1 broke" in proc.stderr
  assert sorted(os.listdir(tmp_path / "logs")) == [f"process_{i}.log" for i in range(3)]
  # A second launch keeps the logs of the first (the crash) as process_<i>.log.prev.
  proc = run("multiprocess.sh", "3", f"--log_dir={tmp_path}/logs", "--config", "x.py",
             env={"PYTHON": python})
  assert proc.returncode == 3
  assert (tmp_path / "logs" / "process_1.log.prev").read_text() == "process 1 broke\n"
  assert sorted(os.listdir(tmp_path / "logs")) == sorted(
      f"process_{i}.log{end}" for i in range(3) for end in ("", ".prev"))


def test_multiprocess_timeout(tmp_path):
  python = _fake_python(tmp_path, "exec sleep 60\n")
  proc = run("multiprocess.sh", "2", "--timeout=1", f"--log_dir={tmp_path}/logs",
             env={"PYTHON": python})
  assert proc.returncode == 124 and "--timeout=1 s reached" in proc.stderr


# --- slurm_gpu.sbatch -----------------------------------------------------------------

SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "16"}


def test_slurm_dry_run_prints_the_srun_line():
  proc = run("slurm_gpu.sbatch", "--dry_run", "--config", "experiments/entropy_tiny.py",
             "--workdir", "/shared/run", "--config.train.steps=10", env=SLURM_ENV)
  assert proc.returncode == 0, proc.stderr
  port = 61440 + 4242 % 4096
  assert proc.stdout.strip().splitlines() == [
      f"export BLTJAX_DISTRIBUTED=slurm BLTJAX_COORDINATOR=gpu07:{port} "
      "BLTJAX_NUM_PROCESSES=16 BLTJAX_INIT_TIMEOUT=900",
      "srun --kill-on-bad-exit=1 --label python3 -m bltjax.cli train --config "
      "experiments/entropy_tiny.py --workdir /shared/run --config.train.steps=10"]


def test_slurm_outside_an_allocation_or_without_srun_is_a_clear_error():
  proc = run("slurm_gpu.sbatch", "--dry_run", "--config", "x.py")
  assert proc.returncode == 2
  assert "SLURM_JOB_ID is not set: this is not a SLURM allocation" in proc.stderr
  proc = run("slurm_gpu.sbatch", "--config", "x.py",
             env=dict(SLURM_ENV, SRUN="/nonexistent/srun"))
  assert proc.returncode == 2 and "'/nonexistent/srun' not found" in proc.stderr


# --- tpu_pod.sh -----------------------------------------------------------------------


def test_tpu_dry_run_prints_the_gcloud_commands():
  proc = run("tpu_pod.sh", "--tpu=blt", "--zone", "us-west4-a", "--dry_run",
             "--config", "experiments/entropy_tiny.py", "--workdir", "/mnt/runs/x")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  vm = "gcloud compute tpus tpu-vm"
  assert lines[0] == (f"{vm} describe blt --zone=us-west4-a >/dev/null 2>&1 || {vm} create "
                      "blt --zone=us-west4-a --accelerator-type=v5litepod-16 "
                      "--version=v2-alpha-tpuv5-lite")
  assert lines[1].startswith("tar -czf ") and f"-C {REPO} " in lines[1]
  assert lines[2].startswith(f"{vm} scp ") and "blt:bltjax-src.tar.gz --worker=all" in lines[2]
  assert lines[3].startswith(f"{vm} ssh blt --worker=all --zone=us-west4-a '--command=")
  assert 'pip install -q -e "./bltjax[tpu]"' in lines[3]
  assert lines[4] == (
      f"{vm} ssh blt --worker=all --zone=us-west4-a '--command=set -o pipefail; mkdir -p "
      "bltjax_logs && cd bltjax && BLTJAX_DISTRIBUTED=auto JAX_COORDINATOR_PORT=8476 "
      "BLTJAX_INIT_TIMEOUT=900 python3 -m bltjax.cli train --config "
      "experiments/entropy_tiny.py --workdir /mnt/runs/x 2>&1 | tee "
      "../bltjax_logs/$(hostname).log'")
  assert lines[5:] == ["mkdir -p tpu_logs/blt",
                       f"{vm} scp --recurse blt:bltjax_logs tpu_logs/blt --worker=all "
                       "--zone=us-west4-a"]


@pytest.mark.parametrize("args, env, message", [
    (["--zone=z"], {}, "no TPU VM name; pass --tpu=NAME"),
    (["--tpu=t"], {}, "no zone; pass --zone=ZONE"),
    (["--tpu=t", "--zone=z"], {"GCLOUD": "/nonexistent/gcloud"},
     "'/nonexistent/gcloud' not found; install the Google Cloud SDK"),
    (["--tpu=t", "--zone=z", "--workdir", "gs://b/run"], {}, "mount the bucket"),
    (["--tpu=t", "--zone=z", "--workdir", "runs/x"], {}, "--workdir must be an absolute"),
    (["--tpu=t", "--zone=z", "--workdir=runs/x"], {}, "lands in ~/bltjax on each worker"),
    (["--tpu=t", "--zone=z", "export", "--workdir", "/mnt/w", "--out", "runs/hf"], {},
     "--out must be an absolute path every worker shares"),
])
def test_tpu_missing_tool_or_variable_is_a_clear_error(args, env, message):
  proc = run("tpu_pod.sh", *args, env=env)
  assert proc.returncode == 2 and message in proc.stderr


# --- bltjax.distributed ---------------------------------------------------------------


def test_distributed_plan_from_environment():
  plan = distributed.plan_from_env
  assert plan({}).mode == "single"
  explicit = plan({"BLTJAX_COORDINATOR": "127.0.0.1:1234", "BLTJAX_NUM_PROCESSES": "2",
                   "BLTJAX_PROCESS_ID": "1", "BLTJAX_INIT_TIMEOUT": "60"})
  assert explicit == distributed.Plan("explicit", "127.0.0.1:1234", 2, 1, None, 60)
  assert plan({"BLTJAX_COORDINATOR": "h:1", "BLTJAX_NUM_PROCESSES": "1",
               "BLTJAX_PROCESS_ID": "0"}).mode == "single"
  srun_task = {"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "3"}
  assert plan(dict(srun_task, BLTJAX_DISTRIBUTED="off")).mode == "single"
  # A task of a multi-task srun step; a multi-worker TPU slice; asked for by name.
  assert plan(srun_task).mode == "slurm"
  assert plan({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}).mode == "single"  # sbatch shell
  assert plan(dict(srun_task, SLURM_STEP_NUM_TASKS="1")).mode == "single"  # srun -n 1
  assert plan({"TPU_WORKER_HOSTNAMES": "w0,w1"}).mode == "auto"
  slurm = plan({"BLTJAX_DISTRIBUTED": "slurm", "BLTJAX_COORDINATOR": "gpu07:61000",
                "BLTJAX_NUM_PROCESSES": "16"})
  assert (slurm.mode, slurm.coordinator, slurm.num_processes, slurm.process_id) == (
      "slurm", "gpu07:61000", 16, None)
  assert plan({"BLTJAX_DISTRIBUTED": "auto"}).timeout_s == distributed.DEFAULT_TIMEOUT_S


@pytest.mark.parametrize("env, message", [
    ({"BLTJAX_COORDINATOR": "h:1"}, "BLTJAX_NUM_PROCESSES, BLTJAX_PROCESS_ID not"),
    ({"BLTJAX_COORDINATOR": "h:1", "BLTJAX_NUM_PROCESSES": "2", "BLTJAX_PROCESS_ID": "2"},
     "must be in [0, BLTJAX_NUM_PROCESSES=2)"),
    ({"BLTJAX_COORDINATOR": "h", "BLTJAX_NUM_PROCESSES": "2", "BLTJAX_PROCESS_ID": "0"},
     "needs a port"),
    ({"BLTJAX_COORDINATOR": "h:1", "BLTJAX_NUM_PROCESSES": "two", "BLTJAX_PROCESS_ID": "0"},
     "BLTJAX_NUM_PROCESSES='two' is not an integer"),
    ({"BLTJAX_DISTRIBUTED": "yes"}, "is not one of off"),
    ({"BLTJAX_INIT_TIMEOUT": "0"}, "positive number of seconds"),
])
def test_distributed_bad_environment_is_a_clear_error(env, message):
  with pytest.raises(distributed.DistributedError, match=re.escape(message)):
    distributed.plan_from_env(env)


def test_initialize_does_nothing_for_one_process():
  assert distributed.initialize({}).mode == "single"
  assert distributed.is_main()


# --- bench/gpu_suite.sh ---------------------------------------------------------------

def test_gpu_suite_dry_run_lists_every_benchmark_within_eight_minutes():
  def dry_run(*steps):
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_suite.sh"), *steps],
                          env=dict(os.environ, DRY_RUN="1"), capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return re.findall(r"^== \[(\d+) s\] \S+ (.*)$", proc.stdout, flags=re.M)

  default = dry_run()
  commands = " ".join(c for _, c in default)
  for bench in ("pallas_kernels.sparse_ffn.bench", "diffusion_kernels.py",
                "sparse_ffn_train.py", "blt_bench.py:bltd8,large", "generation.py",
                "hf_peer.py"):
    assert bench in commands
  assert sum(int(b) for b, _ in default) < 8 * 60
  # too long for the 8 minutes
  named_only = dry_run("generation_all", "bltd8_400m", "decode_layers", "fused_projections",
                       "entropy_100m")
  assert "bltd8_400m" in named_only[1][1] and "--quick" not in named_only[0][1]
  assert "decode_layers.py" in named_only[2][1]
  assert "--compare projections" in named_only[3][1]
  assert "--model entropy_100m" in named_only[4][1]
  steps = default + named_only
  for _, command in steps:   # every script it names exists
    target = command.split()[1] if command.startswith("-m ") else command.split()[0]
    path = (target.replace(".", "/") + ".py" if command.startswith("-m ") and
            not target.startswith("bltjax") else target)
    if not command.startswith("-m bltjax"):
      assert os.path.exists(os.path.join(REPO, path)) or os.path.isdir(
          os.path.join(REPO, path[:-3])), path
