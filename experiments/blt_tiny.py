r"""A tiny BLT (or BLT-D) for CPU, patched by the tiny entropy model.

  bltjax train --config experiments/entropy_tiny.py --workdir runs/entropy_tiny
  bltjax calibrate --workdir runs/entropy_tiny
  bltjax train --config experiments/blt_tiny.py \
      --config.patcher.entropy_workdir=runs/entropy_tiny --workdir runs/blt_tiny

Variants (comma-separated): `bltd4` / `bltd8` / `bltd16` (BLT-D with that block size,
lambda_diff 1), `static` / `space` (no entropy model needed), `runlocal` (a few steps).
"""

from bltjax import configs


def get_config(arg=None):
  args = set(arg.split(",")) if arg else set()
  config = configs.base_config()
  config.model.kind = "blt"
  blt = config.model.blt
  blt.encoder = configs.transformer_section(128, 1, 4, window=512, rope_theta=500000.0)
  blt.global_model = configs.transformer_section(256, 3, 4, rope_theta=500000.0)
  blt.decoder = configs.transformer_section(128, 2, 4, window=512, rope_theta=500000.0)
  blt.cross_attn_k = 2
  blt.hash_table_size = 4099
  blt.ngram_sizes = (3, 4, 5, 6)

  # BLT-D: 16 noisy blocks per 512-byte chunk (128 bytes for B = 8). The default (a
  # quarter of the chunk in blocks: 1024 noisy bytes) makes a step 4x slower on CPU.
  config.model.diffusion.blocks_per_chunk = 16

  config.patcher.mode = "entropy"
  config.patcher.max_patch_len = 8
  config.patcher.max_patches = 192         # P for 512-byte rows (>= 2.7 bytes per patch)

  config.train.steps = 600
  config.train.batch_size = 16
  config.train.seq_len = 512
  config.train.log_every = 25
  config.train.eval_every = 200
  config.train.save_every = 200
  config.optim.lr = 2e-3
  config.optim.warmup_steps = 60

  for arg_name in sorted(args):
    if arg_name.startswith("bltd") and arg_name[len("bltd"):].isdigit():
      config.model.diffusion.lambda_diff = 1.0
      config.model.diffusion.block_size = int(arg_name[len("bltd"):])
    elif arg_name in ("static", "space"):
      config.patcher.mode = arg_name
    elif arg_name == "runlocal":
      blt.encoder = configs.transformer_section(32, 1, 2, window=16, rope_theta=500000.0)
      blt.global_model = configs.transformer_section(64, 1, 2, rope_theta=500000.0)
      blt.decoder = configs.transformer_section(32, 1, 2, window=16, rope_theta=500000.0)
      blt.hash_table_size = 97
      config.train.steps = 4
      config.train.batch_size = 8
      config.train.seq_len = 48
      config.patcher.max_patches = 0       # one per byte: never drops a byte
      config.train.log_every = 1
      config.train.eval_every = 2
      config.train.eval_batches = 2
      config.train.save_every = 2
    else:
      raise ValueError(f"unknown variant {arg_name!r}; use bltd4|bltd8|bltd16, static|space, "
                       "runlocal")
  return config
