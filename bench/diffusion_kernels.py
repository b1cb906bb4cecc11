"""Benchmark: the BLT-D kernels of pallas_kernels/diffusion against the XLA code they
replace, each checked against it first.

    python bench/diffusion_kernels.py             # GPU/TPU
    python bench/diffusion_kernels.py --small     # CPU: the kernels in interpret mode

range_attention: BLT-D training attention over `[clean ; noisy blocks]`, the chunked XLA
  frames (`model.attention.impl = "xla"`) vs the range kernel (`"pallas"`),
  forward and forward+backward. Inputs as BLT-D training builds them: documents of ~1000
  bytes, patch starts every 4.5 bytes on average, window-long chunks with window/4
  blocks (`diffusion.anchor_blocks_per_chunk`, as `objectives.BltObjective.noisy_blocks`).
  Useful TFLOP/s count only visible (query, key) pairs.
unmask: one BLT-D decoder step's unmasking (`unmask_impl = "xla"`: softmax, argmax,
  confidence or entropy, the rule, the write, as separate XLA ops; `"pallas"`: one fused
  kernel) on a block's logits `[rows, B, 260]`, per step inside a compiled loop of
  `--unmask_steps` steps (so dispatch is not timed).
cached_attention: one decoding step's attention over a KV cache per layer (XLA's
  `generate.caches` specs: two matmuls with the mask and softmax around them; `"pallas"`:
  one kernel), for an AR byte (T = 1, keys already stored) and a BLT-D block (T = 8 over
  the cache and itself) with a 512-byte window (cache of 640 slots), and a patch over a
  global model's cache (8192 slots, 1000 filled), per step inside a compiled loop.
Prints tables and appends them to bench/RESULTS.md. On CPU (interpret mode) the times
say nothing about speed: `--small` checks that the benchmark and the kernels run.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402  pylint: disable=g-import-not-at-top
from bltjax import diffusion  # noqa: E402
from bltjax.generate import caches  # noqa: E402
from bltjax.generate import diffusion as generate_diffusion  # noqa: E402
from bltjax.generate import sampling  # noqa: E402
from bltjax.model import attention  # noqa: E402
from pallas_kernels.diffusion import range_attention, tiles as tiles_lib  # noqa: E402

ATTENTION_SHAPES = {  # batch, length, window, heads, head_dim, block_size
    "full": (4, 4096, 512, 8, 64, 8),
    "small": (2, 128, 32, 2, 16, 4),
}
SMALL_TILES = dict(bq=16, bk=16)
KERNELS = ("range_attention", "unmask", "cached_attention")


def rel_err(a, b):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-6))


# --------------------------------------------------------------------------- range attention


def bltd_layout(batch, length, window, block_size, seed=0):
  """(positions, segment_ids, NoisyAttentionInfo, Ranges, chunk) of a BLT-D batch."""
  rng = np.random.default_rng(seed)
  segments = np.cumsum(rng.random((batch, length)) < 1 / 1000, axis=1).astype(np.int32) + 1
  starts = rng.random((batch, length + 1)) < 1 / 4.5
  starts[:, :2] = True
  segments, starts = jnp.asarray(segments), jnp.asarray(starts)
  chunk = attention.noisy_chunk_size(length, window)
  per_chunk = max(1, chunk // 4)
  blocks = diffusion.anchor_blocks_per_chunk(starts, segments, block_size=block_size,
                                             chunk=chunk, blocks_per_chunk=per_chunk,
                                             rng=jax.random.PRNGKey(seed))
  info = diffusion.chunked_attention_info(blocks, segments, blocks_per_chunk=per_chunk)
  ranges = diffusion.bltd_attention_ranges(blocks.anchors, blocks.valid, segments,
                                           seq_len=length, block_size=block_size,
                                           window=window, in_block=blocks.in_block)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return positions, segments, info, ranges, chunk


def bench_range_attention(args, backend, interpret, argv):
  tile_kw = SMALL_TILES if args.small else {}
  batch, length, window, heads, head_dim, block_size = ATTENTION_SHAPES[
      "small" if args.small else "full"]
  dtype = jnp.dtype(args.dtype)
  positions, segments, info, ranges, chunk = bltd_layout(batch, length, window, block_size)
  total = ranges.a0.shape[1]
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  q = jax.random.normal(keys[0], (batch, total, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, total, heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, total, heads, head_dim), dtype)
  ct = jax.random.normal(keys[3], q.shape, jnp.float32)
  spec = attention.CleanNoisySpec(attention.CausalSpec(positions, segments, window=window),
                                  info, chunk=chunk)
  kernel = lambda q, k, v: range_attention(q, k, v, tuple(ranges), backend=backend,
                                           interpret=interpret, **tile_kw)
  impls = {"xla chunked": lambda q, k, v: spec(q, k, v), "range kernel": kernel}
  fwd = {name: jax.jit(fn) for name, fn in impls.items()}
  grads = {name: jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(
      fn(q, k, v).astype(jnp.float32) * ct), argnums=(0, 1, 2))) for name, fn in impls.items()}

  errs = [rel_err(fwd["range kernel"](q, k, v), fwd["xla chunked"](q, k, v))]
  errs += [rel_err(a, b) for a, b in zip(grads["range kernel"](q, k, v),
                                         grads["xla chunked"](q, k, v))]
  tol = 5e-2 if dtype.itemsize == 2 else 1e-3
  ok = max(errs) <= tol
  check = (f"kernel vs XLA: rel err out {errs[0]:.1e}, dq {errs[1]:.1e}, dk {errs[2]:.1e}, "
           f"dv {errs[3]:.1e} (tol {tol:g}): {'ok' if ok else 'MISMATCH'}")
  print(check, flush=True)

  visible = float(jnp.sum((ranges.a1 - ranges.a0) + (ranges.b1 - ranges.b0)))
  bq = tile_kw.get("bq", 64 if backend == "gpu" else 128)
  bk = tile_kw.get("bk", 64 if backend == "gpu" else 128)
  padded = [jnp.pad(r, [(0, 0), (0, -total % bq)]) for r in ranges]
  occupancy = float(tiles_lib.occupancy(tiles_lib.tile_bounds(padded, bq=bq, bk=bk),
                                        -(-total // bk)))
  rows = []
  for name, fns, flops_per_pair in (("fwd", fwd, 4), ("fwd+bwd", grads, 12)):
    ms = {i: 1e3 * common.fastest(fn, q, k, v, repeats=args.repeats) for i, fn in fns.items()}
    useful = flops_per_pair * visible * heads * head_dim
    cells = [f"{ms[i]:.3f} ({useful / ms[i] / 1e9:.3g})" for i in impls]
    rows.append([name, *cells, f"{ms['xla chunked'] / ms['range kernel']:.2f}x"])
    print(" | ".join(rows[-1]), flush=True)
  columns = ["pass", "XLA chunked ms (useful TFLOP/s)", "range kernel ms (useful TFLOP/s)",
             "kernel speedup"]
  note = (f"{batch} rows x {length} bytes + {total - length} noisy positions (blocks of "
          f"{block_size}, {chunk // 4} per {chunk}-byte chunk), window {window}, {heads} heads "
          f"x {head_dim}, {dtype.name}; kernels {backend}"
          f"{' (interpret mode: times are not speed)' if interpret else ''}, tiles "
          f"bq={bq} bk={bk}: {occupancy:.1%} of the (query tile, key block) pairs computed. "
          f"{check}.")
  if not args.no_append:
    common.append("BLT-D range attention: chunked XLA vs the range kernel",
                  common.markdown_table(columns, rows), argv=argv, note=note, path=args.results)
  return rows, ok


# --------------------------------------------------------------------------- per-step A/B


def step_row(labels, fns, inputs, *, steps, repeats, same):
  """A table row: labels, then microseconds per step of `fns["xla"]` and `fns["kernel"]`
  (compiled loops of `steps` steps), the kernel's speedup and whether they agreed."""
  us = {i: 1e6 * common.fastest(fn, *inputs, repeats=repeats) / steps for i, fn in fns.items()}
  row = [*labels, f"{us['xla']:.2f}", f"{us['kernel']:.2f}",
         f"{us['xla'] / us['kernel']:.2f}x", "yes" if same else "NO"]
  print(" | ".join(row), flush=True)
  return row


