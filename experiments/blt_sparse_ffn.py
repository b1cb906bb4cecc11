r"""Activation-sparse global FFN (issue 4): ReLU + L1 vs the dense SwiGLU BLT of equal size.

  bltjax train --config experiments/blt_sparse_ffn.py:relu --workdir runs/sparse_relu
  bltjax train --config experiments/blt_sparse_ffn.py:dense --workdir runs/sparse_dense
  python bench/sparse_ffn_train.py            # both, then the comparison -> bench/RESULTS.md

Static patching (4 bytes; no entropy model needed). Variants (comma-separated):
- `relu` (default) | `dense`: the global model's FFN. relu: `model.ffn.activation="relu"`,
  `l1_coef` (TwELL's lambda: sum over hidden units, mean over positions and layers) and
  width 1.5x the SwiGLU width, so both models have the same parameters and FLOPs
  (2 matrices of 1.5 f vs 3 of f). The local models keep SwiGLU (`model.blt.ffn_local`).
- `local`: with relu, the local encoder and decoder FFNs too (`model.blt.ffn_local`,
  widths 1.5x theirs). At CPU scale the local FFNs are what carries the prediction
  (zeroing the global FFNs of the trained dense CPU model costs ~0.2% bpb, the decoder's
  ~5%), so this is the variant where bpb parity says something on CPU.
- `pallas` (default with relu) | `xla`: `model.ffn.impl`. On CPU the pallas path runs the
  kernel package's XLA reference (same math as xla); on GPU/TPU the sparse kernels.
- `cpu` (default): a small model (1M parameters without the hash tables) that trains in
  minutes on 2 CPU cores. `gpu`: 93M parameters without the hash tables (124M with;
  global 768 x 12, local 384), bf16, 64 x 2048 bytes per step.
- `runlocal`: a few steps of a tiny model (tests).
"""

from bltjax import configs
from bltjax.model import layers

# L1 coefficient: TwELL's lambda, the value. On CPU (300 steps; bench/RESULTS.md):
# relu 2e-5 -> 96-97.5% zeros per global FFN, 1e-4 -> 99.4-99.7%, 1e-3 -> 100% (dead FFNs);
# relu,local 2e-5 -> 92-93% global and 54-67% local, 1e-4 -> 98.5% global (+0.1% bpb).
L1_COEF = {"cpu": 2e-5, "gpu": 2e-5}


def get_config(arg=None):
  args = set(arg.split(",")) if arg else set()
  unknown = args - {"relu", "dense", "local", "pallas", "xla", "cpu", "gpu", "runlocal"}
  if unknown:
    raise ValueError(f"unknown variants {sorted(unknown)}; use relu|dense, local, pallas|xla, "
                     "cpu|gpu, runlocal")
  if {"relu", "dense"} <= args or {"pallas", "xla"} <= args or {"cpu", "gpu"} <= args:
    raise ValueError("choose one of relu|dense, one of pallas|xla, one of cpu|gpu")
  preset = "gpu" if "gpu" in args else "cpu"
  config = configs.base_config()
  config.model.kind = "blt"
  blt = config.model.blt
  config.patcher.mode = "static"
  config.patcher.patch_size = 4

  if preset == "gpu":
    d_local, d_global = 384, 768
    blt.encoder = configs.transformer_section(d_local, 1, 6, window=512, rope_theta=500000.0)
    blt.global_model = configs.transformer_section(d_global, 12, 12, rope_theta=500000.0)
    blt.decoder = configs.transformer_section(d_local, 2, 6, window=512, rope_theta=500000.0)
    blt.hash_table_size = 20011
    config.model.dtype = "bfloat16"
    config.train.steps = 3000
    config.train.batch_size = 64
    config.train.seq_len = 2048
    config.train.log_every = 50
    config.train.eval_every = 1000
    config.train.eval_batches = 16
    config.train.save_every = 1000
    config.optim.lr = 1.5e-3
    config.optim.warmup_steps = 300
  else:
    d_local, d_global = 64, 128
    blt.encoder = configs.transformer_section(d_local, 1, 2, window=256, rope_theta=500000.0)
    blt.global_model = configs.transformer_section(d_global, 3, 4, rope_theta=500000.0)
    blt.decoder = configs.transformer_section(d_local, 1, 2, window=256, rope_theta=500000.0)
    blt.hash_table_size = 4099
    config.train.steps = 300
    config.train.batch_size = 16
    config.train.seq_len = 256
    config.train.log_every = 25
    config.train.eval_every = 0
    config.train.eval_batches = 16
    config.train.save_every = 300
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 30
  blt.cross_attn_k = 2                      # 2 * d_local = d_global: no input projection
  blt.ngram_sizes = (3, 4, 5, 6)
  blt.ffn_local = False
  # Static patches: 1 + ceil((L - 1) / 4) per row plus one per document start; the slack
  # keeps dropped bytes at ~0 (logged as dropped_bytes) without 4x padding in the global.
  config.patcher.max_patches = config.train.seq_len // 4 + config.train.seq_len // 16

  if "dense" not in args:
    config.model.ffn.activation = "relu"
    config.model.ffn.l1_coef = L1_COEF[preset]
    config.model.ffn.impl = "xla" if "xla" in args else "pallas"
    blt.global_model.ffn_dim = 3 * layers.blt_ffn_dim(d_global) // 2
    if "local" in args:
      blt.ffn_local = True
      blt.encoder.ffn_dim = blt.decoder.ffn_dim = 3 * layers.blt_ffn_dim(d_local) // 2

  if "runlocal" in args:
    wide = lambda d: 0 if "dense" in args else 3 * layers.blt_ffn_dim(d) // 2  # noqa: E731
    local_ffn = wide(32) if "local" in args else 0
    blt.encoder = configs.transformer_section(32, 1, 2, window=16, rope_theta=500000.0,
                                              ffn_dim=local_ffn)
    blt.global_model = configs.transformer_section(64, 1, 2, rope_theta=500000.0,
                                                   ffn_dim=wide(64))
    blt.decoder = configs.transformer_section(32, 1, 2, window=16, rope_theta=500000.0,
                                              ffn_dim=local_ffn)
    blt.hash_table_size = 97
    config.model.dtype = "float32"
    config.patcher.max_patches = 16
    config.train.steps = 4
    config.train.batch_size = 8
    config.train.seq_len = 48
    config.train.log_every = 1
    config.train.eval_every = 2
    config.train.eval_batches = 2
    config.train.save_every = 2
  return config
