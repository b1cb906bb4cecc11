"""Transformer building blocks: Dense, RMSNorm, RoPE, attention, FFN, block, stack.

Every parameter carries logical axis names (`embed`, `heads`, `kv_heads`, `mlp`,
`vocab`); `bltjax/sharding.py` maps them to mesh axes. Compatibility with the released
BLT weights (`compat="blt"`): interleaved RoPE, bias-free linears, RMSNorm eps 1e-5,
FFN width `256 * ceil(int(8d/3) / 256)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.model import attention as attention_lib

ACTIVATIONS = ("swiglu", "relu")
FFN_IMPLS = ("xla", "pallas")
ATTENTION_IMPLS = ("xla", "pallas")


def blt_ffn_dim(d_model: int, multiple_of: int = 256) -> int:
  """The reference FFN width rule: `256 * ceil(int(8d/3) / 256)`."""
  return multiple_of * math.ceil(int(8 * d_model / 3) / multiple_of)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Shape of one transformer stack (entropy model, local encoder/decoder, global)."""
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int = 0          # 0: same as n_heads (no GQA)
  ffn_dim: int = 0             # 0: the BLT width rule
  window: int = 0              # sliding attention window; 0: full causal
  rope_theta: float = 10000.0
  activation: str = "swiglu"   # swiglu | relu
  l1_coef: float = 0.0         # L1 penalty on FFN hidden activations (relu sparsity)
  ffn_impl: str = "xla"        # xla | pallas (activation-sparse kernel, relu only)
  ffn_backend: str = ""        # pallas kernel: "" (the kernel package picks), gpu, tpu, xla
  ffn_interpret: bool = False  # pallas kernels in interpret mode (CPU tests)
  ffn_dense_threshold: float = 0.5  # kernel occupancy above which dense matmuls run; >= 1: never
  attention_impl: str = "xla"  # training attention: xla (chunked frames / dense) | pallas
                               # (range-attention kernel, flash over each row's key ranges)
  attention_backend: str = ""  # pallas kernel: "" (the kernel package picks), gpu, tpu, xla
  attention_interpret: bool = False  # pallas kernels in interpret mode (CPU tests)
  norm_eps: float = 1e-5
  dtype: str = "float32"       # compute dtype; params stay float32
  remat: bool = False
  scan_layers: bool = False    # one scanned block (params stacked [layers, ...]): compile
                               # time independent of depth; for stacks run whole
  fused_projections: bool = False  # q/k/v as one kernel `qkv`, SwiGLU gate/up as one
                                   # `gate_up`: fewer, wider matmuls (decoding sets it;
                                   # checkpoints keep them apart: `fuse_projections`)

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} (d_model / n_heads) must be even for RoPE")
    if self.kv_heads and self.n_heads % self.kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"ffn activation {self.activation!r} is not one of {ACTIVATIONS}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention impl {self.attention_impl!r} is not one of "
                       f"{ATTENTION_IMPLS}")
    if self.ffn_impl not in FFN_IMPLS:
      raise ValueError(f"ffn impl {self.ffn_impl!r} is not one of {FFN_IMPLS}")
    if self.ffn_impl == "pallas" and self.activation != "relu":
      raise ValueError("ffn impl 'pallas' (activation-sparse kernel) needs activation 'relu'")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def hidden_dim(self) -> int:
    return self.ffn_dim or blt_ffn_dim(self.d_model)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


def truncated_normal(std: float):
  return nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


def _kernel_param(module: nn.Module, shape, axes, init_std):
  std = init_std if init_std is not None else shape[0] ** -0.5
  return module.param("kernel", nn.with_logical_partitioning(truncated_normal(std), axes),
                      shape, jnp.float32)


class Kernel(nn.Module):
  """A float32 weight matrix `[in, out]` with logical axis names (truncated normal init)."""
  shape: tuple[int, int]
  axes: tuple[str | None, str | None]
  init_std: float | None = None  # default: in ** -0.5

  @nn.compact
  def __call__(self):
    return _kernel_param(self, self.shape, self.axes, self.init_std)


class Dense(nn.Module):
  """Bias-free linear layer `[..., in] -> [..., features]`."""
  features: int
  kernel_axes: tuple[str | None, str | None]
  dtype: Any = jnp.float32
  init_std: float | None = None  # default: in_features ** -0.5

  @nn.compact
  def __call__(self, x):
    kernel = _kernel_param(self, (x.shape[-1], self.features), self.kernel_axes, self.init_std)
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class Embed(nn.Module):
  """Token embedding table `[num_embeddings, features]`."""
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  table_axes: tuple[str | None, str | None] = ("vocab", "embed")

  @nn.compact
  def __call__(self, ids):
    table = self.param(
        "embedding", nn.with_logical_partitioning(
            truncated_normal(self.features ** -0.5), self.table_axes),
        (self.num_embeddings, self.features), jnp.float32)
    return jnp.take(table, ids, axis=0).astype(self.dtype)


