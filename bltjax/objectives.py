"""What a training step minimises, per model kind (`config.model.kind`).

An objective owns its linen module and offers pure functions the train loop calls:
`init(rng, batch) -> boxed params`, `loss(params, batch, rng, frozen) -> (loss,
metrics)`, `eval_sums(params, batch, frozen) -> {"nats", "bytes", "dropped"}` (CE nats
of the target bytes scored, their count, and the count of target bytes left out) and
`train_flops(batch_size, seq_len)`. `frozen` holds parameters that are used but not
trained (the BLT's patcher entropy model).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from bltjax import bytes as blt_bytes
from bltjax import configs
from bltjax import diffusion
from bltjax import flops
from bltjax import losses
from bltjax import model as model_lib
from bltjax import sharding
from bltjax.model import attention
from bltjax.model import blt
from bltjax.model import entropy_model
from bltjax.model import layers
from bltjax.model import patcher as patcher_lib


class EntropyObjective:
  """Next-byte cross-entropy of the entropy model (+ the FFN L1 penalty if any)."""

  kind = "entropy"

  def __init__(self, config: ml_collections.ConfigDict):
    self.model_config = model_lib.transformer_config(config.model.entropy, config.model)
    self.module = entropy_model.EntropyModel(self.model_config)

  def init(self, rng, batch):
    return self.module.init(rng, batch["inputs"], batch["segment_ids"])["params"]

  def frozen_params(self, mesh):
    del mesh
    return None

  def _forward(self, params, batch):
    logits, state = self.module.apply({"params": params}, batch["inputs"],
                                      batch["segment_ids"], mutable=["intermediates"])
    return logits, state.get("intermediates", {})

  def loss(self, params, batch, rng, frozen=None):
    del rng, frozen
    logits, intermediates = self._forward(params, batch)
    nats, n_bytes = losses.cross_entropy_sums(logits, batch["targets"],
                                              losses.target_mask(batch["targets"]))
    ce = nats / jnp.maximum(n_bytes, 1.0)
    penalty, ffn_metrics = layers.ffn_penalty(intermediates, self.model_config.l1_coef,
                                              masks=batch["segment_ids"] > 0)
    metrics = {"ce": ce, "bpb": ce / losses.LN2, **ffn_metrics}
    return ce + penalty, metrics

  def eval_sums(self, params, batch, frozen=None):
    del frozen
    logits, _ = self._forward(params, batch)
    nats, n_bytes = losses.cross_entropy_sums(logits, batch["targets"],
                                              losses.target_mask(batch["targets"]))
    return {"nats": nats, "bytes": n_bytes, "dropped": jnp.zeros_like(n_bytes)}

  def train_flops(self, batch_size: int, seq_len: int) -> float:
    positions = batch_size * seq_len
    forward = (flops.stack_forward_flops(self.model_config, positions, seq_len)
               + flops.linear_flops(self.model_config.d_model, blt_bytes.VOCAB_SIZE, positions))
    return 3.0 * forward


class BltObjective:
  """Next-byte CE of the BLT (+ lambda_diff * masked block-diffusion CE for BLT-D).

  Patches are computed inside the step from the frozen entropy model (or by static /
  space patching); bytes whose global context falls past `max_patches` are left out
  of the loss and their fraction is logged as `dropped_bytes`.
  """

  kind = "blt"

  def __init__(self, config: ml_collections.ConfigDict):
    from bltjax import patching  # pylint: disable=g-import-not-at-top
    self.config = config
    self.model_config = model_lib.blt_config(config.model)
    self.module = blt.BLT(self.model_config)
    seq_len = config.train.seq_len
    section = config.patcher
    self.patcher_section = section
    if section.mode == "entropy":
      if not section.entropy_workdir:
        raise configs.ConfigError(
            "config.patcher.mode='entropy' needs config.patcher.entropy_workdir (the workdir "
            "of a trained entropy model), or use --config.patcher.mode=static|space")
      threshold = patching.resolve_threshold(section, section.entropy_workdir)
      self.entropy_model = patching.EntropyModelRef.describe(section.entropy_workdir)
    else:
      threshold, self.entropy_model = 0.0, None
    self.patcher_config = model_lib.patcher_config(section, threshold=threshold,
                                                   default_max_patches=seq_len)

  @property
  def max_patches(self) -> int:
    return self.patcher_config.max_patches

  def frozen_params(self, mesh):
    """The patcher's entropy model params, replicated over the mesh (or None)."""
    if self.entropy_model is None:
      return None
    from bltjax import patching  # pylint: disable=g-import-not-at-top
    return patching.blt_entropy_model(self.patcher_section, sharding.replicated(mesh)).params

  def patches(self, batch, frozen) -> patcher_lib.Patches:
    entropies = None
    if self.entropy_model is not None:
      entropies = jax.lax.stop_gradient(self.entropy_model.entropies(
          frozen, batch["inputs"], batch["segment_ids"]))
    return patcher_lib.patch(self.patcher_config, batch["inputs"], batch["segment_ids"],
                             entropies)

  def init(self, rng, batch):
    static = dataclasses.replace(self.patcher_config, mode="static")
    patches = patcher_lib.patch(static, batch["inputs"], batch["segment_ids"])
    return self.module.init(rng, batch["inputs"], batch["segment_ids"], patches)["params"]

  def _next_byte(self, params, batch, patches, noisy=None):
    (logits, noisy_logits), state = self.module.apply(
        {"params": params}, batch["inputs"], batch["segment_ids"], patches, noisy,
        mutable=["intermediates"])
    real = losses.target_mask(batch["targets"])
    mask = real & (patches.next_patch_ids <= self.max_patches)
    nats, n_bytes = losses.cross_entropy_sums(logits, batch["targets"], mask)
    dropped = 1.0 - n_bytes / jnp.maximum(jnp.sum(real), 1.0)
    return nats, n_bytes, dropped, noisy_logits, state.get("intermediates", {})

  def noisy_blocks(self, batch, patches, rng):
    """BLT-D's noisy copy: blocks anchored at patch starts, grouped per window chunk,
    corrupted with MASK. Returns (NoisyInput, clean block ids, Corruption, Blocks)."""
    cfg, dcfg = self.model_config, self.config.model.diffusion
    tokens, segment_ids = batch["inputs"], batch["segment_ids"]
    length = tokens.shape[1]
    chunk = attention.noisy_chunk_size(length, blt.stack_window(cfg))
    per_chunk = dcfg.blocks_per_chunk or max(1, chunk // 4)
    anchor_rng, noise_rng = jax.random.split(rng)
    blocks = diffusion.anchor_blocks_per_chunk(
        patches.starts, segment_ids, block_size=dcfg.block_size, chunk=chunk,
        blocks_per_chunk=per_chunk, rng=anchor_rng,
        allowed=(segment_ids > 0) & patches.in_patches)
    clean = diffusion.gather_blocks(tokens, blocks)                     # [B, K, Bsz]
    corruption = diffusion.corrupt_blocks(clean, blocks.in_block, rng=noise_rng,
                                          noise=dcfg.noise, eps=dcfg.eps)
    size = dcfg.block_size
    chunked = lambda x: diffusion.per_chunk_layout(x, per_chunk)
    per_position = lambda x: jnp.broadcast_to(x[..., None], x.shape + (size,))
    info = diffusion.chunked_attention_info(blocks, segment_ids, blocks_per_chunk=per_chunk)
    hash_ids = (blt.noisy_hash_ids(cfg, tokens, corruption.tokens, blocks.anchors)
                if cfg.n_hash_tables else jnp.zeros(corruption.tokens.shape + (0,), jnp.int32))
    ranges = {}
    for stack in ("encoder", "decoder"):
      if getattr(cfg, stack).attention_impl == "pallas":
        ranges[f"{stack}_ranges"] = tuple(diffusion.bltd_attention_ranges(
            blocks.anchors, blocks.valid, segment_ids, seq_len=length, block_size=size,
            window=getattr(cfg, stack).window, in_block=blocks.in_block))
    noisy = blt.NoisyInput(tokens=chunked(corruption.tokens), hash_ids=chunked(hash_ids),
                           read_patch=chunked(per_position(blocks.context_patch)), info=info,
                           **ranges)
    return noisy, clean, corruption, blocks

  def loss(self, params, batch, rng, frozen=None):
    patches = self.patches(batch, frozen)
    dcfg = self.config.model.diffusion
    noisy = None
    if dcfg.lambda_diff > 0:
      noisy, clean, corruption, blocks = self.noisy_blocks(batch, patches, rng)
    nats, n_bytes, dropped, noisy_logits, intermediates = self._next_byte(
        params, batch, patches, noisy)
    ce = nats / jnp.maximum(n_bytes, 1.0)
    valid = batch["segment_ids"] > 0
    penalty, ffn_metrics = layers.ffn_penalty(   # padding positions do not count
        intermediates, self.model_config.global_model.l1_coef,
        masks={"global_model": patches.lengths > 0, "encoder": valid, "decoder": valid})
    metrics = {"ce": ce, "bpb": ce / losses.LN2, "dropped_bytes": dropped,
               "patch_len": patcher_lib.mean_patch_length(patches, valid)}
    loss = ce + penalty
    if noisy is not None:
      block_logits = noisy_logits.reshape(clean.shape + (-1,))
      masked = losses.masked_block_ce(block_logits, clean, corruption.is_masked, corruption.t)
      objective = (losses.masked_block_ce(block_logits, clean, corruption.is_masked,
                                          corruption.t, elbo_weight=True)
                   if dcfg.elbo_weight else masked)
      loss = loss + dcfg.lambda_diff * objective.mean
      size = dcfg.block_size
      metrics[f"masked_ce_b{size}"] = masked.nats / jnp.maximum(masked.count, 1.0)
      metrics[f"masked_acc_b{size}"] = masked.accuracy
      metrics["blocks_dropped"] = jnp.sum(blocks.num_dropped) / jnp.maximum(
          jnp.sum(blocks.num_candidates), 1)
    metrics.update(ffn_metrics)
    return loss, metrics

  def eval_sums(self, params, batch, frozen=None):
    patches = self.patches(batch, frozen)
    nats, n_bytes, _, _, _ = self._next_byte(params, batch, patches)
    targets = jnp.sum(losses.target_mask(batch["targets"]))
    return {"nats": nats, "bytes": n_bytes, "dropped": targets - n_bytes}

  def train_flops(self, batch_size: int, seq_len: int) -> float:
    cfg = self.model_config
    n_bytes = batch_size * seq_len
    n_patches = n_bytes / 4.5   # the nominal BLT patch length; MFU is an estimate
    k_d = cfg.cross_attn_k * cfg.d_local
    forward = (flops.stack_forward_flops(cfg.encoder, n_bytes, seq_len)
               + flops.stack_forward_flops(cfg.global_model, n_patches, int(seq_len / 4.5))
               + flops.stack_forward_flops(cfg.decoder, n_bytes, seq_len)
               + flops.linear_flops(cfg.d_local, k_d, n_patches)
               + flops.linear_flops(cfg.global_model.d_model, k_d, n_patches)
               + flops.linear_flops(cfg.d_local, blt_bytes.VOCAB_SIZE, n_bytes))
    return 3.0 * forward


def check_diffusion_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError on a BLT-D block size (`model.diffusion.block_size`, read when
  `lambda_diff` > 0) that a training row (`train.seq_len`) cannot hold.

  Training checks it (`train.check_config`), not `make_objective`: evaluation and
  generation never build noisy blocks, whatever their row length."""
  dcfg, seq_len = config.model.diffusion, config.train.seq_len
  if config.model.kind != "blt" or not dcfg.lambda_diff > 0:
    return
  most = diffusion.max_block_size(seq_len)
  if not 1 <= dcfg.block_size <= most:
    raise configs.ConfigError(
        f"config.model.diffusion.block_size={dcfg.block_size} must be in [1, {most}]: a "
        f"{seq_len}-byte row (config.train.seq_len) holds blocks of at most {most} bytes "
        f"(they start {diffusion.MIN_ANCHOR_OFFSET} or more bytes into it); use e.g. 4, 8 "
        "or 16")


def make_objective(config: ml_collections.ConfigDict) -> Any:
  kinds = {"entropy": EntropyObjective, "blt": BltObjective}
  if config.model.kind not in kinds:
    raise ValueError(f"config.model.kind={config.model.kind!r} is not one of {sorted(kinds)}")
  return kinds[config.model.kind](config)


def scoring_objective(objective: Any, length: int) -> Any:
  """`objective` for scoring rows of `length` bytes with no byte dropped.

  A BLT's `patcher.max_patches` is a training budget (e.g. 192 patches for 512-byte rows):
  rows longer than training's, or of high-entropy bytes, need more patches, and bytes
  past the last one would go unscored. The copy allows one patch per byte; an entropy
  objective is returned as it is. `bltjax eval` and `Model.score` both score through it.
  """
  if objective.kind != "blt":
    return objective
  scoring = copy.copy(objective)
  scoring.patcher_config = dataclasses.replace(objective.patcher_config, max_patches=length)
  return scoring


def _count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def entropy_transformer_config(config: ml_collections.ConfigDict):
  """The entropy model's TransformerConfig: for a BLT whose `patcher.entropy_workdir`
  names a workdir, that model (the one it is patched with); else `config.model.entropy`."""
  model_section = config.model
  workdir = config.get("patcher", {}).get("entropy_workdir", "")
  if (config.model.kind == "blt" and workdir
      and os.path.isfile(os.path.join(workdir, configs.SAVED_CONFIG))):
    from bltjax import checkpoint  # pylint: disable=g-import-not-at-top
    model_section = checkpoint.read_config(workdir).model
  return model_lib.transformer_config(model_section.entropy, model_section)


def param_counts(config: ml_collections.ConfigDict, seq_len: int = 64) -> dict[str, int]:
  """Parameters per component, from `jax.eval_shape` (nothing is allocated).

  For kind "blt" the hash tables are counted apart from the encoder, and the entropy
  model is that of `patcher.entropy_workdir` when it names a workdir (the model the BLT
  is patched with), else the shape in `config.model.entropy`.

  Raises:
    ConfigError: a BLT-D block size the training rows cannot hold.
  """
  check_diffusion_config(config)
  shapes = {k: jax.ShapeDtypeStruct((1, seq_len), jnp.int32) for k in ("inputs",
                                                                        "segment_ids")}
  entropy_cfg = entropy_transformer_config(config)
  entropy_params = jax.eval_shape(entropy_model.EntropyModel(entropy_cfg).init,
                                  jax.random.PRNGKey(0), shapes["inputs"],
                                  shapes["segment_ids"])["params"]
  counts = {"entropy_model": _count(entropy_params)}
  if config.model.kind == "blt":
    module = blt.BLT(model_lib.blt_config(config.model))

    def init(rng, tokens, segment_ids):
      static = patcher_lib.PatcherConfig(mode="static", max_patches=seq_len)
      return module.init(rng, tokens, segment_ids,
                         patcher_lib.patch(static, tokens, segment_ids))["params"]

    params = jax.eval_shape(init, jax.random.PRNGKey(0), shapes["inputs"], shapes["segment_ids"])
    encoder = dict(params["encoder"])
    hash_tables = encoder.pop("embedding", {}).get("hash_embed", {})
    counts["local_encoder"] = _count(encoder) + _count(params["encoder"]["embedding"]) - _count(
        hash_tables)
    counts["hash_tables"] = _count(hash_tables)
    counts["global_model"] = _count(params["global_model"])
    counts["local_decoder"] = _count(params["decoder"])
    counts["blt_without_hash"] = (counts["local_encoder"] + counts["global_model"]
                                  + counts["local_decoder"])
    counts["blt_total"] = counts["blt_without_hash"] + counts["hash_tables"]
  return counts
