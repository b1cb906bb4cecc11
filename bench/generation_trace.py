"""Where a whole compiled decode's time goes: a `jax.profiler` trace, op time by call count.

For each method, decodes one prompt (--batch copies of it; compiled once, fastest of
--repeats runs), traces one more run and sums the time of every XLA op by how many times
it ran in the decode. Ops that ran as often as a component was called (its NFE count,
which covers the generation loop, not the prompt's prefill) are that component's work:
e.g. ops run 19 times in an AR decode with 19 global calls are the global model; ops run
a handful of times, as often as the prompt has prefill chunks, are the prefill. Unlike
`bench/generation_profile.py` (each piece jitted alone), this is the decode as it runs,
inside its `while_loop`. CPU or GPU.

  python bench/generation_trace.py --workdir runs/bench/bltd8
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import bltjax  # noqa: E402
from bench import common  # noqa: E402
from bench.generation_profile import PROMPT  # noqa: E402

METHODS = (("AR", "ar", {}), ("BLT-S k=8", "blt_s", {"draft_len": 8}),
           ("BLT-D-8 a=0.5", "blt_d", {"block_size": 8, "alpha": 0.5}),
           ("BLT-DV k=8", "blt_dv", {"draft_len": 8}),
           ("BLT-H-8 gate=0.8", "blt_h", {"block_size": 8, "alpha": 0.7, "gate": 0.8}))
# XLA op names (`dot.4155`, `wrapped_scatter`, `ynn_fusion`); the runtime's own events
# (`ParseArguments`, `Wait for usage holds`, `PjitFunction(...)`, ...) do not match.
_OP_NAME = re.compile(r"[a-z][a-z0-9_.\-]*")
# Control-flow ops: their events span the ops of their bodies, which are counted as such.
_CONTAINERS = ("while", "cond", "conditional", "call")


def op_times(trace_dir: str) -> dict[str, tuple[int, float]]:
  """{XLA op: (times it ran, total seconds)} from the trace written to `trace_dir`; leaf
  ops only (a while or cond event spans the ops of its body)."""
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  total, count = collections.Counter(), collections.Counter()
  for event in events:
    name = event.get("name", "")
    if (event.get("ph") != "X" or not _OP_NAME.fullmatch(name)
        or name.split(".")[0] in _CONTAINERS):
      continue
    total[name] += event["dur"] * 1e-6
    count[name] += 1
  return {name: (count[name], total[name]) for name in total}


def seconds_by_count(times: dict[str, tuple[int, float]]) -> dict[int, float]:
  """{times an op ran: total seconds of the ops that ran that often}."""
  by_count: dict[int, float] = collections.Counter()
  for count, seconds in times.values():
    by_count[count] += seconds
  return dict(by_count)


def label(calls: int, nfe: dict[str, int]) -> str:
  """The components called `calls` times in the generation loop."""
  return ", ".join(c for c, n in nfe.items() if n == calls and c != "embedded_positions") or "-"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a trained BLT workdir")
  parser.add_argument("--max_bytes", type=int, default=128)
  parser.add_argument("--batch", type=int, default=1, help="rows (copies of the prompt)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--top", type=int, default=6, help="call counts listed per method")
  parser.add_argument("--top_ops", type=int, default=0,
                      help="also print the N costliest XLA ops per method (name, runs, ms)")
  parser.add_argument("--methods", default="ar,blt_s,blt_d",
                      help=f"comma-separated, of {','.join(m for _, m, _ in METHODS)}")
  parser.add_argument("--results", default="", help="append the table to this file")
  args = parser.parse_args(argv)
  wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = sorted(set(wanted) - {m for _, m, _ in METHODS})
  if unknown:
    parser.error(f"unknown method {unknown[0]!r}; pick from "
                 f"{', '.join(m for _, m, _ in METHODS)}")
  model = bltjax.load(args.workdir)
  rows = []
  for name, method, options in (m for m in METHODS if m[1] in wanted):
    run = lambda timed: model.generate([PROMPT] * args.batch, max_bytes=args.max_bytes,
                                       method=method, time_prefill=timed, **options)
    out = run(True)   # compiles
    best = min((run(True) for _ in range(args.repeats)), key=lambda o: o.decode_seconds)
    with tempfile.TemporaryDirectory() as trace_dir:
      with jax.profiler.trace(trace_dir):
        run(False)    # the decode alone (prefill included, not run apart)
      times = op_times(trace_dir)
      by_count = seconds_by_count(times)
    for op, (runs, seconds) in sorted(times.items(), key=lambda kv: -kv[1][1])[:args.top_ops]:
      print(f"{name}: op {op} ran {runs} times, {seconds * 1e3:.1f} ms", flush=True)
    ops_total = sum(by_count.values())
    n_bytes = best.num_bytes / args.batch   # per row: the loop's steps serve every row
    rows.append([name, f"{best.decode_seconds / n_bytes * 1e3:.2f}",
                 f"{best.generation_seconds / n_bytes * 1e3:.2f}",
                 ", ".join(f"{k} {v}" for k, v in out.nfe.items()), "", "", ""])
    for calls, seconds in sorted(by_count.items(), key=lambda kv: -kv[1])[:args.top]:
      rows.append(["", "", "", "", f"{calls} ({label(calls, out.nfe)})",
                   f"{seconds * 1e3:.1f}", f"{seconds / ops_total:.0%}"])
    print(f"{name}: {best.num_bytes} bytes, traced op time {ops_total * 1e3:.1f} ms", flush=True)
  table = common.markdown_table(
      ["method", "ms/row byte (whole decode)", "ms/row byte (generation)", "NFE",
       "op ran (= calls of)", "op ms", "share"], rows)
  print(table)
  if args.results:
    common.append(f"Where a compiled decode's time goes (jax.profiler trace, batch {args.batch})",
                  table, path=args.results,
                  note=f"{args.batch} x one {len(PROMPT)}-byte prompt, {args.max_bytes} bytes "
                       "per row, greedy; ms per byte of a row; XLA op time summed by how many "
                       "times an op ran in the decode, labelled with the components called "
                       "that often.")


if __name__ == "__main__":
  main()
