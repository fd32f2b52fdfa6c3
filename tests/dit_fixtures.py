"""Shared builders for the DiT / RoPE / KV-cache tests: a 2-layer, width-64 variant of the tiny preset."""

from __future__ import annotations

import functools

import jax
from jax import flatten_util
import jax.numpy as jnp
import ml_collections

from configs import models
from msjax import config_utils
from msjax.models import dit
from msjax.models import track_head

# Scale of the noise added to initialised parameters, so that zero-initialised leaves (the head) carry signal.
PARAM_NOISE = 0.05


def small_config(**stream) -> ml_collections.ConfigDict:
  """Tiny preset shrunk for fast CPU tests: 2 layers x 64 wide, 32x32 px (8x8 latents, 16 tokens/frame)."""
  c = models.tiny()
  c.model.dim = 64
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.ffn_dim = 128
  c.video.height = 32
  c.video.width = 32
  for name, value in stream.items():
    c.stream[name] = value
  return c


def random_inputs(config: ml_collections.ConfigDict, key: jax.Array, batch: int = 1):
  """Clean latents [B, F, h, w, C] for the whole clip and a Conditioning with text, first frame and tracks."""
  geo = config_utils.geometry(config)
  latent_shape = (batch, geo.latent_frames, geo.latent_height, geo.latent_width, geo.latent_channels)
  grid_shape = (batch, geo.num_frames, geo.latent_height, geo.latent_width, config_utils.track_grid_channels(config))
  context_shape = (batch, config.model.text_len, config.model.text_dim)

  @jax.jit
  def draw(key):
    keys = jax.random.split(key, 3)
    latents = jax.random.normal(keys[0], latent_shape)
    cond = track_head.Conditioning(context=jax.random.normal(keys[2], context_shape), first_latent=latents[:, 0],
                                   track_grid=jax.random.normal(keys[1], grid_shape))
    return latents, cond

  return draw(key)


def random_params(config: ml_collections.ConfigDict, latents: jax.Array, cond: track_head.Conditioning,
                  key: jax.Array):
  """Initialised parameters plus small noise on every leaf (Wan zero-initialises the head)."""
  model = dit.WanDiT(dit.DiTSpec.from_config(config))

  @jax.jit
  def draw(key, latents, cond):
    params = model.init(key, latents, jnp.zeros(latents.shape[:2]), cond)["params"]
    flat, unravel = flatten_util.ravel_pytree(params)
    return unravel(flat + PARAM_NOISE * jax.random.normal(jax.random.fold_in(key, 1), flat.shape))

  return model, draw(key, latents, cond)


@functools.lru_cache(maxsize=None)
def _shared_model():
  config = small_config()
  latents, cond = random_inputs(config, jax.random.key(0))
  model, params = random_params(config, latents, cond, jax.random.key(1))
  return model, params, latents, cond


def small_setup():
  """(config, model, params, clean latents, conditioning) for the small config. Model and arrays are built once
  per test run and shared; the config is a fresh copy that a test may change."""
  return (small_config(),) + _shared_model()


def chunk_track_grid(grid: jax.Array, chunk: int, chunk_frames: int, temporal_stride: int) -> jax.Array:
  """The pixel frames of latent chunk `chunk`: 1 + s(c-1) frames for the first chunk, s*c afterwards."""
  if chunk == 0:
    return grid[:, :1 + temporal_stride * (chunk_frames - 1)]
  start = 1 + temporal_stride * (chunk * chunk_frames - 1)
  return grid[:, start:start + temporal_stride * chunk_frames]


def chunk_cond(cond: track_head.Conditioning, chunk: int, config: ml_collections.ConfigDict):
  """The conditioning a streamed pass over chunk `chunk` receives."""
  grid = chunk_track_grid(cond.track_grid, chunk, config.stream.chunk_frames, config.codec.temporal_stride)
  return cond.replace(track_grid=grid)
