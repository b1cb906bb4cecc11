"""Multi-host start: `jax.distributed` from the environment our launchers set.

`initialize()` runs before anything touches devices (the CLI calls it first). It picks
one of three modes from the environment:

- explicit: `BLTJAX_COORDINATOR=host:port`, `BLTJAX_NUM_PROCESSES`, `BLTJAX_PROCESS_ID`
  (optional `BLTJAX_LOCAL_DEVICE_IDS=0,1`), as set by `launch/multiprocess.sh`.
- cluster: `BLTJAX_DISTRIBUTED=auto` (or a jax cluster name: `slurm`, `gcetpu`,
  `gketpu`, `ompi`, `mpi4py`): `jax.distributed.initialize()` detects the rest
  (`launch/tpu_pod.sh`, `launch/slurm_gpu.sbatch`). `JAX_COORDINATOR_PORT` overrides the
  detected port (Cloud TPU: 8476, see jax#35905). Without `BLTJAX_DISTRIBUTED`, a task
  of a multi-task `srun` step (`SLURM_STEP_NUM_TASKS > 1`) and a multi-worker TPU
  environment (`TPU_WORKER_HOSTNAMES` with several hosts) are detected too.
- single process: none of the above (or `BLTJAX_DISTRIBUTED=off`): nothing happens.

`BLTJAX_INIT_TIMEOUT` (seconds, default 300) bounds the rendezvous; raise it for large
cold starts. CPU processes talk through gloo collectives.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Mapping

import jax

COORDINATOR = "BLTJAX_COORDINATOR"
NUM_PROCESSES = "BLTJAX_NUM_PROCESSES"
PROCESS_ID = "BLTJAX_PROCESS_ID"
LOCAL_DEVICE_IDS = "BLTJAX_LOCAL_DEVICE_IDS"
MODE = "BLTJAX_DISTRIBUTED"
TIMEOUT = "BLTJAX_INIT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300
CLUSTERS = ("auto", "slurm", "gcetpu", "gketpu", "tpu", "ompi", "mpi4py", "k8s")


class DistributedError(ValueError):
  """A bad or incomplete multi-host environment. The message names the fix."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """How to start: `mode` is "single", "explicit" or a cluster name ("auto", ...)."""
  mode: str
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  timeout_s: int = DEFAULT_TIMEOUT_S


def _int_var(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env[name])
  except ValueError:
    raise DistributedError(f"{name}={env[name]!r} is not an integer") from None


def _int_or(text: str | None, default: int) -> int:
  try:
    return int(text) if text else default
  except ValueError:
    return default


def plan_from_env(env: Mapping[str, str] | None = None) -> Plan:
  """Reads the environment (default `os.environ`) into a `Plan`; starts nothing."""
  env = os.environ if env is None else env
  timeout = _int_var(env, TIMEOUT) if env.get(TIMEOUT) else DEFAULT_TIMEOUT_S
  if timeout < 1:
    raise DistributedError(f"{TIMEOUT}={timeout} must be a positive number of seconds")
  mode = env.get(MODE, "").strip().lower()
  if mode in ("off", "0", "false", "none"):
    return Plan("single", timeout_s=timeout)
  if mode and mode not in CLUSTERS:
    raise DistributedError(f"{MODE}={mode!r} is not one of off, {', '.join(CLUSTERS)}")
  explicit = [n for n in (COORDINATOR, NUM_PROCESSES, PROCESS_ID) if env.get(n)]
  local_ids = None
  if env.get(LOCAL_DEVICE_IDS):
    try:
      local_ids = tuple(int(i) for i in env[LOCAL_DEVICE_IDS].split(","))
    except ValueError:
      raise DistributedError(f"{LOCAL_DEVICE_IDS}={env[LOCAL_DEVICE_IDS]!r} is not a "
                             "comma-separated list of device ids") from None
  if mode:  # A cluster: jax detects what the explicit variables leave unset.
    return Plan(mode, env.get(COORDINATOR) or None,
                _int_var(env, NUM_PROCESSES) if env.get(NUM_PROCESSES) else None,
                _int_var(env, PROCESS_ID) if env.get(PROCESS_ID) else None,
                local_ids, timeout)
  if explicit:
    missing = [n for n in (COORDINATOR, NUM_PROCESSES, PROCESS_ID) if not env.get(n)]
    if missing:
      raise DistributedError(
          f"{', '.join(explicit)} set but {', '.join(missing)} not: set all of "
          f"{COORDINATOR}=host:port, {NUM_PROCESSES} and {PROCESS_ID} (or use "
          "launch/multiprocess.sh)")
    num, pid = _int_var(env, NUM_PROCESSES), _int_var(env, PROCESS_ID)
    if num < 1 or not 0 <= pid < num:
      raise DistributedError(f"{PROCESS_ID}={pid} must be in [0, {NUM_PROCESSES}={num})")
    if ":" not in env[COORDINATOR]:
      raise DistributedError(f"{COORDINATOR}={env[COORDINATOR]!r} needs a port: host:port")
    if num == 1:
      return Plan("single", timeout_s=timeout)
    return Plan("explicit", env[COORDINATOR], num, pid, local_ids, timeout)
  if _int_or(env.get("SLURM_STEP_NUM_TASKS"), 1) > 1 and "SLURM_PROCID" in env:
    return Plan("slurm", timeout_s=timeout)  # A task of a multi-task srun step.
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return Plan("auto", timeout_s=timeout)  # A multi-worker Cloud TPU slice.
  return Plan("single", timeout_s=timeout)


def startup_line(coordinator: str | None = None) -> str:
  """One line about this process: index, host, local and global devices."""
  local = jax.local_devices()
  where = f" (coordinator {coordinator})" if coordinator else ""
  kind = local[0].platform
  if local[0].device_kind.lower() != kind:
    kind += f", {local[0].device_kind}"
  return (f"bltjax: process {jax.process_index()}/{jax.process_count()} on "
          f"{socket.gethostname()}{where}: {len(local)} local / {jax.device_count()} "
          f"global devices ({kind})")


def initialize(env: Mapping[str, str] | None = None, *, timeout_s: int | None = None,
               verbose: bool = True) -> Plan:
  """Starts `jax.distributed` when the environment asks for it (see the module doc).

  Call once, before anything creates a jax array or lists devices. Safe to call again
  (a second call does nothing).

  Args:
    env: the environment to read (default `os.environ`).
    timeout_s: rendezvous timeout; default `BLTJAX_INIT_TIMEOUT` or 300 s.
    verbose: print the startup line of every process.

  Returns:
    The `Plan` that was carried out.

  Raises:
    DistributedError: an incomplete or malformed environment, or a failed rendezvous.
  """
  plan = plan_from_env(env)
  if timeout_s is not None:
    plan = dataclasses.replace(plan, timeout_s=int(timeout_s))
  if plan.mode == "single" or jax.distributed.is_initialized():
    return plan
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    # Cross-process collectives on CPU (the jax 0.10 default, made explicit).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(coordinator_address=plan.coordinator, num_processes=plan.num_processes,
                process_id=plan.process_id, initialization_timeout=plan.timeout_s)
  if plan.local_device_ids is not None:
    kwargs["local_device_ids"] = list(plan.local_device_ids)
  if plan.mode == "explicit":
    # Everything is given: no cluster detection (inside a SLURM job it would otherwise
    # restrict each CPU process to one device).
    kwargs["cluster_detection_method"] = "deactivate"
  elif plan.mode != "auto":
    kwargs["cluster_detection_method"] = plan.mode
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DistributedError(
        f"jax.distributed.initialize ({plan.mode}, coordinator {plan.coordinator or 'auto'}) "
        f"failed: {first}; check that every process started with the same coordinator "
        f"and process count, or raise {TIMEOUT}") from e
  if verbose:
    print(startup_line(plan.coordinator), flush=True)
  return plan


def barrier(name: str, timeout_s: int | None = None) -> None:
  """Waits until every process reaches the barrier `name` (nothing to do for one process).

  The wait goes through the coordination service, not a device collective, so it may
  last up to `timeout_s` (default `BLTJAX_INIT_TIMEOUT` or 300 s): a collective's first
  run gives late peers only gloo's fixed 30 s (and orbax's barriers are such collectives).
  """
  if jax.process_count() == 1:
    return
  if timeout_s is None:
    timeout_s = plan_from_env().timeout_s
  # pylint: disable-next=g-import-not-at-top
  from jax._src import distributed as jax_distributed  # The client has no public handle.
  jax_distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


def is_main() -> bool:
  """True on process 0, the one that writes logs, summaries and reports."""
  return jax.process_index() == 0
