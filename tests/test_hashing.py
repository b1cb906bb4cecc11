"""Hash n-gram ids: numpy and jax versions against an exact big-integer reference."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax import bytes as blt_bytes
from bltjax.model import hashing

# Written out again (not imported) so a typo in the module's list is caught.
REFERENCE_PRIMES = (
    1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899,
    9576890767, 3628273133, 2860486313, 5463458053, 3367900313)
SIZES = (3, 4, 5, 6, 7, 8)
PRIME_TABLE_SIZE = 1000003


def bigint_signed_hashes(tokens, ngram_sizes=SIZES, n_functions=1) -> np.ndarray:
  """Exact integers, then wrapped to signed 64 bits. object `[batch, seq, n_tables]`."""
  tokens = np.asarray(tokens)
  out = np.empty(tokens.shape + (n_functions * len(ngram_sizes),), dtype=object)
  for row_index, row in enumerate(tokens.tolist()):
    for f in range(n_functions):
      prime = REFERENCE_PRIMES[f % 11]
      for size_index, n in enumerate(ngram_sizes):
        powers = [prime**j for j in range(n)]
        padded = [0] * (n - 1) + row
        for t in range(len(row)):
          exact = sum(w * p for w, p in zip(padded[t:t + n], powers))
          out[row_index, t, f * len(ngram_sizes) + size_index] = (
              (exact + 2**63) % 2**64 - 2**63)
  return out


def bigint_ids(signed_hashes, table_size) -> np.ndarray:
  """Python's `%` (floor-mod) on the signed wrapped hashes."""
  return (signed_hashes % table_size).astype(np.int64)


@pytest.fixture(scope="module")
def random_tokens():
  return np.random.default_rng(0).integers(0, 260, size=(3, 3000)).astype(np.int32)


@pytest.fixture(scope="module")
def random_signed_hashes(random_tokens):
  return bigint_signed_hashes(random_tokens, n_functions=3)


def test_primes_match_reference():
  assert hashing.PRIMES == REFERENCE_PRIMES
  assert hashing.prime_for_function(11) == REFERENCE_PRIMES[0]


@pytest.mark.parametrize("table_size", [500002, 50002, PRIME_TABLE_SIZE, 2**24])
def test_numpy_and_jax_match_bigint(random_tokens, random_signed_hashes, table_size):
  expected = bigint_ids(random_signed_hashes, table_size)
  ids_numpy = hashing.hash_ngram_ids_numpy(
      random_tokens, table_size=table_size, n_functions=3)
  ids_jax = hashing.hash_ngram_ids(random_tokens, table_size=table_size, n_functions=3)
  assert ids_jax.dtype == jnp.int32 and ids_jax.shape == (3, 3000, 18)
  np.testing.assert_array_equal(ids_numpy, expected)
  np.testing.assert_array_equal(np.asarray(ids_jax), expected)
  if table_size == 500002:  # one function = the first len(SIZES) tables
    ids_one = hashing.hash_ngram_ids(random_tokens, table_size=table_size)
    np.testing.assert_array_equal(np.asarray(ids_one), expected[..., :6])
    np.testing.assert_array_equal(
        hashing.hash_ngram_ids_numpy(random_tokens, table_size=table_size),
        expected[..., :6])


def test_prime_table_size_is_prime():
  assert all(PRIME_TABLE_SIZE % d for d in range(2, int(PRIME_TABLE_SIZE**0.5) + 1))