def append_table(args, argv, title, columns, rows, note, backend, interpret):
  if not args.no_append:
    note += (f" Kernel {backend}"
             f"{' (interpret mode: times are not speed)' if interpret else ''}.")
    common.append(title, common.markdown_table(columns, rows), argv=argv, note=note,
                  path=args.results)


# --------------------------------------------------------------------------- unmasking


def unmask_loop(rule, steps, impl, backend, interpret):
  """`steps` unmasking steps of one block in a compiled loop (logits nudged per step so
  nothing is hoisted); returns the number of revealed positions (kept live)."""
  kernel_rule = generate_diffusion.UnmaskRule(
      alpha=0.7, gamma=1.0 if rule == "entropy_bounded" else None, impl=impl,
      backend=backend, interpret=interpret)
  greedy = sampling.SamplingConfig()

  def run(logits, block, still):
    positions = jnp.broadcast_to(jnp.arange(block.shape[1]), block.shape)

    def body(i, revealed):
      new_block, left = generate_diffusion.reveal_step(
          logits * (1.0 + 1e-6 * i), block, still, positions, kernel_rule, None, greedy)
      return revealed + jnp.sum(still & ~left) + jnp.sum(new_block) % 2
    return jax.lax.fori_loop(0, steps, body, jnp.int32(0))
  return jax.jit(run)


