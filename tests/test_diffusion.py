"""BLT-D: anchors, corruption, masked loss, attention ranges and unmasking rules."""

import functools

import jax
import numpy as np
import pytest

from bltjax import bytes as blt_bytes
from bltjax import diffusion
from bltjax import losses
from bltjax.model import attention

MASK = blt_bytes.MASK_ID
V = blt_bytes.VOCAB_SIZE
# Jitted once per shape: far fewer compilations than op-by-op dispatch.
anchor_blocks = jax.jit(diffusion.anchor_blocks,
                        static_argnames=("block_size", "num_blocks", "min_offset"))
corrupt_blocks = jax.jit(diffusion.corrupt_blocks, static_argnames=("noise", "eps"))
attention_ranges = jax.jit(diffusion.bltd_attention_ranges,
                           static_argnames=("seq_len", "block_size", "window"))
masked_block_ce = jax.jit(losses.masked_block_ce, static_argnames=("elbo_weight",))
confidence_reveal = jax.jit(diffusion.confidence_reveal)
entropy_bounded_reveal = jax.jit(diffusion.entropy_bounded_reveal,
                                 static_argnames=("subtract_max",))


def _starts(length, positions):
  """Start flags `[1, length + 1]` with the given positions set."""
  flags = np.zeros((1, length + 1), bool)
  flags[0, positions] = True
  return flags


# ----------------------------------------------------------------------------- anchors


def test_few_anchors_are_exactly_the_patch_starts_from_position_two():
  length = 12
  starts = _starts(length, [0, 1, 3, 4, 7, 11, 12])  # 12 = len: the next byte, never an anchor
  blocks = anchor_blocks(starts, np.ones((1, length), np.int32), block_size=4,
                                   num_blocks=6, rng=jax.random.PRNGKey(0))
  assert blocks.anchors[0].tolist() == [3, 4, 7, 11, length, length]
  assert blocks.valid[0].tolist() == [True] * 4 + [False] * 2
  assert int(blocks.num_candidates[0]) == 4 and int(blocks.num_dropped[0]) == 0
  np.testing.assert_array_equal(blocks.positions[0, 2], [7, 8, 9, 10])
  # Blocks overlap (3..6 and 4..7) and are padded at the row's end (11 | 12 13 14).
  assert blocks.in_block[0, :4].tolist() == [[True] * 4, [True] * 4, [True] * 4,
                                             [True, False, False, False]]
  assert blocks.lengths[0].tolist() == [4, 4, 4, 1, 0, 0]
  assert not bool(blocks.in_block[0, 4:].any())
  # The block at patch i's start reads global output i - 1 (patch ids 0,1,2,3,4,5).
  assert blocks.context_patch[0, :4].tolist() == [1, 2, 3, 4]


def test_many_anchors_keep_a_sorted_random_subset_deterministic_per_rng():
  length, k = 40, 5
  candidates = list(range(2, length, 2))
  starts = _starts(length, [0, 1] + candidates)
  segments = np.ones((1, length), np.int32)
  choose = functools.partial(anchor_blocks, block_size=4, num_blocks=k)
  blocks = choose(starts, segments, rng=jax.random.PRNGKey(1))
  anchors = blocks.anchors[0].tolist()
  assert bool(blocks.valid.all()) and anchors == sorted(anchors) and len(set(anchors)) == k
  assert set(anchors) <= set(candidates)
  assert int(blocks.num_candidates[0]) == len(candidates)
  assert int(blocks.num_dropped[0]) == len(candidates) - k
  again = choose(starts, segments, rng=jax.random.PRNGKey(1))
  np.testing.assert_array_equal(again.anchors, blocks.anchors)
  # Over many keys every candidate is chosen about K / n of the time (uniform subset).
  many = jax.jit(jax.vmap(lambda r: choose(starts, segments, rng=r).anchors[0]))(
      jax.random.split(jax.random.PRNGKey(2), 400))
  counts = np.array([(np.asarray(many) == c).sum() for c in candidates])
  expected = 400 * k / len(candidates)  # 100, std ~ 8.7
  assert np.abs(counts - expected).max() < 35, counts


