"""bench/compile_check.py: what it compiles for a GPU or TPU, and how it stops without the
compiler plugin."""

import importlib.util
import re

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import pytest

from bench import compile_check
from conftest import lowered_text


def _has(module: str) -> bool:
  parent = module.rpartition(".")[0]
  return ((not parent or importlib.util.find_spec(parent) is not None)
          and importlib.util.find_spec(module) is not None)


HAS_PLUGIN = {"h200": _has("jax_plugins.xla_cuda12"), "v5e": _has("libtpu")}
MARKERS = {"gpu": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


@pytest.mark.parametrize("target, extra", [("h200", "cuda12"), ("v5e", "tpu")])
def test_without_the_plugin_it_names_the_install(target, extra):
  if HAS_PLUGIN[target]:
    pytest.skip(f"the {target} compiler is installed here")
  with pytest.raises(SystemExit, match=re.escape(f"jax[{extra}]=={jax.__version__}")):
    compile_check.compile_only_sharding(target)


@pytest.mark.parametrize("backend, platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_every_kernel_case_lowers_to_kernel_calls(backend, platform):
  cases = compile_check.kernel_cases(jax.ShapeDtypeStruct, backend)
  names = [name for name, _, _ in cases]
  for kernel in ("range_attention", "unmask_step", "cached_attention", "sparse_relu_ffn"):
    assert any(n.startswith(kernel) for n in names), kernel
  for name, fn, args in cases:
    assert MARKERS[backend] in lowered_text(jax.jit(fn), *args, platform=platform), name


def test_gpu_targets_describe_hopper():
  for target in ("h100", "h200"):
    text = compile_check.target_config(target)
    assert "cuda_compute_capability { major: 9 minor: 0 }" in text
    assert "shared_memory_per_block_optin: 232448" in text


def _double(x_ref, o_ref):
  o_ref[...] = x_ref[...] * 2


@pytest.mark.parametrize("target, backend", [("h200", "gpu"), ("v5e", "tpu")])
def test_compiles_a_kernel_and_rejects_a_block_too_big_for_the_chip(target, backend):
  if not HAS_PLUGIN[target]:
    pytest.skip(f"needs the {target} compiler plugin (no accelerator needed)")
  sharding = compile_check.compile_only_sharding(target)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  unmask = [c for c in compile_check.kernel_cases(spec, backend) if c[0].startswith("unmask")]
  row, ok = compile_check.compile_case(*unmask[0], backend)
  assert ok and row[1] == "compiled", row
  # One block of 4096 x 4096 float32 (64 MB in, 64 MB out): more than an H200's shared
  # memory per block or a v5e core's VMEM.
  n = 4096
  too_big = lambda x: pl.pallas_call(_double, out_shape=jax.ShapeDtypeStruct((n, n),
                                                                             x.dtype))(x)
  row, ok = compile_check.compile_case("too big", too_big, [spec((n, n), jnp.float32)],
                                       backend)
  assert not ok and row[1] == "FAILED", row


def test_range_length_cases_cover_both_dtypes_and_head_dims():
  cases = compile_check.range_attention_cases(jax.ShapeDtypeStruct, "tpu", [256, 512])
  assert len(cases) == 2 * 2 * 2
  name, fn, args = cases[0]
  assert "[4, 256, 8 / 2 kv, 64] bfloat16" in name
  assert MARKERS["tpu"] in lowered_text(jax.jit(fn), *args, platform="tpu")


def test_cache_size_cases_cover_both_head_dims():
  cases = compile_check.cache_size_cases(jax.ShapeDtypeStruct, "tpu", [256, 1024])
  assert [name for name, _, _ in cases] == [
      f"cached_attention T=8 cache {size}, head_dim {d}" for d in (64, 128)
      for size in (256, 1024)]
  name, fn, args = cases[-1]
  assert MARKERS["tpu"] in lowered_text(jax.jit(fn), *args, platform="tpu")
