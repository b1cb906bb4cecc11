"""`sparse_relu_ffn`: the activation-sparse ReLU FFN with a custom VJP, GPU / TPU / XLA.

Forward:  h = relu(x @ w_up) (dense: it is what finds the zeros), per-token-tile lists of
          the active hidden units, out = h @ w_down reading only the active units.
Backward: da = (g @ w_down^T + ct_l1) * (h > 0) only at the active units (SDDMM);
          dx = da @ w_up^T over the active units; dW_down = h^T g and dW_up = x^T da
          skipping the (unit block, token tile) pairs with no active unit.
Dense fallback: when the fraction of active work (`occupancy`) exceeds `dense_threshold`,
          a `lax.cond` runs the plain XLA matmuls instead (forward down projection and the
          whole backward) -- TwELL's per-layer routing, decided per call on device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ..platform import resolve
from . import format as fmt
from . import gpu
from . import tpu
from .reference import FFNStats, relu_ffn_reference_with_stats


# Default tiles (see the package README for the reasoning; tune with bench.py --tiles).
GPU_DEFAULTS = dict(tm=64, bk=64, bn=128, bd=64, kb=64, bf=128, num_warps=4, num_stages=3)
TPU_DEFAULTS = dict(tm=128, bk=256)
# Above this occupancy the call runs dense XLA matmuls (a guess until measured on GPU/TPU:
# the gather kernels do fewer FLOPs at lower efficiency than cuBLAS / XLA TPU GEMMs).
DEFAULT_DENSE_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class Config:
  backend: str
  interpret: Any = False
  tm: int = 64
  bk: int = 64
  bn: int = 128
  bd: int = 64
  kb: int = 64
  bf: int = 128
  num_warps: int = 4
  num_stages: int = 3
  up_impl: str = "xla"
  dense_threshold: float | None = None


def _pow2_at_least(n: int, lo: int = 16) -> int:
  p = lo
  while p < n:
    p *= 2
  return p


def _dot_t0(a, b):
  """a^T @ b for a [K, M], b [K, N] (f32 accumulate)."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------- GPU