def bench_unmask(args, backend, interpret, argv):
  block_size = 8
  steps = 4 if args.small else args.unmask_steps
  rows, ok = [], True
  for n_rows in (1, 8):
    rng = np.random.default_rng(n_rows)
    logits = jnp.asarray(rng.normal(size=(n_rows, block_size, 260)) * 3, jnp.float32)
    still = jnp.asarray(rng.random((n_rows, block_size)) < 0.8).at[:, 0].set(True)
    block = jnp.where(still, 3, 100).astype(jnp.int32)
    for rule in ("confidence", "entropy_bounded"):
      fns = {"xla": unmask_loop(rule, steps, "xla", "", interpret),
             "kernel": unmask_loop(rule, steps, "pallas", backend, interpret)}
      inputs = (logits, block, still)
      same = int(fns["xla"](*inputs)) == int(fns["kernel"](*inputs))
      ok = ok and same
      rows.append(step_row([str(n_rows), rule], fns, inputs, steps=steps,
                           repeats=args.repeats, same=same))
  columns = ["rows", "rule", "XLA ops us/step", "fused kernel us/step", "kernel speedup",
             "same reveals"]
  note = (f"Blocks of {block_size} bytes, logits [rows, {block_size}, 260] float32, greedy; "
          f"{steps} steps per compiled loop.")
  append_table(args, argv, "BLT-D unmasking step: XLA ops vs the fused kernel", columns,
               rows, note, backend, interpret)
  return rows, ok


# --------------------------------------------------------------------------- decoding attention


def cached_step_loop(steps, t, block, window, kernel):
  """`steps` decoding-step attentions in a compiled loop (queries nudged per step)."""
  def run(q, new_k, new_v, cache_k, cache_v, cache_positions, positions):
    valid = jnp.ones(positions.shape, bool)
    start = positions[:, 0] if block else None

    def body(i, total):
      qi = q * (1.0 + 1e-3 * i.astype(q.dtype))
      if t == 1:   # an AR byte or a patch: its keys are in the cache already
        view = caches.CacheView(cache_k, cache_v, cache_positions, positions, valid,
                                window=window, kernel=kernel)
        out = view(qi, None, None)
      else:
        spec = caches.CachedSpec(cache_k, cache_v, cache_positions, positions, valid, start,
                                 window=window, kernel=kernel)
        out = spec(qi, new_k, new_v)
      return total + jnp.sum(out.astype(jnp.float32))
    return jax.lax.fori_loop(0, steps, body, jnp.float32(0))
  return jax.jit(run)


def cache_positions_of(size, held, length, window):
  """`[size]` slot positions of a cache after `length` positions (-1: empty): a windowed
  cache is a ring (position p in slot p % size, the last `held` kept); an unwindowed one
  (a global model's, a slot per possible patch) fills slots 0, 1, ... in order."""
  slot = jnp.arange(size, dtype=jnp.int32)
  if not window:
    return jnp.where(slot < length, slot, -1)
  last = length - 1 - (length - 1 - slot) % size
  return jnp.where((last >= 0) & (last >= length - held), last, -1)


