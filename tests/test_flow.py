"""Rectified-flow maths: noising, conversions, shift, timestep lists and both samplers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msjax.diffusion import flow

LATENT_SHAPE = (2, 3, 4, 4, 5)  # [B, F, h, w, C]


def _latents(seed: int) -> jax.Array:
  return jax.random.normal(jax.random.PRNGKey(seed), LATENT_SHAPE)


def test_noising_endpoints_and_conversions_roundtrip():
  z0, eps = _latents(0), _latents(1)
  t = jnp.array([0.3, 0.8])
  z_t = flow.add_noise(z0, eps, t)
  np.testing.assert_allclose(flow.add_noise(z0, eps, jnp.zeros(2)), z0)
  np.testing.assert_allclose(flow.add_noise(z0, eps, jnp.ones(2)), eps)
  v = flow.velocity_target(z0, eps)
  np.testing.assert_allclose(flow.x0_from_velocity(z_t, t, v), z0, atol=1e-5)
  np.testing.assert_allclose(flow.noise_from_velocity(z_t, t, v), eps, atol=1e-5)
  # The velocity is the time derivative of the path.
  dt = 1e-2
  finite_diff = (flow.add_noise(z0, eps, t + dt) - z_t) / dt
  np.testing.assert_allclose(finite_diff, v, atol=1e-3)


def test_per_frame_timesteps_broadcast_per_frame():
  z0, eps = _latents(0), _latents(1)
  t = jnp.array([[0.0, 0.5, 1.0], [1.0, 0.5, 0.0]])
  z_t = flow.add_noise(z0, eps, t)
  np.testing.assert_allclose(z_t[0, 0], z0[0, 0])
  np.testing.assert_allclose(z_t[0, 2], eps[0, 2])
  np.testing.assert_allclose(z_t[1, 1], 0.5 * (z0[1, 1] + eps[1, 1]), atol=1e-6)
  with pytest.raises(ValueError, match="timestep shape"):
    flow.add_noise(z0, eps, jnp.zeros(3))


def test_shift_formula_fixed_points_and_monotone():
  t = jnp.linspace(0.0, 1.0, 11)
  shifted = flow.shift_timestep(t, 6.0)
  np.testing.assert_allclose(shifted, 6 * t / (1 + 5 * t), rtol=1e-6)
  np.testing.assert_allclose(flow.shift_timestep(t, 1.0), t, rtol=1e-6)
  assert shifted[0] == 0.0 and shifted[-1] == pytest.approx(1.0)
  assert bool(jnp.all(jnp.diff(shifted) > 0)) and bool(jnp.all(shifted[1:-1] > t[1:-1]))


def test_training_timesteps_follow_the_shifted_distribution():
  t = flow.sample_training_timesteps(jax.random.PRNGKey(0), (20000,), shift=5.0)
  chex.assert_shape(t, (20000,))
  # P(t' <= shift(u)) = u for u uniform: check a few quantiles.
  for u in (0.1, 0.5, 0.9):
    assert float(jnp.mean(t <= flow.shift_timestep(u, 5.0))) == pytest.approx(u, abs=0.02)
  clipped = flow.sample_training_timesteps(jax.random.PRNGKey(1), (5000,), shift=5.0, t_min=0.02, t_max=0.98)
  assert clipped.min() >= jnp.float32(0.02) and clipped.max() <= jnp.float32(0.98)
  assert float(jnp.mean(clipped == jnp.float32(0.98))) > 0.05  # shift 5 piles ~9% onto the upper clamp


def test_consistency_timesteps_match_self_forcing_warp():
  np.testing.assert_allclose(flow.consistency_timesteps(4, 5.0) * flow.NUM_TRAIN_TIMESTEPS,
                             [1000.0, 937.5, 833.333, 625.0], rtol=1e-5)
  three = flow.consistency_timesteps(3, 5.0)
  np.testing.assert_allclose(three, [1.0, 5 * (2 / 3) / (1 + 4 * 2 / 3), 5 * (1 / 3) / (1 + 4 / 3)], rtol=1e-6)
  euler = flow.euler_timesteps(4, 3.0)
  chex.assert_shape(euler, (5,))
  assert euler[0] == pytest.approx(1.0) and euler[-1] == 0.0


def test_unshift_inverts_the_shift_and_earlier_timestep_walks_the_few_step_list():
  u = jnp.linspace(0.0, 1.0, 21)
  for shift in (1.0, 3.0, 6.0):
    np.testing.assert_allclose(flow.unshift_timestep(flow.shift_timestep(u, shift), shift), u, atol=1e-6)
  steps = flow.consistency_timesteps(4, 6.0)  # 1, 0.947, 0.857, 0.667
  np.testing.assert_allclose(flow.earlier_timestep(steps[1:], 6.0, 0.25), steps[:-1], rtol=1e-5)
  np.testing.assert_allclose(flow.earlier_timestep(jnp.array([1.0, 0.99]), 6.0, 0.25), [1.0, 1.0])


def test_velocity_from_x0_leads_any_input_to_that_x0():
  z0, eps, other = _latents(0), _latents(1), _latents(2)
  t = jnp.array([0.3, 0.8])
  z_t = flow.add_noise(z0, eps, t)
  np.testing.assert_allclose(flow.velocity_from_x0(z_t, t, z0), flow.velocity_target(z0, eps), atol=1e-5)
  v = flow.velocity_from_x0(other, t, z0)
  np.testing.assert_allclose(flow.x0_from_velocity(other, t, v), z0, atol=1e-5)


def test_euler_sampler_transports_noise_to_the_data_point():
  # With the exact velocity field of a single data point, every Euler step lands on the straight path.
  target = _latents(2)
  noise = _latents(3)

  def velocity_fn(z, t):
    chex.assert_shape(t, (LATENT_SHAPE[0],))
    return (z - target) / flow._broadcast_t(t, z)

  out = jax.jit(lambda n: flow.euler_sample(velocity_fn, n, flow.euler_timesteps(8, 5.0)))(noise)
  np.testing.assert_allclose(out, target, atol=1e-4)


def test_euler_sampler_first_order_error_on_curved_field():
  # dz/dt = z has z(0) = z(1) e^{-1}: the Euler error must shrink as steps grow.
  noise = _latents(4)
  errors = []
  for steps in (4, 16, 64):
    out = flow.euler_sample(lambda z, t: z, noise, jnp.linspace(1.0, 0.0, steps + 1))
    errors.append(float(jnp.max(jnp.abs(out - noise * np.exp(-1.0)))))
  assert errors[0] > 3 * errors[1] > 9 * errors[2] > 0


def test_consistency_sampler_renoises_with_fresh_noise_and_returns_x0():
  noise = _latents(5)
  target = _latents(6)
  timesteps = flow.consistency_timesteps(3, 5.0)
  traces = []

  def velocity_fn(z, t):
    traces.append(t)
    return (z - target) / flow._broadcast_t(t, z)

  def run(rng):
    return flow.consistency_sample(velocity_fn, noise, timesteps, rng)

  out = run(jax.random.PRNGKey(0))
  np.testing.assert_allclose(out, target, atol=1e-5)
  # The step function is traced once inside the scan.
  assert len(traces) == 1

  # A predictor that never recovers x0 exactly: the output must depend on the re-noising key.
  def biased(z, t):
    return 0.5 * z

  a = flow.consistency_sample(biased, noise, timesteps, jax.random.PRNGKey(0))
  b = flow.consistency_sample(biased, noise, timesteps, jax.random.PRNGKey(1))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3
  # One manual step reproduces the single-step sampler.
  one = flow.consistency_sample(biased, noise, timesteps[:1], jax.random.PRNGKey(0))
  x0, z_next = flow.consistency_step(biased, noise, timesteps[0], 0.0, jnp.zeros_like(noise))
  np.testing.assert_allclose(one, x0, rtol=1e-6)
  np.testing.assert_allclose(z_next, x0, rtol=1e-6)
