"""pallas_kernels.diffusion.range_attention on CPU: interpret mode for numerics,
cross-lowering for the GPU (Triton) and TPU (Mosaic) constraints.

Tolerances (max |kernel - reference| / max |reference|): f32 1e-5 forward, 1e-4
gradients; bf16 2e-2 / 4e-2 (the kernels round p and ds to bf16 before the matmuls, the
reference rounds the probabilities).
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from bltjax import diffusion
from conftest import lowered_text, tpu_streamed_blocks, tpu_vmem_bytes
from pallas_kernels import diffusion as kernels_pkg
from pallas_kernels.diffusion import kernels as range_kernels
from pallas_kernels.diffusion import ops, range_attention, range_attention_reference, tiles

VARIANTS = {"gpu": dict(backend="gpu", bq=16, bk=16), "tpu": dict(backend="tpu", bq=16, bk=16)}
TOL_FWD = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
TOL_GRAD = {jnp.float32: 1e-4, jnp.bfloat16: 4e-2}


def rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-6))


def qkv(seed, b, q_len, k_len, heads, groups, d, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  make = lambda *s: jnp.asarray(rng.normal(size=s), dtype)
  return make(b, q_len, heads, d), make(b, k_len, groups, d), make(b, k_len, groups, d)


def window_ranges(b, length, window, empty_rows=()):
  """Causal sliding window, second range empty; `empty_rows` see nothing."""
  t = np.arange(length)
  a0 = np.broadcast_to(np.maximum(0, t - window + 1), (b, length)).copy()
  a1 = np.broadcast_to(t + 1, (b, length)).copy()
  for row in empty_rows:
    a0[:, row] = a1[:, row] = row
  zeros = np.zeros((b, length), np.int32)
  return tuple(jnp.asarray(x, jnp.int32) for x in (a0, a1, zeros, zeros))


def bltd_ranges(seed, b=2, length=40, block_size=4, num_blocks=5, window=12):
  """The `[clean ; noisy]` ranges of BLT-D training (two documents per row)."""
  rng = np.random.default_rng(seed)
  segment_ids = np.ones((b, length), np.int32)
  segment_ids[:, length // 2:] = 2
  segment_ids[1, -3:] = 0   # padding
  starts = rng.random((b, length)) < 0.3
  starts[:, 0] = True
  blocks = diffusion.anchor_blocks(jnp.asarray(starts), jnp.asarray(segment_ids),
                                   block_size=block_size, num_blocks=num_blocks,
                                   rng=jax.random.PRNGKey(seed))
  return diffusion.bltd_attention_ranges(
      blocks.anchors, blocks.valid, jnp.asarray(segment_ids), seq_len=length,
      block_size=block_size, window=window, in_block=blocks.in_block)


def test_reference_matches_a_per_row_softmax():
  q, k, v = qkv(0, 1, 6, 9, 2, 1, 4)
  ranges = (jnp.array([[0, 2, 0, 0, 3, 1]]), jnp.array([[3, 5, 0, 9, 4, 1]]),
            jnp.array([[6, 0, 0, 0, 7, 0]]), jnp.array([[8, 0, 0, 0, 9, 0]]))
  out = np.asarray(range_attention_reference(q, k, v, ranges))
  for row in range(6):
    keys = [j for j in range(9) if ranges[0][0, row] <= j < ranges[1][0, row]
            or ranges[2][0, row] <= j < ranges[3][0, row]]
    for h in range(2):
      if not keys:
        np.testing.assert_array_equal(out[0, row, h], 0.0)
        continue
      s = np.asarray(k[0, keys, 0]) @ np.asarray(q[0, row, h]) / 2.0
      p = np.exp(s - s.max())
      np.testing.assert_allclose(out[0, row, h], p @ np.asarray(v[0, keys, 0]) / p.sum(),
                                 rtol=1e-5, atol=1e-6)


def test_tile_bounds_cover_each_tile_and_merge_overlaps():
  a0 = jnp.array([[0, 4, 30, 30]]); a1 = jnp.array([[3, 9, 30, 30]])   # rows 2, 3: empty a
  b0 = jnp.array([[8, 0, 40, 0]]); b1 = jnp.array([[12, 0, 47, 0]])
  bounds = np.asarray(tiles.tile_bounds((a0, a1, b0, b1), bq=2, bk=4))
  # tile 0: a covers keys 0..8 -> blocks [0, 3); b keys 8..11 -> block 2: merged [0, 3).
  np.testing.assert_array_equal(bounds[0, 0], [0, 3, 0, 0])
  # tile 1: a empty in both rows; b keys 40..46 -> blocks [10, 12).
  np.testing.assert_array_equal(bounds[0, 1], [10, 12, 0, 0])
  spans = np.asarray(tiles.key_block_tiles(jnp.asarray(bounds), 12))
  np.testing.assert_array_equal(spans[0, 0], [0, 1, 0, 0])
  np.testing.assert_array_equal(spans[0, 11], [1, 2, 0, 0])
  np.testing.assert_array_equal(spans[0, 5], [0, 0, 0, 0])


def test_key_block_tiles_split_at_the_longest_gap():
  """Key block 0 is seen by tiles 0, 1, 3 and 7: spans [0, 4) and [7, 8) (tile 2 is left
  to the kernel's skip); key block 1 by tile 2 alone."""
  visits = {0: [0, 1, 3, 7], 1: [2]}
  bounds = np.zeros((1, 8, 4), np.int32)
  for block, tile_ids in visits.items():
    for tile in tile_ids:
      bounds[0, tile, 2 * (block == 1):2 * (block == 1) + 2] = [block, block + 1]
  spans = np.asarray(tiles.key_block_tiles(jnp.asarray(bounds), 2))
  np.testing.assert_array_equal(spans[0], [[0, 4, 7, 8], [2, 3, 0, 0]])


def test_key_block_spans_of_bltd_rows_hold_every_visit_and_skip_the_gap():
  """A BLT-D row (4k clean bytes, 64 noisy blocks of 8): every (tile, block) visit lies in
  its block's spans, and the spans hold a fraction of the first-to-last span's tiles."""
  ranges = bltd_ranges(8, b=2, length=4096, block_size=8, num_blocks=64, window=512)
  bounds = tiles.tile_bounds(tuple(ranges), bq=128, bk=128)
  n_blocks = -(-ranges.a0.shape[1] // 128)
  touches = np.asarray(tiles.tile_touches(bounds, n_blocks))[0]        # [nq, nk]
  spans = np.asarray(tiles.key_block_tiles(bounds, n_blocks))[0]        # [nk, 4]
  tile = np.arange(touches.shape[0])[:, None]
  in_spans = (((tile >= spans[:, 0]) & (tile < spans[:, 1]))
              | ((tile >= spans[:, 2]) & (tile < spans[:, 3])))
  assert not np.any(touches & ~in_spans)
  assert np.all((spans[:, 1] <= spans[:, 2]) | (spans[:, 3] == 0))   # disjoint, in order
  first = np.where(touches.any(0), touches.argmax(0), 0)
  last = np.where(touches.any(0), touches.shape[0] - touches[::-1].argmax(0), 0)
  assert in_spans.sum() < 0.5 * np.sum(last - first)


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_matches_reference_windowed_gqa_ragged(variant, dtype):
  """Lengths that divide no tile, GQA (4 heads over 2), an odd head_dim, empty rows."""
  q, k, v = qkv(1, 2, 45, 45, 4, 2, 12, dtype)
  ranges = window_ranges(2, 45, 10, empty_rows=(7, 44))
  ref = range_attention_reference(q, k, v, ranges)
  out = jax.jit(lambda *a: range_attention(*a, interpret=True, **VARIANTS[variant]))(
      q, k, v, ranges)
  assert out.shape == q.shape and out.dtype == dtype
  assert rel_err(out, ref) < TOL_FWD[dtype]
  np.testing.assert_array_equal(np.asarray(out[:, 7], np.float32), 0.0)


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_match_reference_on_bltd_ranges(variant, dtype):
  ranges = bltd_ranges(2)
  total = ranges.a0.shape[1]
  q, k, v = qkv(3, 2, total, total, 2, 2, 8, dtype)
  weights = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)

  def loss(attend):
    return lambda q, k, v: jnp.sum(attend(q, k, v, ranges).astype(jnp.float32) * weights)

  kernel = lambda *a: range_attention(*a, interpret=True, **VARIANTS[variant])
  out = kernel(q, k, v, ranges)
  assert rel_err(out, range_attention_reference(q, k, v, ranges)) < TOL_FWD[dtype]
  want = jax.grad(loss(range_attention_reference), argnums=(0, 1, 2))(q, k, v)
  got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
  for name, g, w in zip("qkv", got, want):
    assert g.dtype == dtype, name
    assert rel_err(g, w) < TOL_GRAD[dtype], name


def test_kernel_never_reads_blocks_no_tile_sees():
  """Key blocks outside every tile's intervals hold NaN: the output stays exact, so the
  kernels skip them (reading one would turn 0 * NaN into NaN)."""
  length, window, bk = 64, 8, 16
  q, k, v = qkv(5, 1, length, length, 2, 2, 8)
  ranges = window_ranges(1, length, window)
  ranges = (ranges[0], ranges[1], ranges[0], ranges[0])
  # queries 0..15 only: every tile but the first sees nothing
  keep = jnp.arange(length) < 16
  ranges = tuple(jnp.where(keep, r, 0) for r in ranges)
  poison = (jnp.arange(length) >= 16)[None, :, None, None]
  k_nan, v_nan = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
  for variant in ("gpu", "tpu"):
    out = range_attention(q, k_nan, v_nan, ranges, interpret=True,
                          **{**VARIANTS[variant], "bk": bk})
    ref = range_attention_reference(q, k, v, ranges)
    assert np.all(np.isfinite(np.asarray(out))), variant
    assert rel_err(out, ref) < 1e-5, variant
    grads = jax.grad(lambda q: jnp.sum(range_attention(
        q, k_nan, v_nan, ranges, interpret=True, **{**VARIANTS[variant], "bk": bk})))(q)
    assert np.all(np.isfinite(np.asarray(grads))), variant


def test_occupancy_of_bltd_ranges_is_their_windows():
  """A long windowed row: the kernels compute a small fraction of the (tile, block) pairs."""
  ranges = window_ranges(1, 1024, 128)
  bounds = tiles.tile_bounds(ranges, bq=64, bk=64)
  occ = float(tiles.occupancy(bounds, 1024 // 64))
  # tile i sees keys 64i - 127 .. 64i + 63: blocks i-2 .. i (tiles 0 and 1: 1 and 2 blocks)
  assert occ == pytest.approx((1 + 2 + 14 * 3) / 256)


def test_tpu_kernels_race_detection(capfd):
  ranges = bltd_ranges(6)
  total = ranges.a0.shape[1]
  q, k, v = qkv(7, 2, total, total, 2, 1, 8)
  params = pltpu.InterpretParams(detect_races=True)
  f = lambda q, k, v: jnp.sum(range_attention(q, k, v, ranges, backend="tpu", bq=16, bk=16,
                                              interpret=params) ** 2)
  loss, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(lambda q, k, v: jnp.sum(range_attention_reference(q, k, v, ranges) ** 2),
                  argnums=(0, 1, 2))(q, k, v)
  assert all(rel_err(g, w) < 1e-4 for g, w in zip(grads, want))
  assert "RACE DETECTED" not in capfd.readouterr().out


def _tpu_kernels(length, measure):
  """`measure` (a conftest helper) of the TPU range-attention kernels (fwd, dq, dkv) at a
  bf16 row of `length`, head_dim 64."""
  q = jax.ShapeDtypeStruct((1, length, 4, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, length, 2, 64), jnp.bfloat16)
  ranges = [jax.ShapeDtypeStruct((1, length), jnp.int32)] * 4
  loss = lambda q, k, v, *r: jnp.sum(range_attention(q, k, v, r, backend="tpu"))
  return measure(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, *ranges)


def _tpu_vmem_bytes(length):
  return _tpu_kernels(length, tpu_vmem_bytes)


def test_tpu_dkv_streams_two_row_tiles_and_one_stats_tile_per_query_tile():
  """dk/dv copies, per visited query tile, q and do `[bq, d]` and one `[8, bq]` f32 tile
  of the rows' lse, delta and ranges (`kernels.row_stats`), not six `[bq, 1]` columns
  (each padded to 128 lanes in VMEM: 8 DMAs a tile before)."""
  bq = ops.TPU_DEFAULTS["bq"]
  streamed = _tpu_kernels(1024, tpu_streamed_blocks)["range_attention_dkv"]
  assert streamed == [((bq, 64), np.dtype(jnp.bfloat16))] * 2 + [((8, bq), np.dtype("float32"))]


def test_row_stats_are_lane_major_rows_and_ranges_keep_their_bits():
  lse, delta = (jnp.asarray(np.random.default_rng(s).normal(size=(2, 3, 5, 1)), jnp.float32)
                for s in (0, 1))
  ranges = [jnp.asarray(np.random.default_rng(2 + c).integers(0, 1 << 30, (2, 5, 1)), jnp.int32)
            for c in range(4)]
  stats = range_kernels.row_stats(lse, delta, ranges)
  assert stats.shape == (2, 3, 8, 5) and stats.dtype == jnp.float32
  np.testing.assert_array_equal(stats[:, :, 0], lse[..., 0])
  np.testing.assert_array_equal(stats[:, :, 1], delta[..., 0])
  for c, r in enumerate(ranges):
    bits = jax.lax.bitcast_convert_type(stats[:, :, 2 + c], jnp.int32)
    np.testing.assert_array_equal(bits, np.broadcast_to(r[:, None, :, 0], (2, 3, 5)))
  np.testing.assert_array_equal(stats[:, :, 6:], 0.0)


def test_tpu_kernels_hold_tiles_not_rows_in_vmem():
  """The streamed operand (keys/values in fwd and dq, query tiles in dkv) stays in HBM and
  only its visited blocks are copied in: VMEM per kernel is the same for a 1k and a 64k
  row (whole rows in VMEM capped a v5e at 8k bf16 positions, bench/RESULTS.md)."""
  short, long = _tpu_vmem_bytes(1024), _tpu_vmem_bytes(65536)
  assert set(short) == {"range_attention_fwd", "range_attention_dq", "range_attention_dkv"}
  assert short == long
  assert max(short.values()) < 512 * 1024, short


def _lower(backend, dtype, b, length, heads, groups, d, **tile_kw):
  shapes = [jax.ShapeDtypeStruct((b, length, heads, d), dtype)] + [
      jax.ShapeDtypeStruct((b, length, groups, d), dtype)] * 2 + [
      jax.ShapeDtypeStruct((b, length), jnp.int32)] * 4

  def loss(q, k, v, *ranges):
    out = range_attention(q, k, v, ranges, backend=backend, **tile_kw)
    return jnp.sum(out.astype(jnp.float32))

  platform = "cuda" if backend == "gpu" else "tpu"
  return lowered_text(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), *shapes, platform=platform)


# The production shape (a 4k row with 512 noisy positions, GQA) in bf16 with the default
# tiles, and an odd small shape in f32 with the test tiles.
LOWER_CASES = [(jnp.bfloat16, (2, 4096 + 512, 4, 2, 64), {}),
               (jnp.float32, (1, 100, 2, 1, 24), dict(bq=16, bk=16))]


@pytest.mark.parametrize("backend,marker", [("gpu", "__gpu$xla.gpu.triton"),
                                            ("tpu", "tpu_custom_call")])
def test_cross_lowering(backend, marker):
  """Real Pallas -> Triton / Mosaic lowering of the forward and both backward kernels."""
  for dtype, shape, tile_kw in LOWER_CASES:
    txt = _lower(backend, dtype, *shape, **tile_kw)
    names = set(re.findall(r"range_attention_\w+", txt))
    assert {"range_attention_fwd", "range_attention_dq", "range_attention_dkv"} <= names
    assert marker in txt


def test_bad_arguments_are_named():
  q, k, v = qkv(0, 1, 8, 8, 2, 1, 4)
  ranges = window_ranges(1, 8, 4)
  with pytest.raises(ValueError, match="power of 2"):
    range_attention(q, k, v, ranges, backend="gpu", bq=24)
  with pytest.raises(ValueError, match="positive multiples of 8, got bq=12"):
    range_attention(q, k, v, ranges, backend="tpu", bq=12)
  with pytest.raises(ValueError, match="unknown tpu tile options"):
    range_attention(q, k, v, ranges, backend="tpu", num_warps=4)
  with pytest.raises(ValueError, match=r"4 arrays \[batch, q_len\]"):
    range_attention(q, k, v, ranges[:3], backend="xla")
  with pytest.raises(ValueError, match="backend 'cuda'"):
    range_attention(q, k, v, ranges, backend="cuda")


def test_package_is_independent_of_bltjax():
  root = pathlib.Path(kernels_pkg.__file__).parent
  for path in root.glob("*.py"):
    assert not re.search(r"^\s*(from|import)\s+bltjax", path.read_text(), re.M), path


# --- Bad or edge input: named, or computed like the reference -------------------------


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_ranges_outside_the_keys_mean_what_the_reference_means(variant):
  """A range past K ("every key") or below 0 is clipped to the keys: the kernels' padded
  key blocks (and a block index of -1) used to count as keys."""
  q, k, v = qkv(7, 1, 5, 10, 2, 2, 8)
  z = jnp.zeros((1, 5), jnp.int32)
  for ranges in ((z, jnp.full((1, 5), 20, jnp.int32), z, z),
                 (jnp.full((1, 5), -5, jnp.int32), jnp.full((1, 5), 3, jnp.int32), z,
                  jnp.full((1, 5), 99, jnp.int32))):
    kernel = lambda q, k, v: range_attention(q, k, v, ranges, interpret=True,
                                             **VARIANTS[variant])
    reference = lambda q, k, v: range_attention_reference(q, k, v, ranges)
    assert rel_err(kernel(q, k, v), reference(q, k, v)) < TOL_FWD[jnp.float32]
    loss = lambda f: lambda *a: jnp.sum(f(*a) ** 2)
    for got, want in zip(jax.grad(loss(kernel), (0, 1, 2))(q, k, v),
                         jax.grad(loss(reference), (0, 1, 2))(q, k, v)):
      assert rel_err(got, want) < TOL_GRAD[jnp.float32]


@pytest.mark.parametrize("shapes", [((1, 5, 2, 8), (1, 6, 2, 4)),    # head_dim differs
                                    ((2, 5, 2, 8), (1, 6, 2, 8)),    # batch differs
                                    ((1, 5, 3, 8), (1, 6, 2, 8))])   # heads % kv_heads
def test_q_and_kv_that_do_not_fit_are_named(shapes):
  q, k = jnp.zeros(shapes[0]), jnp.zeros(shapes[1])
  ranges = window_ranges(shapes[0][0], shapes[0][1], 4)
  with pytest.raises(ValueError, match=r"need q \[batch, q_len, heads, head_dim\] and k, v"):
    range_attention(q, k, k, ranges, backend="tpu", interpret=True)


def test_mixed_dtypes_empty_axes_and_cpu_options():
  q, k, v = qkv(3, 1, 6, 6, 2, 2, 16)
  ranges = window_ranges(1, 6, 3)
  mixed = range_attention(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), ranges,
                          interpret=True, **VARIANTS["gpu"])
  assert mixed.dtype == jnp.float32
  assert rel_err(mixed, range_attention_reference(q, k, v, ranges)) < TOL_FWD[jnp.bfloat16]
  # Triton's dot needs one element type: mixed inputs lower (they used to fail in Triton).
  assert lowered_text(jax.jit(lambda q, k, v: range_attention(q, k, v, ranges, bq=16, bk=16,
                                                              backend="gpu")),
                      q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), platform="cuda")
  no_keys = range_attention(q, k[:, :0], v[:, :0], ranges, interpret=True, **VARIANTS["tpu"])
  np.testing.assert_array_equal(no_keys, jnp.zeros_like(q))
  assert range_attention(q[:, :0], k, v, tuple(r[:, :0] for r in ranges), interpret=True,
                         **VARIANTS["tpu"]).shape == (1, 0, 2, 16)
  with pytest.raises(ValueError, match="TPU tiles bq and bk must be positive multiples of 8"):
    range_attention(q, k, v, ranges, backend="tpu", interpret=True, bq=0)
  # On this CPU the default backend is the jnp reference: interpret=True (a kernel test
  # that would test the reference) and a misspelled tile fail here, not first on a GPU.
  with pytest.raises(ValueError, match=r"interpret=True runs a Pallas kernel in interpret "
                     r"mode, but backend None runs the jnp reference on this platform"):
    range_attention(q, k, v, ranges, interpret=True)
  with pytest.raises(ValueError, match=r"unknown xla tile options \['bqq'\]"):
    range_attention(q, k, v, ranges, bqq=16)
