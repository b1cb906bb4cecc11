"""Model FLOPs for MFU, counted per component from its shapes.

Forward FLOPs of a transformer stack over n positions:
  2 * (matmul params) * n                      (q, k, v, o, FFN; embeddings are lookups)
+ 4 * n * visible_keys * heads * head_dim * layers   (QK^T and PV; causal: keys actually
                                                       visible on average, so no 2x overcount)
Training counts 3x forward (forward + backward). MFU = achieved / peak, where the peak
is a per-device_kind table of dense bf16 FLOP/s (unknown devices, e.g. CPUs: no MFU).
"""

from __future__ import annotations

from bltjax.model import attention
from bltjax.model.layers import TransformerConfig

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind]
  for name, value in PEAK_FLOPS.items():
    if device_kind.startswith(name):
      return value
  return None


def stack_matmul_params(cfg: TransformerConfig) -> int:
  attn = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.kv_heads)
  ffn = (3 if cfg.activation == "swiglu" else 2) * cfg.d_model * cfg.hidden_dim
  return cfg.n_layers * (attn + ffn)


def stack_forward_flops(cfg: TransformerConfig, n_positions: float, seq_len: int) -> float:
  """Forward FLOPs of one stack over `n_positions` positions in rows of `seq_len`."""
  visible = attention.visible_keys_per_query(seq_len, cfg.window)
  attn = cfg.n_layers * attention.attention_flops(n_positions, visible, cfg.n_heads,
                                                  cfg.head_dim)
  return 2.0 * stack_matmul_params(cfg) * n_positions + attn


def linear_flops(d_in: int, d_out: int, n_positions: float) -> float:
  return 2.0 * d_in * d_out * n_positions
