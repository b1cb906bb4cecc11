"""pallas_kernels.diffusion.cached_attention: a decoding step's attention over a KV
cache. Its reference equals the XLA specs generation runs (`generate.caches.CachedSpec`,
`CacheView`); the kernels equal the reference (interpret mode) and lower for Triton and
Mosaic."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax.generate import caches
from conftest import lowered_text, tpu_vmem_bytes
from pallas_kernels.diffusion import decode_attention as ca
from pallas_kernels.diffusion.reference import cached_attention_reference

B, H, G, D, S = 2, 4, 2, 16, 256
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-6))


def step(seed, t, lengths=(300, 37), n_valid=None, dtype=jnp.float32, history=60):
  """A decoding step: T new positions after `lengths`, a ring cache of S slots holding
  the last `history` positions of each row (slot p % S), -1 elsewhere."""
  rng = np.random.default_rng(seed)
  make = lambda *s: jnp.asarray(rng.normal(size=s), dtype)
  lengths = np.asarray(lengths)
  n_valid = np.full(B, t) if n_valid is None else np.asarray(n_valid)
  positions = jnp.asarray(lengths[:, None] + np.arange(t), jnp.int32)
  valid = jnp.asarray(np.arange(t)[None] < n_valid[:, None])
  slots = np.full((B, S), -1)
  for r in range(B):
    for p in range(max(0, lengths[r] - history), lengths[r]):
      slots[r, p % S] = p
  return dict(q=make(B, t, H, D), positions=positions, valid=valid,
              cache_k=make(B, G, S, D), cache_v=make(B, G, D, S),
              cache_positions=jnp.asarray(slots, jnp.int32), new_k=make(B, t, G, D),
              new_v=make(B, t, G, D), lengths=jnp.asarray(lengths, jnp.int32))


def kernel_out(x, backend, *, new, block, window, bk=64):
  kw = {}
  if new:
    kw = dict(new_k=x["new_k"], new_v=x["new_v"],
              new_positions=jnp.where(x["valid"], x["positions"], -1))
  if block:
    kw["block_start"] = x["lengths"]
  args = (x["q"], x["positions"], x["valid"], x["cache_k"], x["cache_v"],
          x["cache_positions"])
  if backend == "reference":
    return cached_attention_reference(*args, window=window, **kw)
  return ca.cached_attention(*args, window=window, backend=backend, interpret=True,
                             bk=bk if backend == "gpu" else 128, **kw)


CASES = [  # (T, new keys, BLT-D block, window, valid per row)
    (1, False, False, 0, None),      # an AR step (keys already stored: CacheView)
    (5, False, False, 40, (5, 3)),   # a BLT-S verification, ragged rows
    (8, True, True, 40, (8, 6)),     # a BLT-D block over the cache and itself
    (3, True, False, 0, (3, 0)),     # the global model's new patches; a row with none
]


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_equals_reference(backend, case, dtype):
  t, new, block, window, n_valid = case
  x = step(t, t, n_valid=n_valid, dtype=dtype)
  want = kernel_out(x, "reference", new=new, block=block, window=window)
  got = kernel_out(x, backend, new=new, block=block, window=window)
  assert got.shape == x["q"].shape and got.dtype == dtype
  assert rel_err(got, want) < TOL[dtype]
  invalid = ~np.asarray(x["valid"])
  np.testing.assert_array_equal(np.asarray(got, np.float32)[invalid], 0.0)


def test_kernel_never_reads_cache_blocks_without_a_filled_slot():
  """A global model's cache fills from slot 0 (row 0: slots 0..99, row 1: 0..36): every
  block past a row's last filled slot holds NaN, and the output stays exact, so the
  kernel never reads those blocks."""
  x = step(9, 3, lengths=(100, 37), history=200)
  want = kernel_out(x, "reference", new=True, block=False, window=0)
  for backend, bk in (("gpu", 64), ("tpu", 128)):
    first_unfilled = np.array([[128], [64]]) if bk == 64 else np.array([[128], [128]])
    poison = jnp.asarray(np.arange(S)[None] >= first_unfilled)            # [B, S]
    nan = dict(x, cache_k=jnp.where(poison[:, None, :, None], jnp.nan, x["cache_k"]),
               cache_v=jnp.where(poison[:, None, None, :], jnp.nan, x["cache_v"]))
    got = kernel_out(nan, backend, new=True, block=False, window=0, bk=bk)
    assert np.all(np.isfinite(np.asarray(got))), backend
    assert rel_err(got, want) < TOL[jnp.float32], backend


def test_tpu_kernel_holds_blocks_not_the_cache_in_vmem():
  """The cache stays in HBM and its blocks are copied in one at a time: the kernel's VMEM
  is the same for a 1k-slot and a 64k-slot cache (a global model's cache has a slot per
  byte of prompt and output)."""
  def vmem(size, t=8, d=128):
    arrays = dict(q=((B, t, H, d), jnp.bfloat16), qp=((B, t), jnp.int32), qv=((B, t), bool),
                  ck=((B, G, size, d), jnp.bfloat16), cv=((B, G, d, size), jnp.bfloat16),
                  cp=((B, size), jnp.int32))
    args = [jax.ShapeDtypeStruct(*a) for a in arrays.values()]
    return tpu_vmem_bytes(lambda *a: ca.cached_attention(*a, backend="tpu"), *args)

  small, large = vmem(1024), vmem(65536)
  assert set(small) == {"cached_attention"} and small == large
  assert small["cached_attention"] < 256 * 1024, small


@pytest.mark.parametrize("case", CASES)
def test_reference_equals_the_generation_specs(case):
  """The XLA specs of `generate.caches` on the same step: CachedSpec (reads the cache and
  the new keys) and, for cache-only steps, CacheView (the keys already stored)."""
  t, new, block, window, n_valid = case
  x = step(t + 10, t, n_valid=n_valid)
  want = kernel_out(x, "reference", new=new, block=block, window=window)
  if new:
    spec = caches.CachedSpec(x["cache_k"], x["cache_v"], x["cache_positions"],
                             x["positions"], x["valid"],
                             x["lengths"] if block else None, window=window)
    got = spec(x["q"], x["new_k"], x["new_v"])
  else:
    view = caches.CacheView(x["cache_k"], x["cache_v"], x["cache_positions"],
                            x["positions"], x["valid"], window=window)
    got = view(x["q"], None, None)
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("platform,backend", [("cuda", "gpu"), ("tpu", "tpu")])
def test_cross_lowering(platform, backend):
  b, h, g, d, size = 2, 8, 4, 64, 640   # a 512 window + slack, rounded to 128
  for t, new, block, dtype in ((1, False, False, jnp.bfloat16), (8, True, True, jnp.bfloat16),
                               (9, True, False, jnp.float32)):
    shapes = (jax.ShapeDtypeStruct((b, t, h, d), dtype), jax.ShapeDtypeStruct((b, t), jnp.int32),
              jax.ShapeDtypeStruct((b, t), bool), jax.ShapeDtypeStruct((b, g, size, d), dtype),
              jax.ShapeDtypeStruct((b, g, d, size), dtype),
              jax.ShapeDtypeStruct((b, size), jnp.int32),
              jax.ShapeDtypeStruct((b, t, g, d), dtype), jax.ShapeDtypeStruct((b, t, g, d), dtype),
              jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))

    def fn(q, qp, qv, ck, cv, cp, nk, nv, npos, start):
      kw = dict(new_k=nk, new_v=nv, new_positions=npos) if new else {}
      return ca.cached_attention(q, qp, qv, ck, cv, cp, window=512, backend=backend,
                                 block_start=start if block else None, **kw)

    text = lowered_text(jax.jit(fn), *shapes, platform=platform)
    assert re.search(r"cached_attention", text), (t, new, block)


def test_bad_arguments_are_named():
  x = step(0, 1)
  args = (x["q"], x["positions"], x["valid"], x["cache_k"], x["cache_v"],
          x["cache_positions"])
  with pytest.raises(ValueError, match="not a multiple of the key block"):
    ca.cached_attention(*args, backend="tpu", bk=96)
  with pytest.raises(ValueError, match="powers of 2 >= 16"):
    ca.cached_attention(x["q"][..., :8], *args[1:3], x["cache_k"][..., :8],
                        x["cache_v"][:, :, :8], args[5], backend="gpu")
  with pytest.raises(ValueError, match=r"cache_v .* must be \[batch, kv_heads, head_dim"):
    ca.cached_attention(*args[:4], x["cache_v"].swapaxes(2, 3), args[5], backend="gpu")
  # Shapes that do not fit are named, not read out of bounds (or with a head's KV group
  # clamped in interpret mode).
  q3 = jnp.zeros((B, 1, 3, D))
  for bad, message in [
      ((q3, *args[1:]), r"heads 3 must be a multiple of kv_heads"),
      ((*args[:3], x["cache_k"][..., :8], *args[4:]), r"cache_k .* must be \[batch, kv_heads, "
       r"size, head_dim\]"),
      ((*args[:5], args[5][:, :7]), r"cache_positions .* must be \[batch, size\]")]:
    with pytest.raises(ValueError, match=message):
      ca.cached_attention(*bad, backend="tpu", interpret=True)
  with pytest.raises(ValueError, match="new_k, new_v and new_positions come together; "
                     "new_v, new_positions missing"):
    ca.cached_attention(*args, new_k=x["new_k"], backend="tpu", interpret=True)
  # A scalar block_start is every row's.
  scalar = ca.cached_attention(*args, block_start=jnp.int32(300), backend="tpu",
                               interpret=True)
  rows = ca.cached_attention(*args, block_start=jnp.full((B,), 300, jnp.int32),
                             backend="tpu", interpret=True)
  np.testing.assert_array_equal(scalar, rows)
  assert caches.kernel_cache_size(544) == 640 and caches.kernel_cache_size(128) == 128
