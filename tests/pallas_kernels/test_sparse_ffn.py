"""pallas_kernels.sparse_ffn on CPU: interpret mode for numerics, cross-lowering for the
GPU (Triton) and TPU (Mosaic) constraints.

Tolerances (max |kernel - reference| / max |reference|): f32 1e-5 (forward) and 1e-4
(gradients); bf16 2e-2 (forward) and 4e-2 (gradients): the kernels and the reference
round h, da and the outputs to bf16 at the same points but sum in a different order.
"""

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import sparse_ffn
from pallas_kernels.sparse_ffn import bench, format as fmt, gpu, tpu
from pallas_kernels.sparse_ffn.reference import relu_ffn_reference_with_stats

# Shapes that divide none of the tiles: tokens 50 (tiles 16), d_model 48, d_ff 200.
T, D, F = 50, 48, 200
GPU_TILES = dict(tm=16, bk=16, bn=16, bd=16, kb=16, bf=16)
TPU_TILES = dict(tm=16, bk=128)
VARIANTS = {
    "gpu": dict(backend="gpu", **GPU_TILES),
    "gpu_pallas_up": dict(backend="gpu", up_impl="pallas", **GPU_TILES),
    "tpu": dict(backend="tpu", **TPU_TILES),
}
TOL_FWD = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
TOL_GRAD = {jnp.float32: 1e-4, jnp.bfloat16: 4e-2}


def make_inputs(seed, sparsity, dtype, t=T, d=D, f=F, dead_tiles=False):
  """Random x, w_up, w_down with about `sparsity` zeros in relu(x @ w_up).

  The last column of x is 1 and the last row of w_up a per-unit bias that sets the
  fraction of zeros. dead_tiles: also zero whole token tiles and unit blocks, so the
  kernels meet empty lists and empty blocks.
  """
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(t, d)).astype(np.float32)
  x[:, -1] = 1.0
  w_up = (rng.normal(size=(d, f)) / np.sqrt(d)).astype(np.float32)
  sigma = np.sqrt((d - 1) / d)
  if sparsity <= 0.0:
    bias = np.full(f, 10.0)
  elif sparsity >= 1.0:
    bias = np.full(f, -10.0)
  else:
    from scipy.special import ndtri  # noqa: PLC0415
    bias = np.full(f, -sigma * ndtri(sparsity))
  w_up[-1] = bias
  if dead_tiles:
    x[16:32] = 0.0   # one whole token tile of 16 without any active unit
    w_up[:, 128:] = 0.0  # units 128.. never active: an empty 128-block
    w_up[-1, 128:] = -1.0
  w_down = (rng.normal(size=(f, d)) / np.sqrt(f)).astype(np.float32)
  return tuple(jnp.asarray(a, dtype) for a in (x, w_up, w_down))


def rel_err(a, b):
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-6))


@functools.lru_cache(maxsize=None)
def fwd_fn(variant, interpret=True):
  kw = VARIANTS[variant]
  return jax.jit(lambda x, wu, wd: sparse_ffn.sparse_relu_ffn(
      x, wu, wd, interpret=interpret, return_stats=True, **kw))


def loss_of(fn):
  def loss(x, wu, wd):
    out, st = fn(x, wu, wd)
    o = out.astype(jnp.float32)
    # A nonlinear readout (so every output entry gets its own cotangent) + the L1 term.
    return jnp.sum(o * jnp.cos(o)) + 0.1 * jnp.sum(st.l1)
  return loss


@functools.lru_cache(maxsize=None)
def grad_fn(variant, interpret=True, **extra):
  kw = {**VARIANTS[variant], **extra}
  fn = lambda x, wu, wd: sparse_ffn.sparse_relu_ffn(  # noqa: E731
      x, wu, wd, interpret=interpret, return_stats=True, **kw)
  return jax.jit(jax.grad(loss_of(fn), argnums=(0, 1, 2)))


_ref_grad = jax.jit(jax.grad(loss_of(relu_ffn_reference_with_stats), argnums=(0, 1, 2)))


# --------------------------------------------------------------------------- reference


def test_reference_matches_numpy():
  x, wu, wd = make_inputs(0, 0.5, jnp.float32)
  xn, wun, wdn = (np.asarray(a, np.float64) for a in (x, wu, wd))
  h = np.maximum(xn @ wun, 0)
  out = sparse_ffn.relu_ffn_reference(x, wu, wd)
  assert rel_err(out, h @ wdn) < 1e-5
  assert out.dtype == jnp.float32
  xb, wub, wdb = (a.astype(jnp.bfloat16) for a in (x, wu, wd))
  assert sparse_ffn.relu_ffn_reference(xb, wub, wdb).dtype == jnp.bfloat16
  assert abs(float(sparse_ffn.activation_sparsity(jnp.asarray(h))) - np.mean(h == 0)) < 1e-6
  mask = np.arange(T) < 20
  want = np.mean(h[:20] == 0)
  assert abs(float(sparse_ffn.activation_sparsity(jnp.asarray(h), jnp.asarray(mask))) - want) < 1e-6


