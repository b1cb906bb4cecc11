"""Benchmark: dense XLA ReLU FFN vs the activation-sparse kernels, forward and fwd+bwd.

    python -m pallas_kernels.sparse_ffn.bench            # GPU/TPU: 16k x 2048 x 8192 + decode
    python -m pallas_kernels.sparse_ffn.bench --small    # CPU, interpret mode, tiny shapes

Prints a table and appends it to bench/RESULTS.md (device, date, command, git commit).

Inputs. The activation pattern is what decides the speed, so the inputs are built to
produce a chosen one: x = [random features | document context | 1], w_up = [random |
context loadings | per-unit bias], so the pre-activation of unit f at token t is
z + c[doc(t), f] + b_f with z ~ N(0, 1), c ~ N(0, ctx^2) shared by the tokens of a
document, and b_f setting unit f's firing rate p_f. Structures:
  structured  p_f heavy-tailed (lognormal, sigma 1.5), a fraction 0.3 * sparsity of dead
              units, context sigma 1 over 256-token documents, units sorted by firing rate
              (what `neuron_order` + `permute_ffn_weights` do to a trained model);
  random      every unit fires with the same probability independently (worst case: no
              token tile is ever empty of a unit).
Timings: median over repeats of back-to-back calls on rotating input sets; TFLOP/s are
dense-equivalent (4 T D F forward, 12 T D F forward+backward) for every column.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import pathlib
import statistics
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from . import ops
from .reference import relu_ffn_reference, relu_ffn_reference_with_stats

SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)
SHAPES = {"batched": (16384, 2048, 8192), "decode": (8, 2048, 8192)}
SMALL_SHAPES = {"batched": (200, 128, 512), "decode": (3, 128, 512)}
SMALL_TILES = {"gpu": dict(tm=16, bk=16, bn=32, bd=32, kb=32, bf=32),
               "tpu": dict(tm=16, bk=128)}
REPO = pathlib.Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- inputs


def unit_rates(f, sparsity, structure, rng, sigma=1.5, dead_frac=0.3):
  """Per-unit firing probabilities with mean 1 - sparsity, sorted descending."""
  dense = 1.0 - sparsity
  if structure == "random" or dense >= 1.0 or dense <= 0.0:
    return np.full(f, dense)
  w = np.exp(sigma * rng.normal(size=f))
  w[rng.permutation(f)[: int(round(dead_frac * sparsity * f))]] = 0.0
  lo, hi = 0.0, 1e6
  for _ in range(100):  # scale so that mean(min(c w, 1)) = 1 - sparsity
    c = 0.5 * (lo + hi)
    lo, hi = (c, hi) if np.minimum(c * w, 1.0).mean() < dense else (lo, c)
  return np.sort(np.minimum(c * w, 1.0))[::-1]


def make_inputs(seed, t, d, f, sparsity, structure, dtype, *, doc_len=256, ctx=1.0,
                n_ctx=16):
  from scipy.special import ndtri  # noqa: PLC0415  (a jax dependency)
  rng = np.random.default_rng(seed)
  p = unit_rates(f, sparsity, structure, rng)
  ctx = ctx if structure == "structured" else 0.0
  scale = np.sqrt(1.0 + ctx * ctx)
  bias = scale * ndtri(np.clip(p, 1e-7, 1 - 1e-7))
  bias = np.where(p <= 0, -12.0 * scale, np.where(p >= 1, 12.0 * scale, bias))
  return _build(jax.random.PRNGKey(seed), jnp.asarray(bias, jnp.float32),
                jnp.float32(ctx), t=t, d=d, f=f, n_ctx=n_ctx, doc_len=doc_len,
                dtype=jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("t", "d", "f", "n_ctx", "doc_len", "dtype"))
def _build(key, bias, ctx, *, t, d, f, n_ctx, doc_len, dtype):
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  nr = d - n_ctx - 1
  docs = -(-t // doc_len)
  ctx_vec = jax.random.normal(k1, (docs, n_ctx))
  x = jnp.concatenate([
      jax.random.normal(k2, (t, nr)),
      jnp.repeat(ctx_vec, doc_len, axis=0)[:t],
      jnp.ones((t, 1)),
  ], axis=1)
  w_up = jnp.concatenate([
      jax.random.normal(k3, (nr, f)) / np.sqrt(nr),
      jax.random.normal(k4, (n_ctx, f)) * (ctx / np.sqrt(n_ctx)),
      bias[None, :],
  ], axis=0)
  w_down = jax.random.normal(k5, (f, d)) / np.sqrt(f)
  return tuple(a.astype(dtype) for a in (x, w_up, w_down))


# --------------------------------------------------------------------------- timing


def time_fn(fn, arg_sets, iters, inner):
  for a in arg_sets:
    jax.block_until_ready(fn(*a))
  times = []
  for r in range(iters):
    t0 = time.perf_counter()
    out = None
    for k in range(inner):
      out = fn(*arg_sets[(r * inner + k) % len(arg_sets)])
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


def fwd_bwd(fn):
  def loss(x, wu, wd, ct):
    return jnp.sum(fn(x, wu, wd).astype(jnp.float32) * ct)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def variants(backend, interpret, tiles, names):
  out = {}
  for name in names:
    kw = dict(backend=backend, interpret=interpret, **tiles)
    if name == "sparse":
      kw["dense_threshold"] = None
    elif name == "auto":
      kw["dense_threshold"] = ops.DEFAULT_DENSE_THRESHOLD
    elif name == "pallas_up":
      if backend != "gpu":
        continue
      kw.update(dense_threshold=None, up_impl="pallas")
    else:
      raise ValueError(f"unknown variant {name}")
    out[name] = (lambda kw: lambda x, wu, wd: ops.sparse_relu_ffn(x, wu, wd, **kw))(kw)
  return out


def git_commit():
  if os.environ.get("GIT_COMMIT"):
    return os.environ["GIT_COMMIT"]
  try:
    sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, text=True,
                         capture_output=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=REPO, text=True, capture_output=True).stdout.strip()
    return sha + ("-dirty" if dirty else "")
  except Exception:  # noqa: BLE001  (no git on the device machine)
    return "unknown"


def device_name():
  dev = jax.devices()[0]
  return f"{getattr(dev, 'device_kind', dev.platform)} ({dev.platform}, {len(jax.devices())} devices)"


# --------------------------------------------------------------------------- main


def parse_args(argv):
  ap = argparse.ArgumentParser(prog="python -m pallas_kernels.sparse_ffn.bench",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--small", action="store_true",
                  help="tiny shapes; on CPU the kernels run in interpret mode")
  ap.add_argument("--backend", default="auto", choices=("auto", "gpu", "tpu"),
                  help="kernel backend (auto: the default device; GPU kernels on CPU)")
  ap.add_argument("--shapes", default="batched,decode")
  ap.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES))
  ap.add_argument("--random_at", default="0.95",
                  help="sparsities at which the random (unstructured) pattern also runs")
  ap.add_argument("--variants", default="sparse,auto,pallas_up",
                  help="sparse: always the kernels; auto: with the dense fallback at "
                       "occupancy > DEFAULT_DENSE_THRESHOLD; pallas_up: GPU Pallas up kernel")
  ap.add_argument("--passes", default="fwd,fwd+bwd")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--tiles", default="", help="tile overrides, e.g. tm=32,bk=64")
  ap.add_argument("--iters", type=int, default=0, help="timing repeats (default 20; 1 small)")
  ap.add_argument("--inner", type=int, default=0, help="calls per repeat (default 5; 1 small)")
  ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
  ap.add_argument("--no_append", action="store_true")
  ap.add_argument("--no_check", action="store_true",
                  help="skip the kernel-vs-dense correctness check on the bench inputs")
  return ap.parse_args(argv)


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  warnings.filterwarnings("ignore", category=DeprecationWarning)  # Pallas Triton notice
  platform = jax.default_backend()
  backend = args.backend if args.backend != "auto" else (
      platform if platform in ("gpu", "tpu") else "gpu")
  interpret = platform not in ("gpu", "tpu")
  if platform not in ("gpu", "tpu") and not args.small:
    raise SystemExit("no GPU/TPU: use --small (interpret mode)")
  dtype = jnp.dtype(args.dtype)
  shapes = SMALL_SHAPES if args.small else SHAPES
  tiles = dict(SMALL_TILES[backend]) if args.small else {}
  for kv in filter(None, args.tiles.split(",")):
    k, v = kv.split("=")
    tiles[k] = int(v)
  iters = args.iters or (1 if args.small else 20)
  inner = args.inner or (1 if args.small else 5)
  nsets = 1 if args.small else 2
  sparsities = [float(s) for s in args.sparsities.split(",")]
  random_at = [float(s) for s in filter(None, args.random_at.split(","))]
  passes = args.passes.split(",")
  fns = variants(backend, interpret, tiles, args.variants.split(","))
  header = (f"sparse_ffn bench: device {device_name()}, kernels {backend}"
            f"{' (interpret)' if interpret else ''}, {dtype.name}, tiles {tiles or 'default'}, "
            f"jax {jax.__version__}")
  print(header, flush=True)
  cols = ["shape (T x D x F)", "structure", "sparsity", "occupancy", "pass",
          "dense ms (TFLOP/s)"] + [f"{v} ms (speedup, TFLOP/s)" for v in fns]
  rows = []

  def emit(row):
    rows.append(row)
    print(" | ".join(row), flush=True)

  print(" | ".join(cols), flush=True)
  checks = []
  for shape_name in args.shapes.split(","):
    t, d, f = shapes[shape_name]
    cases = [("structured", s) for s in sparsities] + [("random", s) for s in random_at]
    dense = {"fwd": jax.jit(relu_ffn_reference),
             "fwd+bwd": fwd_bwd(relu_ffn_reference)}
    kern = {v: {"fwd": jax.jit(fn), "fwd+bwd": fwd_bwd(fn)} for v, fn in fns.items()}
    stats_fn = jax.jit(lambda *a: jnp.sum(relu_ffn_reference_with_stats(*a)[1].nonzeros))
    occ_fn = jax.jit(lambda x, wu, wd: ops.sparse_relu_ffn(
        x, wu, wd, backend=backend, interpret=interpret, return_stats=True,
        dense_threshold=None, **tiles)[1].occupancy)
    dense_ms = {}
    if not args.no_check:
      checks += check(shape_name, (t, d, f), dtype, dense, kern)
    for structure, s in cases:
      sets = [make_inputs(17 * k + int(1000 * s), t, d, f, s, structure, dtype)
              for k in range(nsets)]
      ct = jax.jit(lambda k: jax.random.normal(k, (t, d), jnp.float32))(jax.random.PRNGKey(3))
      real = 1.0 - float(stats_fn(*sets[0])) / (t * f)
      occ = float(occ_fn(*sets[0]))
      for p in passes:
        flops = (4 if p == "fwd" else 12) * t * d * f
        argsets = sets if p == "fwd" else [a + (ct,) for a in sets]
        if p not in dense_ms:  # the dense time does not depend on the data
          dense_ms[p] = 1e3 * time_fn(dense[p], argsets, iters, inner)
        dm = dense_ms[p]
        row = [f"{shape_name} {t}x{d}x{f}", structure, f"{s:.2f} ({real:.3f})", f"{occ:.3f}",
               p, f"{dm:.3f} ({flops / dm / 1e9:.3g})"]
        for v in fns:
          ms = 1e3 * time_fn(kern[v][p], argsets, iters, inner)
          row.append(f"{ms:.3f} ({dm / ms:.2f}x, {flops / ms / 1e9:.3g})")
        emit(row)
  if not args.no_append:
    append_results(args.results, header, cols, rows, argv, checks)
  bad = [c for c in checks if c.endswith("MISMATCH")]
  if bad:
    raise SystemExit(f"{len(bad)} kernel results differ from the dense reference")
  return rows


def rel_err(a, b):
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-6))


def check(shape_name, shape, dtype, dense, kern, tol=None):
  """Kernel vs dense XLA on the benchmark inputs: forward and the three gradients."""
  tol = tol or (5e-2 if jnp.dtype(dtype).itemsize == 2 else 1e-3)
  t, d, f = shape
  lines = []
  for s in (0.0, 0.95):
    args = make_inputs(99, t, d, f, s, "structured", dtype)
    ct = jax.jit(lambda k: jax.random.normal(k, (t, d), jnp.float32))(jax.random.PRNGKey(5))
    ref_out = dense["fwd"](*args)
    ref_grads = dense["fwd+bwd"](*args, ct)
    for v, fns in kern.items():
      errs = [rel_err(fns["fwd"](*args), ref_out)]
      errs += [rel_err(a, b) for a, b in zip(fns["fwd+bwd"](*args, ct), ref_grads)]
      verdict = "ok" if max(errs) <= tol else "MISMATCH"
      line = (f"check {shape_name} sparsity {s:.2f} {v}: rel err out {errs[0]:.2e}, dx "
              f"{errs[1]:.2e}, dw_up {errs[2]:.2e}, dw_down {errs[3]:.2e} (tol {tol:g}) "
              f"{verdict}")
      print(line, flush=True)
      lines.append(line)
  return lines


def append_results(path, header, cols, rows, argv, checks=()):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  cmd = " ".join(["python -m pallas_kernels.sparse_ffn.bench"] + argv)
  lines = [
      "", f"## sparse_ffn: {now}", "",
      f"- {header}", f"- command: `{cmd}`", f"- git commit: {git_commit()}",
      "- sparsity: target (measured); occupancy: fraction of (token tile, hidden unit) "
      "pairs the kernels compute (GPU) / of (token tile, unit block) pairs (TPU); "
      "TFLOP/s dense-equivalent", "",
      "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
  ] + ["| " + " | ".join(r) + " |" for r in rows] + [""] + [f"- {c}" for c in checks]
  new = not path.exists()
  with path.open("a") as fh:
    if new:
      fh.write("# Benchmark results\n")
    fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
