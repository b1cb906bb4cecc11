"""Why AR decoding at batch 8 is not 8x batch 1 on CPU: XLA:CPU's matmul of a few rows.

A decode step multiplies `[rows, d]` activations by every weight matrix once; with few
rows it should cost the weights' bytes (memory bandwidth) whatever the row count. This
times a chain of 24 `[rows, 512] @ [512, 2048]` float32 matmuls (100 MB of weights,
more than the caches) at rows 1, 2, 8 and 16, with the weights stored `[in, out]` (how
bltjax stores kernels) and `[out, in]`, and as a multiply + sum instead of a dot, and
reports weight GB/s beside the memory read bandwidth (`jnp.sum` of 400 MB). On the 2-core CPU VM
8 rows take ~3x the time of 1 row (bench/RESULTS.md): the global model over 8 rows x 1
patch costs ~3-4x one row, which is the batch-8 AR gap of bench/generation.py, not the
KV cache (a head-major cache and reading only the used cache prefix were tried in
scratch A/B runs, not recorded, and changed nothing beyond the machine's drift).
Nor is it worth multiplying such steps row by row: 1.1-4.2x faster per matmul of 2-8
rows, it left decoding within the drift and compiled 10-57% longer (tried at 9a7e971
and d07bd17, reverted; bench/RESULTS.md, 2026-11-28).

  python bench/cpu_gemm.py
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

D, F, LAYERS = 512, 2048, 24


def chain(x, kernels, *, out_in: bool, reduce: bool = False):
  """`reduce`: each product as a broadcast multiply and a sum over `d` (kernels [out,
  in]), which XLA:CPU emits as one loop fusion reading each weight row once for all rows,
  instead of a dot."""
  for w in kernels:
    if reduce:
      y = jnp.sum(w[:, None, :] * x[None, :, :], axis=-1).T
    else:
      y = jnp.einsum("md,fd->mf", x, w) if out_in else x @ w
    x = jnp.tanh(y)[:, :D]
  return x


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--no_append", action="store_true")
  args = parser.parse_args(argv)
  keys = jax.random.split(jax.random.PRNGKey(0), LAYERS)
  in_out = [jax.random.normal(k, (D, F)) for k in keys]
  out_in = [w.T.copy() for w in in_out]
  weight_bytes = LAYERS * D * F * 4
  big = jnp.ones((100_000_000,), jnp.float32)
  read_gb_s = big.nbytes / common.fastest(jax.jit(jnp.sum), big, repeats=args.repeats) / 1e9
  del big
  print(f"memory read bandwidth (jnp.sum of 400 MB): {read_gb_s:.1f} GB/s", flush=True)
  rows = []
  for m in (1, 2, 8, 16):
    x = jax.random.normal(jax.random.PRNGKey(1), (m, D))
    cells = [str(m)]
    for layout, kernels in (("in_out", in_out), ("out_in", out_in), ("reduce", out_in)):
      fn = jax.jit(lambda x, ks, layout=layout: chain(x, ks, out_in=layout != "in_out",
                                                      reduce=layout == "reduce"))
      seconds = common.fastest(fn, x, kernels, repeats=args.repeats)
      cells.append(f"{1e3 * seconds:.2f} ms ({weight_bytes / seconds / 1e9:.1f} GB/s)")
    print(" | ".join(cells), flush=True)
    rows.append(cells)
  table = common.markdown_table(
      ["rows", "kernels [in, out] (bltjax)", "kernels [out, in]",
       "multiply + sum, kernels [out, in]"], rows)
  print(table)
  if not args.no_append:
    common.append("XLA matmul of a few rows: time and weight bandwidth", table, argv=argv,
                  note=f"{LAYERS} chained [rows, {D}] x [{D}, {F}] float32 matmuls "
                       f"({weight_bytes / 1e6:.0f} MB of weights), fastest of "
                       f"{args.repeats}. Memory read bandwidth for comparison (jnp.sum of "
                       f"400 MB float32): {read_gb_s:.1f} GB/s.")


if __name__ == "__main__":
  main()