def test_xla_backend_and_default():
  x, wu, wd = make_inputs(1, 0.8, jnp.float32)
  assert sparse_ffn.default_backend() == "xla"  # CPU
  out, st = sparse_ffn.sparse_relu_ffn(x, wu, wd, return_stats=True)
  assert rel_err(out, sparse_ffn.relu_ffn_reference(x, wu, wd)) < 1e-6
  h = np.asarray(sparse_ffn.hidden_reference(x, wu))
  np.testing.assert_allclose(st.nonzeros, (h > 0).sum(1))
  with pytest.raises(ValueError):
    sparse_ffn.sparse_relu_ffn(x, wu, wd, backend="cuda")
  with pytest.raises(ValueError):
    sparse_ffn.sparse_relu_ffn(x, wu, wd, backend="tpu", up_impl="pallas")


# --------------------------------------------------------------------------- format


def test_compact_rows_and_work_list():
  rng = np.random.default_rng(0)
  flags = rng.random((7, 37)) < 0.3
  flags[2] = False
  flags[4] = True
  cnt, ids = fmt.compact_rows(jnp.asarray(flags), pad_to=16)
  assert ids.shape == (7, 48)
  for r in range(7):
    want = np.nonzero(flags[r])[0]
    assert cnt[r] == len(want)
    np.testing.assert_array_equal(ids[r, :len(want)], want)
    np.testing.assert_array_equal(ids[r, len(want):], want[-1] if len(want) else 0)
  for include_empty in (True, False):
    wl = fmt.work_list(cnt, ids, include_empty=include_empty)
    steps = []
    for r in range(7):
      n = len(np.nonzero(flags[r])[0])
      if n == 0 and include_empty:
        steps.append((r, None, fmt.FIRST | fmt.LAST))
      for k in range(n):
        fl = fmt.VALID | (fmt.FIRST if k == 0 else 0) | (fmt.LAST if k == n - 1 else 0)
        steps.append((r, int(ids[r, k]), fl))
    assert int(wl.num) == len(steps)
    for s, (r, c, fl) in enumerate(steps):
      assert (int(wl.row[s]), int(wl.flags[s])) == (r, fl), s
      if c is not None:
        assert int(wl.col[s]) == c
  empty = fmt.work_list(*fmt.compact_rows(jnp.zeros((3, 4), bool)), include_empty=False)
  assert int(empty.num) == 1 and int(empty.flags[0]) & fmt.VALID == 0


