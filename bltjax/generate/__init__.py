"""Fast generation: cached AR, BLT-D, BLT-S, BLT-DV and BLT-H, one jitted call each.

`decode(engine, params, prompt_ids, prompt_lengths, config, rng)` prefills the caches
and runs the chosen method's loop on device; `make_engine` sizes the buffers for a
request. See engine.py for the shared primitive and each method's module for its loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bltjax.generate import ar
from bltjax.generate import diffusion
from bltjax.generate import hybrid
from bltjax.generate import speculative
from bltjax.generate.engine import COMPONENTS, EMBEDDED, Engine
from bltjax.generate.sampling import SamplingConfig
from bltjax.model import layers

METHODS = ("ar", "blt_d", "blt_s", "blt_dv", "blt_h")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  method: str = "ar"             # ar | blt_d | blt_s | blt_dv | blt_h
  max_bytes: int = 256
  temperature: float = 0.0       # 0: greedy
  top_p: float = 1.0
  block_size: int = 8            # BLT-D / BLT-H block B
  alpha: float = 0.7             # BLT-D confidence threshold
  gamma: float | None = None     # BLT-D entropy bound (EB rule instead of alpha)
  draft_len: int = 8             # BLT-S / BLT-DV k
  block_commit: str = "forced"   # forced | last_boundary
  gate: float = 0.9              # BLT-H: mean confidence needed to diffuse a block
  prefill_chunk: int = 32        # prompt bytes per prefill step
  unroll_layers: bool = True     # stacks trained with model.scan_layers decode unrolled:
                                 # faster steps, longer compile (see make_engine)
  fuse_projections: bool = True  # q/k/v and gate/up run as one matmul each (see make_engine)
  attention_impl: str = ""       # decoding attention: "" (as the model's stacks were
                                 # configured: model.attention.impl) | xla | pallas
                                 # (one cached-attention kernel per layer and step)
  unmask_impl: str = "xla"       # BLT-D / BLT-H unmasking: xla | pallas (one fused kernel)
  unmask_backend: str = ""       # pallas: "" (the kernel package picks), gpu | tpu | xla
  unmask_interpret: bool = False  # pallas: the kernel in interpret mode (CPU tests)

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method {self.method!r} is not one of {METHODS}")
    if self.attention_impl not in ("",) + layers.ATTENTION_IMPLS:
      raise ValueError(f"attention_impl {self.attention_impl!r} is not one of "
                       f"{('',) + layers.ATTENTION_IMPLS}")
    if self.unmask_impl not in diffusion.UNMASK_IMPLS:
      raise ValueError(f"unmask_impl {self.unmask_impl!r} is not one of "
                       f"{diffusion.UNMASK_IMPLS}")
    if self.block_commit not in diffusion.BLOCK_COMMITS:
      raise ValueError(f"block_commit {self.block_commit!r} is not one of "
                       f"{diffusion.BLOCK_COMMITS}")
    for name, least in (("max_bytes", 1), ("block_size", 1), ("draft_len", 2),
                        ("prefill_chunk", 1)):
      if getattr(self, name) < least:
        raise ValueError(f"{name}={getattr(self, name)}: need {name} >= {least}")
    if not 0 <= self.temperature < math.inf or not 0 < self.top_p <= 1:
      raise ValueError(f"need temperature >= 0 (finite) and 0 < top_p <= 1, got "
                       f"temperature {self.temperature}, top_p {self.top_p}")
    if self.temperature == 0 and self.top_p < 1:
      raise ValueError(f"top_p={self.top_p} applies to sampling, and temperature=0 decodes "
                       "greedily; set a temperature > 0 to sample, or leave top_p at 1")
    for name in ("alpha", "gamma", "gate"):   # inf is meaningful: see UnmaskRule, hybrid
      value = getattr(self, name)
      if value is not None and not value >= 0:   # NaN fails too
        raise ValueError(f"{name}={value}: need {name} >= 0 (see `bltjax generate --help`)")

  def structure(self) -> "DecodeConfig":
    """What shapes the compiled program besides its engine: the config with its numeric
    knobs (alpha, gamma, gate, temperature, top_p) replaced by placeholders, keeping only
    whether sampling, top-p and the EB rule are on (`unroll_layers` and
    `fuse_projections` live in the engine).
    Configs with equal structure and engine share one compile."""
    return dataclasses.replace(
        self, alpha=0.0, gate=0.0, gamma=None if self.gamma is None else 0.0,
        temperature=0.0 if self.temperature == 0 else 1.0,
        top_p=1.0 if self.top_p >= 1.0 else 0.5, unroll_layers=True, fuse_projections=True)

  def knobs(self) -> dict:
    """The numeric knobs, passed to the compiled program as traced scalars."""
    return {"alpha": jnp.float32(self.alpha), "gate": jnp.float32(self.gate),
            "gamma": jnp.float32(self.gamma if self.gamma is not None else 0.0),
            "temperature": jnp.float32(self.temperature), "top_p": jnp.float32(self.top_p)}

  @property
  def max_extend(self) -> int:
    return max(self.prefill_chunk, self.block_size, self.draft_len)


def check_unmask_rule(alpha: float | None, gamma: float | None) -> None:
  """Raises ValueError when both BLT-D unmasking rules are asked for: `DecodeConfig`
  decodes with gamma's whenever it is set, so an alpha beside it would be ignored."""
  if alpha is not None and gamma is not None:
    raise ValueError(f"alpha={alpha} and gamma={gamma} both given: each picks BLT-D's "
                     "unmasking rule (alpha: confidence, gamma: entropy bounded); pass one of "
                     "them")


