"""Two layouts of the decoding stacks, on the same weights: compile seconds and bytes/s.

`--compare layers` (default): a model trained with `model.scan_layers` decodes with its
global (and entropy) stacks unrolled by default (`DecodeConfig.unroll_layers`;
`unroll_layers=False` keeps them scanned); a model trained unrolled gets its global stack
stacked in memory (`layers.stack_layers`), so any BLT workdir serves (its entropy model
stays as trained). `--compare projections`: every stack's q/k/v and gate/up projections
as one matmul each (`DecodeConfig.fuse_projections`, the default) or apart.

Per method and batch: the seconds the first generate call spent compiling (its decode
and prefill programs), the bytes/s of the generation loop (prefill timed apart), fastest
of --repeats with the two layouts alternated, and whether both generated the same bytes.

  python bench/decode_layers.py --workdir runs/bench/bltd8 [--compare projections]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bltjax  # noqa: E402
from bench import common  # noqa: E402
from bltjax import api  # noqa: E402
from bltjax import continuation  # noqa: E402
from bltjax.model import layers  # noqa: E402

METHODS = (("AR", "ar", {}), ("BLT-S k=8", "blt_s", {"draft_len": 8}),
           ("BLT-D-8 a=0.5", "blt_d", {"block_size": 8, "alpha": 0.5}))
# --compare -> (results title, the DecodeConfig option, (layout name, its value) x 2).
COMPARISONS = {
    "layers": ("Decoding a scanned global stack: scanned vs unrolled", "unroll_layers",
               (("scanned", False), ("unrolled", True))),
    "projections": ("Decoding with q/k/v and gate/up fused: apart vs fused",
                    "fuse_projections", (("apart", False), ("fused", True))),
}


def scanned_model(model: api.Model) -> api.Model:
  """`model` with its global stack scanned: itself when trained so, else a copy whose
  global params are stacked `[n_layers, ...]`."""
  if model.config.model.scan_layers:
    return model
  config = copy.deepcopy(model.config)
  config.model.scan_layers = True
  stack = model.params["global_model"]
  params = dict(model.params, global_model=dict(
      stack, transformer=layers.stack_layers(stack["transformer"])))
  return api.Model(model.workdir, config, params, model.frozen, model.step,
                   max_len=model.max_len, compiler_options=model.compiler_options)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a trained BLT workdir")
  parser.add_argument("--batch_sizes", type=common.batch_sizes, default="1,8")
  parser.add_argument("--prompts", type=int, default=8, help="held-out prompts of 64 bytes")
  parser.add_argument("--max_bytes", type=int, default=128, help="bytes generated per prompt")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--compare", choices=sorted(COMPARISONS), default="layers")
  parser.add_argument("--no_append", action="store_true")
  args = parser.parse_args(argv)
  title, option, layouts = COMPARISONS[args.compare]
  (old, _), (new, _) = layouts

  loaded = bltjax.load(args.workdir)
  model = scanned_model(loaded) if args.compare == "layers" else loaded
  items = continuation.make_continuations(loaded.config.data, count=args.prompts,
                                          prompt_bytes=64,
                                          continuation_bytes=args.max_bytes, seed=0)
  rows = []
  for batch in args.batch_sizes:
    for name, method, options in METHODS:
      compile_s, speed, outputs = {}, {}, {}
      for layout, value in layouts:
        first = model.generate(items.prompts[:batch], max_bytes=args.max_bytes,
                               method=method, time_prefill=True, **{option: value},
                               **options)
        compile_s[layout] = first.compile_seconds
      for _ in range(args.repeats):
        for layout, value in layouts:
          result = continuation.run(model, items, method=method, batch_size=batch,
                                    warmup=False, **{option: value}, **options)
          speed[layout] = max(speed.get(layout, 0.0), result.generation_bytes_per_s)
          outputs[layout] = result.outputs
      row = [name, str(batch), *(f"{compile_s[l]:.1f}" for l, _ in layouts),
             *(f"{speed[l]:.1f}" for l, _ in layouts), f"{speed[new] / speed[old]:.2f}x",
             "yes" if outputs[old] == outputs[new] else "no"]
      print(" | ".join(row), flush=True)
      rows.append(row)
  table = common.markdown_table(
      ["method", "batch", f"compile s, {old}", f"compile s, {new}", f"bytes/s, {old}",
       f"bytes/s, {new}", f"{new} / {old}", "same bytes"], rows)
  print(table)
  if not args.no_append:
    trained = "scanned" if loaded.config.model.scan_layers else "unrolled"
    if args.compare == "layers" and not loaded.config.model.scan_layers:
      trained += ", stacked in memory"
    common.append(
        title, table, argv=argv,
        note=(f"Model: `{args.workdir}` (step {loaded.step}; global stack trained {trained}). "
              f"{args.prompts} held-out prompts of 64 bytes, {args.max_bytes} bytes generated "
              "each, greedy. compile: seconds the first generate call compiled (decode and "
              "prefill programs); bytes/s: the generation loop (prefill timed apart), fastest "
              f"of {args.repeats} with the layouts alternated; same bytes: both layouts "
              "generated identical outputs."))


if __name__ == "__main__":
  main()
