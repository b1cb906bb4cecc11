"""Test setup: 8 fake CPU devices (set before jax starts), float32 matmuls, and fast
compiles (LLVM -O0, one disk cache per run)."""

import contextlib
import importlib.metadata
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# 8 fake devices share 2 cores: a loaded machine must not trip XLA's 40 s collective
# rendezvous timeout (it aborts the process).
os.environ["XLA_FLAGS"] += (" --xla_cpu_collective_call_terminate_timeout_seconds=900"
                            " --xla_cpu_collective_timeout_seconds=900"
                            " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300")
# Compiling is most of the suite's time (hundreds of small programs, each run briefly):
# LLVM's -O0 codegen compiles them faster, and one disk cache for the xdist workers of a
# run (named by its test-run id, removed when the run ends) compiles a program that
# several tests or both workers need once.
os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# XLA:CPU's older fusion emitters compile the same fusions faster than its MLIR ones: the
# suite's summed test time fell 27%, mostly in decoding programs (bench/RESULTS.md,
# 2026-11-28). Tests only: bltjax itself keeps XLA's defaults. jaxlib 0.11 removed the
# older emitters, and XLA aborts on a flag it does not know.
OLD_FUSION_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
if tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2]) < (0, 11):
  os.environ["XLA_FLAGS"] += " " + OLD_FUSION_EMITTERS
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# In-process `cli.main` calls keep the suite's cache (the test of the command's own cache
# runs it in a subprocess).
os.environ["BLTJAX_COMPILE_CACHE"] = "off"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _xla_cache(run_id) -> str:
  return os.path.join(tempfile.gettempdir(), f"bltjax-tests-xla-{run_id}")


jax.config.update("jax_compilation_cache_dir",
                  _xla_cache(os.environ.get("PYTEST_XDIST_TESTRUNUID", os.getpid())))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


import shutil  # noqa: E402
import sysconfig  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config):
  """The xdist controller picks the run id its workers name the cache by (it knows it)."""
  if not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None):
    config.option.testrunuid = config.option.testrunuid or uuid.uuid4().hex


def pytest_unconfigure(config):
  if not hasattr(config, "workerinput"):   # the controller, or a run without xdist
    xdist = getattr(config.option, "numprocesses", None)
    shutil.rmtree(_xla_cache(config.option.testrunuid if xdist else os.getpid()),
                  ignore_errors=True)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small, real, fixed text for training tests: a few standard-library modules.
CORPUS_MODULES = ("argparse.py", "textwrap.py", "fractions.py", "heapq.py", "bisect.py")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
  """A directory of a few real Python source files (~120 KB)."""
  directory = tmp_path_factory.mktemp("corpus")
  stdlib = sysconfig.get_paths()["stdlib"]
  for name in CORPUS_MODULES:
    shutil.copy(os.path.join(stdlib, name), directory / name)
  return str(directory)


@pytest.fixture(scope="session")
def package_corpus(tmp_path_factory):
  """The `email` package's 20 modules (~400 KB): enough documents for a held-out split."""
  directory = tmp_path_factory.mktemp("email_corpus")
  package = os.path.join(sysconfig.get_paths()["stdlib"], "email")
  for name in sorted(os.listdir(package)):
    if name.endswith(".py"):
      shutil.copy(os.path.join(package, name), directory / name)
  return str(directory)