def cached_attention_cases(small: bool):
  """(name, T, BLT-D block, cache slots, positions held, window): an AR byte and a BLT-D
  block over a local model's windowed ring cache, and a patch over a global model's
  cache of a slot per byte of prompt and output, of which a patch per ~4.5 bytes is
  filled (the kernel visits the filled blocks only; XLA reads every slot)."""
  local, history, window = (256, 200, 32) if small else (640, 600, 512)
  global_size, patches = (512, 100) if small else (8192, 1000)
  return [("AR byte (T=1)", 1, False, local, history, window),
          ("BLT-D block (T=8)", 8, True, local, history, window),
          (f"global patch (T=1), {patches} of {global_size} slots", 1, False, global_size,
           patches, 0)]


def bench_cached_attention(args, backend, interpret, argv):
  heads, head_dim = (2, 16) if args.small else (8, 64)
  steps = 4 if args.small else args.unmask_steps
  dtype = jnp.dtype(args.dtype)
  rows, ok = [], True
  for batch in (1, 8):
    for name, t, block, size, held, window in cached_attention_cases(args.small):
      keys = jax.random.split(jax.random.PRNGKey(batch * 10 + t), 5)
      length = held
      positions = jnp.broadcast_to(length + jnp.arange(t, dtype=jnp.int32), (batch, t))
      # T = 1: the new position's key is in the cache already.
      slots = cache_positions_of(size, held + (t == 1), length + (t == 1), window)
      cache_positions = jnp.broadcast_to(slots, (batch, size))
      q = jax.random.normal(keys[0], (batch, t, heads, head_dim), dtype)
      new_k = jax.random.normal(keys[1], (batch, t, heads, head_dim), dtype)
      new_v = jax.random.normal(keys[2], (batch, t, heads, head_dim), dtype)
      cache_k = jax.random.normal(keys[3], (batch, heads, size, head_dim), dtype)
      cache_v = jax.random.normal(keys[4], (batch, heads, head_dim, size), dtype)
      inputs = (q, new_k, new_v, cache_k, cache_v, cache_positions, positions)
      fns = {"xla": cached_step_loop(steps, t, block, window, None),
             "kernel": cached_step_loop(steps, t, block, window, (backend, interpret))}
      want, got = float(fns["xla"](*inputs)), float(fns["kernel"](*inputs))
      same = abs(want - got) / max(abs(want), 1.0) < (5e-2 if dtype.itemsize == 2 else 1e-4)
      ok = ok and same
      rows.append(step_row([str(batch), name], fns, inputs, steps=steps,
                           repeats=args.repeats, same=same))
  columns = ["rows", "step", "XLA us/step", "kernel us/step", "kernel speedup", "same sums"]
  local, _, window = cached_attention_cases(args.small)[0][3:]
  note = (f"One layer: {heads} heads x {head_dim}, {dtype.name}; local caches of {local} "
          f"slots, window {window}; {steps} steps per compiled loop.")
  append_table(args, argv, "Decoding attention over a KV cache: XLA vs the cached-attention "
               "kernel", columns, rows, note, backend, interpret)
  return rows, ok


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--small", action="store_true", help="tiny shapes, interpret mode on CPU")
  ap.add_argument("--kernels", default=",".join(KERNELS), help=f"of {','.join(KERNELS)}")
  ap.add_argument("--backend", default="auto", choices=("auto", "gpu", "tpu"))
  ap.add_argument("--dtype", default="bfloat16", help="range attention's q, k, v")
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--unmask_steps", type=int, default=200,
                  help="steps per compiled loop (unmask, cached_attention)")
  ap.add_argument("--results", default=common.RESULTS)
  ap.add_argument("--no_append", action="store_true")
  args = ap.parse_args(argv)
  kernels = [k for k in args.kernels.split(",") if k]
  unknown = sorted(set(kernels) - set(KERNELS))
  if unknown:
    raise SystemExit(f"unknown kernel {unknown[0]!r}; known: {', '.join(KERNELS)}")
  platform = jax.default_backend()
  on_device = platform in ("gpu", "tpu")
  if not on_device and not args.small:
    raise SystemExit("no GPU/TPU: use --small (the kernels run in interpret mode)")
  if args.small:
    args.repeats = 1
  backend = args.backend if args.backend != "auto" else (platform if on_device else "gpu")
  results, ok = {}, True
  for name, fn in (("range_attention", bench_range_attention), ("unmask", bench_unmask),
                   ("cached_attention", bench_cached_attention)):
    if name in kernels:
      results[name], good = fn(args, backend, not on_device, argv)
      ok = ok and good
  if not ok:
    raise SystemExit("a kernel differs from the XLA code it replaces")
  return results


if __name__ == "__main__":
  main()
