"""Model shapes from the papers, shared by the paper-size experiment files.

BLT (arXiv 2412.09871, appendix table of FLOP-controlled sizes; widths/layers/heads):
  400M: encoder 1 x 768 (12 heads), global 24 x 1280 (10 heads), decoder 7 x 768, k=2,
        cross-attention 10 heads.   Paper: global 470M, decoder 50M, encoder 7M.
  1B:   encoder 1 x 1024 (16), global 25 x 2048 (16), decoder 9 x 1024, k=2 (= the
        released blt-1b).            Paper: global 1B, decoder 113M, encoder 12M.
Fast BLT (arXiv 2605.08044) 3B: the paper gives a 2.82B global model and a 160M decoder;
  its layer shapes are not published. We use the 1B local models with a 25 x 3072
  global (24 heads) and k=3 (k * 1024 = 3072 needs no projection): 2.83B global.
Entropy model (released blt-entropy): 14 x 768, 12 heads, window 512 (~100M).
The paper counts 12 * layers * d^2 per stack (FFN 4d); ours are SwiGLU with the BLT
width rule, so counts differ by a few percent (`bltjax params --config ...`).
"""

from bltjax import configs

SHAPES = {
    # name: (d_local, enc_layers, local_heads, d_global, global_layers, global_heads,
    #        dec_layers, cross_attn_k, cross_attn_heads)
    "400m": (768, 1, 12, 1280, 24, 10, 7, 2, 10),
    "1b": (1024, 1, 16, 2048, 25, 16, 9, 2, 16),
    "3b": (1024, 1, 16, 3072, 25, 24, 9, 3, 16),
}

# Parameters the papers report (for the test that our shapes match them).
PAPER_PARAMS = {
    "400m": {"global_model": 470e6},
    "1b": {"global_model": 1.0e9 * 1.258},   # "1B" row: 12 * 25 * 2048^2 = 1.258B
    "3b": {"global_model": 2.82e9, "local_decoder": 160e6},
}


def entropy_100m() -> "configs.ml_collections.ConfigDict":
  return configs.transformer_section(768, 14, 12, window=512, rope_theta=10000.0)


def apply_blt_shape(config, name: str) -> None:
  """Sets config.model.blt (and the patcher's entropy shape) to a paper size."""
  d_local, enc_layers, heads, d_global, glob_layers, glob_heads, dec_layers, k, cross = (
      SHAPES[name])
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
  config.model.entropy = entropy_100m()