def test_blocks_stop_at_document_boundaries_and_skip_document_starts_and_padding():
  # doc 1: 0..6, doc 2: BOS at 7 .. 13, padding (segment 0) from 14.
  segments = np.array([[1] * 7 + [2] * 7 + [0] * 4], np.int32)
  length = segments.shape[1]
  starts = _starts(length, [0, 1, 5, 7, 8, 10, 14, 16])
  blocks = anchor_blocks(starts, segments, block_size=4, num_blocks=8,
                                   rng=jax.random.PRNGKey(0))
  # 7 (doc 2's BOS) and 8 (its first byte) are like positions 0 and 1; 14, 16 are padding.
  assert blocks.anchors[0, :3].tolist() == [5, 10, length]
  assert blocks.in_block[0, 0].tolist() == [True, True, False, False]  # 5, 6 | 7 is doc 2
  assert blocks.in_block[0, 1].tolist() == [True, True, True, True]    # 10..13
  assert blocks.lengths[0, :2].tolist() == [2, 4]
  # min_offset=1 lets the first byte of each document anchor a block.
  blocks = anchor_blocks(starts, segments, block_size=4, num_blocks=8,
                                   rng=jax.random.PRNGKey(0), min_offset=1)
  assert blocks.anchors[0, :4].tolist() == [1, 5, 8, 10]


def test_allowed_cuts_blocks_and_gather_fills_outside():
  length = 10
  starts = _starts(length, [0, 1, 3, 6])
  tokens = np.arange(100, 100 + length)[None]
  allowed = np.arange(length)[None] < 8  # e.g. the first P patches
  blocks = anchor_blocks(starts, np.ones((1, length), np.int32), block_size=4,
                                   num_blocks=3, rng=jax.random.PRNGKey(0), allowed=allowed)
  assert blocks.anchors[0].tolist() == [3, 6, length]
  clean = diffusion.gather_blocks(tokens, blocks)
  assert clean[0].tolist() == [[103, 104, 105, 106], [106, 107, 0, 0], [0, 0, 0, 0]]
  states = diffusion.gather_blocks(np.ones((1, length, 2), np.float32), blocks, fill=-1.0)
  assert states.shape == (1, 3, 4, 2) and float(states[0, 1, 2, 0]) == -1.0
  positions = diffusion.bltd_positions(blocks, length)
  assert positions.shape == (1, length + 12)
  assert positions[0, length:length + 4].tolist() == [3, 4, 5, 6]


# ----------------------------------------------------------------------------- corruption


def test_corruption_masks_only_block_bytes_with_probability_t():
  batch, k, b = 128, 8, 16
  in_block = np.arange(b)[None, None] < np.random.default_rng(0).integers(
      0, b + 1, (batch, k, 1))
  clean = np.full((batch, k, b), 50, np.int32)
  out = corrupt_blocks(clean, in_block, rng=jax.random.PRNGKey(1))
  is_masked, t = np.asarray(out.is_masked), np.asarray(out.t)
  assert not (is_masked & ~np.asarray(in_block)).any()
  np.testing.assert_array_equal(np.asarray(out.tokens), np.where(is_masked, MASK, 50))
  assert (t > 1e-3).all() and (t <= 1.0).all()
  np.testing.assert_array_equal(t, np.broadcast_to(t[:, :1], t.shape))  # per example
  # Masked fraction ~ t: the total and each row (~ 8 * 8 real bytes per row).
  n_real = np.asarray(in_block).sum(axis=(1, 2))
  expected = (t[:, 0] * n_real).sum()
  assert abs(is_masked.sum() - expected) < 4 * np.sqrt(expected), (is_masked.sum(), expected)
  frac = is_masked.sum(axis=(1, 2)) / np.maximum(n_real, 1)
  assert np.abs(frac - t[:, 0]).max() < 0.3


def test_per_block_noise_draws_t_per_block_and_is_deterministic():
  in_block = np.ones((4, 6, 8), bool)
  clean = np.full((4, 6, 8), 9, np.int32)
  out = corrupt_blocks(clean, in_block, rng=jax.random.PRNGKey(3), noise="per_block")
  t = np.asarray(out.t)
  assert all(len(np.unique(row)) == 6 for row in t)
  again = corrupt_blocks(clean, in_block, rng=jax.random.PRNGKey(3),
                                   noise="per_block")
  np.testing.assert_array_equal(again.is_masked, out.is_masked)
  with pytest.raises(ValueError, match="noise"):
    corrupt_blocks(clean, in_block, rng=jax.random.PRNGKey(3), noise="per_byte")