def test_golden_values():
  """Computed once with `bigint_signed_hashes`; catches a change to all versions."""
  tokens = blt_bytes.encode("Byte Latent Transformer", add_eos=False)[None]  # [1, 24]
  golden_last = [  # V = 500002, 3 functions, last position
      50092, 133452, 159947, 66771, 191546, 466452,
      335564, 68080, 321485, 301327, 396522, 450112,
      467948, 52712, 133697, 448163, 64914, 296460]
  golden_first = [  # V = 500002, function 0, positions 0, 1, 2 (zero-padded windows)
      [443987, 437197, 123201, 166353, 34117, 172383],
      [460965, 407195, 333213, 469799, 133519, 381799],
      [394130, 215442, 254722, 355638, 102884, 67662]]
  golden_signed_last = [
      7319537314742696934, -5733473785566273600, 2109056674491113139,
      4044287252843369807, -3337025877456426080, 8020018247168635346]
  golden_last_2_24 = [7633894, 5169088, 3514035, 6198607, 15494048, 10695122]

  signed = bigint_signed_hashes(tokens, n_functions=3)
  assert signed[0, -1, :6].tolist() == golden_signed_last
  assert bigint_ids(signed, 500002)[0, -1].tolist() == golden_last
  for compute in (hashing.hash_ngram_ids_numpy, hashing.hash_ngram_ids):
    ids = np.asarray(compute(tokens, n_functions=3))
    assert ids[0, -1].tolist() == golden_last
    assert ids[0, :3, :6].tolist() == golden_first
    ids_2_24 = np.asarray(compute(tokens, table_size=2**24))
    assert ids_2_24[0, -1].tolist() == golden_last_2_24


def test_negative_wrapped_sums_are_exercised(random_signed_hashes):
  signed = random_signed_hashes
  negative = signed < 0
  assert negative.mean() > 0.4  # sizes >= 3 wrap: the sign is close to a coin flip
  for table_index in range(signed.shape[-1]):
    assert negative[..., table_index].mean() > 0.3
  floor_mod = bigint_ids(signed, 500002)
  unsigned_mod = ((signed + 2**64) % 2**64 % 500002).astype(np.int64)
  assert (floor_mod != unsigned_mod).mean() > 0.4


def test_jit_keeps_x64_disabled(random_tokens):
  assert not jax.config.jax_enable_x64
  tokens = jnp.asarray(random_tokens[:, :200])
  jitted = jax.jit(lambda t: hashing.hash_ngram_ids(t) + 1)
  np.testing.assert_array_equal(
      np.asarray(jitted(tokens)) - 1, hashing.hash_ngram_ids_numpy(random_tokens[:, :200]))
  jaxpr = str(jax.make_jaxpr(lambda t: hashing.hash_ngram_ids(t))(tokens))
  assert "i32[" in jaxpr and not re.search(r"\b[iuf]64\[", jaxpr)  # no 64-bit values
  assert not jax.config.jax_enable_x64


def test_newest_window_equals_full_sequence():
  """Generation: last max(n) tokens, zero-padded at the document start."""
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 260, size=(2, 40)).astype(np.int32)
  tokens[:, 0] = blt_bytes.BOS_ID
  full = hashing.hash_ngram_ids_numpy(tokens, n_functions=2)
  max_n = max(SIZES)
  padded = np.concatenate([np.zeros((2, max_n - 1), np.int32), tokens], axis=1)
  windows = np.stack([padded[:, t:t + max_n] for t in range(40)], axis=1)  # [2, 40, 8]
  newest = hashing.hash_newest_ngram_ids(windows, n_functions=2)  # [2, 40, 12]
  np.testing.assert_array_equal(np.asarray(newest), full)
  # The same through the full-sequence function on each window.
  window_ids = hashing.hash_ngram_ids(windows, n_functions=2)[..., -1, :]
  np.testing.assert_array_equal(np.asarray(window_ids), full)
  # A longer window is cut to the last max(n) tokens.
  longer = np.concatenate([np.full((2, 40, 3), 77, np.int32), windows], axis=-1)
  np.testing.assert_array_equal(
      np.asarray(hashing.hash_newest_ngram_ids(longer, n_functions=2)), full)
  with pytest.raises(ValueError, match="left-pad"):
    hashing.hash_newest_ngram_ids(windows[..., 1:])


