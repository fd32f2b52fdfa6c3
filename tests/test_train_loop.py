"""The shared training machinery: optimizer, EMA, gradient accumulation, checkpoints and exact resume."""

import glob
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import models
from msjax import config_utils
from msjax.train import loop, state as state_lib
from tests import train_loop_toy as toy

WORKER = os.path.abspath(toy.__file__)


def _params_of(run: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: v for k, v in run.items() if k.startswith(("param", "ema"))}


def _toy_params(seed: int = 0):
  return toy.ToyModel().init(jax.random.PRNGKey(seed), jnp.zeros((1, toy.FEATURES)))["params"]


def _toy_batch(size: int = 8):
  examples = [toy.make_example(i) for i in range(size)]
  return {k: jnp.stack([e[k] for e in examples]) for k in examples[0]}


def _deterministic_loss(params, batch, rng):
  del rng
  pred = toy.ToyModel().apply({"params": params}, batch["x"])
  return jnp.mean((pred - batch["y"]) ** 2), {"pred_mean": jnp.mean(pred)}


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
  reference = toy.run_worker(tmp_path / "reference", tmp_path / "reference.npz")
  workdir = tmp_path / "killed"
  args = [sys.executable, WORKER, "--workdir", str(workdir), "--out", str(tmp_path / "never.npz"),
          "--sleep_per_step=0.4"]
  proc = subprocess.Popen(args, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first_checkpoint = workdir / loop.CHECKPOINT_SUBDIR / "4"
  try:
    deadline = time.monotonic() + toy.WORKER_TIMEOUT_S
    while not first_checkpoint.is_dir() and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    assert first_checkpoint.is_dir(), "the worker never committed its step-4 checkpoint"
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL, "the worker finished before it could be killed"
  assert not (tmp_path / "never.npz").exists()

  resumed = toy.run_worker(workdir, tmp_path / "resumed.npz")
  steps_after_resume = len(resumed["losses"])
  assert 0 < steps_after_resume < len(reference["losses"]), "the restarted run did not resume"
  np.testing.assert_array_equal(resumed["losses"], reference["losses"][-steps_after_resume:])
  chex.assert_trees_all_close(_params_of(resumed), _params_of(reference), atol=1e-6, rtol=0)
  # No temporary (half-written) checkpoint survives the restart, and only the newest 2 are kept.
  assert not glob.glob(str(workdir / loop.CHECKPOINT_SUBDIR / "*tmp*"))
  assert sorted(os.listdir(workdir / loop.CHECKPOINT_SUBDIR)) == ["12", "8"]


def test_gradient_accumulation_equals_big_batch():
  params, batch = _toy_params(), _toy_batch(8)
  rng = jax.random.PRNGKey(0)
  loss_1, metrics_1, grads_1 = state_lib.accumulate_gradients(_deterministic_loss, params, batch, rng, 1)
  loss_4, metrics_4, grads_4 = jax.jit(
      lambda p, b: state_lib.accumulate_gradients(_deterministic_loss, p, b, rng, 4))(params, batch)
  np.testing.assert_allclose(loss_4, loss_1, rtol=1e-6)
  np.testing.assert_allclose(metrics_4["pred_mean"], metrics_1["pred_mean"], rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(grads_4, grads_1, rtol=1e-5, atol=1e-7)

  # The full update with accumulation matches the big-batch update.
  optim = toy.toy_config().optim
  tx = state_lib.make_optimizer(optim, 10)
  start = state_lib.create_train_state(params, tx, rng)
  big, _ = state_lib.make_train_step(_deterministic_loss, tx, 0.9, 1)(start, batch)
  accumulated, _ = state_lib.make_train_step(_deterministic_loss, tx, 0.9, 4)(start, batch)
  chex.assert_trees_all_close(accumulated.params, big.params, rtol=1e-5, atol=1e-7)

  # Micro-batches are strided (sample i goes to micro-batch i % k) and really are smaller.
  split = state_lib.split_micro_batches({"i": jnp.arange(8)}, 4)["i"]
  np.testing.assert_array_equal(split, [[0, 4], [1, 5], [2, 6], [3, 7]])
  with pytest.raises(ValueError, match="divisible by grad_accum"):
    state_lib.split_micro_batches({"i": jnp.arange(6)}, 4)


def constant_config(optim):
  """A copy of `optim` with the constant schedule."""
  copied = optim.copy_and_resolve_references()
  copied.schedule = "constant"
  return copied


def test_schedule_clipping_decay_mask_and_ema():
  optim = toy.toy_config().optim
  optim.warmup_steps, optim.schedule = 4, "cosine"
  cosine = state_lib.learning_rate_schedule(optim, 20)
  assert float(cosine(0)) == 0.0
  assert float(cosine(2)) == pytest.approx(optim.learning_rate / 2)
  assert float(cosine(4)) == pytest.approx(optim.learning_rate)
  assert float(cosine(20)) == pytest.approx(0.0, abs=1e-9)
  optim.schedule = "constant"
  constant = state_lib.learning_rate_schedule(optim, 20)
  assert float(constant(2)) == pytest.approx(optim.learning_rate / 2)
  assert float(constant(19)) == pytest.approx(optim.learning_rate)
  optim.schedule, optim.cooldown_steps = "wsd", 8
  wsd = state_lib.learning_rate_schedule(optim, 20)
  assert float(wsd(2)) == pytest.approx(optim.learning_rate / 2)
  assert float(wsd(12)) == pytest.approx(optim.learning_rate)  # the cooldown starts at 20 - 8
  assert float(wsd(16)) == pytest.approx(optim.learning_rate / 2)
  assert float(wsd(20)) == pytest.approx(0.0, abs=1e-9)
  # A constant-rate run's optimizer state restores into a wsd optimizer: the cooldown is a relaunch flag.
  params = {"kernel": jnp.ones((4, 4))}
  assert (jax.tree.structure(state_lib.make_optimizer(optim, 20).init(params))
          == jax.tree.structure(state_lib.make_optimizer(constant_config(optim), 20).init(params)))
  for cooldown_steps in (0, 17):  # none, or reaching into the warmup
    optim.cooldown_steps = cooldown_steps
    with pytest.raises(ValueError, match="cooldown_steps"):
      state_lib.learning_rate_schedule(optim, 20)
  optim.schedule = "linear"
  with pytest.raises(ValueError, match="optim.schedule"):
    state_lib.learning_rate_schedule(optim, 20)

  optim.schedule, optim.warmup_steps, optim.grad_clip, optim.weight_decay = "constant", 0, 1.0, 0.5
  params = {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}
  tx = state_lib.make_optimizer(optim, 10)
  start = state_lib.create_train_state(params, tx, jax.random.PRNGKey(0))
  # Zero gradients: only decoupled weight decay moves parameters, and only the matrix.
  stepped = state_lib.apply_gradients(start, jax.tree.map(jnp.zeros_like, params), tx, ema_decay=0.75)
  np.testing.assert_array_equal(stepped.params["bias"], params["bias"])
  decayed = 1.0 - optim.learning_rate * optim.weight_decay  # one step of decoupled decay from 1.0
  assert float(stepped.params["kernel"][0, 0]) == pytest.approx(decayed, rel=1e-5)
  # Layers stacked by scan: a per-layer bias, norm scale or modulation table is 2-D or more, yet not decayed.
  stacked = {"blocks": {"q": {"kernel": jnp.ones((2, 4, 4)), "bias": jnp.ones((2, 4))},
                        "norm_q": {"scale": jnp.ones((2, 4))}, "modulation": jnp.ones((2, 6, 4))},
             "token_embed": {"embedding": jnp.ones((5, 4))}}
  stacked_start = state_lib.create_train_state(stacked, tx, jax.random.PRNGKey(0))
  moved = state_lib.apply_gradients(stacked_start, jax.tree.map(jnp.zeros_like, stacked), tx, ema_decay=0.75).params
  expected = {"blocks": {"q": {"kernel": jnp.full((2, 4, 4), decayed), "bias": jnp.ones((2, 4))},
                         "norm_q": {"scale": jnp.ones((2, 4))}, "modulation": jnp.ones((2, 6, 4))},
              "token_embed": {"embedding": jnp.full((5, 4), decayed)}}
  chex.assert_trees_all_close(moved, expected, rtol=1e-6)
  # EMA warm-up: at step 0 the decay is min(0.75, 1/10); late in a run it is the configured 0.75.
  chex.assert_trees_all_close(stepped.ema_params,
                              jax.tree.map(lambda p, q: 0.1 * p + 0.9 * q, params, stepped.params))
  assert int(stepped.step) == 1
  late = state_lib.apply_gradients(start.replace(step=jnp.asarray(1000, jnp.int32)),
                                   jax.tree.map(jnp.zeros_like, params), tx, ema_decay=0.75)
  chex.assert_trees_all_close(late.ema_params, jax.tree.map(lambda p, q: 0.75 * p + 0.25 * q, params, late.params))
  # Clipping: a huge gradient is cut to global norm grad_clip before Adam sees it.
  clip_only = optax.clip_by_global_norm(optim.grad_clip)
  clipped, _ = clip_only.update({"g": jnp.full((3,), 100.0)}, clip_only.init(None))
  assert float(optax.global_norm(clipped)) == pytest.approx(optim.grad_clip, rel=1e-5)
  assert isinstance(tx, optax.GradientTransformation)


def test_eval_hook_tensorboard_and_config_mismatch(tmp_path):
  config = toy.toy_config(steps=4, checkpoint_every=2, log_every=2, eval_every=3)
  calls = []

  def eval_hook(step, state):
    calls.append(step)
    assert int(state.step) == step
    return {"score": float(step)}

  final, _ = toy.run(config, str(tmp_path), eval_hook)
  assert int(final.step) == 4 and calls == [3, 4]
  assert glob.glob(str(tmp_path / loop.TENSORBOARD_SUBDIR / "events.out.tfevents.*"))
  # Asking for more steps continues from the saved step 4.
  config.train.steps = 5
  resumed, losses = toy.run(config, str(tmp_path))
  assert int(resumed.step) == 5 and len(losses) == 1
  # A different model in the same workdir is refused with the differing key named.
  config.train.steps = 6
  config.model.hidden = toy.HIDDEN * 2
  with pytest.raises(loop.CheckpointMismatchError, match="model.hidden"):
    toy.run(config, str(tmp_path))


def test_a_checkpoint_older_than_a_config_key_matches_the_value_it_was_trained_with():
  # Checkpoints written before tracks.splat existed were rasterised with nearest cells.
  config = models.tiny()
  saved = loop._config_json(config)  # pylint: disable=protected-access
  del saved["tracks"]["splat"]
  loop.check_config_compatible(saved, config, "old")
  config.tracks.splat = "bilinear"
  with pytest.raises(loop.CheckpointMismatchError, match="tracks.splat: checkpoint 'nearest', config 'bilinear'"):
    loop.check_config_compatible(saved, config, "old")
  config.tracks.splat = "cubic"
  with pytest.raises(config_utils.ConfigError, match="tracks.splat"):
    config_utils.geometry(config)
  # ... and before model.track_input_scale existed, the track head read the grid unscaled.
  config = models.tiny()
  saved = loop._config_json(config)  # pylint: disable=protected-access
  del saved["model"]["track_input_scale"]
  loop.check_config_compatible(saved, config, "old")
  config.model.track_input_scale = 32.0
  with pytest.raises(loop.CheckpointMismatchError, match="model.track_input_scale: checkpoint 1.0, config 32.0"):
    loop.check_config_compatible(saved, config, "old")


def test_a_run_resumes_under_other_execution_settings():
  """Compute dtype, attention kernel, remat and the layer loop leave the parameters as they are."""
  config = models.tiny()
  saved = loop._config_json(config)  # pylint: disable=protected-access
  config.model.scan_layers = not config.model.scan_layers
  config.model.remat = not config.model.remat
  config.model.dtype, config.model.attention = "bfloat16", "cudnn"
  loop.check_config_compatible(saved, config, "old")
  config.model.num_layers += 1
  with pytest.raises(loop.CheckpointMismatchError, match="model.num_layers") as error:
    loop.check_config_compatible(saved, config, "old")
  assert "scan_layers" not in str(error.value)
