"""A stand-in stage for the training-loop tests: a small MLP regression fed by a grain pipeline.

Importable by the tests, and runnable as a worker process (`python tests/train_loop_toy.py --workdir ...`)
so tests can kill it with SIGKILL or give it 8 forced CPU devices. The worker writes the final parameters
and the per-step losses to `--out` (.npz).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from msjax.train import loop, sharding, state as state_lib  # pylint: disable=g-import-not-at-top

FEATURES, HIDDEN, OUTPUTS = 16, 64, 8
DATASET_SIZE = 96
WORKER_TIMEOUT_S = 240


class ToyModel(nn.Module):
  """Two dense layers: big enough that fsdp shards the kernels, small enough to train in milliseconds."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.gelu(nn.Dense(HIDDEN)(x))
    return nn.Dense(OUTPUTS)(x)


def toy_config(**train_overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict({"hidden": HIDDEN})
  c.optim = ml_collections.ConfigDict(dict(learning_rate=3e-3, warmup_steps=3, b1=0.9, b2=0.999,
                                           weight_decay=0.01, grad_clip=1.0, ema_decay=0.9, schedule="cosine",
                                           cooldown_steps=0))
  c.train = ml_collections.ConfigDict(dict(steps=12, batch_size=8, grad_accum=1, log_every=4, eval_every=6,
                                           checkpoint_every=4, keep_checkpoints=2))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=256))
  c.train.update(train_overrides)
  return c


def make_example(index: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(index)
  x = rng.standard_normal(FEATURES).astype(np.float32)
  y = np.sin(x[:OUTPUTS] * 2.0) + 0.5 * x[OUTPUTS:]
  return {"x": x, "y": y.astype(np.float32)}


def make_iterator(batch_size: int, seed: int) -> grain.DatasetIterator:
  dataset = (grain.MapDataset.range(DATASET_SIZE).shuffle(seed=seed).repeat().map(make_example)
             .batch(batch_size, drop_remainder=True))
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def loss_fn(params, batch, rng):
  """MSE with a little input noise, so the per-step keys matter for exact resume."""
  x = batch["x"] + 0.01 * jax.random.normal(rng, batch["x"].shape)
  pred = ToyModel().apply({"params": params}, x)
  loss = jnp.mean((pred - batch["y"]) ** 2)
  return loss, {"abs_error": jnp.mean(jnp.abs(pred - batch["y"]))}


def build(config: ml_collections.ConfigDict):
  """(mesh, state initializer, abstract state, jitted step, iterator): what a stage assembles for the loop."""
  mesh = sharding.make_mesh(config.mesh)
  tx = state_lib.make_optimizer(config.optim, config.train.steps)

  def init_fn(rng):
    init_rng, state_rng = jax.random.split(rng)
    params = ToyModel().init(init_rng, jnp.zeros((1, FEATURES)))["params"]
    return state_lib.create_train_state(params, tx, state_rng)

  rng = jax.random.PRNGKey(config.seed)
  abstract = sharding.abstract_sharded(init_fn, mesh, rng, config.mesh.fsdp_min_size)
  step = state_lib.make_train_step(loss_fn, tx, config.optim.ema_decay, config.train.grad_accum,
                                   state_lib.learning_rate_schedule(config.optim, config.train.steps))
  jitted = sharding.jit_train_step(step, mesh, sharding.shardings_of(abstract))
  return (mesh, lambda: sharding.init_sharded(init_fn, abstract, rng), abstract, jitted,
          make_iterator(config.train.batch_size, config.seed))


def flat_params(tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def run(config: ml_collections.ConfigDict, workdir: str, eval_hook=None, sleep_per_step: float = 0.0):
  """Builds the toy stage and runs the shared loop; returns (final state, losses of the steps run here)."""
  mesh, init_state, abstract, step_fn, iterator = build(config)
  losses = []

  def recording_step(state, batch):
    if sleep_per_step:
      time.sleep(sleep_per_step)
    new_state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
    return new_state, metrics

  final = loop.train_loop(config, workdir, init_state, abstract, recording_step, iterator,
                          lambda batch: sharding.shard_batch(mesh, batch), eval_hook)
  return final, np.asarray(losses)


def run_worker(workdir, out, devices: int = 1, timeout_s: float = WORKER_TIMEOUT_S, **flags):
  """Runs `main` in a fresh process with `devices` forced CPU devices; returns its .npz contents."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  args = [sys.executable, os.path.abspath(__file__), "--workdir", str(workdir), "--out", str(out)]
  args += [f"--{name}={value}" for name, value in flags.items()]
  result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s)
  assert result.returncode == 0, result.stderr[-3000:]
  return dict(np.load(out))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--checkpoint_every", type=int, default=4)
  parser.add_argument("--mesh_data", type=int, default=-1)
  parser.add_argument("--mesh_fsdp", type=int, default=1)
  parser.add_argument("--sleep_per_step", type=float, default=0.0)
  args = parser.parse_args()
  config = toy_config(steps=args.steps, checkpoint_every=args.checkpoint_every)
  config.mesh.data, config.mesh.fsdp = args.mesh_data, args.mesh_fsdp
  final, losses = run(config, args.workdir, sleep_per_step=args.sleep_per_step)
  np.savez(args.out, losses=losses, devices=jax.device_count(),
           max_param_shards=max(len({str(s.index) for s in leaf.addressable_shards})
                                for leaf in jax.tree.leaves(final.params)),
           **{f"param{k}": v for k, v in flat_params(final.params).items()},
           **{f"ema{k}": v for k, v in flat_params(final.ema_params).items()})


if __name__ == "__main__":
  main()
