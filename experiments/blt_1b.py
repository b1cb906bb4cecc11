r"""BLT-1b (paper shapes, see experiments/paper_shapes.py) for accelerators.

  bltjax params --config experiments/blt_1b.py
  bltjax train --config experiments/blt_1b.py:bltd8 \
      --config.patcher.entropy_workdir=runs/entropy_100m --workdir runs/blt_1b

Variants: `bltd4` / `bltd8` / `bltd16` (BLT-D, the Fast BLT loss: ce + masked ce / t).
Defaults: bf16 compute, 8192-byte rows, 64 rows per step (2^19 bytes, Fast BLT's 1B
batch), AdamW (0.9, 0.95), peak lr 4e-4, cosine, clip 1.0, weight decay 0.1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paper_shapes  # noqa: E402  pylint: disable=g-import-not-at-top
from bltjax import configs  # noqa: E402


def get_config(arg=None):
  config = configs.base_config()
  config.model.kind = "blt"
  config.model.dtype = "bfloat16"
  config.model.remat = True
  paper_shapes.apply_blt_shape(config, "1b")
  config.patcher.mode = "entropy"
  config.patcher.max_patch_len = 8
  config.patcher.max_patches = 4096
  config.train.seq_len = 8192
  config.train.batch_size = 64
  config.train.steps = 240_000
  config.train.log_every = 50
  config.train.eval_every = 5000
  config.train.save_every = 2000
  config.optim.lr = 4e-4
  config.optim.warmup_steps = 2000
  config.optim.weight_decay = 0.1
  config.optim.clip_norm = 1.0
  config.mesh.data = 1
  config.mesh.fsdp = -1
  if arg and arg.startswith("bltd"):
    config.model.diffusion.lambda_diff = 1.0
    config.model.diffusion.elbo_weight = True
    config.model.diffusion.block_size = int(arg[len("bltd"):])
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use bltd4|bltd8|bltd16 or nothing")
  return config