# ----------------------------------------------------------------------------- loss


def _loss_inputs():
  rng = np.random.default_rng(4)
  logits = (rng.normal(size=(2, 3, 4, V)) * 3.0).astype(np.float32)
  clean = rng.integers(blt_bytes.OFFSET, V, (2, 3, 4)).astype(np.int32)
  is_masked = rng.random((2, 3, 4)) < 0.5
  t = np.array([[0.5, 0.25, 1.0], [0.1, 0.8, 0.6]], np.float32)
  return logits, clean, is_masked, t


def test_masked_ce_counts_only_mask_positions_with_optional_elbo_weight():
  logits, clean, is_masked, t = _loss_inputs()
  out = masked_block_ce(logits, clean, is_masked, t)
  changed = np.where(is_masked[..., None], logits, 100.0 * logits + 7.0)
  again = masked_block_ce(changed, clean, is_masked, t)
  np.testing.assert_allclose(again.nats, out.nats, rtol=1e-6)
  assert float(again.correct) == float(out.correct)
  # Reference: CE over the ids without MASK, at masked positions.
  lg, cl, m, tt = map(np.asarray, (logits, clean, is_masked, t))
  lg = np.delete(lg.astype(np.float64), MASK, axis=-1)
  logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, (cl - (cl > MASK))[..., None], -1)[..., 0]
  assert float(out.count) == m.sum()
  np.testing.assert_allclose(out.mean, (ce * m).sum() / m.sum(), rtol=1e-5)
  elbo = masked_block_ce(logits, clean, is_masked, t, elbo_weight=True)
  np.testing.assert_allclose(elbo.nats, (ce * m / tt[..., None]).sum(), rtol=1e-5)
  none = masked_block_ce(logits, clean, np.zeros_like(is_masked), t)
  assert float(none.nats) == 0.0 and float(none.mean) == 0.0


def test_mask_logit_never_wins_and_gradients_are_finite():
  logits, clean, is_masked, t = _loss_inputs()
  huge = logits.copy()
  huge[..., MASK] = 1e4
  out = masked_block_ce(huge, clean, is_masked, t)
  np.testing.assert_allclose(out.nats, masked_block_ce(logits, clean, is_masked, t).nats,
                             rtol=1e-6)
  perfect = (np.arange(V) == clean[..., None]) * 50.0
  perfect[..., MASK] = 1e4
  assert float(masked_block_ce(perfect, clean, is_masked, t).accuracy) == 1.0
  grad = jax.jit(jax.grad(lambda x: losses.masked_block_ce(x, clean, is_masked, t).mean))(
      logits)
  assert np.isfinite(grad).all() and float(np.abs(grad[..., MASK]).max()) == 0.0


# ----------------------------------------------------------------------------- ranges


def _reference_mask(anchors, in_block, segments, window):
  """The BLT-D visibility rule written out per (query, key), in numpy."""
  batch, length = segments.shape
  _, k, b = in_block.shape
  total = length + k * b
  mask = np.zeros((batch, total, total), bool)
  for r in range(batch):
    seg = segments[r]
    for q in range(length):
      for key in range(length):
        mask[r, q, key] = (seg[key] == seg[q] and key <= q
                           and (window == 0 or q - key < window))
    for blk in range(k):
      s = anchors[r, blk]
      for j in range(b):
        if not in_block[r, blk, j]:
          continue
        q, p = length + blk * b + j, s + j
        for key in range(s):
          mask[r, q, key] = seg[key] == seg[s] and (window == 0 or p - key < window)
        for j2 in range(b):
          mask[r, q, length + blk * b + j2] = in_block[r, blk, j2]
  return mask


