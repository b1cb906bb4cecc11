"""Hash n-gram ids of the BLT local encoder, bit-exact with the reference.

The reference (facebookresearch/blt `bytelatent/model/blt.py`
`byte_group_hash_function` / `rolling_polynomial_hash`, and the transformers port
`models/blt/modeling_blt.py` `compute_hash_embeddings`) computes, for n-gram size
`n`, position `t` and hash function `f`:

    window = x[t-n+1 .. t]          (oldest first; left-padded with token id 0)
    h      = sum_{j<n} window[j] * prime_f**j     in torch int64, wrapping
    id     = h % V                  (torch `%`: floor-mod of the SIGNED value)

with `prime_f = PRIMES[f % 11]` (the original indexes `primes[f]`, the same for
f < 11). The newest token gets the highest power. `prime**j` itself wraps for
j >= 3, and about half of the wrapped sums are negative (49.9% on random byte ids),
so neither exact big-integer arithmetic nor an unsigned remainder gives the
reference ids. Checked against facebookresearch/blt 3ada01f and transformers
modeling_blt.py 015e687 (both read, not run: tests compare with an exact big-integer
transcription).

Tables are ordered functions-outer, sizes-inner: table `f * len(ngram_sizes) + i`
holds size `ngram_sizes[i]` of function `f`. The transformers port stores all tables
in one fused embedding of `n_tables * V` rows, table `k` at rows `[k * V, (k+1) * V)`
(see `fused_table_offsets`).

How the jax version stays exact without `jax_enable_x64` (`hash_ngram_ids`):

* A token (int32, sign-extended to 64 bits as torch does) is split exactly as
  `x = low + 2**16 * high`, `low = x & 0xffff` in [0, 2**16), `high = x >> 16`
  (arithmetic) in [-2**15, 2**15). A 64-bit constant `c = prime**j mod 2**64` is
  split into bytes `c = sum_b d_b 2**(8 b)`. Then, mod 2**64,
  `x * c = sum_b (low * d_b + high * d_{b-2}) 2**(8 b)`: each product is below
  2**24 in magnitude, so the 8 byte columns of `h = sum_j window[j] * c_j` are plain
  int32 sums of products with no carries (|column| < 2 * 2**24 * n <= 2**30 for
  n <= MAX_NGRAM_SIZE = 32). The sum is linear, so no product has to be split.
* One carry pass over the byte columns (`v & 0xff`, arithmetic `v >> 8`) gives the
  wrapped value `U = h mod 2**64` as 8 exact bytes; the carry out of the top byte
  is the discarded multiple of 2**64.
* The signed floor-mod: `s = U - 2**64 [U >= 2**63]`, so `s mod V = (sum_i chunk_i
  (2**lo_i mod V) + [U >= 2**63] ((-2**64) mod V)) mod V` over chunks of U's bits.
  The terms are summed in uint32 with a `% V` only where the next term could
  overflow 2**32 (`remainder_plan`): one remainder for V = 500002, none for
  V = 2**24, any `1 <= V <= 2**31` works.

Only elementwise uint32/int32 ops, static slices and integer remainders by
constants: it lowers the same way on CPU, GPU and TPU.

Generation. The id for position `t` depends only on `x[t-max(n)+1 .. t]` (tokens
before the start of the sequence count as 0). So for the newest byte it suffices to
hash a window of the last `max(n)` tokens, left-padded with 0 at the start of a
document, and keep its last position (`hash_newest_ngram_ids`): for `t >= M - 1`
(M = max(n)) the window is exactly `x[t-M+1 .. t]`, and for `t < M - 1` the padded
window is `[0] * (M-1-t) + x[0 .. t]`, whose leading zeros play the role of the
reference's left padding (a zero token contributes 0 to every sum). Each size n <= M
reads only the last n entries of the window, so all sizes agree with the
full-sequence result (tested in tests/test_hashing.py).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PRIMES = (
    1000000007,
    5915587277,
    1500450271,
    3267000013,
    5754853343,
    4093082899,
    9576890767,
    3628273133,
    2860486313,
    5463458053,
    3367900313,
)
DEFAULT_NGRAM_SIZES = (3, 4, 5, 6, 7, 8)
DEFAULT_TABLE_SIZE = 500002  # encoder_hash_byte_group_vocab of the released models
MAX_TABLE_SIZE = 2**31  # ids are int32; the remainder plan needs V - 1 + V - 1 < 2**32
MAX_NGRAM_SIZE = 32  # keeps the int32 byte columns of `hash_ngram_ids` exact

_MASK64 = (1 << 64) - 1
_DIGIT_BITS = 8  # the 64-bit values are held as 8 bytes (digits)
_DIGIT_MASK = (1 << _DIGIT_BITS) - 1
_NUM_DIGITS = 8
_CHUNK_MAX_BITS = 16


def prime_for_function(function_index: int) -> int:
  """The prime of hash function `function_index` (the list cycles every 11)."""
  return PRIMES[function_index % len(PRIMES)]


def num_tables(ngram_sizes: Sequence[int] = DEFAULT_NGRAM_SIZES, n_functions: int = 1) -> int:
  return n_functions * len(ngram_sizes)


def table_index(function_index: int, size_index: int, ngram_sizes: Sequence[int]) -> int:
  """Table of (hash function, position in `ngram_sizes`): functions outer, sizes inner."""
  return function_index * len(ngram_sizes) + size_index


def fused_table_offsets(
    ngram_sizes: Sequence[int] = DEFAULT_NGRAM_SIZES, table_size: int = DEFAULT_TABLE_SIZE,
    n_functions: int = 1) -> np.ndarray:
  """First row of each table in a fused `[n_tables * table_size, d]` embedding.

  Table k occupies rows `[k * table_size, (k + 1) * table_size)` (the transformers
  layout, `hash_ids + embedding_idx * encoder_hash_byte_group_vocab`). Add the result
  to `hash_ngram_ids(...)` (it broadcasts over the last axis) to get fused row ids.

  Returns:
    int32 `[n_tables]`.

  Raises:
    ValueError: when a fused row id would not fit in int32.
  """
  ngram_sizes, table_size, n_functions = _check_args(ngram_sizes, table_size, n_functions)
  n_tables = num_tables(ngram_sizes, n_functions)
  if n_tables * table_size > 2**31:
    raise ValueError(
        f"a fused table of {n_tables} x {table_size} rows has ids beyond int32; "
        "use separate tables or a smaller table_size")
  return np.arange(n_tables, dtype=np.int32) * np.int32(table_size)


def _check_args(ngram_sizes, table_size, n_functions) -> tuple[tuple[int, ...], int, int]:
  """Validates and normalizes the static arguments (hashable for jit)."""
  ngram_sizes = tuple(int(n) for n in ngram_sizes)
  if not ngram_sizes or min(ngram_sizes) < 1 or max(ngram_sizes) > MAX_NGRAM_SIZE:
    raise ValueError(
        f"ngram_sizes must be a non-empty list of sizes in [1, {MAX_NGRAM_SIZE}], "
        f"got {ngram_sizes}")
  table_size = int(table_size)
  if not 1 <= table_size <= MAX_TABLE_SIZE:
    raise ValueError(
        f"table_size must be in [1, 2**31] (ids are int32 and the exact remainder "
        f"works on uint32), got {table_size}")
  n_functions = int(n_functions)
  if n_functions < 1:
    raise ValueError(f"n_functions must be >= 1, got {n_functions}")
  return ngram_sizes, table_size, n_functions


def _to_signed64(value: int) -> int:
  value &= _MASK64
  return value - (1 << 64) if value >> 63 else value


def prime_powers_int64(prime: int, count: int) -> np.ndarray:
  """`prime**j` for j < count with int64 wrap-around, as torch computes them. `[count]`."""
  return np.array([_to_signed64(pow(prime, j, 1 << 64)) for j in range(count)], np.int64)


def hash_ngram_ids_numpy(
    tokens, *, ngram_sizes: Sequence[int] = DEFAULT_NGRAM_SIZES,
    table_size: int = DEFAULT_TABLE_SIZE, n_functions: int = 1) -> np.ndarray:
  """The readable reference: numpy int64 with wrap-around, then floor-mod.

  Args:
    tokens: integer token ids `[..., seq]` (usually `[batch, seq]`).
    ngram_sizes: n-gram sizes, in table order.
    table_size: V, rows per table.
    n_functions: number of hash functions (primes).

  Returns:
    int32 `[..., seq, n_functions * len(ngram_sizes)]`, values in [0, table_size).
  """
  ngram_sizes, table_size, n_functions = _check_args(ngram_sizes, table_size, n_functions)
  tokens = np.asarray(tokens)
  if not np.issubdtype(tokens.dtype, np.integer) or tokens.ndim < 1:
    raise TypeError(f"tokens must be integer ids [..., seq], got {tokens.dtype}{tokens.shape}")
  tokens = tokens.astype(np.int64)
  seq = tokens.shape[-1]
  max_n = max(ngram_sizes)
  padded = np.concatenate(
      [np.zeros(tokens.shape[:-1] + (max_n - 1,), np.int64), tokens], axis=-1)
  ids = []
  with np.errstate(over="ignore"):
    for f in range(n_functions):
      powers = prime_powers_int64(prime_for_function(f), max_n)
      for n in ngram_sizes:
        hashes = np.zeros(tokens.shape, np.int64)
        for j in range(n):  # window[j] = x[t - n + 1 + j]
          start = max_n - n + j
          hashes += padded[..., start:start + seq] * powers[j]
        ids.append(np.remainder(hashes, np.int64(table_size)))  # floor-mod, like torch `%`
  return np.stack(ids, axis=-1).astype(np.int32)


def _add(total, term):
  """`total + term`, where None stands for zero."""
  if total is None or term is None:
    return term if total is None else total
  return total + term


def _constant_bytes(constant: int) -> list[int]:
  """The 8 bytes of a 64-bit constant, least significant first."""
  return [(constant >> (_DIGIT_BITS * b)) & _DIGIT_MASK for b in range(_NUM_DIGITS)]


def _wrapped_bytes(columns, shape) -> list:
  """int32 byte columns (|column| <= 2**30) -> 8 uint32 bytes of their sum mod 2**64.

  `columns[b]` (or None for zero) has weight 2**(8 b); the result is the unique
  `U = sum_b byte_b 2**(8 b)` in [0, 2**64) congruent to the sum mod 2**64.
  """
  result = []
  carry = None
  for column in columns:
    value = _add(carry, column)
    if value is None:
      value = jnp.zeros(shape, jnp.int32)
    result.append((value & np.int32(_DIGIT_MASK)).astype(jnp.uint32))
    carry = value >> np.int32(_DIGIT_BITS)  # arithmetic: floor(value / 256)
  return result


def _bits(digits, lo_bit: int, hi_bit: int):
  """Bits [lo_bit, hi_bit) of the value with uint32 bytes `digits`, as uint32 `[...]`."""
  chunk = None
  for d, digit in enumerate(digits):
    digit_lo, digit_hi = _DIGIT_BITS * d, _DIGIT_BITS * (d + 1)
    take_lo, take_hi = max(digit_lo, lo_bit), min(digit_hi, hi_bit)
    if take_lo >= take_hi:
      continue
    piece = digit
    if take_lo > digit_lo:
      piece = piece >> np.uint32(take_lo - digit_lo)
    if take_hi < digit_hi:
      piece = piece & np.uint32((1 << (take_hi - take_lo)) - 1)
    if take_lo > lo_bit:
      piece = piece << np.uint32(take_lo - lo_bit)
    chunk = piece if chunk is None else chunk | piece
  return chunk


@functools.lru_cache(maxsize=None)
def remainder_plan(table_size: int) -> tuple[int, tuple[tuple[int, int, bool], ...], bool]:
  """How `_signed_floor_mod` reduces a signed 64-bit value mod V in uint32.

  The value is `s = U - 2**64 [U >= 2**63]` with `U = sum_i chunk_i 2**lo_i`, so
  `s mod V = (sum_i chunk_i (2**lo_i mod V) + [U >= 2**63] ((-2**64) mod V)) mod V`.
  The terms are summed in uint32; an intermediate `% V` is inserted only when the
  next term could overflow 2**32. The chunk width is chosen for the lowest
  cost, counting a remainder as 4 multiply-adds (V = 500002: 13-bit chunks, one
  remainder; V = 2**24: no remainder at all).

  Returns:
    (chunk_bits, steps, final_remainder): steps are `(lo_bit, hi_bit,
    reduce_first)`, `lo_bit == hi_bit == -1` marking the sign term;
    `final_remainder` says whether the sum can reach V.
  """
  best = None
  for chunk_bits in range(1, _CHUNK_MAX_BITS + 1):
    terms = [(-1, -1, (-(1 << 64)) % table_size, 1)]  # the sign term: 0 or 1 times K
    for lo_bit in range(0, 64, chunk_bits):
      hi_bit = min(lo_bit + chunk_bits, 64)
      weight = pow(2, lo_bit, table_size)
      terms.append((lo_bit, hi_bit, weight, (1 << (hi_bit - lo_bit)) - 1))
    steps, bound, n_remainders, ok = [], 0, 0, True
    for lo_bit, hi_bit, weight, max_chunk in terms:
      term_bound = weight * max_chunk
      if term_bound == 0:
        continue
      reduce_first = bound + term_bound >= 1 << 32
      if reduce_first:
        n_remainders += 1
        bound = table_size - 1
        if bound + term_bound >= 1 << 32:
          ok = False
          break
      steps.append((lo_bit, hi_bit, reduce_first))
      bound += term_bound
    if not ok:
      continue
    final_remainder = bound >= table_size
    n_remainders += final_remainder
    cost = (4 * n_remainders + len(steps), n_remainders)  # a remainder ~ 4 multiply-adds
    if best is None or cost < best[0]:
      best = (cost, chunk_bits, tuple(steps), final_remainder)
  if best is None:
    raise ValueError(f"no exact uint32 remainder plan for table_size {table_size}")
  return best[1:]


def _signed_floor_mod(digits, table_size: int):
  """Floor-mod by V of the signed 64-bit value with uint32 bytes `digits`. int32 `[...]`."""
  _, steps, final_remainder = remainder_plan(table_size)
  divisor = np.uint32(table_size)
  total = None
  for lo_bit, hi_bit, reduce_first in steps:
    if lo_bit < 0:  # s = U - 2**64 when U >= 2**63
      negative = (digits[-1] >> np.uint32(_DIGIT_BITS - 1)) != 0
      term = jnp.where(negative, np.uint32((-(1 << 64)) % table_size), np.uint32(0))
    else:
      term = _bits(digits, lo_bit, hi_bit)
      weight = pow(2, lo_bit, table_size)
      if weight != 1:
        term = term * np.uint32(weight)
    if reduce_first:
      total = total % divisor
    total = _add(total, term)
  if total is None:  # V == 1
    return jnp.zeros(digits[0].shape, jnp.int32)
  if final_remainder:
    total = total % divisor
  return jax.lax.bitcast_convert_type(total, jnp.int32)  # < V <= 2**31


@functools.partial(
    jax.jit, static_argnames=("ngram_sizes", "table_size", "n_functions", "newest_only"))
def _hash_ngram_ids_jit(tokens, ngram_sizes, table_size, n_functions, newest_only=False):
  """`hash_ngram_ids` on checked arguments; `newest_only` keeps the last position."""
  if jnp.issubdtype(tokens.dtype, jnp.unsignedinteger):
    tokens = tokens.astype(jnp.uint32)
    low = (tokens & np.uint32(0xFFFF)).astype(jnp.int32)
    high = (tokens >> np.uint32(16)).astype(jnp.int32)  # in [0, 2**16)
  else:
    tokens = tokens.astype(jnp.int32)
    low = tokens & np.int32(0xFFFF)
    high = tokens >> np.int32(16)  # arithmetic: in [-2**15, 2**15)
  max_n = max(ngram_sizes)
  seq = tokens.shape[-1]
  first_output = seq - 1 if newest_only else 0
  pad = [(0, 0)] * (tokens.ndim - 1) + [(max_n - 1, 0)]
  low, high = jnp.pad(low, pad), jnp.pad(high, pad)  # token 0 before the start
  out_shape = tokens.shape[:-1] + (seq - first_output,)
  # The hash functions run side by side on a leading axis: [n_functions, ..., out].
  power_bytes = np.array([
      [_constant_bytes(pow(prime_for_function(f), j, 1 << 64)) for j in range(max_n)]
      for f in range(n_functions)
  ], np.int32).reshape((n_functions, max_n, _NUM_DIGITS) + (1,) * tokens.ndim)
  ids = []
  for n in ngram_sizes:
    columns = [None] * _NUM_DIGITS
    for j in range(n):  # window[j] = x[t - n + 1 + j], at padded index t + max_n - n + j
      start = max_n - n + j + first_output
      low_j = low[..., start:start + out_shape[-1]]
      high_j = high[..., start:start + out_shape[-1]]
      for b in range(_NUM_DIGITS):
        if power_bytes[:, j, b].any():
          columns[b] = _add(columns[b], low_j * power_bytes[:, j, b])
        if b >= 2 and power_bytes[:, j, b - 2].any():  # high has weight 2**16: 2 bytes
          columns[b] = _add(columns[b], high_j * power_bytes[:, j, b - 2])
    bytes_ = _wrapped_bytes(columns, (n_functions,) + out_shape)
    ids.append(_signed_floor_mod(bytes_, table_size))  # [n_functions, ..., out]
  # Table f * n_sizes + i. (Stacking slices beats moving the function axis on XLA:CPU.)
  return jnp.stack([ids_n[f] for f in range(n_functions) for ids_n in ids], axis=-1)


def hash_ngram_ids(
    tokens: jax.Array, *, ngram_sizes: Sequence[int] = DEFAULT_NGRAM_SIZES,
    table_size: int = DEFAULT_TABLE_SIZE, n_functions: int = 1) -> jax.Array:
  """Reference hash n-gram ids, exact, with 32-bit jax ops only (no x64).

  Works inside jit (all arguments but `tokens` are static). Token ids may be any
  int32 (negative ones are sign-extended to int64, as torch does) or unsigned
  integers; in practice they are byte ids in [0, 260).

  Args:
    tokens: integer token ids `[..., seq]` (usually `[batch, seq]`).
    ngram_sizes: n-gram sizes, in table order.
    table_size: V, rows per table, 1 <= V <= 2**31.
    n_functions: number of hash functions; function f uses `PRIMES[f % 11]`.

  Returns:
    int32 `[..., seq, n_functions * len(ngram_sizes)]` in [0, table_size); the last
    axis is the table index `f * len(ngram_sizes) + size_index`.

  Raises:
    ValueError: bad sizes, or table_size outside [1, 2**31].
  """
  ngram_sizes, table_size, n_functions = _check_args(ngram_sizes, table_size, n_functions)
  tokens = jnp.asarray(tokens)
  if not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.ndim < 1:
    raise TypeError(f"tokens must be integer ids [..., seq], got {tokens.dtype}{tokens.shape}")
  return _hash_ngram_ids_jit(tokens, ngram_sizes, table_size, n_functions)


def hash_newest_ngram_ids(
    window: jax.Array, *, ngram_sizes: Sequence[int] = DEFAULT_NGRAM_SIZES,
    table_size: int = DEFAULT_TABLE_SIZE, n_functions: int = 1) -> jax.Array:
  """Ids of the newest token from a window of the last max(n) tokens (generation).

  Args:
    window: integer token ids `[..., w]`, w >= max(ngram_sizes), newest last; at the
      start of a document, left-pad it with 0 (PAD/BOE), as the reference pads.

  Returns:
    int32 `[..., n_functions * len(ngram_sizes)]`, equal to
    `hash_ngram_ids(full_sequence)[..., t, :]` for the newest position t (see the
    module docstring).
  """
  ngram_sizes, table_size, n_functions = _check_args(ngram_sizes, table_size, n_functions)
  window = jnp.asarray(window)
  if not jnp.issubdtype(window.dtype, jnp.integer) or window.ndim < 1:
    raise TypeError(f"window must be integer ids [..., w], got {window.dtype}{window.shape}")
  max_n = max(ngram_sizes)
  if window.shape[-1] < max_n:
    raise ValueError(
        f"the window has {window.shape[-1]} tokens, fewer than max(ngram_sizes) = {max_n}; "
        "left-pad it with 0")
  ids = _hash_ngram_ids_jit(
      window[..., -max_n:], ngram_sizes, table_size, n_functions, newest_only=True)
  return ids[..., 0, :]
