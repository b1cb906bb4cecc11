"""What a training step minimises, per model kind (`config.model.kind`).

An objective owns its linen module and offers pure functions the train loop calls:
`init(rng, batch) -> boxed params`, `loss(params, batch, rng, frozen) -> (loss,
metrics)`, `eval_sums(params, batch, frozen) -> {"nats", "bytes"}` and
`train_flops(batch_size, seq_len)`. `frozen` holds parameters that are used but not
trained (the BLT's patcher entropy model).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from bltjax import bytes as blt_bytes
from bltjax import flops
from bltjax import losses
from bltjax import model as model_lib
from bltjax.model import entropy_model
from bltjax.model import layers


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
    penalty, sparsity = layers.ffn_penalty(intermediates, self.model_config.l1_coef)
    metrics = {"ce": ce, "bpb": ce / losses.LN2}
    if sparsity is not None:
      metrics["ffn_sparsity"] = sparsity
    return ce + penalty, metrics

  def eval_sums(self, params, batch, frozen=None):
    del frozen
    logits, _ = self._forward(params, batch)
    nats, n_bytes = losses.cross_entropy_sums(logits, batch["targets"],
                                              losses.target_mask(batch["targets"]))
    return {"nats": nats, "bytes": n_bytes}

  def train_flops(self, batch_size: int, seq_len: int) -> float:
    positions = batch_size * seq_len
    forward = (flops.stack_forward_flops(self.model_config, positions, seq_len)
               + flops.linear_flops(self.model_config.d_model, blt_bytes.VOCAB_SIZE, positions))
    return 3.0 * forward


def make_objective(config: ml_collections.ConfigDict) -> Any:
  kinds = {"entropy": EntropyObjective}
  if config.model.kind not in kinds:
    raise ValueError(f"config.model.kind={config.model.kind!r} is not one of {sorted(kinds)}")
  return kinds[config.model.kind](config)
