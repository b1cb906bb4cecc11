"""Sharding on 8 fake CPU devices: same loss as one device, params placed by the rules."""

import types

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bltjax import sharding
from bltjax import train
from conftest import tiny_entropy_config

MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 2, 4)]


def _config(tiny_corpus, mesh):
  config = tiny_entropy_config(
      tiny_corpus, model__entropy__d_model=64, model__entropy__n_heads=4,
      model__entropy__n_kv_heads=4, model__entropy__ffn_dim=256, model__entropy__window=8,
      train__batch_size=8, train__seq_len=32)
  for axis, size in zip(sharding.MESH_AXES, mesh):
    config.mesh[axis] = size
  return config


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, 260, (8, 33)).astype(np.int32)
  segment_ids = np.ones((8, 32), np.int32)
  segment_ids[::2, 20:] = 2
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids}


def _two_step_losses(trainer):
  state = trainer.init_state(jax.random.PRNGKey(0))
  losses = []
  for seed in range(2):
    batch = sharding.make_global_batch(_batch(seed), trainer.mesh)
    state, metrics = trainer.train_step(state, batch, trainer.frozen)
    losses.append(float(metrics["loss"]))
  return losses, state


@pytest.fixture(scope="module")
def one_device_losses(tiny_corpus, tmp_path_factory):
  trainer = train.Trainer(_config(tiny_corpus, (1, 1, 1)), str(tmp_path_factory.mktemp("w")),
                          devices=jax.devices()[:1])
  return _two_step_losses(trainer)[0]


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_steps_equal_the_one_device_steps(mesh, tiny_corpus, tmp_path,
                                                  one_device_losses):
  assert jax.device_count() == 8
  trainer = train.Trainer(_config(tiny_corpus, mesh), str(tmp_path))
  losses, state = _two_step_losses(trainer)
  np.testing.assert_allclose(losses, one_device_losses, rtol=2e-5)

  data, fsdp, tensor = mesh
  layer = state.params["transformer"]["layer_0"]
  q = layer["attn"]["q"]["kernel"]               # (embed, heads) -> (fsdp, tensor)
  down = layer["ffn"]["down"]["kernel"]          # (mlp, embed) -> (tensor, fsdp)
  expect = lambda *spec: jax.sharding.NamedSharding(trainer.mesh, P(*spec))
  assert q.sharding.is_equivalent_to(expect("fsdp", "tensor"), 2)
  assert down.sharding.is_equivalent_to(expect("tensor", "fsdp"), 2)
  assert q.addressable_shards[0].data.shape == (64 // fsdp, 64 // tensor)
  assert down.addressable_shards[0].data.shape == (256 // tensor, 64 // fsdp)
  # The optimizer moments follow their params.
  mu = state.opt_state[1][0].mu["transformer"]["layer_0"]["attn"]["q"]["kernel"]
  assert mu.sharding.is_equivalent_to(q.sharding, 2)


def _devices_of_processes(process_of_device, shape):
  """A `[data, fsdp, tensor]` array of stand-in devices on the given processes."""
  devices = np.empty(len(process_of_device), dtype=object)
  devices[:] = [types.SimpleNamespace(process_index=p) for p in process_of_device]
  return devices.reshape(shape)


def test_every_batch_shard_lives_on_one_process():
  """Each process loads the rows of its own batch shards: a mesh that spreads one batch
  shard over the devices of two processes (tensor across hosts, or fewer batch shards
  than processes) would train every process on its own rows as if they were all."""
  mesh = lambda shape, procs: types.SimpleNamespace(
      devices=_devices_of_processes(procs, shape), shape=dict(zip(sharding.MESH_AXES, shape)))
  two_hosts = [0, 0, 1, 1]   # 2 processes x 2 devices, in device order
  assert sharding.batch_shard_processes(mesh((2, 1, 2), two_hosts).devices) == {0: {0},
                                                                                1: {1}}
  sharding.check_batch(8, mesh((2, 1, 2), two_hosts))
  sharding.check_batch(8, mesh((1, 4, 1), two_hosts))
  with pytest.raises(sharding.ShardingError, match=r"data x fsdp x tensor = 1 x 1 x 4\) puts "
                     r"batch shard 0 on the devices of processes \[0, 1\].*multiple of the 2 "
                     "processes"):
    sharding.check_batch(8, mesh((1, 1, 4), two_hosts))
  with pytest.raises(sharding.ShardingError, match="batch shard 0 on the devices of processes"):
    sharding.check_batch(8, mesh((2, 1, 2), [0, 1, 0, 1]))   # tensor across the hosts


def test_mesh_and_batch_errors_name_the_fix(tiny_corpus, tmp_path):
  with pytest.raises(sharding.ShardingError, match="needs 12 devices"):
    sharding.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
  with pytest.raises(sharding.ShardingError, match="at most one axis may be -1"):
    sharding.make_mesh({"data": -1, "fsdp": -1, "tensor": 1})
  config = _config(tiny_corpus, (8, 1, 1))
  config.train.batch_size = 12
  with pytest.raises(sharding.ShardingError, match="does not divide over 8 batch shards"):
    train.Trainer(config, str(tmp_path))
  config = _config(tiny_corpus, (1, 1, 8))
  config.model.entropy.ffn_dim = 100
  with pytest.raises(sharding.ShardingError, match="dimension of 100 that does not divide"):
    train.Trainer(config, str(tmp_path))
