"""Self Forcing + DMD: the normalised DMD gradient (and that it pulls a toy generator to the data), gradient
truncation in the self-rollout, one generator + critic step, the student sampler, and stage resume."""

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from msjax import config_utils
from msjax import inference
from msjax.bench import stream as stream_bench
from msjax.models import dit
from msjax.models import kv_cache
from msjax.stream import rollout
from msjax.stream import sampler as sampler_lib
from msjax.train import causal_init
from msjax.train import dmd
from msjax.train import ode_pairs
import dit_fixtures
import distill_fixtures

pytestmark = pytest.mark.filterwarnings("ignore::msjax.models.text.TextTruncationWarning")


def test_dmd_gradient_is_normalised_and_is_the_loss_gradient():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x0, real, fake = (jax.random.normal(k, (2, 3, 4)) for k in keys)
  x0 = x0.at[1].multiply(10.0)  # per-sample normalisation: the far sample's gradient is not larger
  grad = dmd.dmd_gradient(x0, real, fake)
  expected = (fake - real) / jnp.mean(jnp.abs(x0 - real), axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(grad, expected, rtol=1e-6)
  loss_grad = jax.grad(lambda x: dmd.dmd_loss(x, real, fake)[0])(x0)
  np.testing.assert_allclose(loss_grad, grad / x0.size, rtol=1e-5)
  assert np.all(np.isfinite(dmd.dmd_gradient(real, real, fake)))  # 0/0 where x0 = real is defused


def _gaussian_x0(z, t, mean):
  """E[x0 | z_t] for x0 ~ N(mean, 1) under z_t = (1 - t) x0 + t eps: the exact denoiser of a Gaussian."""
  a = 1.0 - t
  return mean + a * (z - a * mean) / (a**2 + t**2)


def test_dmd_pulls_a_toy_generator_to_the_real_distribution():
  """Generator x = theta + eps; real data N(2, 1); a perfect critic N(theta, 1). Descending the DMD loss moves
  theta to 2 and shrinks the real-fake score gap."""
  real_mean, theta, lr = 2.0, jnp.full((1,), -1.0), 0.5
  objective = dmd.DMDObjective(shift=3.0, timestep_min=0.02, timestep_max=0.98, num_steps=1, chunk_frames=1,
                               latent_shape=(1, 1, 1, 64), guidance=None, image_condition="none",
                               use_tracks=False)

  def loss(theta, key):
    sample_key, noise_key = jax.random.split(key)
    x0 = theta + jax.random.normal(sample_key, (8, 1, 1, 1, 64))
    z_t, t, _ = dmd.renoise(jax.lax.stop_gradient(x0), noise_key, objective)
    tb = t[:, None, None, None, None]
    real, fake = _gaussian_x0(z_t, tb, real_mean), _gaussian_x0(z_t, tb, jax.lax.stop_gradient(theta))
    value, _ = dmd.dmd_loss(x0, real, fake)  # d value / d theta = mean of the normalised gradient
    return value, jnp.mean(jnp.abs(fake - real))

  grad_fn = jax.jit(jax.grad(loss, has_aux=True))
  gaps, distances = [], []
  for i in range(60):
    grad, gap = grad_fn(theta, jax.random.PRNGKey(i))
    theta = theta - lr * grad
    gaps.append(float(gap))
    distances.append(abs(float(theta[0]) - real_mean))
  assert distances[-1] < 0.15 * distances[0], distances[::10]
  assert np.mean(gaps[-10:]) < 0.3 * np.mean(gaps[:10]), gaps[::10]


# ---- the self-rollout -------------------------------------------------------------------------------------


def _rollout_setup(tmp_path, **overrides):
  config = distill_fixtures.micro_config(tmp_path, **overrides)
  config = causal_init.stage_config(config, dmd.STAGE)
  params = distill_fixtures.random_model(config, seed=0).dit_params
  clean, cond = dit_fixtures.random_inputs(config, jax.random.PRNGKey(1))
  return config, params, clean, cond


def _perturbation(params, key, scale):
  flat, unravel = flatten_util.ravel_pytree(params)
  return unravel(scale * jax.random.normal(key, flat.shape))


def _text_path(name: str) -> bool:
  """Parameters that only shape the text cross-attention K/V, which the stream computes once into its cache."""
  return name.startswith("text_embedding/") or any(f"cross_attn/{p}/" in name for p in ("k", "v", "norm_k"))


def test_gradient_flows_through_the_exit_step_only(tmp_path):
  """On a one-chunk clip (empty cache, so committed chunks play no part), along a parameter direction that
  leaves the text K/V alone: with exit step 0 the autodiff derivative is the whole derivative (finite
  differences agree); with the last exit step the earlier steps are cut, so it misses what flows through them.
  Along the text K/V parameters autodiff sees nothing: the cache (text K/V included) is stop-gradient."""
  config, params, clean, cond = _rollout_setup(tmp_path, **{"flow.shift": 1.0})
  geo = config_utils.geometry(config)
  # no first frame: it would be pinned into this chunk, and a pinned frame has no derivative at all
  one_chunk = cond.replace(track_grid=cond.track_grid[:, :1], first_latent=None)
  noises = jax.random.normal(jax.random.PRNGKey(2), clean[:, :geo.chunk_frames].shape)
  flat = traverse_util.flatten_dict(_perturbation(params, jax.random.PRNGKey(3), 1.0), sep="/")
  directions = [traverse_util.unflatten_dict({k: v * (_text_path(k) == text) for k, v in flat.items()}, sep="/")
                for text in (False, True)]
  assert all(float(jnp.abs(v).max()) > 0 for k, v in flat.items() if _text_path(k))
  eps = 1e-3

  @jax.jit
  def derivatives(exit_step, params, direction):
    f = lambda p: causal_init.stream_clip(p, config, one_chunk, noises, jax.random.PRNGKey(4), exit_step[None])
    _, autodiff = jax.jvp(f, (params,), (direction,))
    plus = f(jax.tree.map(lambda p, d: p + eps * d, params, direction))
    minus = f(jax.tree.map(lambda p, d: p - eps * d, params, direction))
    return autodiff, (plus - minus) / (2 * eps)

  def relative_gap(exit_step, direction):
    autodiff, finite = derivatives(jnp.asarray(exit_step), params, direction)
    return float(jnp.linalg.norm(autodiff - finite) / jnp.linalg.norm(finite)), float(jnp.abs(autodiff).max())

  gap, size = relative_gap(0, directions[0])
  assert gap < 0.02 and size > 1e-3
  gap, size = relative_gap(config.stream.num_steps - 1, directions[0])
  assert gap > 0.1 and size > 1e-3
  gap, size = relative_gap(0, directions[1])
  assert gap > 0.99 and size == 0.0


def _two_chunk_setup(tmp_path):
  """A 2-chunk clip and `last_alone(p, cache)`: the weighted last chunk rolled out alone against `cache`."""
  config, params, clean, cond = _rollout_setup(tmp_path, **{"video.num_frames": 5})  # 2 chunks of 1 frame
  c = config.stream.chunk_frames
  noises = jax.random.normal(jax.random.PRNGKey(2), clean.shape)
  weights = jax.random.normal(jax.random.PRNGKey(5), clean[:, -c:].shape)
  split = cond.track_grid.shape[1] - config.codec.temporal_stride * c  # pixel frames before the last chunk
  exits = jnp.asarray([1, 0])

  def last_alone(p, cache):
    _, x0 = rollout.rollout(p, cache, noises[:, -c:], cond.replace(track_grid=cond.track_grid[:, split:]),
                            rollout.student_timesteps(config), jax.random.PRNGKey(4), exit_steps=exits[-1:])
    return jnp.sum(weights * x0)

  def whole(p):
    x0 = causal_init.stream_clip(p, config, cond, noises, jax.random.PRNGKey(4), exits)
    return jnp.sum(weights * x0[:, -c:])

  def cache_before_last(p):
    state = kv_cache.init_cache(p, config, cond, noises.shape[0])
    state, _ = rollout.rollout(p, state, noises[:, :-c], cond.replace(track_grid=cond.track_grid[:, :split]),
                               rollout.student_timesteps(config), jax.random.PRNGKey(4), exit_steps=exits[:-1])
    return state

  return config, params, clean, cond, split, last_alone, whole, cache_before_last


def test_cached_keys_and_values_carry_no_gradient(tmp_path):
  """A chunk rolled out against a filled cache: its parameters get gradient, the cache's K/V get none."""
  config, params, clean, cond, split, last_alone, _, _ = _two_chunk_setup(tmp_path)
  cache = kv_cache.init_cache(params, config, cond, clean.shape[0])
  cache = jax.jit(kv_cache.commit)(params, cache, clean[:, :config.stream.chunk_frames],
                                   cond.replace(track_grid=cond.track_grid[:, :split]))
  param_grad, cache_grad = jax.jit(jax.grad(last_alone, argnums=(0, 1), allow_int=True))(params, cache)
  assert float(jnp.abs(flatten_util.ravel_pytree(param_grad)[0]).max()) > 1e-4
  float_grads = [g for g in jax.tree.leaves(cache_grad) if g.dtype.kind == "f"]
  assert float(jnp.abs(cache.sink_k).max()) > 0 and len(float_grads) >= 4
  assert all(float(jnp.abs(g).max()) == 0.0 for g in float_grads)


@pytest.mark.slow
def test_committed_chunks_pass_no_gradient_to_later_ones(tmp_path):
  """The last chunk's gradient through the whole rollout equals its gradient rolled out alone against a constant
  copy of the cache the earlier chunk left: that chunk's K/V, made from the same parameters, pass nothing back."""
  _, params, _, _, _, last_alone, whole, cache_before_last = _two_chunk_setup(tmp_path)

  @jax.jit
  def gradients(p):
    return jax.grad(whole)(p), jax.grad(last_alone)(p, jax.lax.stop_gradient(cache_before_last(p)))

  grad_whole, grad_alone = (flatten_util.ravel_pytree(g)[0] for g in gradients(params))
  assert float(jnp.abs(grad_whole).max()) > 1e-4
  np.testing.assert_allclose(grad_whole, grad_alone, atol=1e-5 * float(jnp.abs(grad_whole).max()))


# ---- one step of the stage ----------------------------------------------------------------------------------


def _step_setup(tmp_path):
  config = causal_init.stage_config(distill_fixtures.micro_config(tmp_path), dmd.STAGE)
  teacher_model = distill_fixtures.random_model(config, seed=0)
  student = distill_fixtures.random_model(config, seed=5)
  objective = dmd.DMDObjective.from_config(config)
  optimizers = dmd.Optimizers.from_config(config)
  params = causal_init.student_params(student.dit_params, teacher_model)
  state = dmd.create_state(params, {dmd.DIT_PARAMS: teacher_model.dit_params}, optimizers, jax.random.PRNGKey(0))
  groups = 1 + config.dmd.critic_steps
  _, cond = dit_fixtures.random_inputs(config, jax.random.PRNGKey(1), batch=groups * config.train.batch_size)
  batch = {"first_latent": cond.first_latent, "track_grid": cond.track_grid, "context": cond.context}
  null = teacher_model.text_encoder.null_context(teacher_model.text_params)[0]
  return config, teacher_model, objective, optimizers, state, batch, null


@pytest.mark.slow
def test_one_generator_and_critic_step(tmp_path):
  """A full DMD step: the generator and the critic both move, the generator's text encoder does not, the EMA
  follows, and the metrics are finite."""
  config, teacher_model, objective, optimizers, state, batch, null = _step_setup(tmp_path)
  step = dmd.make_dmd_step(dit.WanDiT(teacher_model.spec), config, objective, optimizers, config.dmd.critic_steps)
  before = jax.tree.map(np.asarray, state)
  new_state, metrics = jax.jit(step)(state, batch, teacher_model.dit_params, null)
  assert int(new_state.step) == 1
  assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  assert float(metrics["grad_norm"]) > 0 and float(metrics["critic_grad_norm"]) > 0

  def moved(a, b):
    return max(float(np.abs(np.asarray(x) - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  assert moved(new_state.params[dmd.DIT_PARAMS], before.params[dmd.DIT_PARAMS]) > 0
  assert moved(new_state.critic_params, before.critic_params) > 0
  assert moved(new_state.ema_params[dmd.DIT_PARAMS], before.ema_params[dmd.DIT_PARAMS]) > 0
  assert moved(new_state.params[causal_init.TEXT_PARAMS], before.params[causal_init.TEXT_PARAMS]) == 0


@pytest.mark.slow
def test_generator_loss_has_gradient_and_critic_loss_trains_the_critic(tmp_path):
  config, teacher_model, objective, _, state, batch, null = _step_setup(tmp_path)
  network = dit.WanDiT(teacher_model.spec)
  one = jax.tree.map(lambda x: x[:1], batch)
  generator = functools.partial(dmd.generator_loss, critic_params=state.critic_params,
                                teacher_params=teacher_model.dit_params, null_context=null, model=network,
                                config=config, objective=objective)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(generator, has_aux=True))(state.params, one,
                                                                                jax.random.PRNGKey(2))
  assert np.isfinite(float(loss)) and float(metrics["real_fake_gap"]) > 0
  grad_dit = flatten_util.ravel_pytree(grads[dmd.DIT_PARAMS])[0]
  assert np.all(np.isfinite(grad_dit)) and float(jnp.abs(grad_dit).max()) > 0
  critic = functools.partial(dmd.critic_loss, generator_params=state.params, model=network, config=config,
                             objective=objective)
  critic_grads = jax.jit(jax.grad(lambda p: critic(p, one, jax.random.PRNGKey(3))[0]))(state.critic_params)
  assert float(jnp.abs(flatten_util.ravel_pytree(critic_grads)[0]).max()) > 0


def test_student_sample_pins_the_first_frame_and_follows_its_key(tmp_path):
  config, _, clean, cond = _rollout_setup(tmp_path)
  model = distill_fixtures.random_model(config, seed=0)
  first = clean[:, 0]
  sample = dmd.student_sample(model, first, cond, jax.random.PRNGKey(0))
  assert sample.shape == clean.shape
  np.testing.assert_array_equal(sample[:, 0], first)
  np.testing.assert_array_equal(dmd.student_sample(model, first, cond, jax.random.PRNGKey(0)), sample)
  assert not np.allclose(dmd.student_sample(model, first, cond, jax.random.PRNGKey(1)), sample, atol=1e-3)
  two_frame_chunks = config.copy_and_resolve_references()
  two_frame_chunks.stream.chunk_frames = 2  # 3 latent frames are not whole chunks of 2
  with pytest.raises(ValueError, match="not whole chunks"):
    dmd.student_sample(dataclasses.replace(model, config=two_frame_chunks), first, cond, jax.random.PRNGKey(0))


@pytest.mark.slow
def test_student_sample_is_the_streaming_samplers_stream(tmp_path):
  """student_sample with key k makes the chunks StreamSampler makes with seed k (same noise, same steps, same
  cache): train/test parity of the rollout, up to float rounding between two compiled programs."""
  config, _, clean, cond = _rollout_setup(tmp_path)
  model = distill_fixtures.random_model(config, seed=0)
  geo = config_utils.geometry(config)
  seed = 7
  sampler = sampler_lib.StreamSampler(model)
  state = sampler.start(cond.replace(track_grid=None), seed=seed)
  chunks = []
  for i in range(geo.latent_frames // geo.chunk_frames):
    grid = dit_fixtures.chunk_track_grid(cond.track_grid, i, geo.chunk_frames, config.codec.temporal_stride)
    state, frames = sampler.chunk_step(state, grid)
    chunks.append(np.asarray(frames))
  streamed = np.concatenate(chunks, axis=1).astype(np.int32)
  latents = dmd.student_sample(model, clean[:, 0], cond, jax.random.key(seed))
  sampled = inference.to_uint8(model.codec.decode(model.codec_params, latents)).astype(np.int32)
  assert streamed.shape == sampled.shape
  assert np.abs(streamed - sampled).max() <= 1 and np.mean(streamed != sampled) < 0.01


@pytest.mark.slow
def test_stage_resumes_to_the_same_parameters(tmp_path):
  """N steps, then N more from the checkpoint, equal 2N straight (generator, its EMA, critic)."""
  config = distill_fixtures.micro_config(tmp_path)
  teacher_model = distill_fixtures.saved_teacher(config)
  distill_fixtures.save_model(distill_fixtures.random_model(config, seed=5), config.dmd.init_checkpoint, "student")
  config.dmd.train.update(eval_every=0, checkpoint_every=1)
  del teacher_model

  def run(workdir, steps):
    run_config = config.copy_and_resolve_references()
    run_config.dmd.workdir = str(tmp_path / workdir)
    run_config.dmd.train.steps = steps
    return dmd.train(run_config)

  straight = run("straight", 2)
  run("resumed", 1)
  resumed = run("resumed", 2)
  assert int(resumed.step) == 2
  for a, b in zip(jax.tree.leaves((straight.params, straight.ema_params, straight.critic_params)),
                  jax.tree.leaves((resumed.params, resumed.ema_params, resumed.critic_params))):
    np.testing.assert_allclose(a, b, atol=1e-6)
  exported = inference.load_model(str(tmp_path / "resumed"), config)
  assert exported.stage == dmd.STAGE


@pytest.mark.slow
def test_train_py_runs_the_dmd_stage_and_writes_a_sample(tmp_path):
  config = distill_fixtures.micro_config(tmp_path, small_text=False)
  distill_fixtures.saved_teacher(config)
  distill_fixtures.save_model(distill_fixtures.random_model(config, seed=5), config.dmd.init_checkpoint, "student")
  output = distill_fixtures.run_train_py(config, tmp_path, [
      "--config.stage=dmd", "--config.dmd.train.steps=1", "--config.dmd.train.eval_every=1"])
  assert re.search(r"step 1: .*critic_loss=.*loss=", output)
  assert re.search(r"eval/val_critic_loss=.*eval/val_real_fake_gap_t0.5=", output)
  assert os.path.isfile(os.path.join(config.dmd.workdir, "samples", "step_0000001.gif"))


def test_train_step_benchmark_times_both_student_stages(tmp_path):
  """`python -m msjax.bench.train_step` runs the step `train.py` runs for causal adaptation and for DMD."""
  config = distill_fixtures.micro_config(tmp_path, small_text=False)
  distill_fixtures.saved_teacher(config)
  distill_fixtures.save_model(distill_fixtures.random_model(config, seed=5), config.dmd.init_checkpoint, "student")
  ode_pairs.generate(config, config.ode_pairs.dir, None)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=distill_fixtures.REPO)
  env.pop("XLA_FLAGS", None)

  def bench(stage, *extra):
    args = [sys.executable, "-m", "msjax.bench.train_step", *distill_fixtures.cli_overrides(config),
            f"--config.stage={stage}", "--steps=1", f"--json={tmp_path / stage}.json", *extra]
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=distill_fixtures.TRAIN_TIMEOUT_S)

  # A DMD step reads the generator's batch of 1 and one more for each of the 2 critic updates.
  for stage, batch, clips in ((causal_init.STAGE, 2, 2), (dmd.STAGE, 1, 1 + 2)):
    result = bench(stage)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"tiny {stage} step, batch {batch} x 9 frames" in result.stdout
    report = json.loads((tmp_path / f"{stage}.json").read_text())
    assert report["stage"] == stage and report["clips_per_step"] == clips
    assert report["clips_per_s"] == pytest.approx(clips / (report["step_ms_mean"] / 1000))
    assert np.isfinite(report["loss_first"])
    if stage == dmd.STAGE:
      assert report["gflop_per_step"] is None and "not counted" in result.stdout
    else:
      resolved = causal_init.stage_config(config, stage)
      assert report["gflop_per_step"] == pytest.approx(3 * 2 * stream_bench.dit_flops(resolved, 3, 3) / 1e9)
  missing = bench(causal_init.STAGE, f"--config.ode_pairs.dir={tmp_path / 'no_pairs'}")
  assert missing.returncode == 2 and "no_pairs" in missing.stderr and "Traceback" not in missing.stderr
