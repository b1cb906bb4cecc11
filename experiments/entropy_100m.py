r"""The BLT entropy model at the released blt-entropy shape: 14 x 768, 12 heads, window 512.

  bltjax train --config experiments/entropy_100m.py --workdir runs/entropy_100m
  bltjax calibrate --workdir runs/entropy_100m --target 4.0
"""

from bltjax import configs


def get_config(arg=None):
  if arg:
    raise ValueError(f"experiments/entropy_100m.py takes no variant, got {arg!r}")
  config = configs.base_config()
  config.model.kind = "entropy"
  config.model.dtype = "bfloat16"
  config.model.entropy = configs.transformer_section(768, 14, 12, window=512)
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
