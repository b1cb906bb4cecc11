"""Where a decoding step's time goes: each piece of `Engine.extend` timed alone.

Prefills one held-out prompt, then times (jitted alone, fastest of --repeats calls) the
entropy-model step, the encoder byte step, the decoder step, the global model over 1, 2,
3 and 8 patches, and whole extensions of 1 and 8 bytes and one BLT-D block step. This is
the profile behind the gap between the speedups the traffic estimate predicts and the
measured ones (`bench/generation.py`): on CPU a call's cost is not just its weight bytes.

  python bench/generation_profile.py --workdir runs/bench/bltd8
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bltjax  # noqa: E402
from bench import common  # noqa: E402
from bltjax import bytes as blt_bytes  # noqa: E402
from bltjax.model import entropy_model as entropy_lib  # noqa: E402

PROMPT = ("def read(path):\n    with open(path, encoding='utf-8') as f:\n"
          "        return f.read()\n")


def pieces(engine, batch: int):
  """name -> fn(params, state): each piece of a decoding step on `batch` rows."""
  one = jnp.ones((batch, 1), bool)
  token = jnp.full((batch, 1), blt_bytes.OFFSET + ord("x"), jnp.int32)
  block = jnp.full((batch, 8), blt_bytes.OFFSET + ord("x"), jnp.int32)
  bound = lambda p: engine.blt.bind({"params": p["blt"]})

  def entropy(p, s):
    specs = s.entropy_cache.specs(s.length[:, None], one, window=engine.entropy_config.window)
    return engine.entropy_model.apply({"params": p["entropy"]}, token, s.length[:, None],
                                      specs, method=entropy_lib.EntropyModel.forward)

  def encoder(p, s):
    return engine.encode_bytes(bound(p), s.tokens, token, s.length[:, None], one,
                               s.encoder_cache)

  def decoder(p, s):
    states = jnp.zeros((batch, 1, engine.config.d_local), jnp.float32)
    return engine.decode_bytes(bound(p), states, s.length[:, None], one,
                               jnp.zeros((batch, 1), jnp.int32), s)

  def global_model(n):
    def fn(p, s):
      ids = s.num_patches[:, None] + jnp.arange(n)
      vectors = jnp.zeros((batch, n, engine.config.cross_attn_k * engine.config.d_local))
      specs = s.global_cache.specs(ids, jnp.ones((batch, n), bool), window=0)
      return bound(p).global_model(vectors, jnp.ones_like(ids), ids, specs)
    return fn

  out = {}
  if engine.entropy_model is not None:
    out["entropy model, 1 byte"] = entropy
  out["encoder byte layers, 1 byte"] = encoder
  out["decoder, 1 byte"] = decoder
  for n in (1, 2, 3, 8):
    out[f"global model, {n} patch{'es' if n > 1 else ''}"] = global_model(n)
  out["extend, 1 byte (AR step)"] = lambda p, s: engine.extend(
      p, s, token, jnp.ones((batch,), jnp.int32))
  out["extend, 8 bytes (BLT-D commit, BLT-S verify)"] = lambda p, s: engine.extend(
      p, s, block, jnp.full((batch,), 8, jnp.int32))
  out["BLT-D block step, 8 bytes"] = lambda p, s: engine.block_step(p, s, block)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a trained BLT workdir")
  parser.add_argument("--batch_sizes", type=common.batch_sizes, default="1,8")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--no_append", action="store_true")
  args = parser.parse_args(argv)

  model = bltjax.load(args.workdir)
  prompt = blt_bytes.encode(PROMPT, add_bos=True, add_eos=False)
  config = model.decode_config("ar", 64)
  engine = model.engine(len(prompt), config)
  params = engine.layout_params({"blt": model.params, "entropy": model.frozen})
  batches = args.batch_sizes
  times = {}
  for batch in batches:
    ids = np.tile(np.asarray(prompt, np.int32), (batch, 1))
    state = engine.init_state(batch)
    state, _ = jax.jit(engine.prefill)(params, state, ids, np.full((batch,), len(prompt),
                                                                   np.int32))
    for name, fn in pieces(engine, batch).items():
      best = common.fastest(jax.jit(fn), params, state, repeats=args.repeats)
      times.setdefault(name, {})[batch] = best * 1e3
      print(f"{name:48s} batch {batch}: {best * 1e3:8.2f} ms", flush=True)
  lines = ["| piece | " + " | ".join(f"ms, batch {b}" for b in batches) + " |",
           "|---|" + "---|" * len(batches)]
  lines += [f"| {name} | " + " | ".join(f"{t[b]:.2f}" for b in batches) + " |"
            for name, t in times.items()]
  table = "\n".join(lines)
  print(table)
  if not args.no_append:
    common.append("Generation profile: one decoding step, piece by piece", table, argv=argv,
                  note=(f"Model: `{args.workdir}` (step {model.step}). Each piece jitted "
                        f"alone on the state after a {len(prompt) - 1}-byte prompt, fastest "
                        f"of {args.repeats} calls (inputs not donated, so extend also "
                        "copies the caches it writes)."))


if __name__ == "__main__":
  main()
