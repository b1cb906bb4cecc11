"""Command line: `bltjax train|eval|patch|calibrate|params|convert|demo`.

Every command that reads an experiment file takes `--config FILE[:arg]` and any number
of `--config.section.key=value` overrides. Errors a user can fix are printed as one
line (`bltjax: error: ...`) with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from bltjax import checkpoint
from bltjax import configs
from bltjax import data as data_lib
from bltjax import distributed
from bltjax.train import NonFiniteLossError

DEMO_TEXT = ('def greet(name):\n    """Say hello."""\n    return f"Hello, {name}!"\n\n'
             'print(greet("world"))\n')


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
  result = evaluate.evaluate_workdir(
      args.workdir, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
      max_batches=args.max_batches, overrides=overrides)
  path = evaluate.write_result(result, args.name)
  if distributed.is_main():
    print(evaluate.format_table(result))
    print(f"written to {path}")


def _entropy_config(workdir: str, overrides: Sequence[str]):
  config = checkpoint.read_config(workdir)
  return configs.apply_overrides(config, overrides)


def cmd_calibrate(args, overrides):
  from bltjax import model as model_lib  # pylint: disable=g-import-not-at-top
  from bltjax import patching  # pylint: disable=g-import-not-at-top
  config = _entropy_config(args.workdir, overrides)
  ref = patching.EntropyModelRef.load(args.workdir)
  patcher_config = model_lib.patcher_config(config.patcher, threshold=0.0)
  target = args.target or config.patcher.target_patch_len
  batches = data_lib.eval_batches(
      config.data, seq_len=config.train.seq_len, global_batch=args.batch_size,
      process_index=0, process_count=1, max_batches=args.batches)
  threshold, mean_len = patching.calibrate(ref, batches, patcher_config, target)
  path = patching.write_calibration(args.workdir, dict(
      threshold=threshold, mean_patch_len=mean_len, target_patch_len=target,
      rule=patcher_config.rule, max_patch_len=patcher_config.max_patch_len, step=ref.step,
      rows=args.batches * args.batch_size, seq_len=config.train.seq_len))
  print(f"threshold {threshold:.6f} nats gives mean patch length {mean_len:.3f} bytes "
        f"(target {target}, rule {patcher_config.rule}, max_patch_len "
        f"{patcher_config.max_patch_len}); written to {path}")


def cmd_patch(args, overrides):
  from bltjax import patching  # pylint: disable=g-import-not-at-top
  config = _entropy_config(args.workdir, overrides)
  ref, patcher_config = patching.patcher_from_workdir(args.workdir, config.patcher)
  texts = args.text or [DEMO_TEXT]
  for text, pieces in zip(texts, patching.patch_texts(texts, patcher_config, ref)):
    print(format_patches(pieces))
    mean = sum(len(p) for p in pieces) / max(len(pieces), 1)
    print(f"-- {len(pieces)} patches, mean patch length {mean:.2f} bytes "
          f"(mode {patcher_config.mode}, threshold {patcher_config.threshold:.4f})")


def format_patches(pieces: Sequence[bytes]) -> str:
  return "|".join(p.decode("utf-8", errors="replace").replace("\n", "\\n") for p in pieces)


def cmd_params(args, overrides):
  from bltjax import objectives  # pylint: disable=g-import-not-at-top
  config = configs.load(args.config, overrides)
  for name, count in objectives.param_counts(config).items():
    print(f"{name:>18s}  {count / 1e6:12.3f} M")


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


def cmd_demo(args, overrides):
  """Trains the tiny entropy model, calibrates its patcher and patches a sample text."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  entropy_dir = os.path.join(args.workdir, "entropy")
  print(f"== 1/3 train the entropy model (experiments/entropy_tiny.py) in {entropy_dir}")
  cmd_train(argparse.Namespace(config=os.path.join(repo, "experiments", "entropy_tiny.py"),
                               workdir=entropy_dir), overrides)
  print("== 2/3 calibrate the patching threshold")
  cmd_calibrate(argparse.Namespace(workdir=entropy_dir, target=0.0, batches=8, batch_size=8),
                [])
  print("== 3/3 a sample text cut into patches")
  cmd_patch(argparse.Namespace(workdir=entropy_dir, text=None), [])


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="bltjax", description=__doc__.split("\n")[0],
      epilog="Overrides: --config.section.key=value (any number, after the command).")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("train", help="train or resume a run")
  p.add_argument("--config", required=True, help="experiment file, e.g. experiments/entropy_tiny.py")
  p.add_argument("--workdir", required=True, help="run directory (re-running resumes)")
  p.set_defaults(fn=cmd_train)

  p = sub.add_parser("eval", help="bits per byte of a workdir's latest checkpoint on data")
  p.add_argument("--workdir", required=True, help="workdir of a `bltjax train` run")
  p.add_argument("--data", required=True,
                 help="comma-separated files, directories or globs (text, JSONL, ArrayRecord)")
  p.add_argument("--seq_len", type=int, default=None, help="bytes per row (default: training's)")
  p.add_argument("--batch_size", type=int, default=None,
                 help="global rows per eval step (default: training's)")
  p.add_argument("--max_batches", type=int, default=None,
                 help="at most this many batches per file (default: all)")
  p.add_argument("--name", default=None,
                 help="report name: <workdir>/eval/<name>.json (default: from --data)")
  p.set_defaults(fn=cmd_eval)

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

  p = sub.add_parser("params", help="parameter counts per component of a config")
  p.add_argument("--config", required=True)
  p.set_defaults(fn=cmd_params)

  p = sub.add_parser("convert", help="import a Hugging Face BLT checkpoint (BltForCausalLM)")
  p.add_argument("--hf", required=True,
                 help="Hugging Face checkpoint directory (config.json + *.safetensors)")
  p.add_argument("--out", required=True, help="new bltjax model directory to write")
  p.add_argument("--entropy", default=None,
                 help="directory of the entropy model, when --hf does not hold model.patcher.*")
  p.set_defaults(fn=cmd_convert)

  p = sub.add_parser("demo", help="the quick-start job: train, calibrate and patch")
  p.add_argument("--workdir", default="runs/demo")
  p.set_defaults(fn=cmd_demo)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = _split_overrides(argv)
  parser = build_parser()
  args = parser.parse_args(rest)
  try:
    distributed.initialize()  # Multi-host: before anything touches devices.
    args.fn(args, overrides)
  except (configs.ConfigError, FileNotFoundError, ValueError, NonFiniteLossError) as e:
    if os.environ.get("BLTJAX_TRACEBACK"):
      raise
    print(f"bltjax: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