@pytest.mark.parametrize("window", [0, 5])
def test_ranges_match_the_rule_and_the_clean_rows_match_attention_mask(window):
  segments = np.array([[1] * 9 + [2] * 8 + [0] * 3, [1] * 20], np.int32)
  length, b, k = 20, 4, 5
  starts = np.isin(np.arange(length + 1), [0, 1, 3, 4, 8, 9, 10, 12, 14, 17])[None].repeat(2, 0)
  blocks = anchor_blocks(starts, segments, block_size=b, num_blocks=k,
                                   rng=jax.random.PRNGKey(0))
  ranges = attention_ranges(blocks.anchors, blocks.valid, segments, seq_len=length,
                            block_size=b, window=window)
  mask = np.asarray(jax.jit(diffusion.ranges_to_mask)(ranges))
  np.testing.assert_array_equal(mask, _reference_mask(
      np.asarray(blocks.anchors), np.asarray(blocks.in_block), np.asarray(segments), window))
  pos = np.arange(length)
  clean = jax.jit(attention.attention_mask, static_argnames=("window",))(
      pos[:, None], pos[None, :], segments[:, :, None], segments[:, None, :], window=window)
  np.testing.assert_array_equal(mask[:, :length, :length], clean)
  assert not mask[:, :length, length:].any()  # the clean copy never sees a noisy byte
  # Passing in_block gives the same ranges.
  same = attention_ranges(blocks.anchors, blocks.valid, segments, seq_len=length,
                                         block_size=b, window=window, in_block=blocks.in_block)
  for x, y in zip(same, ranges):
    np.testing.assert_array_equal(x, y)


def test_noisy_blocks_see_their_prefix_and_own_block_only():
  length, b, window = 24, 4, 6
  segments = np.ones((1, length), np.int32)
  anchors = np.array([[5, 6, 12, 22, length]], np.int32)
  valid = anchors < length
  ranges = attention_ranges(anchors, valid, segments, seq_len=length,
                                           block_size=b, window=window)
  mask = np.asarray(jax.jit(diffusion.ranges_to_mask)(ranges))[0]
  lengths = [4, 4, 4, 2, 0]
  for blk, s in enumerate(anchors[0].tolist()):
    rows = slice(length + blk * b, length + (blk + 1) * b)
    own = np.zeros(mask.shape[1], bool)
    own[length + blk * b: length + blk * b + lengths[blk]] = True
    for j in range(b):
      row = mask[rows][j]
      if j >= lengths[blk]:  # padding rows attend to nothing, and nothing attends to them
        assert not row.any() and not mask[:, length + blk * b + j].any()
        continue
      assert not row[s:length].any()                          # own clean bytes and after
      np.testing.assert_array_equal(row[length:], own[length:])  # own block, both ways
      p = s + j
      np.testing.assert_array_equal(np.flatnonzero(row[:length]),
                                    np.arange(max(0, p - window + 1), s))  # the window cut
  # Without a window the whole prefix is visible.
  ranges = attention_ranges(anchors, valid, segments, seq_len=length,
                                           block_size=b, window=0)
  assert ranges.a0[0, length:length + 3 * b + 2].tolist() == [0] * (3 * b + 2)


# ----------------------------------------------------------------------------- decoding


def _block_logits(confidences_order):
  """Logits `[1, B, V]` whose top probability decreases along `confidences_order`."""
  b = len(confidences_order)
  logits = np.zeros((1, b, blt_bytes.VOCAB_SIZE), np.float32)
  for rank, position in enumerate(confidences_order):
    logits[0, position, 10 + position] = 8.0 - rank
  logits[0, :, MASK] = 100.0  # must never be chosen
  return logits


def test_confidence_rule_reveals_one_per_step_in_confidence_order_above_all():
  order = [2, 0, 3, 1, 4]
  logits = _block_logits(order)
  still = np.ones((1, 5), bool)
  block = np.full((1, 5), MASK)
  revealed = []
  for _ in range(5):
    out = confidence_reveal(logits, still, alpha=1.01)
    assert int(out.reveal.sum()) == 1
    revealed.append(int(np.argmax(out.reveal[0])))
    block, still = diffusion.apply_reveal(block, still, out.reveal, out.tokens)
  assert revealed == order and not bool(still.any())
  assert block[0].tolist() == [10, 11, 12, 13, 14]
  # alpha = 0 reveals every masked position at once; alpha in between, the confident ones.
  partial = np.array([[True, True, False, True, True]])
  assert confidence_reveal(logits, partial, alpha=0.0).reveal.tolist() == [
      partial[0].tolist()]
  conf = confidence_reveal(logits, still | True, alpha=0.0).confidence[0]
  mid = float((conf[0] + conf[3]) / 2)  # between the 2nd and 3rd most confident
  assert confidence_reveal(logits, still | True, alpha=mid).reveal[0].tolist() == [
      True, False, True, False, False]
  assert not confidence_reveal(logits, still, alpha=0.0).reveal.any()  # none left


