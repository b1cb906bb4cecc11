"""bench/gpu_compile_check.py: what it compiles for a GPU, and how it stops without the
CUDA plugin."""

import importlib.util
import re

import jax
import pytest

from bench import gpu_compile_check
from conftest import lowered_text

HAS_CUDA_PLUGIN = (importlib.util.find_spec("jax_plugins") is not None
                   and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None)


@pytest.mark.skipif(HAS_CUDA_PLUGIN, reason="the CUDA plugin is installed here")
def test_without_the_cuda_plugin_it_names_the_install():
  with pytest.raises(SystemExit, match=re.escape(f'jax[cuda12]=={jax.__version__}')):
    gpu_compile_check.compile_only_sharding("h200")


def test_every_kernel_case_lowers_to_triton_calls():
  cases = gpu_compile_check.kernel_cases(jax.ShapeDtypeStruct)
  names = [name for name, _, _ in cases]
  for kernel in ("range_attention", "unmask_step", "cached_attention", "sparse_relu_ffn"):
    assert any(n.startswith(kernel) for n in names), kernel
  for name, fn, args in cases:
    text = lowered_text(jax.jit(fn), *args, platform="cuda")
    assert "__gpu$xla.gpu.triton" in text, name


def test_target_configs_describe_hopper():
  for target in ("h100", "h200"):
    text = gpu_compile_check.target_config(target)
    assert "cuda_compute_capability { major: 9 minor: 0 }" in text
    assert "shared_memory_per_block_optin: 232448" in text


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs jax[cuda12] (no GPU needed)")
def test_compiles_a_kernel_for_h200_and_rejects_a_block_too_big_for_it():
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  sharding = gpu_compile_check.compile_only_sharding("h200")
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  unmask = [c for c in gpu_compile_check.kernel_cases(spec) if c[0].startswith("unmask")][0]
  row, ok = gpu_compile_check.compile_case(*unmask)
  assert ok and row[1] == "compiled", row

  def copy(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2
  n = 1024   # a 4 MB float32 block: more than an H200's 227 KB of shared memory per block
  too_big = lambda x: pl.pallas_call(copy, out_shape=jax.ShapeDtypeStruct((n, n), x.dtype))(x)
  row, ok = gpu_compile_check.compile_case("too big", too_big, [spec((n, n), jnp.float32)])
  assert not ok and row[1] == "FAILED", row
