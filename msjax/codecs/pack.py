"""`pack`: an exactly invertible space-time-to-depth codec that stands in for the VAE in the toy world.

Each latent frame packs a `temporal_stride` x `spatial_stride` x `spatial_stride` block of RGB pixels into
its channels, so C = 3 * ts * ss * ss and nothing is learned or lost. Wan's 1 + ts*k rule is kept by
treating video frame 0 as if it had been shown `temporal_stride` times: latent frame 0 holds ts copies of
frame 0 (so it looks like every other latent frame to the DiT, rather than being 3/4 zeros), and decode
keeps the last copy, which is frame 0 exactly.

Channel order inside a latent cell is (dt, dy, dx, rgb), rgb fastest. Values are not rescaled: video in
[-1, 1] is already close to unit scale for diffusion, and leaving it alone keeps the inverse exact.

Only reshapes, transposes and static indexing are used (array methods), so the same code runs on numpy
arrays inside grain workers and on jax arrays under `jit`.
"""

from __future__ import annotations

from typing import Any

import chex
import ml_collections
import numpy as np

from msjax import config_utils

Array = Any  # np.ndarray or jax.Array: the codec is written against their shared methods.

_RGB = 3


class PackCodec:
  """Space-time-to-depth codec; `params` is always None and the streaming decode state is `()`."""

  def __init__(self, temporal_stride: int, spatial_stride: int):
    if temporal_stride < 1 or spatial_stride < 1:
      raise ValueError(f"pack codec strides must be >= 1, got temporal_stride={temporal_stride}, "
                       f"spatial_stride={spatial_stride}")
    self.temporal_stride = temporal_stride
    self.spatial_stride = spatial_stride
    self.latent_channels = _RGB * temporal_stride * spatial_stride * spatial_stride

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> PackCodec:
    """Builds the codec of `config.codec`, checking the latent width the DiT was sized for."""
    codec = cls(config.codec.temporal_stride, config.codec.spatial_stride)
    if config.codec.latent_channels != codec.latent_channels:
      raise config_utils.ConfigError(
          f"config.codec.latent_channels is {config.codec.latent_channels}, but the pack codec with "
          f"temporal_stride={codec.temporal_stride} and spatial_stride={codec.spatial_stride} produces "
          f"3*{codec.temporal_stride}*{codec.spatial_stride}*{codec.spatial_stride} = {codec.latent_channels}")
    return codec

  def encode(self, params: None, video: Array) -> Array:
    """[B, T, H, W, 3] video, T = 1 + ts*k -> [B, 1 + k, H/ss, W/ss, C] latents (same dtype)."""
    del params
    chex.assert_rank(video, 5)
    b, t, h, w, rgb = video.shape
    ts, ss = self.temporal_stride, self.spatial_stride
    try:
      f = config_utils.latent_frames(t, ts)
    except config_utils.ConfigError as e:
      raise ValueError(f"pack codec cannot encode video of shape {tuple(video.shape)}: {e}") from e
    if rgb != _RGB or h % ss or w % ss:
      raise ValueError(f"pack codec expects video [B, T, H, W, {_RGB}] with H and W divisible by "
                       f"spatial_stride {ss}; got shape {tuple(video.shape)}")
    # Show frame 0 ts times so every latent frame packs exactly ts frames.
    frame_index = np.concatenate([np.zeros(ts - 1, np.int32), np.arange(t, dtype=np.int32)])
    padded = video[:, frame_index]
    blocks = padded.reshape(b, f, ts, h // ss, ss, w // ss, ss, rgb)
    blocks = blocks.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # [B, F, h, w, dt, dy, dx, rgb]
    return blocks.reshape(b, f, h // ss, w // ss, self.latent_channels)

  def _unpack(self, latents: Array) -> Array:
    """[B, f, h, w, C] -> [B, f*ts, H, W, 3]: every latent frame back to its ts video frames."""
    chex.assert_rank(latents, 5)
    b, f, lh, lw, c = latents.shape
    if c != self.latent_channels:
      raise ValueError(f"pack codec expects {self.latent_channels} latent channels, got shape "
                       f"{tuple(latents.shape)}")
    ts, ss = self.temporal_stride, self.spatial_stride
    blocks = latents.reshape(b, f, lh, lw, ts, ss, ss, _RGB)
    blocks = blocks.transpose(0, 1, 4, 2, 5, 3, 6, 7)  # [B, F, dt, h, dy, w, dx, rgb]
    return blocks.reshape(b, f * ts, lh * ss, lw * ss, _RGB)

  def decode(self, params: None, latents: Array) -> Array:
    """[B, F, h, w, C] -> [B, 1 + ts*(F-1), H, W, 3]; frame 0 is the last of latent frame 0's copies."""
    del params
    return self._unpack(latents)[:, self.temporal_stride - 1:]

  def init_decode_state(self, params: None, batch: int, latent_height: int, latent_width: int) -> tuple[()]:
    """The pack codec decodes each latent frame on its own, so streaming needs no state."""
    del params, batch, latent_height, latent_width
    return ()

  def decode_chunk(self, params: None, state: tuple[()], latents: Array,
                   is_first: bool) -> tuple[tuple[()], Array]:
    """Decodes one chunk; only the first chunk holds latent frame 0 and its extra copies of frame 0."""
    frames = self.decode(params, latents) if is_first else self._unpack(latents)
    return state, frames
