r"""The generation-benchmark model: the paper's proportions at CPU size.

The global transformer holds most of the parameters (8 x 512), the local models are
128 wide (k = 4 patch vectors of 128 = 512: no projection), trained as BLT-D-8 with the
Fast BLT loss (next-byte CE + masked CE weighted by 1/t). `bench/train_bench_model.sh`
trains it (entropy model first) for a fixed CPU budget; `bench/generation.py` measures
every decoding method on it.

Variants: `bltd4` / `bltd8` / `bltd16` (block size; default bltd8), `large` (global
12 x 1024, local 256: the GPU generation table's model, see bench/gpu_suite.sh),
`runlocal`.
"""

from bltjax import configs


def get_config(arg=None):
  config = configs.base_config()
  config.model.kind = "blt"
  blt = config.model.blt
  blt.encoder = configs.transformer_section(128, 1, 4, window=256, rope_theta=500000.0)
  blt.global_model = configs.transformer_section(512, 8, 8, rope_theta=500000.0)
  blt.decoder = configs.transformer_section(128, 3, 4, window=256, rope_theta=500000.0)
  blt.cross_attn_k = 4
  blt.hash_table_size = 16411
  blt.ngram_sizes = (3, 4, 5, 6, 7, 8)
  config.model.diffusion.lambda_diff = 1.0
  config.model.diffusion.elbo_weight = True
  config.model.diffusion.block_size = 8
  config.model.diffusion.blocks_per_chunk = 64

  config.patcher.mode = "entropy"
  config.patcher.max_patch_len = 8
  config.patcher.max_patches = 192     # P for 512-byte rows: >= 2.7 bytes per patch

  config.train.steps = 100_000   # the bench trains for a wall-clock budget, not steps
  config.train.batch_size = 8
  config.train.seq_len = 512
  config.train.log_every = 10
  config.train.eval_every = 0
  config.train.eval_batches = 8
  config.train.save_every = 50
  config.train.keep = 2
  config.optim.lr = 2e-3
  config.optim.warmup_steps = 50
  if arg:
    for name in arg.split(","):
      if name.startswith("bltd") and name[len("bltd"):].isdigit():
        config.model.diffusion.block_size = int(name[len("bltd"):])
      elif name == "large":   # the GPU table's model: global 12 x 1024, local 256 wide
        blt.encoder = configs.transformer_section(256, 1, 4, window=256, rope_theta=500000.0)
        blt.global_model = configs.transformer_section(1024, 12, 16, rope_theta=500000.0)
        blt.decoder = configs.transformer_section(256, 3, 4, window=256, rope_theta=500000.0)
      elif name == "runlocal":
        config.train.steps = 2
        config.train.seq_len = 64
        config.train.batch_size = 2
        config.model.diffusion.blocks_per_chunk = 8
        config.patcher.max_patches = 0
      else:
        raise ValueError(f"unknown variant {name!r}; use bltd4|bltd8|bltd16|large|runlocal")
  return config