def init_variables(module, *args, seed: int = 0, **kwargs) -> dict:
  """`module.init(PRNGKey(seed), *args, **kwargs)`, unboxed, as one jitted program: eager
  init compiles each of its hundreds of ops apart (a tiny BLT: 14 s against 4 s)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  init = jax.jit(lambda rng: module.init(rng, *args, **kwargs))
  return nn.meta.unbox(init(jax.random.PRNGKey(seed)))


def lowered_text(jitted, *args, platform: str) -> str:
  """`jitted(*args)` (args may be abstract) lowered for `platform` ("cuda" | "tpu") on this
  CPU host, as text. From jax 0.11 a Triton kernel lowers for the GPU kind of the abstract
  mesh in context (a host without a GPU has none to ask), so for "cuda" the mesh in
  context, or an empty one, names an H100."""
  target = contextlib.nullcontext()
  if platform == "cuda":
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None,
                                       platform="gpu")
    mesh = jax.sharding.get_abstract_mesh()
    target = jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((), (), abstract_device=h100) if mesh.empty
        else mesh.update(abstract_device=h100))
  with target:
    return jitted.trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _pallas_calls(fn, *args):
  """The pallas_call equations of `fn(*args)` (args may be abstract), nested ones too."""
  import jax.extend  # pylint: disable=g-import-not-at-top

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        yield eqn
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from walk(sub)

  return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def tpu_vmem_bytes(fn, *args) -> dict:
  """Per Pallas kernel `fn(*args)` calls (args may be abstract), by name: the bytes its
  TPU lowering holds in VMEM, i.e. its BlockSpec blocks not left in HBM plus its VMEM
  scratch (Pallas double-buffers the blocks on top; the comparison is what counts)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  nbytes = lambda aval: int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize
  sizes = {}
  for eqn in _pallas_calls(fn, *args):
    mapping = eqn.params["grid_mapping"]
    blocks = [m.transformed_block_aval for m in mapping.block_mappings]
    in_vmem = [b.inner_aval for b in blocks if b.memory_space != pl.ANY]
    sizes[eqn.params["name"]] = sum(map(nbytes, in_vmem + tpu_vmem_scratch(mapping)))
  return sizes


def tpu_vmem_scratch(grid_mapping) -> list:
  """The VMEM scratch avals of a TPU pallas_call's grid mapping."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return [a.inner_aval for a in grid_mapping.scratch_avals if a.memory_space == pltpu.VMEM]


def tpu_streamed_blocks(fn, *args) -> dict:
  """Per TPU Pallas kernel of `fn(*args)`, by name: the (shape, dtype) of each block it
  streams through `streaming.block_loop`, i.e. what it DMAs from HBM per visited block
  (a stream's scratch is two VMEM slots of its block)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return {eqn.params["name"]: [(tuple(a.shape[1:]), np.dtype(a.dtype))
                               for a in tpu_vmem_scratch(eqn.params["grid_mapping"])]
          for eqn in _pallas_calls(fn, *args)}


