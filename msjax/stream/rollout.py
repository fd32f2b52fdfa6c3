"""Few-step chunk generation against the streaming cache: the one piece the sampler and DMD's self-rollout share.

A chunk starts from noise at the student's first time and takes K steps; each step predicts x0 from the
velocity and re-noises it with fresh noise to the next time (`flow.consistency_step`); the last x0 is the
chunk. After it, `kv_cache.commit` writes the clean chunk into the cache. The streaming sampler runs this one
chunk per jitted call; the DMD trainer runs `rollout`, a `lax.scan` over a clip's chunks, and both derive their
random keys with `chunk_keys`, so the two produce the same chunks from the same seed.

The user's first frame is not generated: when `cond.first_latent` is given, latent frame 0 of the stream (in
the chunk that holds it) is replaced by it after every step, so the chunk committed to the sink starts with
exactly the frame the user supplied.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_collections

from msjax.diffusion import flow
from msjax.models import kv_cache
from msjax.models import track_head

Params = kv_cache.Params

# A chunk's key is split into these two streams: its starting noise and its re-noising steps.
_NOISE_STREAM, _STEP_STREAM = 0, 1


def student_timesteps(config: ml_collections.ConfigDict) -> jax.Array:
  """The K descending times every chunk is denoised at (K = config.stream.num_steps, shift config.flow.shift)."""
  if "flow" not in config or "shift" not in config.flow:
    raise ValueError("the config has no flow.shift; streaming needs the timestep shift the student was trained "
                     "with (configs/sample.py and configs/distill.py set it)")
  return flow.consistency_timesteps(config.stream.num_steps, float(config.flow.shift))


def chunk_keys(rng: jax.Array, chunk_index: jax.Array | int) -> tuple[jax.Array, jax.Array]:
  """(noise key, step key) of chunk `chunk_index` of the stream seeded by `rng` (index may be traced)."""
  keys = jax.random.split(jax.random.fold_in(rng, chunk_index))
  return keys[_NOISE_STREAM], keys[_STEP_STREAM]


def chunk_noise(rng: jax.Array, chunk_index: jax.Array | int, shape: tuple[int, ...]) -> jax.Array:
  """The starting noise of chunk `chunk_index`: what the sampler draws and what `rollout` is given."""
  return jax.random.normal(chunk_keys(rng, chunk_index)[0], shape, jnp.float32)


def _pin_first_frame(x0: jax.Array, cache: kv_cache.CacheState, first_latent: jax.Array) -> jax.Array:
  """x0 with the stream's latent frame 0 (if this chunk holds it) replaced by the user's first-frame latent."""
  chex.assert_shape(first_latent, (x0.shape[0],) + x0.shape[2:])
  frame = cache.committed * cache.stream.chunk_frames + jnp.arange(x0.shape[1])
  is_first = (frame == 0)[None, :, None, None, None]
  return jnp.where(is_first, first_latent[:, None].astype(x0.dtype), x0)


def generate_chunk(params: Params, cache: kv_cache.CacheState, noise: jax.Array, cond: track_head.Conditioning,
                   timesteps: jax.Array, rng: jax.Array, *, exit_step: jax.Array | int | None = None) -> jax.Array:
  """Denoises one chunk [B, c, h, w, C] from `noise` at `timesteps[0]` through the K `timesteps`; returns x0.

  `cond` is the chunk's own conditioning (its track grid; the first-frame latent); the cache is read, never
  written. `rng` draws the re-noising noise of steps 0..K-2. `exit_step` (DMD's gradient truncation, may be
  traced): when given, steps before it run without gradient, its x0 is returned with gradient, and later
  steps are skipped; the sampler leaves it None and runs all K steps.
  """
  chex.assert_rank([noise, timesteps], [5, 1])
  num_steps = timesteps.shape[0]
  next_times = jnp.concatenate([timesteps[1:], jnp.zeros((1,), timesteps.dtype)])

  def step(step_params: Params, z: jax.Array, t: jax.Array, t_next: jax.Array,
           key: jax.Array) -> tuple[jax.Array, jax.Array]:
    velocity_fn = lambda z_t, t_vec: kv_cache.denoise(step_params, cache, z_t, t_vec, cond)
    fresh = jax.random.normal(key, z.shape, z.dtype)
    x0, z_next = flow.consistency_step(velocity_fn, z, t, t_next, fresh)
    if cond.first_latent is None:
      return x0, z_next
    x0 = _pin_first_frame(x0, cache, cond.first_latent)
    return x0, flow.add_noise(x0, fresh, jnp.broadcast_to(t_next, (z.shape[0],)))

  def body(carry: tuple[jax.Array, jax.Array], xs) -> tuple[tuple[jax.Array, jax.Array], None]:
    z, x0 = carry
    k, t, t_next, key = xs
    if exit_step is None:
      x0, z = step(params, z, t, t_next, key)
      return (z, x0), None
    # Like Self Forcing's no-grad steps: nothing before the exit step is differentiated, not even its input.
    frozen = jax.lax.stop_gradient
    branches = (lambda z, x0: step(frozen(params), frozen(z), t, t_next, key),
                lambda z, x0: step(params, frozen(z), t, t_next, key),
                lambda z, x0: (x0, z))
    branch = jnp.sign(k - jnp.asarray(exit_step, jnp.int32)) + 1  # 0, 1, 2: before, at, after the exit step
    x0, z = jax.lax.switch(branch, branches, z, x0)
    return (z, x0), None

  # A scan over the K steps: the DiT is traced and compiled once per chunk program, not K times.
  steps = (jnp.arange(num_steps, dtype=jnp.int32), timesteps, next_times, jax.random.split(rng, num_steps))
  (_, x0), _ = jax.lax.scan(body, (noise, jnp.zeros_like(noise)), steps)
  return x0


def _split_track_grid(grid: jax.Array | None, num_chunks: int, chunk_frames: int,
                      temporal_stride: int) -> tuple[jax.Array | None, jax.Array | None]:
  """[B, T, h, w, d] over the clip -> (first chunk's grid or None, later chunks [n, B, s*c, h, w, d] or None).

  T = 1 + s(F-1) means the clip starts at video frame 0, so its first chunk is shorter and handled apart;
  T = s*F means it continues a stream, and every chunk has s*c frames.
  """
  if grid is None:
    return None, None
  chex.assert_rank(grid, 5)
  latent_frames = num_chunks * chunk_frames
  from_start = 1 + temporal_stride * (latent_frames - 1)
  if grid.shape[1] not in (from_start, temporal_stride * latent_frames):
    raise ValueError(f"track grid has {grid.shape[1]} frames; {num_chunks} chunks of {chunk_frames} latent frames "
                     f"need {from_start} (from video frame 0) or {temporal_stride * latent_frames} (continuing)")
  first, later_chunks = None, num_chunks
  if grid.shape[1] == from_start:
    first_frames = 1 + temporal_stride * (chunk_frames - 1)
    first, grid, later_chunks = grid[:, :first_frames], grid[:, first_frames:], num_chunks - 1
  later = grid.reshape((grid.shape[0], later_chunks, temporal_stride * chunk_frames) + grid.shape[2:])
  return first, jnp.moveaxis(later, 1, 0)


def rollout(params: Params, cache: kv_cache.CacheState, noises: jax.Array, conds: track_head.Conditioning,
            timesteps: jax.Array, rng: jax.Array, *,
            exit_steps: jax.Array | None = None) -> tuple[kv_cache.CacheState, jax.Array]:
  """Generates and commits consecutive chunks: returns (cache after them, x0 of the clip [B, F, h, w, C]).

  `noises` [B, F, h, w, C] (F = chunks * chunk_frames) holds each chunk's starting noise (`chunk_noise`);
  `conds.track_grid` covers the clip's pixel frames (1 + s(F-1) from video frame 0, s*F when continuing) or is
  None; `rng` is the stream's key (chunk keys follow `chunk_keys` at the cache's chunk count). The carried cache
  is stop-gradient: committed chunks are constants to later ones. `exit_steps` [chunks] is DMD's exit step per
  chunk (see `generate_chunk`). The first chunk of a clip from frame 0 runs before the scan: its grid is shorter.
  """
  chex.assert_rank(noises, 5)
  chunk_frames = cache.stream.chunk_frames
  if noises.shape[1] % chunk_frames:
    raise ValueError(f"rollout needs whole chunks: {noises.shape[1]} latent frames is not a multiple of "
                     f"chunk_frames {chunk_frames}")
  num_chunks = noises.shape[1] // chunk_frames
  stride = cache.model.temporal_stride
  first_grid, later_grids = _split_track_grid(conds.track_grid, num_chunks, chunk_frames, stride)
  chunk_noises = jnp.moveaxis(noises.reshape((noises.shape[0], num_chunks, chunk_frames) + noises.shape[2:]), 1, 0)
  if exit_steps is not None:
    chex.assert_shape(exit_steps, (num_chunks,))

  def advance(state: kv_cache.CacheState, noise: jax.Array, grid: jax.Array | None,
              exit_step: jax.Array | None) -> tuple[kv_cache.CacheState, jax.Array]:
    state = jax.lax.stop_gradient(state)
    cond = conds.replace(track_grid=grid)
    _, step_key = chunk_keys(rng, state.committed)
    x0 = generate_chunk(params, state, noise, cond, timesteps, step_key, exit_step=exit_step)
    state = kv_cache.commit(params, state, jax.lax.stop_gradient(x0), cond)
    return jax.lax.stop_gradient(state), x0

  outputs = []
  if first_grid is not None:
    cache, first = advance(cache, chunk_noises[0], first_grid, None if exit_steps is None else exit_steps[0])
    outputs.append(first[None])
    chunk_noises = chunk_noises[1:]
    exit_steps = None if exit_steps is None else exit_steps[1:]
  if chunk_noises.shape[0]:
    scanned = (chunk_noises, later_grids, exit_steps)
    cache, later = jax.lax.scan(lambda state, xs: advance(state, *xs), cache, scanned)
    outputs.append(later)
  x0s = jnp.concatenate(outputs, axis=0)  # [chunks, B, c, h, w, C]
  return cache, jnp.moveaxis(x0s, 0, 1).reshape(noises.shape)
