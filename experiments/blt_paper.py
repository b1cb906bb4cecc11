r"""BLT at the papers' sizes, for accelerators: `experiments/blt_paper.py:SIZE[,bltdB]`.

  bltjax params --config experiments/blt_paper.py:1b
  bltjax train --config experiments/blt_paper.py:1b,bltd8 \
      --config.patcher.entropy_workdir=runs/entropy_100m --workdir runs/blt_1b

SIZE (widths x layers, heads):
  400m  BLT paper (arXiv 2412.09871, appendix table of FLOP-controlled sizes): encoder
        1 x 768 (12 heads), global 24 x 1280 (10), decoder 7 x 768, k=2, cross-attention
        10 heads. Paper: global 470M, decoder 50M, encoder 7M.
  1b    encoder 1 x 1024 (16), global 25 x 2048 (16), decoder 9 x 1024, k=2: the released
        blt-1b. Paper: global "1B" (12 * 25 * 2048^2 = 1.258B), decoder 113M.
  3b    Fast BLT (arXiv 2605.08044) gives a 2.82B global and a 160M decoder but no layer
        shapes; we use the 1B local models, a 25 x 3072 global (24 heads) and k=3
        (k * 1024 = 3072 needs no projection): 2.83B global.
The papers count 12 * layers * d^2 per stack (FFN 4d); ours are SwiGLU with the BLT
width rule, so counts differ by a few percent (tests/test_experiments.py checks them).
`bltdB` (4, 8, 16): BLT-D with the Fast BLT loss (next-byte CE + masked CE / t).
Defaults: bf16 compute, remat, 8192-byte rows, 64 rows per step (2^19 bytes, Fast
BLT's 1B batch), AdamW (0.9, 0.95), peak lr 4e-4, cosine, clip 1.0, weight decay 0.1.
"""

from bltjax import configs

# size: (d_local, enc_layers, local_heads, d_global, global_layers, global_heads,
#        dec_layers, cross_attn_k, cross_attn_heads)
SHAPES = {
    "400m": (768, 1, 12, 1280, 24, 10, 7, 2, 10),
    "1b": (1024, 1, 16, 2048, 25, 16, 9, 2, 16),
    "3b": (1024, 1, 16, 3072, 25, 24, 9, 3, 16),
}

# Parameters the papers report, for tests/test_experiments.py.
PAPER_PARAMS = {
    "400m": {"global_model": 470e6},
    "1b": {"global_model": 1.258e9},
    "3b": {"global_model": 2.82e9, "local_decoder": 160e6},
}


def get_config(arg=None):
  names = (arg or "1b").split(",")
  size = names[0]
  if size not in SHAPES:
    raise ValueError(f"unknown size {size!r}; use one of {sorted(SHAPES)}, e.g. :1b,bltd8")
  config = configs.base_config()
  config.model.kind = "blt"
  config.model.dtype = "bfloat16"
  config.model.remat = True
  d_local, enc_layers, heads, d_global, glob_layers, glob_heads, dec_layers, k, cross = (
      SHAPES[size])
  blt = config.model.blt
  blt.encoder = configs.transformer_section(d_local, enc_layers, heads, window=512,
                                            rope_theta=500000.0)
  blt.global_model = configs.transformer_section(d_global, glob_layers, glob_heads,
                                                 rope_theta=500000.0)
  blt.decoder = configs.transformer_section(d_local, dec_layers, heads, window=512,
                                            rope_theta=500000.0)
  blt.cross_attn_k = k
  blt.cross_attn_heads = cross
  blt.hash_table_size = 500002
  blt.ngram_sizes = (3, 4, 5, 6, 7, 8)
  # The patcher this BLT is meant for (the released blt-entropy shape).
  config.model.entropy = configs.transformer_section(768, 14, 12, window=512)
  config.patcher.mode = "entropy"
  config.patcher.max_patch_len = 8
  config.patcher.max_patches = 2816     # P: ~2.9 bytes per patch at least (4.5 on average)
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
  for name in names[1:]:
    if not (name.startswith("bltd") and name[len("bltd"):].isdigit()):
      raise ValueError(f"unknown variant {name!r}; use bltd4|bltd8|bltd16")
    config.model.diffusion.lambda_diff = 1.0
    config.model.diffusion.elbo_weight = True
    config.model.diffusion.block_size = int(name[len("bltd"):])
  return config