def test_neuron_order_preserves_function():
  x, wu, wd = make_inputs(2, 0.9, jnp.float32)
  h = sparse_ffn.hidden_reference(x, wu)
  perm = sparse_ffn.neuron_order(jnp.sum(h > 0, axis=0))
  counts = np.asarray(jnp.sum(h > 0, axis=0))[np.asarray(perm)]
  assert np.all(np.diff(counts) <= 0)
  wu2, wd2 = sparse_ffn.permute_ffn_weights(wu, wd, perm)
  assert rel_err(sparse_ffn.relu_ffn_reference(x, wu2, wd2),
                 sparse_ffn.relu_ffn_reference(x, wu, wd)) < 1e-5


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_reference(variant, dtype):
  fn = fwd_fn(variant)  # one compilation, every sparsity (the pattern is data)
  for seed, (sparsity, dead) in enumerate(
      [(0.0, False), (0.5, False), (0.95, False), (1.0, False), (0.8, True)]):
    x, wu, wd = make_inputs(10 + seed, sparsity, dtype, dead_tiles=dead)
    out, st = fn(x, wu, wd)
    ref, ref_st = relu_ffn_reference_with_stats(x, wu, wd)
    assert out.shape == (T, D) and out.dtype == dtype
    if sparsity == 1.0:
      assert float(jnp.max(jnp.abs(out))) == 0.0
      assert float(st.occupancy) == 0.0
    else:
      assert rel_err(out, ref) < TOL_FWD[dtype], (variant, sparsity)
    np.testing.assert_allclose(st.nonzeros, ref_st.nonzeros)
    np.testing.assert_allclose(st.l1, ref_st.l1, rtol=1e-5, atol=1e-3)
    real = 1 - float(jnp.sum(st.nonzeros)) / (T * F)
    assert abs(real - sparsity) < 0.1 or dead
    if sparsity == 0.0:
      assert float(st.occupancy) > 0.7  # F padded: the padding units are never active
    if dead:  # whole empty tiles / blocks are skipped
      assert float(st.occupancy) < 0.75


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_match_reference_f32(variant):
  fn = grad_fn(variant)
  for seed, (sparsity, dead) in enumerate([(0.5, False), (0.9, True), (1.0, False)]):
    args = make_inputs(30 + seed, sparsity, jnp.float32, dead_tiles=dead)
    got = fn(*args)
    want = _ref_grad(*args)
    for name, a, b in zip(("dx", "dw_up", "dw_down"), got, want):
      assert a.shape == b.shape and a.dtype == b.dtype
      if sparsity == 1.0:
        # relu'(0) = 0 both here and in jax: nothing flows back.
        assert float(jnp.max(jnp.abs(a))) == 0.0 and float(jnp.max(jnp.abs(b))) == 0.0
      else:
        assert rel_err(a, b) < TOL_GRAD[jnp.float32], (variant, sparsity, name)


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_gradients_match_reference_bf16(variant):
  args = make_inputs(40, 0.9, jnp.bfloat16, dead_tiles=True)
  got = grad_fn(variant)(*args)
  want = _ref_grad(*args)
  for name, a, b in zip(("dx", "dw_up", "dw_down"), got, want):
    assert a.dtype == jnp.bfloat16
    assert rel_err(a, b) < TOL_GRAD[jnp.bfloat16], (variant, name)


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_dense_fallback(variant):
  """dense_threshold routes the call (forward and backward) to XLA; same numbers."""
  args = make_inputs(50, 0.5, jnp.float32)
  want = _ref_grad(*args)
  ref = sparse_ffn.relu_ffn_reference(*args)
  for thr in (0.0, 1.0):  # 0.0: always dense; 1.0: never
    kw = {**VARIANTS[variant], "dense_threshold": thr}
    out = sparse_ffn.sparse_relu_ffn(*args, interpret=True, **kw)
    assert rel_err(out, ref) < 1e-5
    got = grad_fn(variant, dense_threshold=thr)(*args)
    for a, b in zip(got, want):
      assert rel_err(a, b) < 1e-4, thr


def test_decode_shape_and_batch_dims():
  """A few tokens (decode), and a caller flattening [batch, seq, d]."""
  x, wu, wd = make_inputs(60, 0.9, jnp.float32, t=3)
  for variant in ("gpu", "tpu"):
    out = sparse_ffn.sparse_relu_ffn(x, wu, wd, interpret=True, **VARIANTS[variant])
    assert rel_err(out, sparse_ffn.relu_ffn_reference(x, wu, wd)) < 1e-5
  xb = x.reshape(3, 1, D)
  out = sparse_ffn.sparse_relu_ffn(xb.reshape(-1, D), wu, wd, interpret=True,
                                   **VARIANTS["gpu"]).reshape(xb.shape)
  assert out.shape == (3, 1, D)


def test_kernels_skip_inactive_work():
  """The GPU gather kernel only reads listed units: poisoning unlisted ones is harmless."""
  rng = np.random.default_rng(0)
  tm, f, t, d = 16, 64, 32, 32
  h = np.maximum(rng.normal(size=(t, f)), 0).astype(np.float32)
  h[:, 20:] = 0
  flags = fmt.column_flags_tokmajor(jnp.asarray(h), tm)
  cnt, ids = fmt.compact_rows(flags, 16)
  w = rng.normal(size=(f, d)).astype(np.float32)
  w_poison = w.copy()
  w_poison[20:] = np.nan
  out = gpu.gather_matmul(cnt, ids, jnp.asarray(h.T), jnp.asarray(w_poison), tm=tm, bk=16,
                          bn=16, interpret=True)
  assert rel_err(out, h @ w) < 1e-5
  hb = np.zeros((t, 256), np.float32)
  hb[:, :128] = h[:, :1].repeat(128, 1)
  bfl = fmt.block_flags(fmt.column_flags_tokmajor(jnp.asarray(hb), tm), 128)
  wl = fmt.work_list(*fmt.compact_rows(bfl), include_empty=True)
  wb = rng.normal(size=(256, d)).astype(np.float32)
  wb_poison = wb.copy()
  wb_poison[128:] = np.nan
  out = tpu.rowlist_matmul(wl, jnp.asarray(hb), jnp.asarray(wb_poison), tm=tm, bk=128,
                           interpret=True)
  assert rel_err(out, hb @ wb) < 1e-5


