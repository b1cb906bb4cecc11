"""bltjax: Byte Latent Transformers in JAX/Flax.

    import bltjax
    model = bltjax.load("runs/blt_tiny")     # see bltjax/api.py
"""

__version__ = "0.1.0"


def load(path: str, **kwargs):
  """Loads a trained model directory; see `bltjax.api.load`."""
  from bltjax import api  # pylint: disable=g-import-not-at-top
  return api.load(path, **kwargs)


__all__ = ["load", "__version__"]
