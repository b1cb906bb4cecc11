r"""The default decoding sweep: every decoding method on the BLT-D-8 that `make demo` trains.

  bltjax sweep --config experiments/sweeps/decoding.py --workdir runs/sweeps/decoding
  bltjax sweep --config experiments/sweeps/decoding.py:batch8 --workdir runs/sweeps/decoding8 \
      --config.model=runs/bench/bltd8 --config.prompts=16

Runs (17 per batch size, 10 compiled programs): ar; blt_s k 4/8/16; blt_dv k 8; blt_d
B 4/8/16 x alpha 0.5/0.7/0.9, and the entropy bound gamma 0.5/1.5 at B 8; blt_h B 8
(alpha 0.7, gate 0.9). Greedy, 8 held-out prompts of 64 bytes from the model's validation
split, 64 bytes generated each: about 5 minutes on a 2-core CPU for the demo model
(10 compiles + 17 runs x 2 passes over 8 x 64 bytes; measured 2026-11-26).

Variants (comma-separated): `batch8` (every run at batch 1 and 8), `quick` (ar, blt_s
k 8, blt_dv k 8, blt_d B 8 alpha 0.7, blt_h: a smoke run).
"""

from bltjax import sweep

VARIANTS = ("batch8", "quick")


def get_config(arg=None):
  args = set(arg.split(",")) if arg else set()
  unknown = sorted(args - set(VARIANTS))
  if unknown:
    raise ValueError(f"unknown variant {unknown[0]!r}; use {'|'.join(VARIANTS)}")
  config = sweep.decoding_config(
      model="runs/demo/bltd8",   # a BLT-D workdir (blt_d, blt_dv and blt_h need lambda_diff > 0)
      data="",                   # "": the model's validation split
      prompts=8, prompt_bytes=64, continuation_bytes=64)
  config.batch_sizes = (1, 8) if "batch8" in args else (1,)
  config.quick = "quick" in args
  return config


def get_sweep(config):
  method = lambda name: sweep.fixed("method", name)
  if config.quick:
    methods = sweep.chain(
        method("ar"),
        sweep.product(method("blt_s"), sweep.fixed("draft_len", 8)),
        sweep.product(method("blt_dv"), sweep.fixed("draft_len", 8)),
        sweep.product(method("blt_d"), sweep.fixed("block_size", 8), sweep.fixed("alpha", 0.7)),
        sweep.product(method("blt_h"), sweep.fixed("block_size", 8), sweep.fixed("alpha", 0.7),
                      sweep.fixed("gate", 0.9)))
  else:
    methods = sweep.chain(
        method("ar"),
        sweep.product(method("blt_s"), sweep.sweep("draft_len", [4, 8, 16])),
        sweep.product(method("blt_dv"), sweep.fixed("draft_len", 8)),
        sweep.product(method("blt_d"), sweep.sweep("block_size", [4, 8, 16]),
                      sweep.sweep("alpha", [0.5, 0.7, 0.9])),
        sweep.product(method("blt_d"), sweep.fixed("block_size", 8),
                      sweep.sweep("gamma", [0.5, 1.5])),
        sweep.product(method("blt_h"), sweep.fixed("block_size", 8), sweep.fixed("alpha", 0.7),
                      sweep.fixed("gate", 0.9)))
  return sweep.product(sweep.sweep("batch_size", list(config.batch_sizes)), methods)