class RMSNorm(nn.Module):
  """`x * rsqrt(mean(x^2) + eps) * scale`, computed in float32."""
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (normed * scale).astype(self.dtype)


def apply_rope(x, positions, theta: float):
  """Interleaved rotary embedding (pairs (2i, 2i+1), as the BLT reference).

  x `[batch, len, heads, head_dim]`, positions `[batch, len]`.
  """
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  even, odd = x32[..., 0::2], x32[..., 1::2]
  rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


class SelfAttention(nn.Module):
  """Multi-head (grouped-query) self-attention with RoPE.

  How queries see keys is the `attention` spec (e.g. `attention.CausalSpec`): a pytree
  called as `attention(q, k, v)`. Returns the output and this layer's rotated (k, v),
  which generation writes into its caches (or, for a spec that stores them itself, the
  written cache: `attention.with_new_keys`).
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, attention):
    cfg = self.config
    b, t, _ = x.shape
    dtype = cfg.compute_dtype
    q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    if cfg.fused_projections:
      qkv = Dense(q_width + 2 * kv_width, ("embed", "heads"), dtype, name="qkv")(x)
      q, k, v = jnp.split(qkv, [q_width, q_width + kv_width], axis=-1)
    else:
      q = Dense(q_width, ("embed", "heads"), dtype, name="q")(x)
      k = Dense(kv_width, ("embed", "kv_heads"), dtype, name="k")(x)
      v = Dense(kv_width, ("embed", "kv_heads"), dtype, name="v")(x)
    q = apply_rope(q.reshape(b, t, cfg.n_heads, cfg.head_dim), positions, cfg.rope_theta)
    k = apply_rope(k.reshape(b, t, cfg.kv_heads, cfg.head_dim), positions, cfg.rope_theta)
    v = v.reshape(b, t, cfg.kv_heads, cfg.head_dim)
    attention, kv = attention_lib.with_new_keys(attention, k, v)
    out = attention(q, k, v).reshape(b, t, cfg.n_heads * cfg.head_dim)
    return Dense(cfg.d_model, ("heads", "embed"), dtype, name="o")(out), kv


class FeedForward(nn.Module):
  """SwiGLU `down(silu(gate(x)) * up(x))` or ReLU `down(relu(up(x)))`.

  ReLU records per position, in the `intermediates` collection, the L1 of the hidden
  activation (`ffn_l1`, sum over the hidden units of |h|, differentiable) and its
  fraction of exact zeros (`ffn_zero_frac`); `ffn_penalty` turns them into the L1
  penalty and the logged sparsity. `ffn_impl="pallas"` runs the activation-sparse kernel
  (`bltjax.model.sparse_ffn`, sharded over the mesh) and takes both numbers from the
  kernel's statistics (also `ffn_occupancy`: the fraction of the down-projection work
  it did), so `relu(x @ w_up)` is computed once.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype = cfg.compute_dtype
    if cfg.activation == "swiglu":
      if cfg.fused_projections:
        gate_up = Dense(2 * cfg.hidden_dim, ("embed", "mlp"), dtype, name="gate_up")(x)
        gate, up = jnp.split(gate_up, 2, axis=-1)
      else:
        gate = Dense(cfg.hidden_dim, ("embed", "mlp"), dtype, name="gate")(x)
        up = Dense(cfg.hidden_dim, ("embed", "mlp"), dtype, name="up")(x)
      return Dense(cfg.d_model, ("mlp", "embed"), dtype, name="down")(nn.silu(gate) * up)
    w_up = Kernel((x.shape[-1], cfg.hidden_dim), ("embed", "mlp"), name="up")().astype(dtype)
    w_down = Kernel((cfg.hidden_dim, cfg.d_model), ("mlp", "embed"), name="down")().astype(dtype)
    x = x.astype(dtype)
    if cfg.ffn_impl == "pallas":
      # Imported here: the model needs the kernel package only when it is selected.
      from bltjax.model import sparse_ffn  # pylint: disable=g-import-not-at-top
      options = sparse_ffn.KernelOptions(
          backend=cfg.ffn_backend or None, interpret=cfg.ffn_interpret,
          dense_threshold=cfg.ffn_dense_threshold if cfg.ffn_dense_threshold < 1 else None)
      out, l1, nonzeros, occupancy = sparse_ffn.relu_ffn(x, w_up, w_down, options)
      self._record(l1, 1.0 - nonzeros / cfg.hidden_dim)
      self.sow("intermediates", "ffn_occupancy", occupancy)
      return out
    hidden = nn.relu(jnp.dot(x, w_up))
    hidden32 = hidden.astype(jnp.float32)
    self._record(jnp.sum(jnp.abs(hidden32), axis=-1),
                 jnp.mean((hidden32 == 0).astype(jnp.float32), axis=-1))
    return jnp.dot(hidden, w_down)

  def _record(self, l1, zero_frac):
    """Per-position L1 `[..., len]` (float32) and fraction of zero hidden units."""
    self.sow("intermediates", "ffn_l1", l1.astype(jnp.float32))
    self.sow("intermediates", "ffn_zero_frac",
             jax.lax.stop_gradient(zero_frac).astype(jnp.float32))


