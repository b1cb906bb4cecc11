r"""The BLT entropy model (released blt-entropy shape: 14 x 768, 12 heads, window 512).

  bltjax train --config experiments/entropy_100m.py --workdir runs/entropy_100m
  bltjax calibrate --workdir runs/entropy_100m --target 4.0
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paper_shapes  # noqa: E402  pylint: disable=g-import-not-at-top
from bltjax import configs  # noqa: E402


def get_config(arg=None):
  if arg:
    raise ValueError(f"experiments/entropy_100m.py takes no variant, got {arg!r}")
  config = configs.base_config()
  config.model.kind = "entropy"
  config.model.dtype = "bfloat16"
  config.model.entropy = paper_shapes.entropy_100m()
  config.train.seq_len = 8192
  config.train.batch_size = 64
  config.train.steps = 100_000
  config.train.log_every = 50
  config.train.eval_every = 5000
  config.train.save_every = 2000
  config.optim.lr = 4e-4
  config.optim.warmup_steps = 500
  config.mesh.data = 1
  config.mesh.fsdp = -1
  return config