class DecodeResult(NamedTuple):
  tokens: jax.Array   # [B, max_bytes] generated ids
  counts: jax.Array   # [B] ids generated per row (EOS included)
  nfe: dict           # component -> calls (a call serves the whole batch), and
                      # EMBEDDED -> byte positions the encoder embedded (hash rows read)
  stats: dict         # method-specific counters (drafted / accepted, blocks / steps ...)


def make_engine(blt_config, patcher_config, entropy_config, prompt_len: int,
                config: DecodeConfig) -> Engine:
  """An engine whose buffers hold the prompt, max_bytes and one extension of slack.

  With `config.unroll_layers`, stacks trained with `scan_layers` (the global and entropy
  models) run unrolled (their params unstacked by `Engine.layout_params`): a scanned step
  copies each layer's weights out of the stacked arrays on every call (decoding ran
  1.25-1.49x slower scanned on CPU, bench/RESULTS.md); unrolled, the program takes longer
  to compile (6-29% on CPU). With `config.fuse_projections`, every stack runs its q/k/v
  projections as one matmul and its SwiGLU gate/up as another (kernels concatenated by
  `Engine.layout_params`): a decode step multiplies a few rows, so each matmul costs its
  weights' bytes plus a fixed cost, and fewer, wider ones save the fixed costs
  (bench/RESULTS.md). `config.attention_impl` ("xla" | "pallas") overrides how every
  stack attends over its caches (`Engine.attention_kernel`). `decode` lays out raw
  params on every call; `api.Model` passes params laid out once."""
  def stack(c):
    if config.unroll_layers:
      c = dataclasses.replace(c, scan_layers=False)
    if config.attention_impl:
      c = dataclasses.replace(c, attention_impl=config.attention_impl)
    return dataclasses.replace(c, fused_projections=config.fuse_projections)
  blt_config = dataclasses.replace(blt_config, encoder=stack(blt_config.encoder),
                                   global_model=stack(blt_config.global_model),
                                   decoder=stack(blt_config.decoder))
  entropy_config = entropy_config and stack(entropy_config)
  return Engine(blt_config, patcher_config, entropy_config,
                max_len=prompt_len + config.max_bytes + config.max_extend + 1,
                max_extend=config.max_extend)


def decode(engine: Engine, params, prompt_ids, prompt_lengths, config: DecodeConfig, rng,
           knobs=None):
  """Prefill + the method's loop. prompt_ids `[B, L]` (BOS + bytes, right-padded).

  `knobs` (from `config.knobs()`, possibly traced) override the config's numeric knobs;
  `config` then only needs the right structure."""
  knobs = config.knobs() if knobs is None else knobs
  params = engine.layout_params(params)
  state = engine.init_state(prompt_ids.shape[0])
  state, logits = engine.prefill(params, state, prompt_ids, prompt_lengths)
  prefill_nfe = state.nfe
  sampling = SamplingConfig(
      temperature=0.0 if config.temperature == 0 else knobs["temperature"],
      top_p=1.0 if config.top_p >= 1.0 else knobs["top_p"])
  common = dict(max_bytes=config.max_bytes, sampling=sampling, rng=rng)
  rule = diffusion.UnmaskRule(alpha=knobs["alpha"],
                              gamma=None if config.gamma is None else knobs["gamma"],
                              impl=config.unmask_impl, backend=config.unmask_backend,
                              interpret=config.unmask_interpret)
  if config.method == "ar":
    state, out, counts = ar.generate(engine, params, state, logits, **common)
    stats = {}
  elif config.method in ("blt_s", "blt_dv"):
    state, out, counts, stats = speculative.generate(
        engine, params, state, logits, draft_len=config.draft_len,
        drafter="decoder" if config.method == "blt_s" else "diffusion", **common)
  elif config.method == "blt_d":
    state, out, counts, stats = diffusion.generate(
        engine, params, state, logits, block_size=config.block_size, rule=rule,
        block_commit=config.block_commit, **common)
  else:
    state, out, counts, stats = hybrid.generate(
        engine, params, state, logits, block_size=config.block_size, rule=rule,
        gate=knobs["gate"], **common)
  nfe = {c: state.nfe[c] - prefill_nfe[c] for c in state.nfe}
  return DecodeResult(out, counts, nfe, stats)


@functools.lru_cache(maxsize=64)
def decode_program(engine: Engine, structure: DecodeConfig):
  """`decode` jitted for one engine and config structure:
  (params, ids, lengths, rng, knobs) -> DecodeResult."""
  return jax.jit(lambda params, ids, lengths, rng, knobs: decode(
      engine, params, ids, lengths, structure, rng, knobs))


@functools.lru_cache(maxsize=64)
def prefill_program(engine: Engine):
  """The prefill that `decode` starts with, jitted alone: (params, ids, lengths) ->
  (state, logits). It times a request's prompt apart from its generation."""
  return jax.jit(lambda params, ids, lengths: engine.prefill(
      engine.layout_params(params), engine.init_state(ids.shape[0]), ids, lengths))


def jitted_decode(engine: Engine, config: DecodeConfig):
  """(params, ids, lengths, rng) -> DecodeResult for this config; configs that differ
  only in numeric knobs reuse one compiled program."""
  program, knobs = decode_program(engine, config.structure()), config.knobs()
  return lambda params, ids, lengths, rng: program(params, ids, lengths, rng, knobs)


__all__ = ["COMPONENTS", "EMBEDDED", "DecodeConfig", "DecodeResult", "Engine", "METHODS",
           "check_unmask_rule", "decode", "decode_program", "jitted_decode", "make_engine",
           "prefill_program"]
