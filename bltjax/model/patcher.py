"""Patching: cut byte sequences into patches, on device, with a static patch count.

Conventions (the BLT reference): position 0 (BOS) is a patch alone and position 1
starts a patch; for t >= 1, byte t+1 starts a patch when a rule fires on byte t:
- entropy, global rule: H_t > threshold (H_t: entropy in nats of the entropy model's
  prediction of byte t+1);
- entropy, monotonic rule: H_t - H_{t-1} > threshold;
- space: byte t is the first of a run of non-word bytes (ASCII non-alphanumerics and
  UTF-8 lead bytes >= 0xC0) or a special id;
- static: every `patch_size` bytes after each forced start (no rule; the split below).
A patch longer than `max_patch_len` is split into chunks of that length (closed form:
a byte `k * max_patch_len` bytes after its patch's start opens a new patch). Patches
never cross documents: a new segment id, and the byte after a BOS, start patches.

Every rule reads only bytes <= t to decide whether byte t+1 starts a patch, so
boundaries are causal; this is what online patching in generation relies on. The
flags are computed for `len + 1` positions: the last one says whether the (not yet
seen) next byte would open a patch, which the decoder needs at the last position.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bltjax import bytes as blt_bytes

MODES = ("entropy", "static", "space")
RULES = ("global", "monotonic")


@dataclasses.dataclass(frozen=True)
class PatcherConfig:
  mode: str = "entropy"         # entropy | static | space
  threshold: float = 1.335442066192627  # nats (entropy mode)
  rule: str = "global"          # global | monotonic (entropy mode)
  max_patch_len: int = 0        # split longer patches; 0: no limit
  patch_size: int = 4           # static mode
  max_patches: int = 0          # static patch count P per row; 0: one per byte

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"patcher mode {self.mode!r} is not one of {MODES}")
    if self.rule not in RULES:
      raise ValueError(f"patcher rule {self.rule!r} is not one of {RULES}")
    if self.mode == "static" and self.patch_size < 1:
      raise ValueError(f"static patching needs patch_size >= 1, got {self.patch_size}")


class Patches(NamedTuple):
  """Patch layout of a batch of rows `[batch, len]` with at most P patches per row."""
  starts: jax.Array          # [batch, len + 1] bool: position t opens a patch
  patch_ids: jax.Array       # [batch, len] int32: patch of each byte (may be >= P)
  next_patch_ids: jax.Array  # [batch, len] int32: patch of byte t+1
  lengths: jax.Array         # [batch, P] int32: bytes per patch (0 for unused patches)
  num_patches: jax.Array     # [batch] int32: patches used (<= P)
  in_patches: jax.Array      # [batch, len] bool: byte lies in one of the first P patches


def entropies_from_logits(logits):
  """Entropy (nats) of each position's predicted distribution. `[..., V]` -> `[...]` f32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def _shift_right(x, fill):
  return jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)


def entropy_rule(entropies, *, threshold, rule: str = "global"):
  """`fires[t]`: byte t+1 starts a patch. entropies `[batch, len]` -> bool `[batch, len]`."""
  if rule == "global":
    return entropies > threshold
  return entropies - _shift_right(entropies, jnp.inf) > threshold


def space_rule(tokens):
  """`fires[t]` when byte t is the first of a run of non-word bytes or a special id."""
  b = tokens - blt_bytes.OFFSET
  is_digit = (b >= ord("0")) & (b <= ord("9"))
  is_upper = (b >= ord("A")) & (b <= ord("Z"))
  is_lower = (b >= ord("a")) & (b <= ord("z"))
  non_word = ~(is_digit | is_upper | is_lower) & ((b < 0x80) | (b >= 0xC0))
  first_of_run = non_word & ~_shift_right(non_word, False)
  return first_of_run | (tokens < blt_bytes.OFFSET)


def patch_starts(fires, tokens, segment_ids, *, max_patch_len: int = 0):
  """Start flags `[batch, len + 1]` from rule firings `[batch, len]` (see module doc)."""
  b, length = tokens.shape
  pos = jnp.arange(length + 1)
  starts = jnp.concatenate([jnp.zeros((b, 1), bool), fires], axis=1)  # start[t+1] = fires[t]
  starts |= (pos <= 1)[None]
  prev_token = jnp.concatenate([jnp.zeros((b, 1), tokens.dtype), tokens], axis=1)
  starts |= (prev_token == blt_bytes.BOS_ID) & (pos >= 1)[None]
  seg_ext = jnp.concatenate([segment_ids, segment_ids[:, -1:]], axis=1)
  starts |= seg_ext != _shift_right(seg_ext, -1)
  if max_patch_len:
    last_start = jax.lax.cummax(jnp.where(starts, pos[None], 0), axis=1)
    starts |= (pos[None] - last_start) % max_patch_len == 0
  return starts


def layout(starts, max_patches: int) -> Patches:
  """Patch ids, lengths and validity from start flags `[batch, len + 1]`."""
  length = starts.shape[1] - 1
  cum = jnp.cumsum(starts.astype(jnp.int32), axis=1) - 1  # patch id of each position
  patch_ids, next_patch_ids = cum[:, :-1], cum[:, 1:]
  p = max_patches or length
  in_patches = patch_ids < p
  one_hot_counts = jax.vmap(lambda ids, ok: jnp.zeros(p, jnp.int32).at[ids].add(
      ok.astype(jnp.int32), mode="drop"))
  lengths = one_hot_counts(patch_ids, in_patches)
  num_patches = jnp.minimum(patch_ids[:, -1] + 1, p)
  return Patches(starts, patch_ids, next_patch_ids, lengths, num_patches, in_patches)


def starts_for(config: PatcherConfig, tokens, segment_ids, entropies=None,
               forced_fires=None):
  """Start flags `[batch, len + 1]` under `config` (see `patch`)."""
  if config.mode == "entropy":
    if entropies is None:
      raise ValueError("entropy patching needs entropies from an entropy model")
    fires = entropy_rule(entropies, threshold=config.threshold, rule=config.rule)
  elif config.mode == "space":
    fires = space_rule(tokens)
  else:
    fires = jnp.zeros(tokens.shape, bool)
  if forced_fires is not None:
    fires = fires | forced_fires
  max_len = config.patch_size if config.mode == "static" else config.max_patch_len
  return patch_starts(fires, tokens, segment_ids, max_patch_len=max_len)


def patch(config: PatcherConfig, tokens, segment_ids, entropies=None,
          forced_fires=None) -> Patches:
  """tokens, segment_ids `[batch, len]` (+ entropies for mode "entropy") -> Patches.

  `forced_fires` `[batch, len]` bool: byte t+1 starts a patch wherever it is set
  (generation uses it to end a committed BLT-D block on a patch boundary)."""
  return layout(starts_for(config, tokens, segment_ids, entropies, forced_fires),
                config.max_patches)


def mean_patch_length(patches: Patches, valid):
  """Mean bytes per patch over valid bytes `[batch, len]` (a float scalar)."""
  n_bytes = jnp.sum(valid)
  n_patches = jnp.sum(patches.starts[:, :-1] & valid)
  return n_bytes / jnp.maximum(n_patches, 1)