def test_any_int32_token_and_extreme_table_sizes():
  """Negative and large ids sign-extend as in torch int64; V up to 2**31."""
  rng = np.random.default_rng(2)
  tokens = rng.integers(-2**31, 2**31, size=(2, 64), dtype=np.int64).astype(np.int32)
  tokens[0, :4] = [-1, 2**31 - 1, -2**31, 0]
  sizes = (1, 2, 8)
  signed = bigint_signed_hashes(tokens, ngram_sizes=sizes, n_functions=2)
  for table_size in (2**31 - 1, 2**31, 1):
    expected = bigint_ids(signed, table_size)
    for compute in (hashing.hash_ngram_ids_numpy, hashing.hash_ngram_ids):
      ids = compute(tokens, ngram_sizes=sizes, table_size=table_size, n_functions=2)
      np.testing.assert_array_equal(np.asarray(ids), expected)
  unsigned = np.abs(tokens).astype(np.uint32)
  expected = bigint_ids(
      bigint_signed_hashes(unsigned.astype(np.int64), ngram_sizes=sizes), 500002)
  np.testing.assert_array_equal(
      np.asarray(hashing.hash_ngram_ids(unsigned, ngram_sizes=sizes)), expected)


def test_signed_floor_mod_for_many_table_sizes():
  """The uint32 remainder plan, eagerly, on edge values of the signed 64-bit range."""
  rng = np.random.default_rng(3)
  values = [0, 1, -1, 2**63 - 1, -2**63, 2**62, -2**62, 2**32, -2**32 - 1]
  values += [int(v) for v in rng.integers(-2**63, 2**63, size=55, dtype=np.int64)]
  unsigned = [v % 2**64 for v in values]
  digits = [jnp.asarray(np.array([(u >> (8 * b)) & 0xFF for u in unsigned], np.uint32))
            for b in range(8)]
  table_sizes = [1, 2, 3, 255, 257, 2**16 - 1, 2**16 + 1, 50002, 500002, 999983,
                 2**24 - 3, 2**24, 2**24 + 1, 2**27 + 5, 2**30 + 3, 2**31 - 1, 2**31]
  table_sizes += [int(v) for v in rng.integers(1, 2**31, size=8)]
  for table_size in table_sizes:
    ids = np.asarray(hashing._signed_floor_mod(digits, table_size))
    assert ids.tolist() == [v % table_size for v in values], table_size


def test_fused_table_offsets_and_table_order():
  offsets = hashing.fused_table_offsets(SIZES, 500002, n_functions=2)
  assert offsets.dtype == np.int32
  assert offsets.tolist() == [k * 500002 for k in range(12)]
  assert hashing.table_index(1, 2, SIZES) == 8  # functions outer, sizes inner
  assert hashing.num_tables(SIZES, 2) == 12
  tokens = np.arange(4, 20, dtype=np.int32)[None]
  fused = hashing.hash_ngram_ids_numpy(tokens, n_functions=2) + offsets
  assert (fused // 500002 == np.arange(12)).all()  # table k lies in [k V, (k+1) V)
  with pytest.raises(ValueError, match="int32"):
    hashing.fused_table_offsets(SIZES, 2**24, n_functions=32)


def test_invalid_arguments():
  tokens = np.zeros((1, 4), np.int32)
  for kwargs in ({"table_size": 0}, {"table_size": 2**31 + 1}, {"ngram_sizes": ()},
                 {"ngram_sizes": (0, 3)}, {"ngram_sizes": (33,)}, {"n_functions": 0}):
    with pytest.raises(ValueError):
      hashing.hash_ngram_ids(tokens, **kwargs)
    with pytest.raises(ValueError):
      hashing.hash_ngram_ids_numpy(tokens, **kwargs)
  with pytest.raises(TypeError):
    hashing.hash_ngram_ids(np.zeros((1, 4), np.float32))
  with pytest.raises(TypeError):
    hashing.hash_ngram_ids_numpy(np.zeros((1, 4), np.float32))
