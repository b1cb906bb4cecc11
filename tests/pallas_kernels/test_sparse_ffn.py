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

from conftest import lowered_text
from pallas_kernels import sparse_ffn
from pallas_kernels.sparse_ffn import bench, format as fmt, gpu, tpu
from pallas_kernels.sparse_ffn.reference import relu_ffn_reference_with_stats

# Shapes that divide none of the tiles: tokens 50 (tiles 16), d_model 48, d_ff 200.
T, D, F = 50, 48, 200
GPU_TILES = dict(tm=16, bk=16, bn=16, bd=16, kb=16, bf=16)
TPU_TILES = dict(tm=16, bk=128)
VARIANTS = {  # dense_threshold=None: always the sparse kernels
    "gpu": dict(backend="gpu", dense_threshold=None, **GPU_TILES),
    "gpu_pallas_up": dict(backend="gpu", up_impl="pallas", dense_threshold=None, **GPU_TILES),
    "tpu": dict(backend="tpu", dense_threshold=None, **TPU_TILES),
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
  # On CPU the default backend is the reference: interpret=True and a misspelled or zero
  # tile are named here, not first on a GPU or TPU.
  with pytest.raises(ValueError, match="runs the jnp reference on this platform"):
    sparse_ffn.sparse_relu_ffn(x, wu, wd, interpret=True)
  with pytest.raises(ValueError, match=r"unknown sparse_ffn tile options \['tmm'\]"):
    sparse_ffn.sparse_relu_ffn(x, wu, wd, tmm=3)
  with pytest.raises(ValueError, match=r"integers >= 1, got \{'tm': 0\}"):
    sparse_ffn.sparse_relu_ffn(x, wu, wd, backend="tpu", interpret=True, tm=0)


# --------------------------------------------------------------------------- format


def test_compact_rows_and_work_list():
  rng = np.random.default_rng(0)
  flags = rng.random((7, 37)) < 0.3
  flags[2] = False
  flags[4] = True
  cnt, ids = jax.device_get(
      jax.jit(fmt.compact_rows, static_argnums=1)(jnp.asarray(flags), 16))
  assert ids.shape == (7, 48)
  for r in range(7):
    want = np.nonzero(flags[r])[0]
    assert cnt[r] == len(want)
    np.testing.assert_array_equal(ids[r, :len(want)], want)
    np.testing.assert_array_equal(ids[r, len(want):], want[-1] if len(want) else 0)
  for include_empty in (True, False):
    wl = jax.device_get(jax.jit(fmt.work_list, static_argnames="include_empty")(
        cnt, ids, include_empty=include_empty))
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
  empty = jax.jit(lambda fl: fmt.work_list(*fmt.compact_rows(fl), include_empty=False))(
      jnp.zeros((3, 4), bool))
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
  """dense_threshold routes work to XLA matmuls by measured occupancy; same numbers.

  0.0: everything dense; 1.0 (TPU): everything sparse under the lax.cond; 0.3 (GPU, this
  data: column occupancy 0.23, block occupancy 0.38): sparse forward / SDDMM / dx, dense
  weight gradients."""
  args = make_inputs(51, 0.9, jnp.float32, dead_tiles=True)
  want = _ref_grad(*args)
  ref = sparse_ffn.relu_ffn_reference(*args)
  for thr in (0.0, 0.3) if variant == "gpu" else (0.0, 1.0):
    kw = {**VARIANTS[variant], "dense_threshold": thr}
    out, st = sparse_ffn.sparse_relu_ffn(*args, interpret=True, return_stats=True, **kw)
    assert rel_err(out, ref) < 1e-5
    if thr == 0.3:
      assert float(st.occupancy) < thr
    got = grad_fn(variant, dense_threshold=thr)(*args)
    for a, b in zip(got, want):
      assert rel_err(a, b) < 1e-4, thr


def test_decode_shape_and_batch_dims():
  """A few tokens (decode), and a caller flattening [batch, seq, d]."""
  x, wu, wd = make_inputs(60, 0.9, jnp.float32, t=3)
  for variant in ("gpu", "tpu"):
    out = fwd_fn(variant)(x, wu, wd)[0]
    assert out.shape == (3, D)
    assert rel_err(out, sparse_ffn.relu_ffn_reference(x, wu, wd)) < 1e-5
  xb = x.reshape(3, 1, D)
  out = fwd_fn("gpu")(xb.reshape(-1, D), wu, wd)[0].reshape(xb.shape)
  assert out.shape == (3, 1, D)


def test_kernels_skip_inactive_work():
  """The kernels only read listed units: NaN weight rows of unlisted units are harmless."""
  rng = np.random.default_rng(0)
  tm, t, d = 16, 32, 32
  h = np.zeros((t, 256), np.float32)
  h[:, :20] = np.maximum(rng.normal(size=(t, 20)), 0)  # units 20.. never active
  w = rng.normal(size=(256, d)).astype(np.float32)
  w_poison = w.copy()
  w_poison[20:] = np.nan
  want = h[:, :20] @ w[:20]

  @jax.jit
  def run(h, w):
    cflags = fmt.column_flags_tokmajor(h, tm)
    cnt, ids = fmt.compact_rows(cflags, 16)
    out_gpu = gpu.gather_matmul(cnt, ids, h.T, w, tm=tm, bk=16, bn=16, interpret=True)
    # TPU: block granularity, block 1 (units 128..255) is empty and must not be read.
    wl = fmt.work_list(*fmt.compact_rows(fmt.block_flags(cflags, 128)), include_empty=True)
    w_tpu = w.at[:128].set(jnp.nan_to_num(w[:128]))
    out_tpu = tpu.rowlist_matmul(wl, h, w_tpu, tm=tm, bk=128, interpret=True)
    return out_gpu, out_tpu

  out_gpu, out_tpu = run(jnp.asarray(h), jnp.asarray(w_poison))
  assert rel_err(out_gpu, want) < 1e-5
  w_tpu_want = np.where(np.isnan(w_poison[:128]), 0, w_poison[:128])
  assert rel_err(out_tpu, h[:, :128] @ w_tpu_want) < 1e-5


def test_tpu_kernels_race_detection(capfd):
  """The TPU kernels under the TPU interpreter (DMAs, VMEM, races, OOB reads)."""
  args = make_inputs(70, 0.9, jnp.float32, t=32, f=256, dead_tiles=True)
  params = pltpu.InterpretParams(detect_races=True)
  fn = lambda x, wu, wd: sparse_ffn.sparse_relu_ffn(  # noqa: E731
      x, wu, wd, interpret=params, return_stats=True, **VARIANTS["tpu"])
  got = jax.jit(jax.grad(loss_of(fn), argnums=(0, 1, 2)))(*args)
  out = jax.jit(fn)(*args)[0]
  for a, b in zip(got, _ref_grad(*args)):
    assert rel_err(a, b) < 1e-4
  assert rel_err(out, sparse_ffn.relu_ffn_reference(*args)) < 1e-5
  assert "RACE DETECTED" not in capfd.readouterr().out  # the interpreter prints races


# --------------------------------------------------------------------------- lowering


def _lower(fn, args, platform):
  return lowered_text(jax.jit(fn), *args, platform=platform)


# The benchmark shapes (abstract: nothing is allocated), bf16 with the production tiles,
# and the odd test shapes in f32 with the test tiles.
LOWER_CASES = [
    ("batched", jnp.bfloat16, (16384, 2048, 8192), False),
    ("decode", jnp.bfloat16, (8, 2048, 8192), False),
    ("odd_f32", jnp.float32, (T, D, F), True),
]


def _abstract(dtype, t, d, f):
  return [jax.ShapeDtypeStruct(s, dtype) for s in ((t, d), (d, f), (f, d))]


@pytest.mark.parametrize("up_impl", ["xla", "pallas"])
def test_cross_lowering_cuda(up_impl):
  """Real Pallas -> Triton lowering (power-of-2 tiles, gathers, dynamic loops, aliasing)
  of the forward and backward, with the dense fallback's lax.cond."""
  for name, dtype, (t, d, f), small in LOWER_CASES:
    tiles = GPU_TILES if small else {}
    fn = lambda x, wu, wd: sparse_ffn.sparse_relu_ffn(  # noqa: E731
        x, wu, wd, backend="gpu", up_impl=up_impl, return_stats=True, **tiles)
    txt = _lower(jax.grad(loss_of(fn), argnums=(0, 1, 2)), _abstract(dtype, t, d, f), "cuda")
    names = set(re.findall(r"sparse_ffn_\w+", txt))
    want = {"sparse_ffn_gather_matmul", "sparse_ffn_sddmm", "sparse_ffn_block_t_matmul"}
    if up_impl == "pallas":
      want.add("sparse_ffn_up_relu")
    assert want <= names, (name, names)
    assert "__gpu$xla.gpu.triton" in txt


def test_cross_lowering_tpu():
  """Real Pallas -> Mosaic lowering ((8, 128) blocks, scalar prefetch, dynamic grid)."""
  for name, dtype, (t, d, f), small in LOWER_CASES:
    tiles = TPU_TILES if small else {}
    fn = lambda x, wu, wd: sparse_ffn.sparse_relu_ffn(  # noqa: E731
        x, wu, wd, backend="tpu", return_stats=True, **tiles)
    txt = _lower(jax.grad(loss_of(fn), argnums=(0, 1, 2)), _abstract(dtype, t, d, f), "tpu")
    names = set(re.findall(r"sparse_ffn_\w+", txt))
    assert {"sparse_ffn_rowlist_matmul", "sparse_ffn_sddmm",
            "sparse_ffn_collist_t_matmul"} <= names, (name, names)
    assert "tpu_custom_call" in txt


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
  argv = ["--small", "--results", str(results), "--sparsities", "0,0.95", "--random_at",
          "0.95", "--variants", "sparse"]
  bench.main(argv)
  out = capsys.readouterr().out
  assert "speedup" in out and "fwd+bwd" in out
  text = results.read_text()
  assert "## sparse_ffn" in text and "--small" in text and "git commit" in text
  rows = [line for line in text.splitlines() if line.startswith("| ") and "fwd" in line]
  assert len(rows) == 2 * 3 * 2  # shapes x (2 structured + 1 random) x passes
  assert all(len(r.split(" | ")) == 7 for r in rows)  # 6 columns + 1 kernel variant


@pytest.mark.slow
def test_bench_small_full(tmp_path):
  """`python -m pallas_kernels.sparse_ffn.bench --small` as a user runs it (~1 min)."""
  rows = bench.main(["--small", "--results", str(tmp_path / "R.md")])
  assert len(rows) == 2 * (len(bench.SPARSITIES) + 1) * 2
  assert all(len(r) == 9 for r in rows)  # sparse, auto, pallas_up
