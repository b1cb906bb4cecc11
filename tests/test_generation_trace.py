"""bench/generation_trace.py: op time grouped by how many times an op ran."""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import generation_trace  # noqa: E402  pylint: disable=g-import-not-at-top


def test_ops_of_a_loop_body_are_counted_once_per_iteration_and_the_loop_not_at_all(tmp_path):
  def body(_, x):
    return jnp.tanh(x @ x)
  loop = jax.jit(lambda x: jax.lax.fori_loop(0, 7, body, x))
  x = jnp.ones((64, 64)) / 64
  jax.block_until_ready(loop(x))   # compiled outside the trace
  with jax.profiler.trace(str(tmp_path)):
    jax.block_until_ready(loop(x))
  times = generation_trace.op_times(str(tmp_path))
  assert not [name for name in times if name.startswith(("while", "cond"))]
  assert not [name for name in times if " " in name or "::" in name]   # runtime events
  assert generation_trace.seconds_by_count(times).get(7, 0) > 0   # the body's ops


def test_a_call_count_is_labelled_with_the_components_called_that_often():
  nfe = {"entropy": 16, "encoder": 128, "global": 16, "decoder": 128, "embedded_positions": 128}
  assert generation_trace.label(16, nfe) == "entropy, global"
  assert generation_trace.label(128, nfe) == "encoder, decoder"
  assert generation_trace.label(3, nfe) == "-"
