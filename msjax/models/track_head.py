"""Conditioning inputs of the DiT: the track head and the image-conditioning channels.

The rasterised track grid lives at pixel-frame rate ([B, T, h, w, d], d = track embedding width, h x w = the
latent grid). The head packs `temporal_stride` consecutive pixel frames into channels (the codec's temporal
compression) and maps each latent cell with two 1x1x1 convolutions. A grid that starts at video frame 0 has
T = 1 + stride * k frames: frame 0 is a latent frame of its own, so it is repeated `stride` times (the same rule
Wan's I2V mask uses); a grid that starts later has T = stride * k. Each latent frame's features therefore depend
only on its own pixel frames, and a streamed chunk can be encoded on its own.

The head is deliberately NOT zero-initialised: the converter zero-initialises the patch-embedding rows that read
the track channels, and with both factors zero no gradient would ever reach either. The one exception is the
offset input of config.tracks.splat = "nearest_offset" (`offset_in`, added to fc1's output): it starts at zero,
so a nearest model's params load into a nearest_offset model unchanged and compute what they computed before,
and the gradient still reaches it through fc1's live path.
"""

from __future__ import annotations

import chex
from flax import linen as nn
from flax import struct
import jax
import jax.numpy as jnp


OFFSET_INPUT = "offset_in"  # the nearest_offset input layer; zero at init (see the module docstring)


@struct.dataclass
class Conditioning:
  """Everything besides the noisy latent that a DiT pass reads.

  context:      [B, text_len, text_dim] text encoder output, zero padded (needed by full passes and by
                `init_cache`; streamed passes read the cached cross-attention K/V instead).
  first_latent: [B, h, w, C] clean latent of the first frame, or None (text-only / no image).
  track_grid:   [B, T, h, w, d] rasterised tracks for the pixel frames of the latents being denoised, or
                None (no motion condition: the head then sees an all-zero grid, as in motion dropout).
  image_tokens: [B, image_tokens, image_embed_dim] CLIP tokens for the Wan 2.1 I2V cross-attention branch.
  """
  context: jax.Array | None = None
  first_latent: jax.Array | None = None
  track_grid: jax.Array | None = None
  image_tokens: jax.Array | None = None


def pack_time(grid: jax.Array, temporal_stride: int) -> jax.Array:
  """[B, T, h, w, d] -> [B, F, h, w, stride * d], earlier pixel frame first within each latent frame.

  T = 1 + stride * k (starts at video frame 0: frame 0 is repeated) gives F = 1 + k; T = stride * k gives F = k.
  """
  chex.assert_rank(grid, 5)
  batch, frames, height, width, depth = grid.shape
  remainder = frames % temporal_stride
  if temporal_stride > 1 and remainder == 1:
    first = jnp.repeat(grid[:, :1], temporal_stride, axis=1)
    grid = jnp.concatenate([first, grid[:, 1:]], axis=1)
  elif remainder:
    raise ValueError(f"track grid has {frames} frames; expected 1 + {temporal_stride}k (a clip or first chunk) or "
                     f"{temporal_stride}k (a later chunk)")
  latent_frames = grid.shape[1] // temporal_stride
  grid = grid.reshape(batch, latent_frames, temporal_stride, height, width, depth)
  grid = jnp.moveaxis(grid, 2, 4)
  return grid.reshape(batch, latent_frames, height, width, temporal_stride * depth)


class TrackHead(nn.Module):
  """Packed track grid -> `track_channels` features per latent cell (two pointwise layers, SiLU between)."""
  embed_dim: int
  temporal_stride: int
  track_channels: int
  input_scale: float = 1.0  # config.model.track_input_scale
  offset_channels: int = 0  # config_utils.track_offset_channels(config.tracks.splat)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, grid: jax.Array) -> jax.Array:
    chex.assert_axis_dimension(grid, -1, self.embed_dim + self.offset_channels)
    packed = pack_time(grid[..., :self.embed_dim] * self.input_scale, self.temporal_stride)
    hidden = nn.Dense(packed.shape[-1], dtype=self.dtype, name="fc1")(packed)
    if self.offset_channels:
      offsets = pack_time(grid[..., self.embed_dim:] * self.input_scale, self.temporal_stride)
      hidden = hidden + nn.Dense(packed.shape[-1], use_bias=False, dtype=self.dtype,
                                 kernel_init=nn.initializers.zeros, name=OFFSET_INPUT)(offsets)
    features = nn.Dense(self.track_channels, dtype=self.dtype, name="fc2")(nn.silu(hidden))
    return features.astype(jnp.float32)


def image_condition_channels(first_latent: jax.Array | None, batch: int, frames: int, height: int, width: int,
                             latent_channels: int, mask_channels: int,
                             frame_start: jax.Array | int) -> jax.Array:
  """Wan 2.1 I2V conditioning: [mask (mask_channels) | first-frame latent (latent_channels)] per latent frame.

  The mask is 1 and the latent is the first frame's on absolute latent frame 0 (if a first frame is given), and
  both are 0 elsewhere. `frame_start` is the absolute index of the first latent frame here (may be traced).
  """
  shape = (batch, frames, height, width)
  if first_latent is None:
    return jnp.zeros(shape + (mask_channels + latent_channels,), jnp.float32)
  chex.assert_shape(first_latent, (batch, height, width, latent_channels))
  is_first = (jnp.asarray(frame_start, jnp.int32) + jnp.arange(frames)) == 0  # [frames]
  is_first = is_first[None, :, None, None, None]
  mask = jnp.broadcast_to(is_first, shape + (mask_channels,)).astype(jnp.float32)
  latent = jnp.where(is_first, first_latent[:, None].astype(jnp.float32), 0.0)
  return jnp.concatenate([mask, jnp.broadcast_to(latent, shape + (latent_channels,))], axis=-1)
