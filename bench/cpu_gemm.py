"""Why AR decoding at batch 8 is not 8x batch 1 on CPU: XLA:CPU's matmul of a few rows.

A decode step multiplies `[rows, d]` activations by every weight matrix once; with few
rows it should cost the weights' bytes (memory bandwidth) whatever the row count. This
times a chain of 24 `[rows, 512] @ [512, 2048]` float32 matmuls (100 MB of weights,
more than the caches) and of 24 `[rows, 128] @ [128, 512]` (a local model's kernels)
at rows 1, 2, 4, 8 and 16, with the weights stored `[in, out]` (how bltjax stores
kernels) and `[out, in]`, and reports weight GB/s. On the 2-core CPU VM
8 rows take ~3x the time of 1 row (bench/RESULTS.md): the global model over 8 rows x 1
patch costs ~3-4x one row, which is the batch-8 AR gap of bench/generation.py, not the
KV cache (a head-major cache and reading only the used cache prefix were tried in
scratch A/B runs, not recorded, and changed nothing beyond the machine's drift).
The third column multiplies row by row (`layers.matmul` with `row_matmul_max=16`, one
matrix-vector product per row), what generation does on CPU for steps of up to
`generate.CPU_ROW_MATMUL_MAX` rows.

  python bench/cpu_gemm.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bltjax.model import layers  # noqa: E402

SHAPES = ((512, 2048), (128, 512))   # a global-model and a local-model kernel [in, out]
LAYERS = 24
LAYOUTS = (("in_out", "kernels [in, out] (bltjax)"), ("out_in", "kernels [out, in]"),
           ("row_by_row", "kernels [in, out], row by row"))


def chain(x, kernels, *, layout: str):
  d = x.shape[1]
  for w in kernels:
    if layout == "out_in":
      y = jnp.einsum("md,fd->mf", x, w)
    else:
      y = layers.matmul(x, w, row_matmul_max=16 if layout == "row_by_row" else 0)
    x = jnp.tanh(y)[:, :d]
  return x


def fastest(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--no_append", action="store_true")
  args = parser.parse_args(argv)
  rows = []
  for d, f in SHAPES:
    keys = jax.random.split(jax.random.PRNGKey(0), LAYERS)
    in_out = [jax.random.normal(k, (d, f)) * d ** -0.5 for k in keys]
    kernels = {"in_out": in_out, "out_in": [w.T.copy() for w in in_out],
               "row_by_row": in_out}
    weight_bytes = LAYERS * d * f * 4
    for m in (1, 2, 4, 8, 16):
      x = jax.random.normal(jax.random.PRNGKey(1), (m, d))
      cells = [f"[{d}, {f}]", str(m)]
      for layout, _ in LAYOUTS:
        fn = jax.jit(lambda x, ks, layout=layout: chain(x, ks, layout=layout))
        seconds = fastest(fn, x, kernels[layout], repeats=args.repeats)
        cells.append(f"{1e3 * seconds:.2f} ms ({weight_bytes / seconds / 1e9:.1f} GB/s)")
      print(" | ".join(cells), flush=True)
      rows.append(cells)
  table = common.markdown_table(["kernel", "rows", *(title for _, title in LAYOUTS)], rows)
  print(table)
  if not args.no_append:
    common.append("XLA matmul of a few rows: time and weight bandwidth", table, argv=argv,
                  note=f"{LAYERS} chained [rows, in] x [in, out] float32 matmuls per kernel "
                       f"shape, fastest of {args.repeats}; GB/s: the kernels' bytes over the "
                       "time. Row by row: `layers.matmul` with `row_matmul_max=16`.")


if __name__ == "__main__":
  main()
