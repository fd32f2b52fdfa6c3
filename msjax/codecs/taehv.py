"""TAEHV (`taew2_1`): the tiny causal autoencoder for Wan 2.1 latents, as functional flax.linen modules.

Everything is a per-frame 2D conv except three kinds of layer that touch time:
  MemBlock  relu(convs(cat[x_t, x_{t-1}]) + skip(x_t)): its own input one frame back (zeros at t = 0),
  TPool     (encoder) groups `stride` consecutive frames into channels, earliest first, and mixes them 1x1,
  TGrow     (decoder) a 1x1 conv to stride*C channels, split into `stride` frames, earliest first.
So a streaming decoder only carries, per MemBlock, the last input frame it saw.

Conventions at the Codec boundary (`TAEHVCodec`), matching `msjax.codecs.base`: video in [-1, 1] (TAEHV
itself works in [0, 1]); latents are the *normalised* Wan 2.1 latents z = (mu - mean)/std, which is what
TAEHV was trained on (no scale or shift of its own). The decoder makes `temporal_stride` frames per latent
and the first `temporal_stride - 1` of the stream are start-up frames that are dropped, so F latents decode
to 1 + 4(F-1) frames: Wan's frame count. Encode mirrors that alignment by showing frame 0 `temporal_stride`
times (latent 0 then covers frame 0 alone, like Wan's), where upstream TAEHV pads the end of the clip instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from msjax import config_utils
from msjax.codecs import base
from msjax.codecs import wan_vae

Params = Any
Cache = Any  # dict: MemBlock name -> its last input frame [B, 1, H, W, C]; None means start of stream

MEMBLOCK_CONVS = 3  # 3x3 convs in a MemBlock's residual branch (ReLU between them)


@dataclasses.dataclass(frozen=True)
class TAEHVConfig:
  """TAEHV architecture; the defaults are `taew2_1` (16 latent channels, 4x time, 8x space)."""
  latent_channels: int = 16
  image_channels: int = 3
  encoder_width: int = 64
  encoder_time_downscale: tuple[bool, ...] = (True, True, False)
  decoder_widths: tuple[int, ...] = (256, 128, 64, 64)
  decoder_time_upscale: tuple[bool, ...] = (False, True, True)
  decoder_space_upscale: tuple[bool, ...] = (True, True, True)
  blocks_per_stage: int = 3
  latent_clamp: float = 3.0  # decoder input soft clamp: tanh(z / c) * c
  dtype: str = "float32"  # compute dtype; params stay float32

  def __post_init__(self):
    stages = len(self.decoder_widths) - 1
    if len(self.decoder_time_upscale) != stages or len(self.decoder_space_upscale) != stages:
      raise ValueError(f"TAEHVConfig: decoder_time_upscale and decoder_space_upscale need {stages} flags (one per "
                       f"decoder stage of {self.decoder_widths}), got {self.decoder_time_upscale} and "
                       f"{self.decoder_space_upscale}")
    if 2 ** sum(self.encoder_time_downscale) != self.temporal_stride:
      raise ValueError(f"TAEHVConfig: encoder time downscale {self.encoder_time_downscale} and decoder time upscale "
                       f"{self.decoder_time_upscale} must give the same temporal stride")
    if 2 ** len(self.encoder_time_downscale) != self.spatial_stride:
      raise ValueError(f"TAEHVConfig: the encoder downsamples space {2 ** len(self.encoder_time_downscale)}x but "
                       f"decoder_space_upscale {self.decoder_space_upscale} gives {self.spatial_stride}x")

  @property
  def temporal_stride(self) -> int:
    return 2 ** sum(self.decoder_time_upscale)

  @property
  def spatial_stride(self) -> int:
    return 2 ** sum(self.decoder_space_upscale)

  @property
  def frames_to_trim(self) -> int:
    """Start-up frames the decoder makes before video frame 0."""
    return self.temporal_stride - 1


TAEW2_1 = TAEHVConfig()


def reduced_config(width_divisor: int = 8, **overrides: Any) -> TAEHVConfig:
  """`taew2_1`'s layout with every width divided, for tests and CPU benchmarks (random weights only)."""
  return dataclasses.replace(TAEW2_1, encoder_width=TAEW2_1.encoder_width // width_divisor,
                             decoder_widths=tuple(w // width_divisor for w in TAEW2_1.decoder_widths), **overrides)


# ----------------------------------------------------------------------------------------------------------
# Layout: the torch nn.Sequential of TAEHV, in order. Both the modules and the converter walk these lists.


@dataclasses.dataclass(frozen=True)
class Layer:
  """One entry of TAEHV's nn.Sequential; `name` is our param path (None for layers without params)."""
  kind: str  # conv | relu | clamp | mem | pool | grow | upsample
  name: Optional[str] = None
  features: int = 0
  stride: int = 1
  bias: bool = True


def encoder_layout(config: TAEHVConfig) -> list[Layer]:
  width = config.encoder_width
  layers = [Layer("conv", "conv_in", width), Layer("relu")]
  for i, down in enumerate(config.encoder_time_downscale):
    layers += [Layer("pool", f"stage_{i}_pool", width, stride=2 if down else 1),
               Layer("conv", f"stage_{i}_down", width, stride=2, bias=False)]
    layers += [Layer("mem", f"stage_{i}_mem_{j}", width) for j in range(config.blocks_per_stage)]
  return layers + [Layer("conv", "conv_out", config.latent_channels)]


def decoder_layout(config: TAEHVConfig) -> list[Layer]:
  widths = config.decoder_widths
  layers = [Layer("clamp"), Layer("conv", "conv_in", widths[0]), Layer("relu")]
  for i, (time_up, space_up) in enumerate(zip(config.decoder_time_upscale, config.decoder_space_upscale)):
    layers += [Layer("mem", f"stage_{i}_mem_{j}", widths[i]) for j in range(config.blocks_per_stage)]
    layers += [Layer("upsample", stride=2 if space_up else 1),
               Layer("grow", f"stage_{i}_grow", widths[i], stride=2 if time_up else 1),
               Layer("conv", f"stage_{i}_proj", widths[i + 1], bias=False)]
  return layers + [Layer("relu"), Layer("conv", "conv_out", config.image_channels)]


# ----------------------------------------------------------------------------------------------------------
# Modules.


def _conv3x3(layer: Layer, dtype: Any) -> nn.Conv:
  """TAEHV's per-frame conv: 3x3, padding 1 (stride 2 pads both sides too, unlike Wan's ZeroPad)."""
  return nn.Conv(layer.features, (3, 3), strides=(layer.stride, layer.stride), padding=((1, 1), (1, 1)),
                 use_bias=layer.bias, dtype=dtype, param_dtype=jnp.float32, name=layer.name)


def _conv1x1(features: int, name: str, dtype: Any) -> nn.Conv:
  return nn.Conv(features, (1, 1), use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name)


class MemBlock(nn.Module):
  """relu(conv-relu-conv-relu-conv(cat[x_t, x_{t-1}]) + skip(x_t)); returns its last input frame as the cache."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, past_frame: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
    chex.assert_rank(x, 5)
    if past_frame is None:
      past_frame = jnp.zeros_like(x[:, :1])
    chex.assert_shape(past_frame, (x.shape[0], 1, *x.shape[2:]))
    past = jnp.concatenate([past_frame.astype(x.dtype), x[:, :-1]], axis=1)
    h = jnp.concatenate([x, past], axis=-1)
    for i in range(MEMBLOCK_CONVS):
      if i:
        h = nn.relu(h)
      h = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=jnp.float32,
                  name=f"conv_{i}")(h)
    skip = x if x.shape[-1] == self.features else _conv1x1(self.features, "skip", self.dtype)(x)
    return nn.relu(h + skip), x[:, -1:]


def _time_pool(x: jax.Array, stride: int, conv: nn.Conv) -> jax.Array:
  """[B, T, H, W, C] -> [B, T/stride, H, W, C]: consecutive frames into channels (earliest first), 1x1 mix."""
  b, t, h, w, c = x.shape
  x = jnp.moveaxis(x.reshape(b, t // stride, stride, h, w, c), 2, 4)
  return conv(x.reshape(b, t // stride, h, w, stride * c))


def _time_grow(x: jax.Array, stride: int, conv: nn.Conv) -> jax.Array:
  """[B, T, H, W, C] -> [B, T*stride, H, W, C]: 1x1 conv to stride*C channels, channel group k -> sub-frame k."""
  b, t, h, w, c = x.shape
  y = conv(x).reshape(b, t, h, w, stride, c)
  return jnp.moveaxis(y, 4, 2).reshape(b, t * stride, h, w, c)


def _upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, factor, axis=-3), factor, axis=-2)


class TAEHVEncoder(nn.Module):
  """[B, T, H, W, 3] pixels in [0, 1], T a multiple of the temporal stride -> raw latents [B, T/4, H/8, W/8, C]."""
  config: TAEHVConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = jnp.dtype(self.config.dtype)
    x = x.astype(dtype)
    for layer in encoder_layout(self.config):
      if layer.kind == "conv":
        x = _conv3x3(layer, dtype)(x)
      elif layer.kind == "relu":
        x = nn.relu(x)
      elif layer.kind == "pool":
        x = _time_pool(x, layer.stride, _conv1x1(layer.features, layer.name, dtype))
      elif layer.kind == "mem":
        x, _ = MemBlock(layer.features, dtype, name=layer.name)(x, None)
      else:
        raise ValueError(f"unexpected TAEHV encoder layer {layer}")
    return x.astype(jnp.float32)


class TAEHVDecoder(nn.Module):
  """Latents [B, F, h, w, C] -> every raw decoder frame [B, 4F, 8h, 8w, 3] in [0, 1] (start-up frames included)."""
  config: TAEHVConfig

  @nn.compact
  def __call__(self, z: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    x = z.astype(dtype)
    new_cache = {}
    for layer in decoder_layout(cfg):
      if layer.kind == "clamp":
        x = jnp.tanh(x / cfg.latent_clamp) * cfg.latent_clamp
      elif layer.kind == "conv":
        x = _conv3x3(layer, dtype)(x)
      elif layer.kind == "relu":
        x = nn.relu(x)
      elif layer.kind == "mem":
        x, new_cache[layer.name] = MemBlock(layer.features, dtype, name=layer.name)(
            x, None if cache is None else cache[layer.name])
      elif layer.kind == "upsample":
        x = _upsample_nearest(x, layer.stride)
      elif layer.kind == "grow":
        x = _time_grow(x, layer.stride, _conv1x1(layer.features * layer.stride, layer.name, dtype))
      else:
        raise ValueError(f"unexpected TAEHV decoder layer {layer}")
    return jnp.clip(x.astype(jnp.float32), 0.0, 1.0), new_cache


class TAEHVModel(nn.Module):
  """Encoder and decoder in TAEHV's own conventions ([0, 1] pixels, every raw frame); `__call__` is for init."""
  config: TAEHVConfig

  def setup(self):
    self.encoder = TAEHVEncoder(self.config)
    self.decoder = TAEHVDecoder(self.config)

  def encode(self, pixels: jax.Array) -> jax.Array:
    return self.encoder(pixels)

  def decode(self, latents: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    return self.decoder(latents, cache)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    return self.decode(self.encode(pixels), None)[0]


# ----------------------------------------------------------------------------------------------------------
# The Codec.


class TAEHVCodec(base.StreamingDecoder):
  """TAEHV behind `msjax.codecs.base.Codec`: [-1, 1] video, normalised Wan latents, Wan frame counts."""

  def __init__(self, config: TAEHVConfig = TAEW2_1):
    self.config = config
    self.model = TAEHVModel(config)
    self.temporal_stride = config.temporal_stride
    self.spatial_stride = config.spatial_stride
    self.latent_channels = config.latent_channels

  def param_shapes(self) -> Params:
    """Parameter ShapeDtypeStructs (the layout the converter fills), without allocating anything."""
    s = self.spatial_stride
    pixels = jax.ShapeDtypeStruct((1, self.temporal_stride, s, s, self.config.image_channels), jnp.float32)
    return jax.eval_shape(self.model.init, jax.random.key(0), pixels)["params"]

  def init_params(self, seed: int = 0) -> Params:
    """Random weights for tests and benchmarks (`wan_vae.random_params`); real ones come from the converter."""
    return wan_vae.random_params(self.param_shapes(), seed)

  def encode(self, params: Params, video: jax.Array) -> jax.Array:
    """[B, 1+4k, H, W, 3] video in [-1, 1] -> [B, 1+k, H/8, W/8, 16] latents (frame 0 shown 4 times)."""
    chex.assert_rank(video, 5)
    _, t, h, w, c = video.shape
    ts, s = self.temporal_stride, self.spatial_stride
    if (t - 1) % ts or h % s or w % s or c != self.config.image_channels:
      raise ValueError(f"TAEHV encode expects video [B, T, H, W, {self.config.image_channels}] with T = 1 + {ts}k "
                       f"and H, W divisible by {s}; got shape {tuple(video.shape)}")
    pixels = (video.astype(jnp.float32) + 1.0) / 2.0
    pixels = jnp.concatenate([jnp.repeat(pixels[:, :1], self.config.frames_to_trim, axis=1), pixels], axis=1)
    latents = self.model.apply({"params": params}, pixels, method=TAEHVModel.encode)
    chex.assert_shape(latents, (video.shape[0], config_utils.latent_frames(t, ts), h // s, w // s,
                                self.latent_channels))
    return latents

  def decode_chunk(self, params: Params, state: Cache, latents: jax.Array,
                   is_first: bool) -> tuple[Cache, jax.Array]:
    """Decodes the next latent chunk; `is_first` starts a new stream and drops its start-up frames."""
    chex.assert_rank(latents, 5)
    if latents.shape[1] < 1 or latents.shape[-1] != self.latent_channels:
      raise ValueError(f"TAEHV decode expects latents [B, F >= 1, h, w, {self.latent_channels}]; "
                       f"got shape {tuple(latents.shape)}")
    pixels, state = self.model.apply({"params": params}, latents, None if is_first else state,
                                     method=TAEHVModel.decode)
    if is_first:
      pixels = pixels[:, self.config.frames_to_trim:]
    return state, pixels * 2.0 - 1.0


def from_config(config: ml_collections.ConfigDict) -> TAEHVCodec:
  """`taew2_1` for a preset whose `codec.name` is 'taehv'; checks strides and latent width agree."""
  dtype = config.codec.get("dtype", config.model.get("dtype", "float32"))
  codec = TAEHVCodec(dataclasses.replace(TAEW2_1, dtype=dtype))
  found = (config.codec.temporal_stride, config.codec.spatial_stride, config.codec.latent_channels)
  expected = (codec.temporal_stride, codec.spatial_stride, codec.latent_channels)
  if found != expected:
    raise config_utils.ConfigError(
        f"config.codec (temporal_stride, spatial_stride, latent_channels) = {found}, but TAEHV taew2_1 has {expected}")
  return codec
