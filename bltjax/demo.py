"""The quick-start job (`make demo` / `bltjax demo`), on the built-in default corpus:

1. train the tiny entropy model (experiments/entropy_tiny.py);
2. calibrate its threshold for 4.5 bytes per patch and cut a sample text into patches;
3. train a tiny BLT-D-8 (experiments/blt_tiny.py:bltd8) patched by it;
4. report the validation bits per byte of both;
5. generate from a prompt with every decoding method, with NFE and bytes/s.

Everything goes to `<workdir>/` (`entropy/`, `bltd8/`, `summary.json`); re-running
resumes the trainings and skips what is done.
"""

from __future__ import annotations

import json
import os

from bltjax import configs
from bltjax import patching
from bltjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "import os\nimport sys\n\n\ndef main("
METHODS = (("ar", {}), ("blt_s", {"draft_len": 8}), ("blt_dv", {"draft_len": 8}),
           ("blt_d", {"block_size": 8, "alpha": 0.7}), ("blt_h", {"block_size": 8, "gate": 0.8}))


def _experiment(name: str, overrides) -> "configs.ml_collections.ConfigDict":
  return configs.load(os.path.join(REPO, "experiments", name), overrides)


def run(workdir: str = "runs/demo", *, steps: int = 300, overrides=(),
        generate_bytes: int = 96) -> dict:
  summary = {}
  entropy_dir = os.path.join(workdir, "entropy")
  print(f"== 1/5 train the entropy model (experiments/entropy_tiny.py, {steps} steps) "
        f"in {entropy_dir}", flush=True)
  config = _experiment("entropy_tiny.py", [f"--config.train.steps={steps}", *overrides])
  summary["entropy_valid_bpb"] = train.train(config, entropy_dir)["bpb"]

  print("== 2/5 calibrate the patching threshold for 4.5 bytes per patch", flush=True)
  record = patching.calibrate_workdir(entropy_dir, config, target_patch_len=4.5)
  threshold, mean_len = record["threshold"], record["mean_patch_len"]
  summary.update(threshold=threshold, mean_patch_len=mean_len)
  print(f"threshold {threshold:.4f} nats -> mean patch length {mean_len:.2f} bytes")
  ref = patching.EntropyModelRef.load(entropy_dir)
  pieces = patching.patch_texts([patching.SAMPLE_TEXT], patching.model_lib.patcher_config(
      config.patcher, threshold=threshold), ref)[0]
  print(patching.format_patches(pieces))
  print(f"-- {len(pieces)} patches, mean {sum(map(len, pieces)) / len(pieces):.2f} bytes")

  blt_dir = os.path.join(workdir, "bltd8")
  print(f"== 3/5 train a tiny BLT-D-8 (experiments/blt_tiny.py:bltd8, {steps} steps) in "
        f"{blt_dir}", flush=True)
  config = _experiment("blt_tiny.py:bltd8", [
      f"--config.train.steps={steps}", f"--config.patcher.entropy_workdir={entropy_dir}",
      *overrides])
  summary["bltd8_valid_bpb"] = train.train(config, blt_dir)["bpb"]

  print("== 4/5 validation bits per byte", flush=True)
  print(f"entropy model {summary['entropy_valid_bpb']:.3f} bpb, BLT-D-8 "
        f"{summary['bltd8_valid_bpb']:.3f} bpb")

  print(f"== 5/5 generate {generate_bytes} bytes after {PROMPT!r} with every method",
        flush=True)
  import bltjax  # pylint: disable=g-import-not-at-top
  model = bltjax.load(blt_dir)
  summary["generation"] = {}
  for method, options in METHODS:
    model.generate([PROMPT], max_bytes=generate_bytes, method=method, **options)  # compile
    out = model.generate([PROMPT], max_bytes=generate_bytes, method=method, **options)
    nfe = " ".join(f"{c} {v:.2f}" for c, v in out.nfe_per_byte.items())
    print(f"--- {method} {options}: {out.bytes_per_s:.0f} bytes/s, NFE/byte {nfe}")
    print(out.texts[0])
    summary["generation"][method] = dict(options=options, text=out.texts[0],
                                         bytes_per_s=out.bytes_per_s,
                                         nfe_per_byte=out.nfe_per_byte)
  with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  print(f"summary written to {os.path.join(workdir, 'summary.json')}")
  return summary
