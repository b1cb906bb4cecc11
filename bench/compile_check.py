"""Compiles every Pallas kernel of bltjax, and the decoding programs and train steps that
call them, for a GPU (H100, H200) or a TPU (v4, v5e, v5p, v6e), on a host without one.

XLA compiles for compile-only devices: a GPU described by its target config (compute
capability, shared memory, registers), so Pallas's Triton lowering, the Triton compiler
and its resource checks run (a block that needs more shared memory than the device has
fails here as it would there); a TPU topology from libtpu, so Mosaic compiles the TPU
kernels as for the chip. Nothing executes. A check to run before a GPU or TPU session,
whose minutes are few: it catches what cross-lowering (tests/pallas_kernels) cannot,
short of running. Shapes: those of `bench/gpu_suite.sh` (the diffusion and sparse-FFN
kernel benchmarks, and the generation model of its `gen_train` step, decoded with
`--attention_impl pallas --unmask_impl pallas` and trained with
`model.attention.impl=pallas`).

Needs the compiler plugin of the installed jaxlib (no GPU, TPU or driver):
  pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"   # GPU
  pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"      # TPU
  python bench/compile_check.py                  # H200 (--target h100 | v5e | v6e | ...)
  python bench/compile_check.py --only kernels   # the kernels alone (seconds)
  python bench/compile_check.py --only train     # the train steps (a minute)
  python bench/compile_check.py --target v5e --only lengths \
      --range_lengths 4096,65536 --cache_sizes 1024,65536   # long rows, large caches
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

# The CUDA plugin checks the driver's version when it loads; there is none on a CPU host.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

# GpuTargetConfigProto (text format) of each GPU target: the device limits the compiler
# reads; and the libtpu topology of each TPU target (one of its chips is used).
_GPU_LIMITS = {
    "h100": dict(core_count=132, clock_rate_ghz=1.98, memory_bandwidth=3352320000000,
                 device_memory_size=84942979072, name="NVIDIA H100 80GB HBM3"),
    "h200": dict(core_count=132, clock_rate_ghz=1.98, memory_bandwidth=4800000000000,
                 device_memory_size=151397597184, name="NVIDIA H200"),
}
_TPU_TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
TARGETS = tuple(_GPU_LIMITS) + tuple(_TPU_TOPOLOGIES)
# What marks a Pallas kernel call in a compiled program, per kernel backend.
_KERNEL_MARKERS = {"gpu": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def kernel_backend(target: str) -> str:
  """The Pallas backend ("gpu" | "tpu") that runs on `target`."""
  return "gpu" if target in _GPU_LIMITS else "tpu"


def target_config(target: str) -> str:
  """The text-format GpuTargetConfigProto of a Hopper GPU (sm_90) named `target`."""
  t = _GPU_LIMITS[target]
  return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {t["core_count"]}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {t["memory_bandwidth"]}
  l2_cache_size: 52428800
  clock_rate_ghz: {t["clock_rate_ghz"]}
  device_memory_size: {t["device_memory_size"]}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: 9 minor: 0 }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{t["name"]}"
"""


