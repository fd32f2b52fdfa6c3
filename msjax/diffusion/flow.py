"""Rectified flow: every piece of timestep maths in msjax lives here.

Conventions (paper section 3.1, Wan):
  t in [0, 1] (t = 1 is pure noise); z_t = (1 - t) z0 + t eps; the network predicts the velocity
  v = eps - z0. Models that embed Wan's 0..1000 timestep scale multiply by `NUM_TRAIN_TIMESTEPS` themselves.

A timestep `t` is either one value per sample ([B]) or one per sample and latent frame ([B, F]); it is
broadcast over the remaining axes of the latent ([B, F, h, w, C]). The student's per-frame modulation and
Wan 2.2's clean first frame (t = 0 on frame 0) both need the [B, F] form.

Samplers take a `velocity_fn(z, t) -> v` with `t` of shape [B], so the same sampler serves the teacher
(with guidance folded into `velocity_fn`), the critic and the student.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

NUM_TRAIN_TIMESTEPS = 1000  # Wan / Self Forcing express t on a 0..1000 scale

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def _broadcast_t(t: jax.Array, x: jax.Array) -> jax.Array:
  """Appends singleton axes so a [B] or [B, F] timestep multiplies a [B, F, ...] latent."""
  t = jnp.asarray(t, jnp.float32)
  if t.ndim > x.ndim or x.shape[:t.ndim] != t.shape:
    raise ValueError(f"timestep shape {t.shape} is not a leading prefix of the latent shape {x.shape}")
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim)).astype(x.dtype)


def add_noise(z0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """Forward process: z_t = (1 - t) z0 + t eps."""
  chex.assert_equal_shape([z0, noise])
  tb = _broadcast_t(t, z0)
  return (1.0 - tb) * z0 + tb * noise


def velocity_target(z0: jax.Array, noise: jax.Array) -> jax.Array:
  """The regression target of flow matching: v = eps - z0 (independent of t)."""
  chex.assert_equal_shape([z0, noise])
  return noise - z0


def x0_from_velocity(z_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """Clean sample implied by a velocity: z0 = z_t - t v."""
  chex.assert_equal_shape([z_t, v])
  return z_t - _broadcast_t(t, z_t) * v


def velocity_from_x0(z_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
  """The velocity whose x0 is `x0`: v = (z_t - x0) / t (t > 0). For z_t = add_noise(z0, eps, t) and x0 = z0 it
  is `velocity_target(z0, eps)`; for any other z_t it is the target that leads z_t back to x0."""
  chex.assert_equal_shape([z_t, x0])
  return (z_t - x0) / _broadcast_t(t, z_t)


def noise_from_velocity(z_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """Noise implied by a velocity: eps = z_t + (1 - t) v."""
  chex.assert_equal_shape([z_t, v])
  return z_t + (1.0 - _broadcast_t(t, z_t)) * v


def shift_timestep(t: jax.Array, shift: float) -> jax.Array:
  """Wan's timestep shift t' = k t / (1 + (k - 1) t): k > 1 spends more time at high noise.

  It maps [0, 1] onto itself, keeps both ends fixed and is the identity at k = 1.
  """
  t = jnp.asarray(t, jnp.float32)
  return shift * t / (1.0 + (shift - 1.0) * t)


def unshift_timestep(t: jax.Array, shift: float) -> jax.Array:
  """The inverse of `shift_timestep`: u = t / (k - (k - 1) t), the uniform time that the shift reads as t."""
  t = jnp.asarray(t, jnp.float32)
  return t / (shift - (shift - 1.0) * t)


def earlier_timestep(t: jax.Array, shift: float, gap: float) -> jax.Array:
  """The time `gap` before t on the uniform grid the shift reads, capped at 1: with gap = 1/K it is the step
  before t in a K-step `consistency_timesteps` list (t = shift(1 - k/K) gives shift(1 - (k - 1)/K))."""
  return shift_timestep(jnp.minimum(1.0, unshift_timestep(t, shift) + gap), shift)


def sample_training_timesteps(rng: jax.Array, shape: tuple[int, ...], shift: float, t_min: float = 0.0,
                              t_max: float = 1.0) -> jax.Array:
  """Training timesteps: u ~ U[0, 1), then t = shift(u), then clipped to [t_min, t_max].

  This is Wan's recipe (uniform over the 1000 training timesteps, read through the shifted table) in
  continuous form. The clip is Self Forcing's DMD clamp ([0.02, 0.98]); the defaults leave t unclipped.
  """
  u = jax.random.uniform(rng, shape, jnp.float32)
  return jnp.clip(shift_timestep(u, shift), min=t_min, max=t_max)


def euler_timesteps(num_steps: int, shift: float) -> jax.Array:
  """`num_steps + 1` descending times from 1 to 0: a uniform grid read through the shift."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  return shift_timestep(jnp.linspace(1.0, 0.0, num_steps + 1), shift)