@pytest.mark.parametrize("entropies,masked,gamma,subtract_max,expected", [
    # sorted 0.1(1) 0.2(3) 0.3(2) 0.5(0): sum - max = 0, 0.1, 0.3, 0.6
    ([0.5, 0.1, 0.3, 0.2], [1, 1, 1, 1], 0.35, True, [0, 1, 1, 1]),
    ([0.5, 0.1, 0.3, 0.2], [1, 1, 1, 1], 0.05, True, [0, 1, 0, 0]),
    # position 1 already revealed: 0.2(3) 0.3(2) 0.5(0): sum - max = 0, 0.2, 0.5
    ([0.5, 0.1, 0.3, 0.2], [1, 0, 1, 1], 0.25, True, [0, 0, 1, 1]),
    # plain cumulative sums 0.1, 0.3, ...: only the first fits 0.25
    ([0.5, 0.1, 0.3, 0.2], [1, 1, 1, 1], 0.25, False, [0, 1, 0, 0]),
    # nothing fits: still the lowest-entropy one
    ([2.0, 3.0, 1.5, 4.0], [1, 1, 1, 1], 0.0, False, [0, 0, 1, 0]),
    ([2.0, 3.0, 1.5, 4.0], [1, 1, 1, 1], 0.0, True, [0, 0, 1, 0]),
    ([2.0, 3.0, 1.5, 4.0], [1, 0, 1, 0], float("inf"), True, [1, 0, 1, 0]),
    ([2.0, 3.0, 1.5, 4.0], [0, 0, 0, 0], float("inf"), True, [0, 0, 0, 0]),
])
def test_entropy_bounded_rule_on_hand_made_entropies(entropies, masked, gamma, subtract_max,
                                                     expected):
  reveal = entropy_bounded_reveal(
      np.array([entropies], np.float32), np.array([masked], bool), gamma=gamma,
      subtract_max=subtract_max)
  assert reveal[0].astype(int).tolist() == expected


def test_entropy_bounded_rule_is_jittable_with_traced_gamma_and_batched():
  rng = np.random.default_rng(9)
  entropies = (rng.random((16, 8)) * 2.0).astype(np.float32)
  still = rng.random((16, 8)) < 0.7
  still[:, 0] = True
  for gamma in (0.0, 0.5, 1e9):
    reveal = np.asarray(entropy_bounded_reveal(entropies, still, gamma=gamma))
    assert (reveal <= np.asarray(still)).all() and (reveal.sum(1) >= 1).all()
    for row in range(16):  # the definition, row by row
      h = np.sort(entropies[row][still[row]])
      k = max(1, int(np.sum(np.cumsum(h) - h <= gamma)))
      assert reveal[row].sum() == k
  logits = rng.normal(size=(2, 3, V)).astype(np.float32)
  logits[..., MASK] = 50.0
  h = jax.jit(diffusion.predictive_entropy)(logits)
  assert np.isfinite(h).all() and float(h.max()) <= np.log(blt_bytes.VOCAB_SIZE - 1)


def test_training_pipeline_jits_end_to_end():
  length, b, k = 32, 4, 6

  @jax.jit
  def pipeline(tokens, starts, segments, rng):
    r1, r2 = jax.random.split(rng)
    blocks = anchor_blocks(starts, segments, block_size=b, num_blocks=k, rng=r1)
    clean = diffusion.gather_blocks(tokens, blocks)
    noisy = corrupt_blocks(clean, blocks.in_block, rng=r2)
    ranges = attention_ranges(blocks.anchors, blocks.valid, segments,
                                             seq_len=length, block_size=b, window=8,
                                             in_block=blocks.in_block)
    return blocks, noisy, ranges

  tokens = np.arange(length)[None] + 4
  starts = (np.arange(length + 1) % 3 == 0)[None] | (np.arange(length + 1) == 1)[None]
  blocks, noisy, ranges = pipeline(tokens, starts, np.ones((1, length), np.int32),
                                   jax.random.PRNGKey(0))
  assert noisy.tokens.shape == (1, k, b) and ranges.a0.shape == (1, length + k * b)
  assert int(blocks.num_dropped[0]) == int(blocks.num_candidates[0]) - k > 0
  keep = np.asarray(~noisy.is_masked & blocks.in_block)
  np.testing.assert_array_equal(np.asarray(noisy.tokens)[keep],
                                np.asarray(blocks.positions)[keep] + 4)