def _dense_dw_t(x, h_t, da_t, g, up_dtype, down_dtype):
  """(dW_up = x^T da, dW_down = h^T g) from the neuron-major hT, daT (XLA matmuls)."""
  dwd = lax.dot_general(h_t, g, (((1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32).astype(down_dtype)
  dwu = lax.dot_general(x, da_t, (((0,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32).astype(up_dtype)
  return dwu, dwd


def _gpu_fwd(cfg: Config, x, w_up, w_down):
  tm = cfg.tm
  t = x.shape[0]
  f = w_up.shape[1]
  if cfg.up_impl == "pallas":
    h_t, flags, l1p, nnzp = gpu.up_relu(
        x, w_up, tm=tm, bf=cfg.bf, bd=cfg.bd, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, interpret=cfg.interpret)
    flags = flags > 0
    l1 = jnp.sum(l1p, axis=0)
    nnz = jnp.sum(nnzp, axis=0)
  else:
    a_t = lax.dot_general(w_up, x, (((0,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32)  # [F, T]
    h_t = jnp.maximum(a_t, 0.0).astype(x.dtype)
    flags = fmt.column_flags_neuronmajor(h_t, tm)
    hf = h_t.astype(jnp.float32)
    l1 = jnp.sum(hf, axis=0)
    nnz = jnp.sum((hf > 0).astype(jnp.float32), axis=0)
  cnt, ids = fmt.compact_rows(flags, cfg.bk)
  occ = jnp.sum(cnt).astype(jnp.float32) / float((t // tm) * f)

  def sparse():
    return gpu.gather_matmul(cnt, ids, h_t, w_down, tm=tm, bk=cfg.bk, bn=cfg.bn,
                             out_dtype=x.dtype, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages, interpret=cfg.interpret)

  def dense():
    return _dot_t0(h_t, w_down).astype(x.dtype)

  use_dense, out = _route(cfg, occ, dense, sparse)
  res = (x, w_up, w_down, h_t, flags, cnt, ids, use_dense)
  return (out, l1, nnz, occ), res


def _gpu_bwd(cfg: Config, res, g, ct_l1):
  x, w_up, w_down, h_t, flags, cnt, ids, use_dense = res
  kw = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, interpret=cfg.interpret)

  def sparse():
    da_t = gpu.sddmm(cnt, ids, g, w_down, h_t, ct_l1, tm=cfg.tm, bk=cfg.bk, bd=cfg.bd, **kw)
    dx = gpu.gather_matmul(cnt, ids, da_t, w_up.T, tm=cfg.tm, bk=cfg.bk, bn=cfg.bn,
                           out_dtype=x.dtype, **kw)
    bflags = fmt.block_flags(flags, cfg.kb)  # [nT, F/kb]

    def sparse_dw():
      tcnt, tids = fmt.compact_rows(bflags.T)
      dwd = gpu.block_t_matmul(tcnt, tids, h_t, g, tm=cfg.tm, kb=cfg.kb, bn=cfg.bn,
                               out_dtype=w_down.dtype, **kw)
      dwu_t = gpu.block_t_matmul(tcnt, tids, da_t, x, tm=cfg.tm, kb=cfg.kb, bn=cfg.bn,
                                 out_dtype=w_up.dtype, **kw)
      return dwu_t.T, dwd

    def dense_dw():
      return _dense_dw_t(x, h_t, da_t, g, w_up.dtype, w_down.dtype)

    # The weight gradients skip only whole (kb units x tm tokens) blocks, which are much
    # rarer than inactive (unit, token tile) pairs: route them on their own occupancy.
    if cfg.dense_threshold is None:
      dwu, dwd = sparse_dw()
    else:
      wocc = jnp.mean(bflags.astype(jnp.float32))
      dwu, dwd = lax.cond(wocc > cfg.dense_threshold, dense_dw, sparse_dw)
    return dx, dwu, dwd

  def dense():
    gt = lax.dot_general(w_down, g, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32)  # [F, T]
    da_t = jnp.where(h_t > 0, gt + ct_l1[None, :], 0.0).astype(h_t.dtype)
    dx = lax.dot_general(da_t, w_up, (((0,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32).astype(x.dtype)
    dwu, dwd = _dense_dw_t(x, h_t, da_t, g, w_up.dtype, w_down.dtype)
    return dx, dwu, dwd

  return _route_bwd(cfg, use_dense, dense, sparse)


# --------------------------------------------------------------------------- TPU


def _tpu_fwd(cfg: Config, x, w_up, w_down):
  tm, bk = cfg.tm, cfg.bk
  h = jnp.maximum(jnp.dot(x, w_up, preferred_element_type=jnp.float32), 0.0).astype(x.dtype)
  hf = h.astype(jnp.float32)
  l1 = jnp.sum(hf, axis=1)
  nnz = jnp.sum((hf > 0).astype(jnp.float32), axis=1)
  bflags = fmt.block_flags(fmt.column_flags_tokmajor(h, tm), bk)  # [nT, nb]
  cnt, ids = fmt.compact_rows(bflags)
  occ = jnp.mean(bflags.astype(jnp.float32))

  def sparse():
    wl = fmt.work_list(cnt, ids, include_empty=True)
    return tpu.rowlist_matmul(wl, h, w_down, tm=tm, bk=bk, out_dtype=x.dtype,
                              interpret=cfg.interpret)

  def dense():
    return jnp.dot(h, w_down, preferred_element_type=jnp.float32).astype(x.dtype)

  use_dense, out = _route(cfg, occ, dense, sparse)
  res = (x, w_up, w_down, h, bflags, cnt, ids, use_dense)
  return (out, l1, nnz, occ), res


def _tpu_bwd(cfg: Config, res, g, ct_l1):
  x, w_up, w_down, h, bflags, cnt, ids, use_dense = res
  tm, bk, it = cfg.tm, cfg.bk, cfg.interpret

  def sparse():
    da = tpu.sddmm(fmt.work_list(cnt, ids, include_empty=False), g, w_down, h, ct_l1,
                   tm=tm, bk=bk, interpret=it)
    dx = tpu.rowlist_matmul(fmt.work_list(cnt, ids, include_empty=True), da, w_up, tm=tm,
                            bk=bk, rhs_transposed=True, out_dtype=x.dtype, interpret=it)
    tcnt, tids = fmt.compact_rows(bflags.T)
    wl_t = fmt.work_list(tcnt, tids, include_empty=True)
    dwd = tpu.collist_t_matmul(wl_t, h, g, tm=tm, bk=bk, out_dtype=w_down.dtype,
                               interpret=it)
    dwu_t = tpu.collist_t_matmul(wl_t, da, x, tm=tm, bk=bk, out_dtype=w_up.dtype,
                                 interpret=it)
    return dx, dwu_t.T, dwd

  def dense():
    gh = lax.dot_general(g, w_down, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32)
    da = jnp.where(h > 0, gh + ct_l1[:, None], 0.0).astype(h.dtype)
    dx = lax.dot_general(da, w_up, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32).astype(x.dtype)
    dwd = _dot_t0(h, g).astype(w_down.dtype)
    dwu = _dot_t0(x, da).astype(w_up.dtype)
    return dx, dwu, dwd

  return _route_bwd(cfg, use_dense, dense, sparse)


# --------------------------------------------------------------------------- routing + vjp


def _route(cfg, occ, dense, sparse):
  if cfg.dense_threshold is None:
    return jnp.zeros((), jnp.bool_), sparse()
  use_dense = occ > cfg.dense_threshold
  return use_dense, lax.cond(use_dense, dense, sparse)


def _route_bwd(cfg, use_dense, dense, sparse):
  if cfg.dense_threshold is None:
    return sparse()
  return lax.cond(use_dense, dense, sparse)


_FWD = {"gpu": _gpu_fwd, "tpu": _tpu_fwd}
_BWD = {"gpu": _gpu_bwd, "tpu": _tpu_bwd}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, x, w_up, w_down):
  return _FWD[cfg.backend](cfg, x, w_up, w_down)[0]


def _core_fwd(cfg, x, w_up, w_down):
  return _FWD[cfg.backend](cfg, x, w_up, w_down)


def _core_bwd(cfg, res, cts):
  g, ct_l1, _, _ = cts
  x = res[0]
  g = g.astype(x.dtype)
  ct_l1 = ct_l1.astype(jnp.float32)
  dx, dwu, dwd = _BWD[cfg.backend](cfg, res, g, ct_l1)
  return dx, dwu, dwd


_core.defvjp(_core_fwd, _core_bwd)


def _aligned_config(backend, t, d, f, dtype, interpret, overrides):
  """Tiles clamped to the problem and the padded sizes (t, d, f) they need."""
  if backend == "gpu":
    p = {**GPU_DEFAULTS, **overrides}
    p["tm"] = min(p["tm"], _pow2_at_least(t))
    p["bn"] = min(p["bn"], _pow2_at_least(d))
    p["bd"] = min(p["bd"], _pow2_at_least(d))
    p["kb"] = min(p["kb"], _pow2_at_least(f))
    p["bf"] = min(p["bf"], _pow2_at_least(f))
    p["bk"] = min(p["bk"], _pow2_at_least(f))
    tp = fmt.round_up(t, p["tm"])
    dp = fmt.round_up(d, max(p["bn"], p["bd"]))
    fp = fmt.round_up(f, max(p["kb"], p["bf"]))
  else:
    p = {**TPU_DEFAULTS, **overrides}
    sub = 16 if jnp.dtype(dtype).itemsize == 2 else 8
    p["tm"] = min(p["tm"], fmt.round_up(t, sub))
    p["bk"] = min(p["bk"], fmt.round_up(f, 128))
    tp = fmt.round_up(t, p["tm"])
    dp = d
    fp = fmt.round_up(f, p["bk"])
  known = {k.name for k in dataclasses.fields(Config)}
  bad = set(p) - known
  if bad:
    raise ValueError(f"unknown sparse_ffn options {sorted(bad)}")
  return Config(backend=backend, interpret=interpret, **p), tp, dp, fp


def sparse_relu_ffn(x, w_up, w_down, *, backend=None, interpret=False, return_stats=False,
                    dense_threshold=DEFAULT_DENSE_THRESHOLD, up_impl="xla", **tiles):
  """`relu(x @ w_up) @ w_down` skipping the zero activations, differentiable.

  Args:
    x: [tokens, d_model] (flatten leading batch dims first), bf16 or f32.
    w_up: [d_model, d_ff]; w_down: [d_ff, d_model] (same dtype as x).
    backend: None (jax.default_backend(): "gpu"/"tpu", else "xla"), "gpu" (Pallas Triton),
      "tpu" (Pallas Mosaic) or "xla" (the dense reference, autodiff).
    interpret: run the Pallas kernels in interpret mode (True, or a
      `pltpu.InterpretParams` for the TPU kernels); for CPU tests.
    return_stats: also return FFNStats (per-token L1, differentiable, and nonzero counts;
      occupancy of the sparse work).
    dense_threshold: a fraction in [0, 1] (default DEFAULT_DENSE_THRESHOLD), or None for
      always sparse: when the measured occupancy exceeds it, the call runs the dense XLA
      down projection and backward instead (decided on device by lax.cond).
    up_impl: "xla" (cuBLAS GEMM + fused ReLU; the flags are one more pass over h) or
      "pallas" (GPU only: the Pallas up kernel writes the flags and stats in its epilogue).
    **tiles: tile overrides (GPU: tm, bk, bn, bd, kb, bf, num_warps, num_stages;
      TPU: tm, bk).

  Returns:
    out [tokens, d_model] in x.dtype, or (out, FFNStats) with return_stats.
  """
  backend = resolve(backend, interpret)
  unknown = set(tiles) - set(GPU_DEFAULTS) - set(TPU_DEFAULTS)
  if unknown:   # checked on every backend: a typo must not pass on CPU and fail on a GPU
    raise ValueError(f"unknown sparse_ffn tile options {sorted(unknown)}; known: GPU "
                     f"{sorted(GPU_DEFAULTS)}, TPU {sorted(TPU_DEFAULTS)}")
  not_positive = {k: v for k, v in tiles.items() if not (isinstance(v, int) and v >= 1)}
  if not_positive:
    raise ValueError(f"sparse_ffn tile options must be integers >= 1, got {not_positive}")
  if x.ndim != 2 or w_up.ndim != 2 or w_down.ndim != 2:
    raise ValueError("expected x [tokens, d_model], w_up [d_model, d_ff], w_down [d_ff, d_model]")
  t, d = x.shape
  f = w_up.shape[1]
  if w_up.shape != (d, f) or w_down.shape != (f, d):
    raise ValueError(f"shape mismatch: x {x.shape}, w_up {w_up.shape}, w_down {w_down.shape}")
  if up_impl not in ("xla", "pallas") or (up_impl == "pallas" and backend != "gpu"):
    raise ValueError("up_impl must be 'xla', or 'pallas' with backend='gpu'")
  w_up = w_up.astype(x.dtype)
  w_down = w_down.astype(x.dtype)

  if backend == "xla" or t == 0:
    out, stats = relu_ffn_reference_with_stats(x, w_up, w_down)
    return (out, stats) if return_stats else out

  cfg, tp, dp, fp = _aligned_config(
      backend, t, d, f, x.dtype, interpret,
      dict(tiles, up_impl=up_impl, dense_threshold=dense_threshold))
  xp = jnp.pad(x, ((0, tp - t), (0, dp - d))) if (tp, dp) != (t, d) else x
  wup = jnp.pad(w_up, ((0, dp - d), (0, fp - f))) if (dp, fp) != (d, f) else w_up
  wdn = jnp.pad(w_down, ((0, fp - f), (0, dp - d))) if (fp, dp) != (f, d) else w_down
  out, l1, nnz, occ = _core(cfg, xp, wup, wdn)
  out = out[:t, :d]
  if not return_stats:
    return out
  return out, FFNStats(l1[:t], lax.stop_gradient(nnz[:t]), lax.stop_gradient(occ))