def compile_only_sharding(target: str):
  """A replicated sharding over one compile-only device of `target`."""
  gpu = kernel_backend(target) == "gpu"
  try:
    if gpu:
      topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                              target_config=target_config(target))
    else:
      topology = topologies.get_topology_desc(_TPU_TOPOLOGIES[target], platform="tpu")
  except (NotImplementedError, RuntimeError) as e:
    if isinstance(e, NotImplementedError) or "not installed" in str(e):
      extra = "cuda12" if gpu else "tpu"
      raise SystemExit(
          f"no {'CUDA' if gpu else 'TPU'} compiler here ({type(e).__name__}: {e}); install "
          f"the plugin of this jaxlib: pip install \"jax[{extra}]=={jax.__version__}\"") from e
    # e.g. libtpu's lockfile: another process holds the TPU compiler.
    raise SystemExit(f"could not make a compile-only {target} device: {e}") from e
  mesh = jax.sharding.Mesh(np.array(topology.devices[:1]), ("x",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


# --------------------------------------------------------------------------- cases


def _fwd_bwd(fn):
  """The gradient of `fn`'s output, summed in float32, w.r.t. its first three arguments."""
  return jax.grad(lambda *args: jnp.sum(fn(*args).astype(jnp.float32)), argnums=(0, 1, 2))


def range_attention_cases(spec, backend: str, lengths):
  """(name, fn, abstract args): range attention forward+backward on rows of each length
  (batch 4, 8 query heads over 2 kv heads, head_dim 64 and 128, bf16 and f32): how long a
  row the kernels hold on the target's on-chip memory."""
  from pallas_kernels import diffusion as dk  # pylint: disable=g-import-not-at-top
  attention = lambda q, k, v, *r: dk.range_attention(q, k, v, r, backend=backend)
  cases = []
  for head_dim in (64, 128):
    for dtype in (jnp.bfloat16, jnp.float32):
      for length in lengths:
        args = ([spec((4, length, 8, head_dim), dtype)]
                + [spec((4, length, 2, head_dim), dtype)] * 2
                + [spec((4, length), jnp.int32)] * 4)
        cases.append((f"range_attention fwd+bwd [4, {length}, 8 / 2 kv, {head_dim}] "
                      f"{jnp.dtype(dtype).name}", _fwd_bwd(attention), args))
  return cases


def _cached_attention_case(spec, backend: str, *, t: int, block_step: bool, size: int,
                           window: int, heads: int, head_dim: int, batch: int = 8):
  """(name, fn, abstract args): one decoding step's cached attention (T new positions, a
  BLT-D block when `block_step`) over a cache of `size` slots, 2 kv heads, bf16."""
  from pallas_kernels import diffusion as dk  # pylint: disable=g-import-not-at-top
  groups = 2
  args = [spec((batch, t, heads, head_dim), jnp.bfloat16), spec((batch, t), jnp.int32),
          spec((batch, t), bool), spec((batch, groups, size, head_dim), jnp.bfloat16),
          spec((batch, groups, head_dim, size), jnp.bfloat16), spec((batch, size), jnp.int32),
          spec((batch, t, groups, head_dim), jnp.bfloat16),
          spec((batch, t, groups, head_dim), jnp.bfloat16), spec((batch, t), jnp.int32),
          spec((batch,), jnp.int32)]

  def attend(q, qp, qv, ck, cv, cp, nk, nv, npos, start):
    return dk.cached_attention(q, qp, qv, ck, cv, cp, nk, nv, npos, window=window,
                               block_start=start if block_step else None, backend=backend)
  name = f"cached_attention T={t}{' block' if block_step else ''} cache {size}"
  return name, attend, args


def cache_size_cases(spec, backend: str, sizes):
  """(name, fn, abstract args): an 8-byte step's cached attention over caches of each
  size (a global model's cache holds a slot per byte of prompt and output), head_dim 64
  and 128: how large a cache the kernel holds on the target's on-chip memory."""
  return [(f"{name}, head_dim {head_dim}", fn, args)
          for head_dim in (64, 128) for size in sizes
          for name, fn, args in [_cached_attention_case(
              spec, backend, t=8, block_step=False, size=size, window=0, heads=8,
              head_dim=head_dim)]]


def kernel_cases(spec, backend: str):
  """(name, fn, abstract args) for each kernel on `backend` ("gpu" | "tpu") at the GPU
  benchmarks' shapes."""
  from bench import diffusion_kernels  # pylint: disable=g-import-not-at-top
  from pallas_kernels import diffusion as dk  # pylint: disable=g-import-not-at-top
  from pallas_kernels import sparse_ffn  # pylint: disable=g-import-not-at-top
  from pallas_kernels.sparse_ffn import bench as sparse_bench  # pylint: disable=g-import-not-at-top

  cases = []
  batch, length, window, heads, head_dim, block = diffusion_kernels.ATTENTION_SHAPES["full"]
  # The benchmark's `[clean ; noisy blocks]` rows (built on this host; only the length).
  total = diffusion_kernels.bltd_layout(batch, length, window, block)[3].a0.shape[1]
  attention = lambda q, k, v, *r: dk.range_attention(q, k, v, r, backend=backend)
  for dtype in (jnp.bfloat16, jnp.float32):
    args = ([spec((batch, total, heads, head_dim), dtype)] * 3
            + [spec((batch, total), jnp.int32)] * 4)
    name = f"range_attention [{batch}, {total}, {heads}, {head_dim}] {jnp.dtype(dtype).name}"
    cases.append((name + " fwd", attention, args))
    cases.append((name + " fwd+bwd", _fwd_bwd(attention), args))

  for rule in dk.RULES:
    for block_size in (4, 8, 16):
      for dtype, sampled in ((jnp.bfloat16, False), (jnp.float32, True)):
        args = [spec((8, block_size, 260), dtype), spec((8, block_size), jnp.int32),
                spec((8, block_size), bool), spec((), jnp.float32),
                spec((8, block_size), jnp.int32)]
        fn = (lambda lg, b, s, th, tok, rule=rule, sampled=sampled: dk.unmask_step(
            lg, b, s, th, rule=rule, backend=backend, tokens=tok if sampled else None))
        cases.append((f"unmask_step {rule} B={block_size} {jnp.dtype(dtype).name}"
                      f"{' sampled' if sampled else ''}", fn, args))

  size = dk.kernel_cache_size(window + 16)
  for t, block_step in ((1, False), (8, False), (8, True)):
    cases.append(_cached_attention_case(spec, backend, t=t, block_step=block_step, size=size,
                                        window=window, heads=heads, head_dim=head_dim))

  ffn = lambda x, wu, wd: sparse_ffn.sparse_relu_ffn(x, wu, wd, backend=backend)
  for name, (t, d, f) in sparse_bench.SHAPES.items():
    args = [spec(s, jnp.bfloat16) for s in ((t, d), (d, f), (f, d))]
    cases.append((f"sparse_relu_ffn {name} [{t}, {d}] x [{d}, {f}] fwd", ffn, args))
    cases.append((f"sparse_relu_ffn {name} fwd+bwd", _fwd_bwd(ffn), args))
  return cases


def decode_cases(spec, backend: str, experiment: str, batch_sizes, prompt_len: int,
                 max_bytes: int):
  """(name, fn, abstract args): every decoding method's whole program (prefill + loop)
  with the cached-attention and unmasking kernels, for the model of `experiment`."""
  from bltjax import configs  # pylint: disable=g-import-not-at-top
  from bltjax import convert  # pylint: disable=g-import-not-at-top
  from bltjax import generate  # pylint: disable=g-import-not-at-top
  from bltjax import model as model_lib  # pylint: disable=g-import-not-at-top

  config = configs.load(experiment)
  configs.set_value(config, "model.dtype", "bfloat16")
  blt_shapes, entropy_shapes = convert.abstract_params(config)
  entropy = config.patcher.mode == "entropy"
  params = {"blt": blt_shapes, "entropy": entropy_shapes if entropy else None}
  params = jax.tree.map(lambda x: spec(x.shape, x.dtype), params)
  blt_config = model_lib.blt_config(config.model)
  patcher_config = model_lib.patcher_config(config.patcher, threshold=2.0)
  entropy_config = (model_lib.transformer_config(config.model.entropy, config.model)
                    if entropy else None)
  methods = [("ar", {}), ("blt_s", {"draft_len": 8}), ("blt_dv", {"draft_len": 8}),
             ("blt_d", {"block_size": 8, "alpha": 0.7}),
             ("blt_d", {"block_size": 8, "gamma": 1.0}),
             ("blt_h", {"block_size": 8, "gate": 0.8})]
  cases = []
  for batch in batch_sizes:
    for method, options in methods:
      for temperature in (0.0, 1.0):
        decode = generate.DecodeConfig(
            method=method, max_bytes=max_bytes, temperature=temperature,
            attention_impl="pallas", unmask_impl="pallas", unmask_backend=backend, **options)
        engine = on_kernels(generate.make_engine(blt_config, patcher_config,
                                                 entropy_config, prompt_len, decode), backend)
        program = generate.decode_program(engine, decode.structure())
        knobs = jax.tree.map(lambda x: spec(x.shape, x.dtype), decode.knobs())
        args = [params, spec((batch, prompt_len), jnp.int32), spec((batch,), jnp.int32),
                spec((2,), jnp.uint32), knobs]
        label = " ".join(f"{k}={v}" for k, v in options.items())
        cases.append((f"decode {method} {label} batch {batch} "
                      f"{'sampled' if temperature else 'greedy'}", program, args))
  return cases


class _InMesh:
  """A jitted function whose lowering runs under `mesh` (the train step's kernels run
  inside `shard_map` over the mesh in context)."""

  def __init__(self, jitted, mesh):
    self.jitted, self.mesh = jitted, mesh

  def lower(self, *args):
    from bltjax import sharding  # pylint: disable=g-import-not-at-top
    with sharding.use_mesh(self.mesh):
      return self.jitted.lower(*args)


def train_cases(devices, backend: str, experiments, workdir: str):
  """(name, step, abstract args): the train step of each `experiments` file with every
  attention on the range-attention kernel (`model.attention.impl=pallas`), bf16."""
  from bltjax import configs  # pylint: disable=g-import-not-at-top
  from bltjax import train  # pylint: disable=g-import-not-at-top
  cases = []
  for experiment in experiments:
    config = configs.load(experiment)
    for key, value in (("model.dtype", "bfloat16"), ("model.attention.impl", "pallas"),
                       ("model.attention.backend", backend)):
      configs.set_value(config, key, value)
    if config.model.kind == "blt":
      configs.set_value(config, "patcher.mode", "static")   # no entropy model to load
    trainer = train.Trainer(config, os.path.join(workdir, str(len(cases))), devices=devices)
    batch = jax.tree.map(
        lambda s, t=trainer: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=t.batch_sharding),
        train.abstract_batch(config.train.batch_size, config.train.seq_len))
    step = trainer._jit_train_step  # pylint: disable=protected-access
    cases.append((f"train step {experiment} (batch {config.train.batch_size} x "
                  f"{config.train.seq_len})", _InMesh(step, trainer.mesh),
                  [trainer.abstract_state, batch, None]))
  return cases


def on_kernels(engine, backend: str):
  """`engine` with every stack's cached attention on `backend`'s kernel (the kernel
  package would pick the XLA reference on this CPU host)."""
  def stack(c):
    return c and dataclasses.replace(c, attention_backend=backend)
  cfg = engine.config
  cfg = dataclasses.replace(cfg, encoder=stack(cfg.encoder),
                            global_model=stack(cfg.global_model), decoder=stack(cfg.decoder))
  return dataclasses.replace(engine, config=cfg, entropy_config=stack(engine.entropy_config))


# --------------------------------------------------------------------------- main


def compile_case(name, fn, args, backend: str):
  """(row, ok): compiles `fn` for `args` (jitted if it is not already); the row counts
  the `backend` kernel calls left in the compiled program."""
  fn = fn if hasattr(fn, "lower") else jax.jit(fn)
  start = time.perf_counter()
  try:
    compiled = fn.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except
    message = " ".join(str(e).split())[:300]
    return [name, "FAILED", f"{time.perf_counter() - start:.1f}", "-",
            f"{type(e).__name__}: {message}"], False
  kernels = compiled.as_text().count(_KERNEL_MARKERS[backend])
  return [name, "compiled", f"{time.perf_counter() - start:.1f}", str(kernels), ""], True


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--target", choices=TARGETS, default="h200")
  parser.add_argument("--only", choices=("kernels", "decode", "train", "lengths"),
                      default=None,
                      help="lengths: only the --range_lengths and --cache_sizes cases")
  parser.add_argument("--range_lengths", type=common.batch_sizes, default=[],
                      help="also range attention fwd+bwd on rows of these lengths")
  parser.add_argument("--cache_sizes", type=common.batch_sizes, default=[],
                      help="also cached attention over decoding caches of these many slots")
  parser.add_argument("--experiment", default="experiments/blt_bench.py:bltd8,large",
                      help="the model whose decoding programs and train step compile "
                           "(gpu_suite's gen_train)")
  parser.add_argument("--train_experiments", type=lambda s: s.split(";"),
                      default=["experiments/entropy_100m.py"],
                      help="more experiment files whose train steps compile (';'-separated)")
  parser.add_argument("--batch_sizes", type=common.batch_sizes, default="1,8")
  parser.add_argument("--prompt_len", type=int, default=65)
  parser.add_argument("--max_bytes", type=int, default=128)
  parser.add_argument("--no_append", action="store_true")
  args = parser.parse_args(argv)
  sharding = compile_only_sharding(args.target)
  backend = kernel_backend(args.target)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  cases = []
  if args.only in (None, "kernels"):
    cases += kernel_cases(spec, backend)
  if args.only in (None, "lengths"):
    cases += range_attention_cases(spec, backend, args.range_lengths)
    cases += cache_size_cases(spec, backend, args.cache_sizes)
  if args.only in (None, "decode"):
    cases += decode_cases(spec, backend, args.experiment, args.batch_sizes, args.prompt_len,
                          args.max_bytes)
  if args.only in (None, "train"):
    workdir = tempfile.mkdtemp(prefix="compile_check_")
    cases += train_cases(list(sharding.mesh.devices.flat), backend,
                         [args.experiment] + args.train_experiments, workdir)
  rows, failed = [], 0
  for name, fn, fn_args in cases:
    row, ok = compile_case(name, fn, fn_args, backend)
    failed += not ok
    print(" | ".join(row), flush=True)
    rows.append(row)
  compiler = "Triton" if backend == "gpu" else "Mosaic"
  table = common.markdown_table(
      ["program", "result", "compile s", f"{compiler} kernels", "error"], rows)
  print(table)
  print(f"{len(rows) - failed} of {len(rows)} compiled for {args.target}")
  if not args.no_append:
    plugin = "CUDA plugin" if backend == "gpu" else "libtpu"
    common.append(
        f"Pallas kernels compiled for {args.target} without one", table, argv=argv,
        note=f"XLA's deviceless compilation (jax {jax.__version__} with its {plugin}, no "
             f"accelerator): every program lowered and compiled for a compile-only "
             f"{args.target} device, {compiler}'s compilation included; nothing ran. "
             f"{compiler} kernels: the kernel calls left in the compiled program.")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