def unigram_bpb(data_config, split="valid") -> float:
  """Entropy (bits) of the byte distribution of a split: what a model must beat."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bltjax import data  # pylint: disable=g-import-not-at-top
  source = data.split_source(data_config, split)
  counts = np.zeros(256)
  for i in range(len(source.lengths)):
    counts += np.bincount(np.frombuffer(source.read(i, 0, int(source.lengths[i])), np.uint8),
                          minlength=256)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())


def tiny_entropy_config(corpus: str, **overrides):
  """The runlocal entropy config on `corpus`, with `section.key=value` overrides."""
  from bltjax import configs  # pylint: disable=g-import-not-at-top
  config = configs.load(os.path.join(REPO, "experiments", "entropy_tiny.py:runlocal"))
  configs.set_value(config, "data.train", corpus)
  configs.set_value(config, "data.prefetch", 0)
  for key, value in overrides.items():
    configs.set_value(config, key.replace("__", "."), value)
  return config


def tiny_blt_config(corpus: str, variant: str = "static", **overrides):
  """The runlocal BLT config (`variant`: static | space | bltd4 ...) on `corpus`."""
  from bltjax import configs  # pylint: disable=g-import-not-at-top
  config = configs.load(os.path.join(REPO, "experiments", f"blt_tiny.py:{variant},runlocal"))
  configs.set_value(config, "data.train", corpus)
  configs.set_value(config, "data.prefetch", 0)
  for key, value in overrides.items():
    configs.set_value(config, key.replace("__", "."), value)
  return config


def logged_train_steps(workdir) -> list[int]:
  """Steps of the train rows a running job has logged to `<workdir>/metrics.jsonl` so far
  (complete lines only: the last one may be half written)."""
  import json  # pylint: disable=g-import-not-at-top
  try:
    with open(os.path.join(str(workdir), "metrics.jsonl"), encoding="utf-8") as f:
      lines = [line for line in f if line.endswith("\n")]
  except FileNotFoundError:
    return []
  rows = [json.loads(line) for line in lines if line.strip()]
  return [row["step"] for row in rows if "train/loss" in row]


def train_on_one_device(config, workdir):
  """`bltjax.train.train` on a 1-device mesh (tests of sharding use all 8 devices)."""
  import jax  # pylint: disable=g-import-not-at-top,redefined-outer-name
  from bltjax import train  # pylint: disable=g-import-not-at-top
  return train.train(config, str(workdir), progress=False, devices=jax.devices()[:1])


def assert_trees_close(want, got, *, rel: float = 1e-4):
  """Every leaf of `got` within `rel` of `want`'s (max abs difference over the leaf's
  largest magnitude); a failure names the leaf."""
  import jax  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    scale = max(float(jnp.max(jnp.abs(a))), 1e-6)
    assert float(jnp.max(jnp.abs(a - b))) / scale < rel, jax.tree_util.keystr(path)


def two_train_steps(trainer, make_batch):
  """Two `trainer.train_step`s from a fresh state on `make_batch(seed)` for seeds 0, 1
  (made global over the trainer's mesh): (metrics of each step, final params)."""
  import jax  # pylint: disable=g-import-not-at-top,redefined-outer-name
  from bltjax import sharding  # pylint: disable=g-import-not-at-top
  state = trainer.init_state(jax.random.PRNGKey(0))
  rows = []
  for seed in range(2):
    batch = sharding.make_global_batch(make_batch(seed), trainer.mesh)
    state, metrics = trainer.train_step(state, batch, trainer.frozen)
    rows.append(jax.device_get(metrics))
  return rows, jax.device_get(state.params)


def packed_batch(seed: int = 0, batch: int = 8, length: int = 48) -> dict:
  """Random bytes in rows of two documents (even rows) or one, a quarter of the rows
  ending in padding: numpy `inputs`, `targets`, `segment_ids` `[batch, length]`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, 260, (batch, length + 1)).astype(np.int32)
  segment_ids = np.ones((batch, length), np.int32)
  segment_ids[::2, length * 5 // 8:] = 2
  segment_ids[1::4, length * 5 // 6:] = 0   # padding: bytes and patches that must not count
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids}


def loss_and_grads(config, params, batch, seed: int = 0):
  """The config's objective on `batch`: (loss, metrics, grads), jitted."""
  import jax  # pylint: disable=g-import-not-at-top,redefined-outer-name
  from bltjax import objectives  # pylint: disable=g-import-not-at-top
  objective = objectives.make_objective(config)
  fn = jax.jit(jax.value_and_grad(
      lambda p: objective.loss(p, batch, jax.random.PRNGKey(seed)), has_aux=True))
  (loss, metrics), grads = fn(params)
  return float(loss), jax.device_get(metrics), grads


def shard_map_body_of_train_step(trainer, batch_size: int, seq_len: int, platform: str) -> str:
  """The train step lowered for `platform` ("cuda" | "tpu") on the trainer's mesh, from
  its first shard_map body on (Shardy or GSPMD): where a kernel's custom call must be."""
  import jax  # pylint: disable=g-import-not-at-top,redefined-outer-name
  from bltjax import sharding, train  # pylint: disable=g-import-not-at-top
  batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                      sharding=trainer.batch_sharding),
                       train.abstract_batch(batch_size, seq_len))
  with sharding.use_mesh(trainer.mesh):
    text = lowered_text(trainer._jit_train_step, trainer.abstract_state, batch, None,
                        platform=platform)
  starts = [text.find(m) for m in ("sdy.manual_computation", "SPMDFullToShardShape")]
  return text[min(i for i in starts if i >= 0):]


def assert_runs_match(want, got, keys, *, tol: float = 2e-5):
  """Two `two_train_steps` results agree: each step's metrics `keys` (relative `tol`) and
  every final parameter (absolute `tol`)."""
  import jax  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import numpy as np  # pylint: disable=g-import-not-at-top
  (want_rows, want_params), (got_rows, got_params) = want, got
  for a, b in zip(want_rows, got_rows):
    for key in keys:
      np.testing.assert_allclose(b[key], a[key], rtol=tol, err_msg=key)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want_params),
                          jax.tree.leaves(got_params)):
    np.testing.assert_allclose(b, a, atol=tol, err_msg=jax.tree_util.keystr(path))