class TransformerBlock(nn.Module):
  """Pre-norm block: `h = x + attn(norm(x)); out = h + ffn(norm(h))`. Returns (out, kv)."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, attention, layer_attention=None):
    """`layer_attention`, when given, replaces `attention` (the scanned stack passes a
    shared spec and per-layer specs separately)."""
    cfg = self.config
    attention = attention if layer_attention is None else layer_attention
    normed = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="attn_norm")(x)
    attn_out, kv = SelfAttention(cfg, name="attn")(normed, positions, attention)
    h = x + attn_out
    out = h + FeedForward(cfg, name="ffn")(RMSNorm(cfg.norm_eps, cfg.compute_dtype,
                                                   name="ffn_norm")(h))
    return nn.with_logical_constraint(out, ("batch", "length", "act_embed")), kv


class Transformer(nn.Module):
  """A stack of `n_layers` blocks (no final norm: callers add one where needed).

  `attention`: one spec for every layer, or a tuple with one spec per layer. Returns
  (x, per-layer (k, v)).

  With `config.scan_layers` the blocks are one `nn.scan`ned block whose params are
  stacked under `layers` with a leading `[n_layers]` axis (logical axis "layers"), so
  XLA compiles one block, not `n_layers` copies; `layers` (the list) then does not
  exist, so stacks that interleave other modules between blocks (the local decoder)
  do not scan.
  """
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    block = nn.remat(TransformerBlock) if cfg.remat else TransformerBlock
    if cfg.scan_layers:
      self.scanned = nn.scan(
          block, variable_axes={"params": 0, "intermediates": 0},
          split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast, 0),
          length=cfg.n_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    else:
      self.layers = [block(cfg, name=f"layer_{i}") for i in range(cfg.n_layers)]

  def __call__(self, x, positions, attention):
    if self.config.scan_layers:
      per_layer = attention if isinstance(attention, tuple) else None
      shared = None if per_layer is not None else attention
      if per_layer is not None:
        if len({jax.tree.structure(spec) for spec in per_layer}) > 1:
          raise ValueError("model.scan_layers needs the per-layer attention specs to be of "
                           "one kind (same type and window); got "
                           f"{[jax.tree.structure(spec) for spec in per_layer]}")
        per_layer = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer)
      x, (k, v) = self.scanned(x, positions, shared, per_layer)
      return x, [(k[i], v[i]) for i in range(self.config.n_layers)]
    kvs = []
    for i, layer in enumerate(self.layers):
      x, kv = layer(x, positions, attention[i] if isinstance(attention, tuple) else attention)
      kvs.append(kv)
    return x, kvs


def stack_layers(stack_params):
  """One unscanned stack's params `{layer_0: ..., layer_1: ...}` -> the scanned layout
  `{layers: ...}` (each leaf stacked `[n_layers, ...]`), e.g. to run a converted
  checkpoint with `model.scan_layers`."""
  names = [f"layer_{i}" for i in range(len(stack_params))]
  if sorted(stack_params) != sorted(names):
    raise ValueError(f"expected the params of one unscanned stack ({', '.join(names)}), got "
                     f"keys {sorted(stack_params)}")
  return {"layers": jax.tree.map(lambda *leaves: jnp.stack(leaves),
                                 *(stack_params[n] for n in names))}


def unstack_layers(stack_params):
  """The inverse of `stack_layers`: one scanned stack's params `{layers: ...}` -> the
  unrolled layout `{layer_0: ..., layer_1: ...}`; an unrolled stack's come back as they
  are."""
  if set(stack_params) != {"layers"}:
    return stack_params
  n_layers = jax.tree.leaves(stack_params["layers"])[0].shape[0]
  return {f"layer_{i}": jax.tree.map(lambda leaf, i=i: leaf[i], stack_params["layers"])
          for i in range(n_layers)}


# (block module, its separate projections, their fused name) of `fused_projections`.
_FUSED_PROJECTIONS = (("attn", ("q", "k", "v"), "qkv"), ("ffn", ("gate", "up"), "gate_up"))


def fuse_projections(params):
  """Params with separate projections -> the `fused_projections` layout: in every
  transformer block (any stack, unrolled or scanned), `attn/{q,k,v}` become one
  `attn/qkv` kernel and a SwiGLU `ffn/{gate,up}` one `ffn/gate_up`, concatenated along
  the output axis. Anything else (cross-attention, ReLU FFNs) comes back as it is."""
  if not isinstance(params, Mapping):
    return params
  out = {}
  for name, sub in params.items():
    sub = fuse_projections(sub)
    for block_module, parts, fused in _FUSED_PROJECTIONS:
      if name == block_module and isinstance(sub, Mapping) and all(p in sub for p in parts):
        kernel = jnp.concatenate([sub[p]["kernel"] for p in parts], axis=-1)
        sub = {fused: {"kernel": kernel}, **{k: v for k, v in sub.items() if k not in parts}}
    out[name] = sub
  return out


def _ffn_layer_name(keys) -> str:
  """Module path of a FeedForward -> a short metric name (`global_0`, `decoder_1`,
  `layer_0` for a lone stack)."""
  parts = [str(k) for k in keys if k not in ("ffn", "transformer", "layers")]
  if parts and parts[-1].startswith("layer_"):
    index = parts[-1][len("layer_"):]
    if len(parts) >= 2:
      stack = {"global_model": "global"}.get(parts[-2], parts[-2])
      return "/".join(parts[:-2] + [f"{stack}_{index}"])
    return f"layer_{index}"
  return "/".join(parts) or "ffn"


def _per_layer_leaves(intermediates):
  """(module path keys, value) of each recorded leaf; a scanned stack's leaves
  `[n_layers, ...]` are split into one per layer, named `layer_<i>` as unscanned."""
  for path, value in jax.tree_util.tree_leaves_with_path(intermediates):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    scanned = [j for j, key in enumerate(keys[:-1])
               if key == "layers" and not str(keys[j + 1]).startswith("layer_")]
    if not scanned:
      yield keys, value
      continue
    j = scanned[-1]
    for i in range(value.shape[0]):
      yield keys[:j] + [f"layer_{i}"] + keys[j + 1:], value[i]


def ffn_penalty(intermediates, l1_coef: float, masks=None):
  """The ReLU FFNs' L1 penalty and sparsity metrics from an `intermediates` collection.

  Penalty (TwELL's): `l1_coef * mean over FFN layers of (mean over positions of the sum
  over hidden units of |h|)`: `l1_coef` is TwELL's lambda (2e-5 .. 3e-4 in its configs).

  Positions: padding does not count. `masks` is a bool array (applies to every layer
  whose recorded positions have its shape), or a mapping from a top-level module name
  (`global_model`, `encoder`, `decoder`) to such an array; a layer with no mask of its
  shape (e.g. local layers over BLT-D's concatenated clean + noisy input) counts all
  its positions.

  Returns (penalty, metrics): `ffn_sparsity` (fraction of zero hidden units, mean over
  layers), `ffn_sparsity_min`, `ffn_sparsity/<layer>` per layer, `ffn_l1` (mean over
  layers of the per-position L1) and, from the kernel path, `ffn_occupancy` (mean
  fraction of the down-projection work done). `(0.0, {})` without a ReLU FFN.
  """
  def mask_for(keys, shape):
    mask = masks.get(keys[0]) if isinstance(masks, dict) else masks
    if mask is None or tuple(mask.shape) != tuple(shape):
      return jnp.ones(shape, jnp.float32)
    return mask.astype(jnp.float32)

  sums: dict[str, list] = {}   # layer -> [l1 sum, zero sum, positions]
  occupancy = []
  for keys, value in _per_layer_leaves(intermediates):
    if "ffn_occupancy" in keys:
      occupancy.append(value)
      continue
    for stat, slot in (("ffn_l1", 0), ("ffn_zero_frac", 1)):
      if stat in keys:
        cut = keys.index(stat)
        mask = mask_for(keys, value.shape)
        acc = sums.setdefault(_ffn_layer_name(keys[:cut]), [0.0, 0.0, 0.0])
        acc[slot] = acc[slot] + jnp.sum(value * mask)
        if slot == 0:
          acc[2] = acc[2] + jnp.sum(mask)
  if not sums:
    return jnp.float32(0.0), {}
  l1 = {name: a[0] / jnp.maximum(a[2], 1.0) for name, a in sums.items()}
  zero = {name: a[1] / jnp.maximum(a[2], 1.0) for name, a in sums.items()}
  mean_l1 = sum(l1.values()) / len(l1)
  zeros = jnp.stack(list(zero.values()))
  metrics = {"ffn_sparsity": jnp.mean(zeros), "ffn_sparsity_min": jnp.min(zeros),
             "ffn_l1": jax.lax.stop_gradient(mean_l1)}
  metrics.update({f"ffn_sparsity/{name}": v for name, v in zero.items()})
  if occupancy:
    metrics["ffn_occupancy"] = jnp.mean(jnp.stack(occupancy))
  return l1_coef * mean_l1, metrics
