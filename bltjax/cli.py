"""Command line: `bltjax train|eval|sweep|generate|patch|calibrate|params|convert|export|demo`.

Every command that reads an experiment file takes `--config FILE[:arg]` and any number
of `--config.section.key=value` overrides. Errors a user can fix are printed as one
line (`bltjax: error: ...`) with exit status 2. Compiled programs are cached on disk
(`bltjax/compile_cache.py`: `BLTJAX_COMPILE_CACHE=DIR|off`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Sequence

import jax

from bltjax import checkpoint
from bltjax import compile_cache
from bltjax import configs
from bltjax import distributed
from bltjax.train import NonFiniteLossError, TrainingPreempted

# The exit status of a run stopped by a preemption notice after saving (128 + SIGTERM,
# as if terminated): not 0, so a chained command or a restart policy sees it unfinished.
PREEMPTED_EXIT_STATUS = 143


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  overrides = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  return rest, overrides


def cmd_train(args, overrides):
  from bltjax import train  # pylint: disable=g-import-not-at-top
  config = configs.load(args.config, overrides)
  result = train.train(config, args.workdir)
  if result and distributed.is_main():
    print(f"validation bpb {result['bpb']:.4f} ({int(result['bytes'])} bytes)")


def cmd_eval(args, overrides):
  from bltjax import evaluate  # pylint: disable=g-import-not-at-top
  if args.name:
    evaluate.check_name(args.name)
  tasks = _continuation_request(args)
  if not args.data and tasks is None:
    raise evaluate.EvalError("nothing to evaluate; pass --data FILES (bits per byte) and/or "
                             "--continuation_bytes N (continuation tasks)")
  report = None
  if args.data:
    result = evaluate.evaluate_workdir(
        args.workdir, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
        max_batches=args.max_batches, overrides=overrides, step=args.step)
    if distributed.is_main():
      print(evaluate.format_table(result))
    if tasks is None:
      path = evaluate.write_report(args.workdir, result.to_dict(), args.name)
      if distributed.is_main():
        print(f"written to {path}")
      return
    report = result.to_dict()
  elif overrides:
    raise configs.ConfigError("continuation tasks take no --config.* overrides; pass --data "
                              "for a bits-per-byte eval they apply to")
  from bltjax import continuation  # pylint: disable=g-import-not-at-top
  cont = continuation.evaluate_workdir(args.workdir, args.data, step=args.step, **tasks)
  report = dict(report or dict(workdir=args.workdir, step=cont["step"],
                               data=cont["data"]), continuation=cont)
  path = evaluate.write_report(args.workdir, report, args.name)
  if distributed.is_main():
    print(f"continuation tasks of {args.workdir} at step {cont['step']}: {cont['prompts']} "
          f"prompts of {cont['prompt_bytes']} bytes from {cont['data']}, "
          f"{cont['continuation_bytes']} bytes generated each, batch {cont['batch_size']}")
    print(continuation.format_table(cont["rows"]))
    print(f"written to {path}")


DECODE_OPTIONS = ("block_size", "alpha", "gamma", "draft_len", "block_commit", "gate",
                  "temperature", "top_p")


def _continuation_request(args) -> dict | None:
  """The continuation-task arguments of `bltjax eval`, checked before any evaluation
  (every method's DecodeConfig built with every option given), or None when not asked
  for."""
  from bltjax import continuation  # pylint: disable=g-import-not-at-top
  from bltjax.api import DEFAULT_MAX_LEN  # pylint: disable=g-import-not-at-top
  asked = [f"--{k}" for k in ("prompt_bytes", "prompts", "methods", *DECODE_OPTIONS,
                              "max_len", "seed")
           if getattr(args, k) is not None]
  if args.continuation_bytes is None:
    if asked:
      raise ValueError(f"{asked[0]} is an option of continuation tasks; pass "
                       "--continuation_bytes N too")
    return None
  methods = [m.strip() for m in (args.methods or "ar").split(",") if m.strip()]
  options = {k: getattr(args, k) for k in DECODE_OPTIONS if getattr(args, k) is not None}
  tasks = dict(methods=[(m, dict(options)) for m in dict.fromkeys(methods)],
               prompts=16 if args.prompts is None else args.prompts,
               prompt_bytes=64 if args.prompt_bytes is None else args.prompt_bytes,
               continuation_bytes=args.continuation_bytes,
               batch_size=1 if args.batch_size is None else args.batch_size,
               max_len=DEFAULT_MAX_LEN if args.max_len is None else args.max_len)
  continuation.check_request(**tasks)
  continuation.check_options(methods, options, args.seed)
  return dict(tasks, seed=args.seed or 0)


def cmd_sweep(args, overrides):
  from bltjax import sweep  # pylint: disable=g-import-not-at-top
  sw = sweep.load_sweep(args.config, overrides)
  finished = sweep.read_results(args.workdir)
  if args.dry_run or distributed.is_main():
    print(sweep.describe(sw, finished))
  if args.dry_run:
    sweep.check_training_runs(sw, [r for r in sw.runs if r.id not in finished])
    return
  report = sweep.run_sweep(sw, args.workdir)
  if distributed.is_main():
    print(f"{len(report.executed)} run(s) done now, {len(report.skipped)} finished before")
    with open(os.path.join(args.workdir, sweep.TABLE), encoding="utf-8") as f:
      print(f.read().rstrip())
    print("written: " + ", ".join(report.files))


def _entropy_config(workdir: str, overrides: Sequence[str]):
  config = checkpoint.read_config(workdir)
  return configs.apply_overrides(config, overrides)


def cmd_calibrate(args, overrides):
  from bltjax import patching  # pylint: disable=g-import-not-at-top
  record = patching.calibrate_workdir(
      args.workdir, _entropy_config(args.workdir, overrides), target_patch_len=args.target,
      batches=args.batches, batch_size=args.batch_size)
  print(f"threshold {record['threshold']:.6f} nats gives mean patch length "
        f"{record['mean_patch_len']:.3f} bytes (target {record['target_patch_len']}, rule "
        f"{record['rule']}, max_patch_len {record['max_patch_len']}); written to "
        f"{record['path']}")


def cmd_patch(args, overrides):
  from bltjax import patching  # pylint: disable=g-import-not-at-top
  config = _entropy_config(args.workdir, overrides)
  ref, patcher_config = patching.patcher_from_workdir(args.workdir, config.patcher)
  texts = _arg_bytes(args.text) or [patching.SAMPLE_TEXT]
  for text, pieces in zip(texts, patching.patch_texts(texts, patcher_config, ref)):
    print(patching.format_patches(pieces))
    mean = sum(len(p) for p in pieces) / max(len(pieces), 1)
    print(f"-- {len(pieces)} patches, mean patch length {mean:.2f} bytes "
          f"(mode {patcher_config.mode}, threshold {patcher_config.threshold:.4f})")


def cmd_params(args, overrides):
  from bltjax import objectives  # pylint: disable=g-import-not-at-top
  if not args.patch_len > 0 or not 0 <= args.context < float("inf"):   # NaN fails too
    raise ValueError(f"need --patch_len > 0 and a finite --context >= 0, got "
                     f"{args.patch_len}, {args.context}")
  if args.workdir:
    config = configs.apply_overrides(checkpoint.read_config(args.workdir), overrides)
  else:
    config = configs.load(args.config, overrides)
  for name, count in objectives.param_counts(config).items():
    print(f"{name:>18s}  {count / 1e6:12.3f} M")
  if config.model.kind == "blt" and config.patcher.mode == "entropy" \
      and not config.patcher.entropy_workdir:
    print("(entropy_model: the shape of config.model.entropy; with "
          "--config.patcher.entropy_workdir=DIR, the model that patches the BLT)")
  if config.model.kind == "blt":
    print(format_traffic(config, args.patch_len, args.context))


def format_traffic(config, patch_len: float, context: float) -> str:
  """Per-component bytes (16-bit) and the estimated traffic per byte of cached AR."""
  from bltjax.generate import cost  # pylint: disable=g-import-not-at-top
  sizes = cost.ModelSizes.from_config(config)
  nfe = cost.ar_nfe_per_byte(patch_len, entropy=sizes.params["entropy"] > 0)
  per_byte = cost.estimate(nfe, sizes, n_bytes=1, context=context,
                           patch_len=patch_len).per_byte()
  fmt = cost.format_bytes
  lines = [f"parameter bytes at {8 * sizes.bytes_per_param}-bit (a call reads its component's "
           "whole; the hash tables only one row per table per byte):"]
  for c, n in sizes.param_bytes().items():
    note = (f"  ({fmt(sizes.hash_row_bytes)} read per byte)" if c == "hash_tables" else "")
    lines.append(f"{c:>18s}  {fmt(n):>10s}{note}")
  lines.append(f"estimated traffic per generated byte of cached AR (patch length {patch_len:g}, "
               f"NFE/byte " + ", ".join(f"{c} {v:.3g}" for c, v in nfe.items()) + "):")
  for c in cost.COMPONENTS:
    lines.append(f"{'weights/' + c:>18s}  {fmt(per_byte['weights/' + c]):>10s}")
  lines.append(f"{'hash_rows':>18s}  {fmt(per_byte['hash_rows']):>10s}")
  lines.append(f"{'total':>18s}  {fmt(per_byte['total']):>10s}")
  kv = sum(v for k, v in per_byte.items() if k.startswith("kv/"))
  lines.append(f"{'+ kv cache':>18s}  {fmt(kv):>10s}  (at a {context:g}-byte context)")
  lines.append(f"{'paper proxy':>18s}  {fmt(per_byte['paper']):>10s}  (Fast BLT Eq. 8: "
               "decoder per byte, encoder + global per patch)")
  return "\n".join(lines)


def _arg_bytes(texts: Sequence[str] | None) -> list[bytes]:
  """Command-line texts as the bytes given: bytes that are not UTF-8 come back as they
  were (os.fsencode undoes Python's surrogate escapes), for a model that reads bytes."""
  return [os.fsencode(t) for t in texts or []]


def _read_prompts(args) -> list[bytes]:
  """--prompt texts, then the lines of each --prompts file that hold more than white space,
  as bytes (any encoding; a UTF-8 byte-order mark at a file's start is not a prompt's)."""
  prompts = _arg_bytes(args.prompt)
  for path in args.prompts or []:
    if os.path.isdir(path):
      raise ValueError(f"--prompts {path} is a directory; pass a text file with one prompt "
                       "per line")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--prompts {path} does not exist; pass a text file with one "
                              "prompt per line")
    with open(path, "rb") as f:
      content = f.read().removeprefix(b"\xef\xbb\xbf")
    lines = [line for line in content.splitlines() if line.strip()]
    if not lines:
      raise ValueError(f"--prompts {path} holds no prompt (every line is blank); write one "
                       "prompt per line")
    prompts += lines
  if not prompts:
    raise ValueError("no prompts; pass --prompt TEXT (repeatable) or --prompts FILE")
  return prompts


def _shown(prompt: bytes) -> str:
  """A prompt as the output names it: its text's repr, or its bytes' if not UTF-8."""
  try:
    return repr(prompt.decode("utf-8"))
  except UnicodeDecodeError:
    return repr(prompt)


def cmd_generate(args, overrides):
  import bltjax  # pylint: disable=g-import-not-at-top
  from bltjax import continuation  # pylint: disable=g-import-not-at-top
  from bltjax.generate import cost  # pylint: disable=g-import-not-at-top
  if overrides:
    raise configs.ConfigError("bltjax generate takes no --config.* overrides; use its own "
                              "options (--method, --block_size, ...)")
  if args.repeats < 0:
    raise ValueError(f"--repeats={args.repeats} must be >= 0")
  prompts = _read_prompts(args)
  options = {k: getattr(args, k) for k in DECODE_OPTIONS + ("attention_impl", "unmask_impl")
             if getattr(args, k) is not None}
  if args.scanned_layers:
    options["unroll_layers"] = False
  methods = list(dict.fromkeys(args.method or ["ar"]))
  continuation.check_options(methods, options, args.seed)
  seed = args.seed or 0
  model = bltjax.load(args.workdir, step=args.step, max_len=args.max_len)
  for method in methods:  # every option and row length checked before any output
    model.decode_config(method, args.max_bytes, **options)
  model.prompt_rows(prompts, args.max_bytes)
  sampling = ("greedy" if not options.get("temperature")
              else f"temperature {options['temperature']}, top_p {options.get('top_p', 1.0)}, "
                   f"seed {seed}")
  print(f"model {args.workdir} (step {model.step}, {model.patcher_config.mode} patching); "
        f"{len(prompts)} prompt(s), max_bytes {args.max_bytes}, {sampling}")
  rows = []
  for method in methods:
    run = lambda: model.generate(prompts, max_bytes=args.max_bytes, method=method,
                                 seed=seed, time_prefill=True, **options)
    out = run()
    compile_seconds = out.compile_seconds
    runs = [run() for _ in range(args.repeats)] if args.repeats else [out]
    seconds = sum(r.generation_seconds for r in runs) / len(runs)
    prefill_seconds = sum(r.prefill_seconds for r in runs) / len(runs)
    for i, (prompt, text) in enumerate(zip(prompts, out.texts)):
      print(f"--- {method} [{i}] {_shown(prompt)} +")
      print(text)
    # The loop less a prefill timed apart: a loop of a byte or two can read <= 0 (noise).
    speed = out.num_bytes / seconds if seconds > 0 else float("nan")
    rows.append((method, out, speed, prefill_seconds, compile_seconds))
  timing = (f"mean of {args.repeats} run(s) after a warm-up run" if args.repeats
            else "the first run, compile excluded")
  print(f"=== cost per method (bytes/s: the generation loop, the prompts' prefill timed "
        f"apart, {timing}; traffic: estimated bytes read per generated byte, weights + hash "
        "rows [+ KV cache], paper proxy = Fast BLT Eq. 8)")
  fmt = cost.format_bytes
  baseline = next((o.traffic for m, o, *_ in rows if m == "ar"), None)
  for method, out, speed, prefill_seconds, compile_seconds in rows:
    nfe = " ".join(f"{c} {v:.3f}" for c, v in out.nfe_per_byte.items())
    per_byte = out.traffic.per_byte()
    saved = ""
    if baseline is not None and method != "ar":
      change = out.traffic.reduction_vs(baseline)
      saved = f", {100 * abs(change):.0f}% {'below' if change >= 0 else 'above'} ar"
    speed = f"{speed:.1f}" if math.isfinite(speed) else "- (too short to time)"
    print(f"{method:<7s} {out.num_bytes} bytes | NFE/byte {nfe} | traffic/byte "
          f"{fmt(per_byte['total'])} [{fmt(per_byte['total_with_kv'])}], paper "
          f"{fmt(per_byte['paper'])}{saved} | {speed} bytes/s (prefill "
          f"{1e3 * prefill_seconds:.0f} ms; compile {compile_seconds:.1f} s, not timed)")


def cmd_convert(args, overrides):
  from bltjax import convert  # pylint: disable=g-import-not-at-top
  if overrides:
    raise configs.ConfigError("bltjax convert takes no --config.* overrides; override them "
                              "when you train or evaluate the converted model")
  result = convert.convert(args.hf, args.out, entropy_dir=args.entropy)
  plan = result.plan
  print(f"converted {result.tensors} tensors of {args.hf} into {args.out}: BLT "
        f"(local {plan.encoder['d_model']}, global {plan.global_model['d_model']}, "
        f"cross_attn_k {plan.cross_attn_k}) + entropy model "
        f"({os.path.join(args.out, convert.ENTROPY_SUBDIR)}), threshold {plan.threshold}, "
        f"max_patch_len {plan.max_patch_len}")


def cmd_export(args, overrides):
  from bltjax import export  # pylint: disable=g-import-not-at-top
  if overrides:
    raise configs.ConfigError("bltjax export takes no --config.* overrides: it writes the "
                              "model the workdir holds")
  result = export.export(args.workdir, args.out, step=args.step)
  print(f"exported step {result.step} of {args.workdir} ({result.tensors} tensors, entropy "
        f"model inside, threshold {result.plan.threshold}) to {args.out}: "
        f"{', '.join(result.files)} + config.json (transformers BltForCausalLM)")


def cmd_demo(args, overrides):
  from bltjax import demo  # pylint: disable=g-import-not-at-top
  demo.run(args.workdir, steps=args.steps, overrides=overrides)


def _add_decode_options(group) -> None:
  """The decoding options of `generate` and of `eval`'s continuation tasks (DESIGN §7),
  their defaults those of `DecodeConfig`."""
  from bltjax import generate  # pylint: disable=g-import-not-at-top
  from bltjax.generate.diffusion import BLOCK_COMMITS  # pylint: disable=g-import-not-at-top
  default = {f.name: f.default for f in dataclasses.fields(generate.DecodeConfig)}
  group.add_argument("--block_size", type=int, default=None,
                     help="BLT-D / BLT-H block size B (default: the block size a BLT-D was "
                     f"trained with, else {default['block_size']})")
  group.add_argument("--alpha", type=float, default=None,
                     help="BLT-D / BLT-H confidence rule: a decoder step reveals the masked "
                     "bytes of probability >= alpha, and always the likeliest one; 0 reveals "
                     f"a block at once, > 1 one byte per step (default {default['alpha']})")
  group.add_argument("--gamma", type=float, default=None,
                     help="BLT-D / BLT-H entropy-bounded rule instead of alpha: a step "
                     "reveals the lowest-entropy masked bytes while their entropies' sum less "
                     "their largest stays <= gamma nats, at least one (default: off)")
  group.add_argument("--draft_len", type=int, default=None,
                     help=f"BLT-S / BLT-DV draft length k (default {default['draft_len']})")
  group.add_argument("--block_commit", choices=BLOCK_COMMITS, default=None,
                     help="BLT-D: end a patch at the block end, or keep up to the last "
                     f"boundary (default {default['block_commit']})")
  group.add_argument("--gate", type=float, default=None,
                     help="BLT-H: mean confidence a block's one-step draft needs to be "
                     "decoded by BLT-D; below it the row emits one AR byte (default "
                     f"{default['gate']})")
  group.add_argument("--temperature", type=float, default=None,
                     help="sampling temperature; 0: greedy (default 0)")
  group.add_argument("--top_p", type=float, default=None,
                     help="nucleus sampling mass, with --temperature > 0 (default 1)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="bltjax", description=__doc__.split("\n")[0],
      epilog="Overrides: --config.section.key=value (any number, after the command).")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("train", help="train or resume a run")
  p.add_argument("--config", required=True, help="experiment file, e.g. experiments/entropy_tiny.py")
  p.add_argument("--workdir", required=True, help="run directory (re-running resumes)")
  p.set_defaults(fn=cmd_train)

  from bltjax.api import DEFAULT_MAX_LEN  # pylint: disable=g-import-not-at-top
  from bltjax.generate import METHODS  # pylint: disable=g-import-not-at-top
  from bltjax.generate.diffusion import UNMASK_IMPLS  # pylint: disable=g-import-not-at-top
  from bltjax.model.layers import ATTENTION_IMPLS  # pylint: disable=g-import-not-at-top
  p = sub.add_parser("eval", help="bits per byte of a workdir's latest checkpoint on data, "
                     "and continuation tasks (generate from held-out prompts)")
  p.add_argument("--workdir", required=True, help="workdir of a `bltjax train` run")
  p.add_argument("--data", default=None,
                 help="comma-separated files, directories or globs (text, JSONL, ArrayRecord); "
                 "may be left out with --continuation_bytes (the workdir's validation split)")
  p.add_argument("--seq_len", type=int, default=None, help="bytes per row (default: training's)")
  p.add_argument("--batch_size", type=int, default=None,
                 help="global rows per eval step (default: training's); continuation tasks: "
                 "prompts per generate call (default 1)")
  p.add_argument("--max_batches", type=int, default=None,
                 help="at most this many batches per file (default: all)")
  p.add_argument("--name", default=None,
                 help="report name: <workdir>/eval/<name>.json (default: the --data base names "
                 "and the step, e.g. notes_step400, or valid_step400)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  g = p.add_argument_group("continuation tasks", "from held-out prompts of --data (or the "
                           "validation split), generate N bytes with each method; report exact "
                           "match, bpb of the generated bytes under AR, agreement with AR, "
                           "NFE/byte, traffic/byte and bytes/s")
  g.add_argument("--continuation_bytes", type=int, default=None,
                 help="bytes to generate per prompt (turns the tasks on)")
  g.add_argument("--prompt_bytes", type=int, default=None, help="bytes per prompt (default 64)")
  g.add_argument("--prompts", type=int, default=None, help="how many prompts (default 16)")
  g.add_argument("--methods", default=None,
                 help=f"comma-separated, of {','.join(METHODS)} (default ar)")
  _add_decode_options(g)
  g.add_argument("--seed", type=int, default=None,
                 help="sampling seed, with --temperature > 0 (default 0)")
  g.add_argument("--max_len", type=int, default=None,
                 help="positions a row may hold: BOS + prompt + generated bytes "
                 f"(default {DEFAULT_MAX_LEN})")
  p.set_defaults(fn=cmd_eval)

  p = sub.add_parser("sweep", help="run every setting of a sweep file (resumable); writes "
                     "results.jsonl, results.md and plots")
  p.add_argument("--config", required=True,
                 help="sweep file[:arg], e.g. experiments/sweeps/decoding.py")
  p.add_argument("--workdir", required=True,
                 help="sweep directory (re-running skips finished runs)")
  p.add_argument("--dry_run", action="store_true",
                 help="list the runs (and which are finished) without running any")
  p.set_defaults(fn=cmd_sweep)

  p = sub.add_parser("calibrate", help="pick the entropy threshold for a mean patch length")
  p.add_argument("--workdir", required=True, help="workdir of a trained entropy model")
  p.add_argument("--target", type=float, default=0.0,
                 help="mean patch length in bytes (default: config.patcher.target_patch_len)")
  p.add_argument("--batches", type=int, default=8, help="validation batches to measure on")
  p.add_argument("--batch_size", type=int, default=8)
  p.set_defaults(fn=cmd_calibrate)

  p = sub.add_parser("patch", help="cut texts into patches with a trained entropy model")
  p.add_argument("--workdir", required=True, help="workdir of a trained entropy model")
  p.add_argument("--text", action="append", help="text to patch (repeatable)")
  p.set_defaults(fn=cmd_patch)

  p = sub.add_parser("params", help="parameter counts, bytes and AR traffic per component")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--config", help="an experiment file (a model not trained yet)")
  source.add_argument("--workdir", help="a trained workdir or a `bltjax convert` output (the "
                      "model in its config.json)")
  p.add_argument("--patch_len", type=float, default=4.5,
                 help="mean patch length for the AR traffic estimate")
  p.add_argument("--context", type=float, default=4096,
                 help="bytes of context for the KV-cache term of the estimate")
  p.set_defaults(fn=cmd_params)

  p = sub.add_parser("generate", help="continue prompts with a trained BLT; print NFE, "
                     "estimated traffic and measured bytes/s per method")
  p.add_argument("--workdir", required=True,
                 help="a BLT workdir (latest checkpoint) or a `bltjax convert` output")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--max_len", type=int, default=DEFAULT_MAX_LEN,
                 help="positions a row may hold: BOS + prompt + max_bytes "
                 f"(default {DEFAULT_MAX_LEN})")
  p.add_argument("--method", action="append", choices=METHODS,
                 help="decoding method (repeatable: one cost line each; default ar)")
  p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
  p.add_argument("--prompts", action="append", default=None,
                 help="text file, one prompt per line (blank lines skipped; repeatable)")
  p.add_argument("--max_bytes", type=int, default=128,
                 help="bytes to generate per prompt (default 128)")
  _add_decode_options(p)
  p.add_argument("--seed", type=int, default=None,
                 help="sampling seed, with --temperature > 0 (default 0)")
  p.add_argument("--attention_impl", choices=ATTENTION_IMPLS, default=None,
                 help="decoding attention over the KV caches: xla, or pallas (one kernel per "
                 "layer and step, pallas_kernels/diffusion); default: as the model was "
                 "configured (model.attention.impl)")
  p.add_argument("--unmask_impl", choices=UNMASK_IMPLS, default=None,
                 help="BLT-D / BLT-H unmasking: xla (default) or pallas (one fused kernel "
                 "per decoder step, pallas_kernels/diffusion)")
  p.add_argument("--scanned_layers", action="store_true",
                 help="decode stacks trained with model.scan_layers scanned (default: "
                 "unrolled, faster per byte but slower to compile)")
  p.add_argument("--repeats", type=int, default=1,
                 help="timed runs after the first (warm-up) run; 0: time the first run "
                 "(default 1)")
  p.set_defaults(fn=cmd_generate)

  p = sub.add_parser("convert", help="import a Hugging Face BLT checkpoint (BltForCausalLM)")
  p.add_argument("--hf", required=True,
                 help="Hugging Face checkpoint directory (config.json + *.safetensors)")
  p.add_argument("--out", required=True, help="new bltjax model directory to write")
  p.add_argument("--entropy", default=None,
                 help="directory of the entropy model, when --hf does not hold model.patcher.*")
  p.set_defaults(fn=cmd_convert)

  p = sub.add_parser("export", help="write a BLT as a Hugging Face BltForCausalLM checkpoint")
  p.add_argument("--workdir", required=True,
                 help="a BLT workdir (or converted model directory) with an entropy model")
  p.add_argument("--out", required=True, help="new Hugging Face checkpoint directory")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.set_defaults(fn=cmd_export)

  p = sub.add_parser("demo", help="the quick-start job: entropy model, BLT-D, generation")
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument("--steps", type=int, default=300, help="training steps of each model")
  p.set_defaults(fn=cmd_demo)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = _split_overrides(argv)
  parser = build_parser()
  args = parser.parse_args(rest)
  try:
    compile_cache.enable()    # A re-run reads its compiled programs from disk.
    distributed.initialize()  # Multi-host: before anything touches devices.
    args.fn(args, overrides)
  except TrainingPreempted as e:
    print(f"bltjax: {e}", file=sys.stderr)
    return PREEMPTED_EXIT_STATUS
  except (configs.ConfigError, FileNotFoundError, ValueError, NonFiniteLossError) as e:
    if os.environ.get("BLTJAX_TRACEBACK"):
      raise
    print(f"bltjax: error: {e}", file=sys.stderr)
    return 2
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e) or os.environ.get("BLTJAX_TRACEBACK"):
      raise
    first = str(e).strip().splitlines()[0]
    print(f"bltjax: error: out of memory ({first[:200]}); lower the rows or bytes a step "
          "holds: --batch_size / --seq_len (eval; eval scores every byte as its own patch, "
          "so its memory grows with seq_len squared), --max_bytes / --max_len (generate), "
          "config.train.batch_size / seq_len or config.train.grad_accum_steps (train)",
          file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
