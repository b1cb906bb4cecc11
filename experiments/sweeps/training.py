r"""A small training sweep: BLT-D block size x (learning rate, warmup) on the tiny BLT.

  bltjax sweep --config experiments/sweeps/training.py --workdir runs/sweeps/training
  bltjax sweep --config experiments/sweeps/training.py:runlocal --workdir /tmp/sweep  # seconds

Each run trains `experiments/blt_tiny.py:bltd8,static` (static patching: no entropy
model needed) with the overrides below into `<workdir>/<run id>`, and the sweep records
its final validation bits per byte. 4 runs: block size 4 / 8 x (lr 1e-3 with 30 warmup
steps, lr 3e-3 with 60), 300 steps each.
"""

from bltjax import sweep


def get_config(arg=None):
  if arg not in (None, "runlocal"):
    raise ValueError(f"unknown variant {arg!r}; use runlocal")
  experiment = "experiments/blt_tiny.py:bltd8,static" + (",runlocal" if arg else "")
  steps = 2 if arg else 300
  return sweep.training_config(
      experiment=experiment,
      overrides=(f"train.steps={steps}", "train.eval_every=0", f"train.save_every={steps}"))


def get_sweep(config):
  del config
  return sweep.product(
      sweep.sweep("model.diffusion.block_size", [4, 8]),
      sweep.zipit(sweep.sweep("optim.lr", [1e-3, 3e-3]),
                  sweep.sweep("optim.warmup_steps", [30, 60])))