def euler_sample(velocity_fn: VelocityFn, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
  """Integrates the flow ODE dz/dt = v from `timesteps[0]` down to `timesteps[-1]` with Euler steps.

  `timesteps` is a descending [N + 1] list (e.g. `euler_timesteps`); `velocity_fn` is called N times,
  inside a `lax.scan`, so it is traced once.
  """
  chex.assert_rank(timesteps, 1)
  batch = noise.shape[0]

  def step(z, t_pair):
    t_now, t_next = t_pair[0], t_pair[1]
    v = velocity_fn(z, jnp.full((batch,), t_now, jnp.float32))
    chex.assert_equal_shape([z, v])
    return z + (t_next - t_now).astype(z.dtype) * v, None

  pairs = jnp.stack([timesteps[:-1], timesteps[1:]], axis=-1)
  z, _ = jax.lax.scan(step, noise, pairs)
  return z


def consistency_timesteps(num_steps: int, shift: float) -> jax.Array:
  """The few-step student's K descending times: shift(1 - k/K) for k = 0..K-1.

  Self Forcing writes this as the list [1000, 750, 500, 250] "warped" through the shifted 1000-entry
  table; at K = 4, shift 5 that is [1000, 937.5, 833.3, 625] / 1000. The same rule gives the 3-step
  student's list for any K and shift. No trailing 0: the last step's x0 is the output.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  uniform = 1.0 - jnp.arange(num_steps, dtype=jnp.float32) / num_steps
  return shift_timestep(uniform, shift)


def consistency_step(velocity_fn: VelocityFn, z_t: jax.Array, t: jax.Array, t_next: jax.Array,
                     noise: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One step of the few-step sampler: predict x0 at `t`, then re-noise it to `t_next` with fresh `noise`.

  Returns (x0, z_next). Exposed on its own so a rollout can stop at any step (DMD's random exit step).
  """
  batch = z_t.shape[0]
  t_vec = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
  v = velocity_fn(z_t, t_vec)
  chex.assert_equal_shape([z_t, v])
  x0 = x0_from_velocity(z_t, t_vec, v)
  z_next = add_noise(x0, noise, jnp.broadcast_to(jnp.asarray(t_next, jnp.float32), (batch,)))
  return x0, z_next


def recycled_input(velocity_fn: VelocityFn, z0: jax.Array, prev_noise: jax.Array, noise: jax.Array, t: jax.Array,
                   shift: float, gap: float) -> jax.Array:
  """What the few-step sampler feeds the model at t: the clip `z0` noised (`prev_noise`) at the time `gap`
  earlier (`earlier_timestep`), the model's x0 there, re-noised to t with `noise` (`consistency_step`).
  Training on such inputs and probing them use this one function."""
  t_prev = earlier_timestep(t, shift, gap)
  _, z_t = consistency_step(velocity_fn, add_noise(z0, prev_noise, t_prev), t_prev, t, noise)
  return z_t


def consistency_sample(velocity_fn: VelocityFn, noise: jax.Array, timesteps: jax.Array,
                       rng: jax.Array) -> jax.Array:
  """Self Forcing's few-step sampler: x0 prediction and fresh re-noising per step; returns the last x0.

  `noise` is the starting z at `timesteps[0]` (1.0 for pure noise); `rng` draws the re-noising noise.
  """
  chex.assert_rank(timesteps, 1)
  num_steps = timesteps.shape[0]
  next_times = jnp.concatenate([timesteps[1:], jnp.zeros((1,), timesteps.dtype)])
  keys = jax.random.split(rng, num_steps)

  def step(carry, xs):
    z, _ = carry
    t, t_next, key = xs
    x0, z_next = consistency_step(velocity_fn, z, t, t_next, jax.random.normal(key, z.shape, z.dtype))
    return (z_next, x0), None

  (_, x0), _ = jax.lax.scan(step, (noise, jnp.zeros_like(noise)), (timesteps, next_times, keys))
  return x0
