"""Patching with a trained entropy model: load it from its workdir, cut texts into
patches, and calibrate the threshold for a target mean patch length.

The calibrated threshold is stored in `<entropy_workdir>/patcher.json`; a config with
`patcher.threshold < 0` uses it. A BLT is patched by one entropy model for good:
`pin_entropy_model` writes the threshold and the entropy checkpoint step into the BLT's
config when it starts training, so recalibrating or training the entropy model further
never changes how an existing BLT is patched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bltjax import bytes as blt_bytes
from bltjax import checkpoint
from bltjax import configs
from bltjax import model as model_lib
from bltjax.model import entropy_model
from bltjax.model import patcher as patcher_lib

CALIBRATION_FILE = "patcher.json"
SAMPLE_TEXT = ('def greet(name):\n    """Say hello."""\n    return f"Hello, {name}!"\n\n'
               'print(greet("world"))\n')


def format_patches(pieces: Sequence[bytes]) -> str:
  """Patches joined by `|`, newlines shown as `\\n` (for the console)."""
  return "|".join(p.decode("utf-8", errors="replace").replace("\n", "\\n") for p in pieces)


def read_calibration(workdir: str) -> dict | None:
  path = os.path.join(workdir, CALIBRATION_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def resolve_threshold(patcher_section: Mapping, entropy_workdir: str) -> float:
  """`patcher.threshold`, or the calibrated one when it is negative."""
  if patcher_section["threshold"] >= 0:
    return float(patcher_section["threshold"])
  calibration = read_calibration(entropy_workdir)
  if calibration is None:
    raise configs.ConfigError(
        f"config.patcher.threshold < 0 asks for the calibrated threshold but "
        f"{os.path.join(entropy_workdir, CALIBRATION_FILE)} does not exist; run `bltjax "
        f"calibrate --workdir {entropy_workdir}` or set --config.patcher.threshold")
  # A threshold holds for the rule and patch-length cap it was found with: under another
  # rule the same threshold cuts patches of any length (1 byte each, say).
  differ = [f"{key}={calibration[key]!r} (calibrated) vs {patcher_section[key]!r} (this "
            "config)" for key in ("rule", "max_patch_len")
            if key in calibration and calibration[key] != patcher_section[key]]
  if differ:
    raise configs.ConfigError(
        f"the calibrated threshold of {os.path.join(entropy_workdir, CALIBRATION_FILE)} was "
        f"found under other patching settings: patcher.{'; patcher.'.join(differ)}; "
        f"re-run `bltjax calibrate --workdir {entropy_workdir}` with this config's "
        "settings (--config.patcher.rule=... --config.patcher.max_patch_len=...), or set "
        "them to the calibrated ones")
  return float(calibration["threshold"])


@dataclasses.dataclass(frozen=True)
class EntropyModelRef:
  """A trained entropy model: module, params (None until loaded) and its workdir."""
  module: entropy_model.EntropyModel
  params: Any
  workdir: str
  step: int | None
  config: Any  # the workdir's ConfigDict

  @classmethod
  def describe(cls, workdir: str) -> "EntropyModelRef":
    """The model of an entropy-model workdir, without its params (float32)."""
    config = checkpoint.read_config(workdir)
    if config.model.kind != "entropy":
      raise configs.ConfigError(
          f"{workdir} holds a {config.model.kind!r} model, not an entropy model; pass the "
          "workdir of an `experiments/entropy_*.py` run")
    model_config = dataclasses.replace(
        model_lib.transformer_config(config.model.entropy, config.model), dtype="float32",
        remat=False)
    return cls(entropy_model.EntropyModel(model_config), None, workdir, None, config)

  @classmethod
  def load(cls, workdir: str, sharding: jax.sharding.Sharding | None = None,
           step: int | None = None) -> "EntropyModelRef":
    """Loads checkpoint `step` (None or < 0: the latest) of an entropy-model workdir."""
    ref = cls.describe(workdir)
    step = None if step is None or step < 0 else step
    steps = checkpoint.saved_steps(workdir)
    if step is not None and step not in steps:
      raise configs.ConfigError(
          f"the entropy model {workdir} has no checkpoint {step} (patcher.entropy_step: the "
          f"step the BLT was trained with; it holds {steps or 'none'}): "
          "restore that step, or set patcher.entropy_step=-1 (--config.patcher.entropy_step "
          "or the BLT's config.json) to patch with the latest one, which changes the patches")
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    boxed = jax.eval_shape(ref.module.init, jax.random.PRNGKey(0), tokens, tokens)["params"]
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            nn.meta.unbox(boxed))
    params, step = checkpoint.load_params(workdir, abstract, step=step)
    return dataclasses.replace(ref, params=params, step=step)

  def entropies(self, params, tokens, segment_ids):
    """Pure: next-byte entropies (nats, float32) `[batch, len]`, per row."""
    logits = self.module.apply({"params": params}, tokens, segment_ids)
    return patcher_lib.entropies_from_logits(logits)


def blt_entropy_model(patcher_section: Mapping,
                      sharding: jax.sharding.Sharding | None = None) -> EntropyModelRef:
  """The entropy model that patches a BLT: `patcher.entropy_workdir` at the pinned
  `patcher.entropy_step` (the latest when < 0)."""
  return EntropyModelRef.load(patcher_section["entropy_workdir"], sharding,
                              step=patcher_section.get("entropy_step", -1))


def pin_entropy_model(config, workdir: str):
  """`config` with the BLT's patching fixed for the run in `workdir`: `patcher.threshold`
  (the calibrated one when < 0) and `patcher.entropy_step` (the entropy workdir's latest
  step when < 0) become the values the run started with (`workdir`'s config.json when it
  holds checkpoints, same entropy workdir) or else today's. Unpinned, a BLT would be
  patched by whatever its entropy workdir holds at each load or resume. Other configs are
  returned as they are."""
  section = config.patcher
  if config.model.kind != "blt" or section.mode != "entropy" or not section.entropy_workdir:
    return config
  why = checkpoint.not_a_directory(section.entropy_workdir)
  if why:
    raise configs.ConfigError(
        f"config.patcher.entropy_workdir {section.entropy_workdir!r} {why}; pass the workdir "
        "of a trained entropy model (bltjax train --config experiments/entropy_tiny.py ...)")
  started = (checkpoint.bound_config(workdir) or {}).get("patcher", {})
  if started.get("entropy_workdir") != section.entropy_workdir:
    started = {}
  threshold, step = section.threshold, section.entropy_step
  if threshold < 0:
    threshold = started.get("threshold", -1.0)
    if threshold < 0:
      threshold = resolve_threshold(section, section.entropy_workdir)
  if step < 0:
    step = started.get("entropy_step", -1)
    if step < 0:
      steps = checkpoint.saved_steps(section.entropy_workdir)
      if not steps:
        raise configs.ConfigError(
            f"config.patcher.entropy_workdir {section.entropy_workdir} holds no finished "
            "checkpoint; train the entropy model first (bltjax train --config "
            "experiments/entropy_tiny.py ...)")
      step = steps[-1]
  pinned = configs.from_json(configs.to_json(config))
  with pinned.unlocked():
    pinned.patcher.threshold, pinned.patcher.entropy_step = float(threshold), int(step)
  return pinned


def patcher_from_workdir(entropy_workdir: str, patcher_section: Mapping | None = None
                         ) -> tuple[EntropyModelRef, patcher_lib.PatcherConfig]:
  """The entropy model of a workdir and its patcher config (calibrated threshold)."""
  ref = EntropyModelRef.load(entropy_workdir)
  section = patcher_section if patcher_section is not None else ref.config.patcher
  threshold = resolve_threshold(section, entropy_workdir) if section["mode"] == "entropy" else 0.0
  return ref, model_lib.patcher_config(section, threshold=threshold)


def patch_texts(texts: Sequence[str | bytes], patcher_config: patcher_lib.PatcherConfig,
                ref: EntropyModelRef | None = None) -> list[list[bytes]]:
  """Cuts each text (BOS + bytes) into patches; returns the bytes of each patch.

  The BOS patch is left out, so the patches of a text join back into the text.
  """
  ids, lengths = blt_bytes.encode_batch(texts, add_bos=True, add_eos=False)
  segment_ids = (np.arange(ids.shape[1])[None] < lengths[:, None]).astype(np.int32)
  entropies = None
  if patcher_config.mode == "entropy":
    if ref is None:
      raise ValueError("entropy patching needs an entropy model (pass --workdir)")
    entropies = jax.jit(ref.entropies)(ref.params, ids, segment_ids)
  patches = patcher_lib.patch(
      dataclasses.replace(patcher_config, max_patches=0), jnp.asarray(ids),
      jnp.asarray(segment_ids), entropies)
  starts = np.asarray(patches.starts)
  out = []
  for row, n in enumerate(lengths):
    cut = [int(t) for t in np.flatnonzero(starts[row, :n])] + [int(n)]
    pieces = [blt_bytes.decode_bytes(ids[row, a:b]) for a, b in zip(cut[:-1], cut[1:])]
    out.append(pieces[1:])  # drop the BOS patch
  return out


def calibrate(ref: EntropyModelRef, batches: Iterable[Mapping[str, np.ndarray]],
              patcher_config: patcher_lib.PatcherConfig, target_patch_len: float, *,
              iterations: int = 50) -> tuple[float, float]:
  """Bisection on the threshold until the mean patch length over `batches` (valid bytes
  only) meets `target_patch_len`. Returns (threshold, mean patch length)."""
  if patcher_config.mode != "entropy":
    raise ValueError(f"only entropy patching has a threshold to calibrate, not "
                     f"{patcher_config.mode!r}")
  entropy_fn = jax.jit(ref.entropies)
  rows = []
  for batch in batches:
    ent = entropy_fn(ref.params, batch["inputs"], batch["segment_ids"])
    rows.append((jnp.asarray(batch["inputs"]), jnp.asarray(batch["segment_ids"]), ent))
  if not rows:
    raise ValueError("calibration needs at least one batch of data")

  @jax.jit
  def counts(threshold):
    n_bytes = n_patches = 0
    for tokens, segment_ids, ent in rows:
      fires = patcher_lib.entropy_rule(ent, threshold=threshold, rule=patcher_config.rule)
      starts = patcher_lib.patch_starts(fires, tokens, segment_ids,
                                        max_patch_len=patcher_config.max_patch_len)
      valid = segment_ids > 0
      n_bytes += jnp.sum(valid)
      n_patches += jnp.sum(starts[:, :-1] & valid)
    return n_bytes, n_patches

  def mean_len(threshold: float) -> float:
    n_bytes, n_patches = counts(jnp.float32(threshold))
    return float(n_bytes) / max(float(n_patches), 1.0)

  low, high = -math.log(blt_bytes.VOCAB_SIZE), 2 * math.log(blt_bytes.VOCAB_SIZE)
  if not mean_len(low) <= target_patch_len <= mean_len(high):
    raise ValueError(
        f"a mean patch length of {target_patch_len} is out of reach (between "
        f"{mean_len(low):.2f} and {mean_len(high):.2f} with max_patch_len="
        f"{patcher_config.max_patch_len}); change the target or max_patch_len")
  for _ in range(iterations):
    mid = 0.5 * (low + high)
    if mean_len(mid) < target_patch_len:
      low = mid
    else:
      high = mid
  return high, mean_len(high)


def write_calibration(workdir: str, record: Mapping[str, Any]) -> str:
  path = os.path.join(workdir, CALIBRATION_FILE)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(dict(record), f, indent=2)
  return path


def calibrate_workdir(workdir: str, config=None, *, target_patch_len: float = 0.0,
                      batches: int = 8, batch_size: int = 8) -> dict:
  """Calibrates the threshold of an entropy-model workdir on its validation data and
  writes `patcher.json`. `config`: the workdir's config (with overrides) or None.

  Returns the record written (threshold, mean_patch_len, ..., path)."""
  for name, value in (("batches", batches), ("batch_size", batch_size)):
    if not value >= 1:
      raise ValueError(f"{name}={value} must be >= 1 (bltjax calibrate --{name})")
  config = checkpoint.read_config(workdir) if config is None else config
  ref = EntropyModelRef.load(workdir)
  patcher_config = model_lib.patcher_config(config.patcher, threshold=0.0)
  target = target_patch_len or config.patcher.target_patch_len
  from bltjax import data as data_lib  # pylint: disable=g-import-not-at-top
  rows = data_lib.eval_batches(config.data, seq_len=config.train.seq_len,
                               global_batch=batch_size, max_batches=batches)
  threshold, mean_len = calibrate(ref, rows, patcher_config, target)
  record = dict(threshold=threshold, mean_patch_len=mean_len, target_patch_len=target,
                rule=patcher_config.rule, max_patch_len=patcher_config.max_patch_len,
                step=ref.step, rows=batches * batch_size, seq_len=config.train.seq_len)
  record["path"] = write_calibration(workdir, record)
  return record
