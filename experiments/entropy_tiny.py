r"""A tiny entropy model for CPU: the patcher of the tiny BLT, and the demo's first job.

  bltjax train --config experiments/entropy_tiny.py --workdir runs/entropy_tiny
  bltjax calibrate --workdir runs/entropy_tiny          # threshold for 4.5 bytes/patch
  bltjax patch --workdir runs/entropy_tiny --text "def main():\n    return 0\n"

Variants: `:runlocal` (a few steps, for tests).
Expected on 2 CPU cores: validation bpb well under 3.0 after the default 600 steps.
"""

from bltjax import configs


def get_config(arg=None):
  config = configs.base_config()
  config.model.kind = "entropy"
  config.model.entropy = configs.transformer_section(128, 3, 4, window=512)

  config.train.steps = 600
  config.train.batch_size = 16
  config.train.seq_len = 512
  config.train.log_every = 25
  config.train.eval_every = 200
  config.train.eval_batches = 8
  config.train.save_every = 200

  config.optim.lr = 3e-3
  config.optim.warmup_steps = 60

  if arg == "runlocal":
    config.model.entropy = configs.transformer_section(32, 1, 2, window=16)
    config.train.steps = 4
    config.train.batch_size = 8
    config.train.seq_len = 32
    config.train.log_every = 1
    config.train.eval_every = 2
    config.train.eval_batches = 2
    config.train.save_every = 2
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use :runlocal or nothing")
  return config
