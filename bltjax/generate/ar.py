"""Cached autoregressive BLT decoding, and the slow uncached reference.

Per byte: entropy-model step, encoder byte step, and (when the patcher closes a patch)
encoder pooling plus one global step, then one decoder step (`Engine.extend` of one
byte). The whole loop runs on device in `lax.while_loop`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bltjax import bytes as blt_bytes
from bltjax.generate import sampling as sampling_lib
from bltjax.generate.engine import Engine, GenState
from bltjax.model import patcher as patcher_lib


def emit(out, count, done, tokens, max_bytes: int, n_valid=None):
  """Appends `tokens` `[B, T]` (the first `n_valid` `[B]` of each row, default all) to
  `out` `[B, max_bytes]`.

  Returns (out, count, done, n_kept): a row stops after EOS or at max_bytes."""
  width = tokens.shape[1]
  idx = jnp.arange(width)[None]
  n_valid = jnp.full((tokens.shape[0],), width) if n_valid is None else n_valid
  is_eos = (tokens == blt_bytes.EOS_ID) & (idx < n_valid[:, None])
  first_eos = jnp.min(jnp.where(is_eos, idx, width), axis=1)
  n_keep = jnp.minimum(first_eos + 1, n_valid)
  n_keep = jnp.where(done, 0, jnp.minimum(n_keep, max_bytes - count))
  rows = jnp.arange(tokens.shape[0])[:, None]
  at = jnp.where(idx < n_keep[:, None], count[:, None] + idx, max_bytes)
  out = out.at[rows, at].set(tokens, mode="drop")
  kept_eos = jnp.any(is_eos & (idx < n_keep[:, None]), axis=1)
  count = count + n_keep
  done = done | kept_eos | (count >= max_bytes)
  return out, count, done, n_keep


def generate(engine: Engine, params, state: GenState, logits, *, max_bytes: int,
             sampling: sampling_lib.SamplingConfig, rng):
  """AR decoding from a prefilled state (`logits` `[B, V]` after the prompt).

  Returns (state, out `[B, max_bytes]` ids, count `[B]`)."""
  batch = logits.shape[0]

  def cond(carry):
    return ~jnp.all(carry[4])

  def body(carry):
    state, logits, out, count, done = carry
    token = sampling_lib.choose(logits, state.length, rng, sampling)
    out, count, done, n_keep = emit(out, count, done, token[:, None], max_bytes)
    consume = jnp.where(done, 0, n_keep)
    state, logits = jax.lax.cond(
        jnp.any(consume > 0),
        lambda s: _last(engine.extend(params, s, token[:, None], consume)),
        lambda s: (s, logits), state)
    return state, logits, out, count, done

  out = jnp.zeros((batch, max_bytes), jnp.int32)
  zeros = jnp.zeros((batch,), jnp.int32)
  carry = (state, logits, out, zeros, jnp.zeros((batch,), bool))
  state, _, out, count, _ = jax.lax.while_loop(cond, body, carry)
  return state, out, count


def _last(result):
  state, logits = result
  return state, logits[:, -1]


def reference_greedy(blt_module, blt_params, patcher_config, entropy_fn, prompts, max_bytes):
  """Ground truth: re-runs the whole model on the whole prefix for every byte (slow).

  prompts: list of id arrays (BOS + bytes). `entropy_fn(tokens, segment_ids)` gives
  entropies for entropy patching (None otherwise). Returns a list of generated id lists.
  """
  rows = [list(p) for p in prompts]
  outputs = [[] for _ in rows]
  done = [False] * len(rows)
  # A fixed width (padding is causally invisible) compiles the forward once.
  width = max(len(r) for r in rows) + max_bytes
  config = dataclasses.replace(patcher_config, max_patches=width)

  @jax.jit
  def next_logits(params, tokens, lengths):
    segments = jnp.ones_like(tokens)   # one document per row: padding never cuts a patch
    entropies = entropy_fn(tokens, segments) if entropy_fn is not None else None
    patches = patcher_lib.patch(config, tokens, segments, entropies)
    logits = blt_module.apply({"params": params}, tokens, segments, patches)[0]
    return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

  for _ in range(max_bytes):
    if all(done):
      break
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
      tokens[i, :len(r)] = r
    lengths = np.array([len(r) for r in rows], np.int32)
    logits = next_logits(blt_params, jnp.asarray(tokens), jnp.asarray(lengths))
    for i, r in enumerate(rows):
      if done[i]:
        continue
      token = int(jnp.argmax(sampling_lib.output_logits(logits[i])))
      outputs[i].append(token)
      r.append(token)
      done[i] = token == blt_bytes.EOS_ID
  return outputs
