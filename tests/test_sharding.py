"""Mesh construction, FSDP rules, and the same training on 8 forced CPU devices as on 1."""

import chex
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from msjax.train import loop, sharding
from tests import train_loop_toy as toy


def _mesh_config(data, fsdp):
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


def test_mesh_shape_fills_and_validates():
  assert sharding.mesh_shape(_mesh_config(-1, 1), 8) == (8, 1)
  assert sharding.mesh_shape(_mesh_config(2, -1), 8) == (2, 4)
  assert sharding.mesh_shape(_mesh_config(1, 1), 1) == (1, 1)
  for bad, match in (((-1, -1), "at most one -1"), ((3, -1), "does not divide"), ((2, 2), "uses 4 devices"),
                     ((0, 1), "positive")):
    with pytest.raises(ValueError, match=match):
      sharding.mesh_shape(_mesh_config(*bad), 8)
  mesh = sharding.make_mesh(_mesh_config(-1, 1))
  assert mesh.axis_names == sharding.MESH_AXES and mesh.size == jax.device_count()


def test_fsdp_spec_picks_largest_divisible_axis():
  assert sharding.fsdp_spec((30, 1536, 8960), 4, min_size=1) == PartitionSpec(None, None, "fsdp")
  assert sharding.fsdp_spec((30, 1536, 8962), 4, min_size=1) == PartitionSpec(None, "fsdp", None)
  assert sharding.fsdp_spec((64, 64), 4, min_size=1) == PartitionSpec("fsdp", None)  # ties: first axis
  assert sharding.fsdp_spec((7, 9), 4, min_size=1) == PartitionSpec()  # nothing divisible
  assert sharding.fsdp_spec((1536,), 4, min_size=2048) == PartitionSpec()  # too small to shard
  assert sharding.fsdp_spec((), 4, min_size=0) == PartitionSpec()
  assert sharding.fsdp_spec((1536, 1536), 1, min_size=1) == PartitionSpec()


def test_shard_batch_rejects_indivisible_batches():
  mesh = sharding.make_mesh(_mesh_config(-1, 1))
  batch = sharding.shard_batch(mesh, {"x": np.zeros((4, 3), np.float32)})
  chex.assert_shape(batch["x"], (4, 3))
  with pytest.raises(ValueError, match="leading batch axis"):
    sharding.shard_batch(mesh, {"x": np.float32(1.0)})


def test_eight_devices_match_one_and_checkpoint_restores_on_one(tmp_path):
  eight = toy.run_worker(tmp_path / "eight", tmp_path / "eight.npz", devices=8, mesh_data=2, mesh_fsdp=4)
  assert int(eight["devices"]) == 8
  assert int(eight["max_param_shards"]) == 4  # kernels really are split over the fsdp axis

  config = toy.toy_config()
  one_final, one_losses = toy.run(config, str(tmp_path / "one"))
  one = toy.flat_params(one_final.params)
  np.testing.assert_allclose(eight["losses"], one_losses, rtol=1e-5)
  for name, value in one.items():
    np.testing.assert_allclose(eight[f"param{name}"], value, rtol=1e-4, atol=1e-6)

  # The 8-device checkpoint restores on this 1-device process, exactly.
  restored = _restore(config, tmp_path / "eight")
  for leaf in jax.tree.leaves(restored):
    assert len(leaf.sharding.device_set) == 1
  for name, value in toy.flat_params(restored).items():
    np.testing.assert_array_equal(eight[f"param{name}"], value)


def _restore(config, workdir):
  """Final params of the newest checkpoint in `workdir`, restored into this process's 1-device layout."""
  _, _, abstract, _, iterator = toy.build(config)
  manager = loop.make_checkpoint_manager(str(workdir), config.train.keep_checkpoints)
  try:
    return loop.restore_checkpoint(manager, manager.latest_step(), abstract, iterator, config).params
  finally:
    manager.close()