def test_tpu_kernels_race_detection(capfd):
  """The TPU kernels under the TPU interpreter (DMAs, VMEM, races, OOB reads)."""
  args = make_inputs(70, 0.9, jnp.float32, t=32, f=256, dead_tiles=True)
  params = pltpu.InterpretParams(detect_races=True)
  fn = lambda x, wu, wd: sparse_ffn.sparse_relu_ffn(  # noqa: E731
      x, wu, wd, backend="tpu", interpret=params, return_stats=True, **TPU_TILES)
  got = jax.jit(jax.grad(loss_of(fn), argnums=(0, 1, 2)))(*args)
  out = jax.jit(fn)(*args)[0]
  for a, b in zip(got, _ref_grad(*args)):
    assert rel_err(a, b) < 1e-4
  assert rel_err(out, sparse_ffn.relu_ffn_reference(*args)) < 1e-5
  assert "RACE DETECTED" not in capfd.readouterr().out  # the interpreter prints races


# --------------------------------------------------------------------------- lowering


def _lower(fn, args, platform):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("up_impl", ["xla", "pallas"])
def test_cross_lowering_cuda(up_impl):
  """Real Pallas -> Triton lowering (tile sizes, power-of-2 shapes, gathers, loops) of the
  forward and backward at the production tiles, bf16, and at the test tiles, f32."""
  for dtype, t, d, f, tiles in ((jnp.bfloat16, 1000, 256, 1024, {}),
                                (jnp.float32, T, D, F, GPU_TILES)):
    args = make_inputs(80, 0.9, dtype, t=t, d=d, f=f)
    fn = lambda x, wu, wd: sparse_ffn.sparse_relu_ffn(  # noqa: E731
        x, wu, wd, backend="gpu", up_impl=up_impl, return_stats=True,
        dense_threshold=0.6, **tiles)
    txt = _lower(jax.grad(loss_of(fn), argnums=(0, 1, 2)), args, "cuda")
    names = set(re.findall(r"sparse_ffn_\w+", txt))
    want = {"sparse_ffn_gather_matmul", "sparse_ffn_sddmm", "sparse_ffn_block_t_matmul"}
    if up_impl == "pallas":
      want.add("sparse_ffn_up_relu")
    assert want <= names, names
    assert "__gpu$xla.gpu.triton" in txt


def test_cross_lowering_tpu():
  """Real Pallas -> Mosaic lowering ((8, 128) blocks, scalar prefetch, dynamic grid)."""
  for dtype, t, d, f, tiles in ((jnp.bfloat16, 1000, 256, 1024, {}),
                                (jnp.float32, T, D, F, TPU_TILES)):
    args = make_inputs(81, 0.9, dtype, t=t, d=d, f=f)
    fn = lambda x, wu, wd: sparse_ffn.sparse_relu_ffn(  # noqa: E731
        x, wu, wd, backend="tpu", return_stats=True, dense_threshold=0.6, **tiles)
    txt = _lower(jax.grad(loss_of(fn), argnums=(0, 1, 2)), args, "tpu")
    assert txt.count("tpu_custom_call") >= 5, txt.count("tpu_custom_call")


def test_tile_constraints_rejected():
  with pytest.raises(ValueError, match="power of 2"):
    gpu.gather_matmul(jnp.zeros(2, jnp.int32), jnp.zeros((2, 24), jnp.int32),
                      jnp.zeros((24, 32)), jnp.zeros((24, 32)), tm=16, bk=24, bn=16)
  with pytest.raises(ValueError, match="bk % 128"):
    wl = fmt.work_list(*fmt.compact_rows(jnp.ones((1, 1), bool)), include_empty=True)
    tpu.rowlist_matmul(wl, jnp.zeros((16, 64)), jnp.zeros((64, 32)), tm=16, bk=64)


def test_package_is_independent_of_bltjax():
  root = pathlib.Path(sparse_ffn.__file__).parent
  for path in root.glob("*.py"):
    assert not re.search(r"^\s*(from|import)\s+bltjax", path.read_text(), re.M), path


# --------------------------------------------------------------------------- bench


def test_bench_small_runs(tmp_path, capsys):
  results = tmp_path / "RESULTS.md"
  bench.main(["--small", "--results", str(results), "--iters", "1"])
  out = capsys.readouterr().out
  assert "speedup" in out and "fwd+bwd" in out
  text = results.read_text()
  assert "sparse_ffn" in text and "--small" in text
  rows = [line for line in text.splitlines() if line.startswith("| ") and "fwd" in line]
  assert len(rows) >= 12
