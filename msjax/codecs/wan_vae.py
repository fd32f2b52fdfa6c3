"""The Wan 2.1 causal video VAE (encoder and decoder) as functional flax.linen modules, channel-last.

Layout follows `msjax.codecs.base`: video [B, T, H, W, 3] in [-1, 1] with T = 1 + 4k, latents
[B, 1 + k, H/8, W/8, 16]. Latents crossing the Codec boundary are *normalised*, z = (mu - mean) / std with
the 16 published constants, because that is what the DiT and TAEHV see; `encode` returns the posterior mean
mu (no sampling), exactly like the official `WanVAE.encode`. The bare module (`WanVAEModel`) works on
unnormalised latents, like diffusers' `AutoencoderKLWan`.

Causality and streaming. Every temporal convolution looks back `kernel_t - stride_t` frames; those frames
come from an explicit cache (zeros at the start of a stream), and the new cache is the tail of
cat[cache, input]. That single rule reproduces the official per-frame feature cache, so decoding a clip in
one call and decoding it chunk by chunk give the same frames. The only special case is the chunk that holds
frame 0 (`is_first`): the first latent frame decodes to one video frame (the upsampling time conv skips it,
Wan's 'Rep' rule), and the first video frame encodes alone (the downsampling time conv passes it through).
Cache pytrees are nested dicts of fixed-shape arrays mirroring the module tree, so a jitted chunk step
compiles once per (is_first, chunk length).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msjax import config_utils
from msjax.codecs import base
from msjax.models import attention

Params = Any
Cache = Any  # nested dict of arrays mirroring the module tree; None means "start of stream" (zeros)

# Per-channel statistics of Wan 2.1 latents (WanVAE / diffusers `latents_mean`, `latents_std`).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# torch's F.normalize floor on the L2 norm; Wan's RMS_norm has no other epsilon.
_L2_NORM_FLOOR = 1e-12
# Spread of `random_params`: biases and gains away from their trivial values so tests see them.
_RANDOM_BIAS_STD = 0.1
_RANDOM_GAIN_RANGE = (0.5, 1.5)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  """Architecture of a Wan-2.1-style VAE; the defaults are the released `Wan2.1_VAE.pth`."""
  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temporal_downsample: tuple[bool, ...] = (False, True, True)
  image_channels: int = 3
  latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = WAN21_LATENTS_STD
  dtype: str = "float32"  # compute dtype of convolutions and attention; params and norms stay float32

  def __post_init__(self):
    stages = len(self.dim_mult)
    if len(self.temporal_downsample) != stages - 1:
      raise ValueError(f"WanVAEConfig.temporal_downsample needs one flag per downsampling stage "
                       f"({stages - 1} for dim_mult {self.dim_mult}), got {self.temporal_downsample}")
    if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
      raise ValueError(f"WanVAEConfig.latents_mean/std need z_dim={self.z_dim} entries, got "
                       f"{len(self.latents_mean)} and {len(self.latents_std)}")
    if self.base_dim % 2:
      raise ValueError(f"WanVAEConfig.base_dim must be even (upsampling halves channels), got {self.base_dim}")

  @property
  def temporal_stride(self) -> int:
    return 2 ** sum(self.temporal_downsample)

  @property
  def spatial_stride(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  @property
  def encoder_dims(self) -> list[int]:
    """Channels entering each encoder stage, then the bottleneck width."""
    return [self.base_dim * m for m in (1, *self.dim_mult)]

  @property
  def decoder_dims(self) -> list[int]:
    """Channels out of each decoder stage, bottleneck first (the encoder's, reversed)."""
    return [self.base_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]


WAN21_VAE = WanVAEConfig()


def reduced_config(base_dim: int = 4, **overrides: Any) -> WanVAEConfig:
  """The Wan 2.1 layout at a small width, for tests and CPU benchmarks (random weights only)."""
  return dataclasses.replace(WAN21_VAE, base_dim=base_dim, **overrides)


def random_params(shapes: Params, seed: int) -> Params:
  """float32 values for a tree of parameter shapes: kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), RMS gains
  ~ U(0.5, 1.5). Drawn with numpy, so even the full-size models need no XLA compile just to get weights."""
  rng = np.random.default_rng(seed)

  def draw(path, spec):
    name = path[-1].key
    if name == "kernel":
      return rng.standard_normal(spec.shape, np.float32) / np.sqrt(np.prod(spec.shape[:-1]))
    if name == "bias":
      return _RANDOM_BIAS_STD * rng.standard_normal(spec.shape, np.float32)
    if name == "gamma":
      return rng.uniform(*_RANDOM_GAIN_RANGE, spec.shape).astype(np.float32)
    raise ValueError(f"random_params: no rule for parameter {jax.tree_util.keystr(path)}")

  return jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(draw, shapes))


# ----------------------------------------------------------------------------------------------------------
# Building blocks.


def _cache_entry(cache: Cache, name: str) -> Cache:
  return None if cache is None else cache[name]


class CausalConv3d(nn.Module):
  """A 3D convolution that sees `kernel_t - stride_t` past frames through an explicit cache.

  `cache` holds the last frames of this conv's input from earlier chunks ([B, n, H, W, C]; None = zeros).
  Returns (output, new cache), the new cache being the tail of cat[cache, x]. 1x1x1 convs return None.
  """
  features: int
  kernel_size: tuple[int, int, int]
  temporal_stride: int = 1
  dtype: Any = jnp.float32

  @property
  def context_frames(self) -> int:
    return self.kernel_size[0] - self.temporal_stride

  @nn.compact
  def __call__(self, x: jax.Array, cache: Optional[jax.Array]) -> tuple[jax.Array, Optional[jax.Array]]:
    chex.assert_rank(x, 5)
    n = self.context_frames
    new_cache = None
    if n > 0:
      if cache is None:
        cache = jnp.zeros((x.shape[0], n, *x.shape[2:]), x.dtype)
      chex.assert_shape(cache, (x.shape[0], n, *x.shape[2:]))
      x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
      new_cache = x[:, -n:]
    _, kh, kw = self.kernel_size
    conv = nn.Conv(self.features, self.kernel_size, strides=(self.temporal_stride, 1, 1),
                   padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)), dtype=self.dtype,
                   param_dtype=jnp.float32, name="conv")
    return conv(x), new_cache


class ChannelRMSNorm(nn.Module):
  """Wan's RMS_norm: L2-normalise over channels, times sqrt(C) and a learned gain (computed in float32)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    gamma = self.param("gamma", nn.initializers.ones, (channels,), jnp.float32)
    xf = x.astype(jnp.float32)
    inv_norm = jax.lax.rsqrt(jnp.maximum(jnp.sum(xf * xf, axis=-1, keepdims=True), _L2_NORM_FLOOR ** 2))
    return (xf * inv_norm * math.sqrt(channels) * gamma).astype(x.dtype)


class ResidualBlock(nn.Module):
  """norm -> SiLU -> causal 3x3x3 conv, twice, plus a (1x1x1 conv when widths differ) shortcut."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    shortcut = x
    if x.shape[-1] != self.features:
      shortcut, _ = CausalConv3d(self.features, (1, 1, 1), dtype=self.dtype, name="shortcut")(x, None)
    h = nn.silu(ChannelRMSNorm(name="norm1")(x))
    h, conv1_cache = CausalConv3d(self.features, (3, 3, 3), dtype=self.dtype, name="conv1")(
        h, _cache_entry(cache, "conv1"))
    h = nn.silu(ChannelRMSNorm(name="norm2")(h))
    h, conv2_cache = CausalConv3d(self.features, (3, 3, 3), dtype=self.dtype, name="conv2")(
        h, _cache_entry(cache, "conv2"))
    return h + shortcut, {"conv1": conv1_cache, "conv2": conv2_cache}


class FrameAttention(nn.Module):
  """Single-head self-attention over the pixels of each frame (no temporal mixing, so no cache)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    y = ChannelRMSNorm(name="norm")(x)
    qkv = nn.Dense(3 * c, dtype=self.dtype, param_dtype=jnp.float32, name="to_qkv")(y)
    qkv = qkv.reshape(b * t, h * w, 3, 1, c)  # one head of width c
    out = attention.attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation=None)
    out = nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name="proj")(out.reshape(b, t, h, w, c))
    return x + out


def _upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """Exact 2x nearest upsampling of H and W (nearest and nearest-exact agree at integer scale)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)


def _interleave_time(y: jax.Array, factor: int) -> jax.Array:
  """[B, T, H, W, factor*C] -> [B, factor*T, H, W, C]; channel group 0 becomes the earliest sub-frame."""
  b, t, h, w, fc = y.shape
  y = y.reshape(b, t, h, w, factor, fc // factor)
  return jnp.moveaxis(y, 4, 2).reshape(b, t * factor, h, w, fc // factor)


class Resample(nn.Module):
  """Spatial (and optionally temporal) 2x resampling between stages.

  `up`: [time_conv doubling frames ->] nearest 2x -> 3x3 conv to `features`.
  `down`: zero-pad right/bottom -> 3x3 stride-2 conv [-> time_conv halving frames].
  """
  direction: str  # "up" | "down"
  temporal: bool
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache, is_first: bool) -> tuple[jax.Array, Cache]:
    channels = x.shape[-1]
    new_cache = {}
    if self.direction == "up":
      if self.temporal:
        x, new_cache["time_conv"] = self._time_upsample(x, channels, cache, is_first)
      x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=jnp.float32,
                  name="spatial_conv")(_upsample_nearest_2x(x))
    elif self.direction == "down":
      x = nn.Conv(self.features, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), dtype=self.dtype,
                  param_dtype=jnp.float32, name="spatial_conv")(x)
      if self.temporal:
        x, new_cache["time_conv"] = self._time_downsample(x, cache, is_first)
    else:
      raise ValueError(f"Resample.direction must be 'up' or 'down', got {self.direction!r}")
    return x, new_cache

  def _time_upsample(self, x, channels, cache, is_first):
    """Each frame -> 2 frames, except frame 0 of a stream, which stays 1 frame and is not time context."""
    time_conv = CausalConv3d(2 * channels, (3, 1, 1), dtype=self.dtype, name="time_conv")
    if not is_first:
      y, new = time_conv(x, _cache_entry(cache, "time_conv"))
      return _interleave_time(y, 2), new
    head, rest = x[:, :1], x[:, 1:]
    if rest.shape[1] == 0:
      return head, jnp.zeros((x.shape[0], time_conv.context_frames, *x.shape[2:]), x.dtype)
    y, new = time_conv(rest, None)
    return jnp.concatenate([head, _interleave_time(y, 2)], axis=1), new

  def _time_downsample(self, x, cache, is_first):
    """Stride-2 time conv over cat[last frame before the chunk, chunk]; frame 0 of a stream passes through."""
    time_conv = CausalConv3d(x.shape[-1], (3, 1, 1), temporal_stride=2, dtype=self.dtype, name="time_conv")
    if not is_first:
      return time_conv(x, _cache_entry(cache, "time_conv"))
    head = x[:, :1]
    if x.shape[1] == 1:
      return head, head
    y, new = time_conv(x[:, 1:], head)
    return jnp.concatenate([head, y], axis=1), new


class MidBlock(nn.Module):
  """Residual block, per-frame attention, residual block: the bottleneck of both encoder and decoder."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    x, res_0 = ResidualBlock(self.features, self.dtype, name="res_0")(x, _cache_entry(cache, "res_0"))
    x = FrameAttention(self.dtype, name="attn")(x)
    x, res_1 = ResidualBlock(self.features, self.dtype, name="res_1")(x, _cache_entry(cache, "res_1"))
    return x, {"res_0": res_0, "res_1": res_1}


class _Head(nn.Module):
  """norm -> SiLU -> causal 3x3x3 conv, closing both encoder and decoder."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    x = nn.silu(ChannelRMSNorm(name="norm_out")(x))
    return CausalConv3d(self.features, (3, 3, 3), dtype=self.dtype, name="conv_out")(x, cache)


# ----------------------------------------------------------------------------------------------------------
# Encoder, decoder, VAE.


def encoder_layer_names(config: WanVAEConfig) -> list[tuple[str, str]]:
  """(kind, name) of the encoder's stage layers in execution order; kind is 'res' or 'resample'.

  The converters derive checkpoint indices from this list, so it is the one statement of the layout.
  """
  layers = []
  for i in range(len(config.dim_mult)):
    layers += [("res", f"down_{i}_res_{j}") for j in range(config.num_res_blocks)]
    if i != len(config.dim_mult) - 1:
      layers.append(("resample", f"down_{i}_resample"))
  return layers


def decoder_layer_names(config: WanVAEConfig) -> list[tuple[int, str, str]]:
  """(stage, kind, name) of the decoder's stage layers in execution order (num_res_blocks + 1 per stage)."""
  layers = []
  for i in range(len(config.dim_mult)):
    layers += [(i, "res", f"up_{i}_res_{j}") for j in range(config.num_res_blocks + 1)]
    if i != len(config.dim_mult) - 1:
      layers.append((i, "resample", f"up_{i}_resample"))
  return layers


class WanEncoder(nn.Module):
  """Video [B, T, H, W, 3] -> [B, 1 + (T-1)/4, H/8, W/8, 2*z_dim] (before quant_conv)."""
  config: WanVAEConfig

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache, is_first: bool) -> tuple[jax.Array, Cache]:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    dims = cfg.encoder_dims
    new_cache = {}
    x, new_cache["conv_in"] = CausalConv3d(dims[0], (3, 3, 3), dtype=dtype, name="conv_in")(
        x.astype(dtype), _cache_entry(cache, "conv_in"))
    stage = 0
    for kind, name in encoder_layer_names(cfg):
      if kind == "res":
        x, new_cache[name] = ResidualBlock(dims[stage + 1], dtype, name=name)(x, _cache_entry(cache, name))
      else:
        x, new_cache[name] = Resample("down", cfg.temporal_downsample[stage], x.shape[-1], dtype, name=name)(
            x, _cache_entry(cache, name), is_first)
        stage += 1
    x, new_cache["mid"] = MidBlock(dims[-1], dtype, name="mid")(x, _cache_entry(cache, "mid"))
    x, new_cache["head"] = _Head(2 * cfg.z_dim, dtype, name="head")(x, _cache_entry(cache, "head"))
    return x, new_cache


class WanDecoder(nn.Module):
  """Latents [B, F, h, w, z_dim] (after post_quant_conv) -> video [B, frames, 8h, 8w, 3], unclipped."""
  config: WanVAEConfig

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache, is_first: bool) -> tuple[jax.Array, Cache]:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    dims = cfg.decoder_dims
    temporal_upsample = cfg.temporal_downsample[::-1]
    new_cache = {}
    x, new_cache["conv_in"] = CausalConv3d(dims[0], (3, 3, 3), dtype=dtype, name="conv_in")(
        x.astype(dtype), _cache_entry(cache, "conv_in"))
    x, new_cache["mid"] = MidBlock(dims[0], dtype, name="mid")(x, _cache_entry(cache, "mid"))
    for stage, kind, name in decoder_layer_names(cfg):
      if kind == "res":
        x, new_cache[name] = ResidualBlock(dims[stage + 1], dtype, name=name)(x, _cache_entry(cache, name))
      else:
        x, new_cache[name] = Resample("up", temporal_upsample[stage], dims[stage + 1] // 2, dtype, name=name)(
            x, _cache_entry(cache, name), is_first)
    x, new_cache["head"] = _Head(cfg.image_channels, dtype, name="head")(x, _cache_entry(cache, "head"))
    return x, new_cache


class WanVAEModel(nn.Module):
  """Encoder + quant_conv and post_quant_conv + decoder on *unnormalised* latents (diffusers semantics).

  Methods take and return an explicit cache; `cache=None` starts a stream. Call them through
  `model.apply(variables, ..., method=WanVAEModel.encode)`; `__call__` (encode then decode) exists for init.
  """
  config: WanVAEConfig

  def setup(self):
    dtype = jnp.dtype(self.config.dtype)
    z = self.config.z_dim
    self.encoder = WanEncoder(self.config)
    self.quant_conv = CausalConv3d(2 * z, (1, 1, 1), dtype=dtype)
    self.post_quant_conv = CausalConv3d(z, (1, 1, 1), dtype=dtype)
    self.decoder = WanDecoder(self.config)

  def encode(self, video: jax.Array, cache: Cache, is_first: bool) -> tuple[jax.Array, Cache]:
    """Video chunk -> posterior mean mu (float32) and the encoder cache after it."""
    h, cache = self.encoder(video, cache, is_first)
    moments, _ = self.quant_conv(h, None)
    return moments[..., :self.config.z_dim].astype(jnp.float32), cache

  def decode(self, latents: jax.Array, cache: Cache, is_first: bool) -> tuple[jax.Array, Cache]:
    """Unnormalised latent chunk -> video in [-1, 1] (float32) and the decoder cache after it."""
    x, _ = self.post_quant_conv(latents.astype(jnp.dtype(self.config.dtype)), None)
    video, cache = self.decoder(x, cache, is_first)
    return jnp.clip(video.astype(jnp.float32), -1.0, 1.0), cache

  def __call__(self, video: jax.Array) -> jax.Array:
    mu, _ = self.encode(video, None, True)
    return self.decode(mu, None, True)[0]


# ----------------------------------------------------------------------------------------------------------
# The Codec.


class WanVAECodec(base.StreamingDecoder):
  """The Wan 2.1 VAE behind `msjax.codecs.base.Codec`, plus streaming encode.

  Streaming: the chunk holding frame 0 is `is_first` (1 + 4m video frames in, 1 + m latent frames; or
  f latent frames in, 1 + 4(f-1) video frames out); every later chunk takes 4m video frames / f latent
  frames. Any chunking gives the same result as one call on the whole clip.
  """

  def __init__(self, config: WanVAEConfig = WAN21_VAE):
    self.config = config
    self.model = WanVAEModel(config)
    self.temporal_stride = config.temporal_stride
    self.spatial_stride = config.spatial_stride
    self.latent_channels = config.z_dim
    self._mean = jnp.asarray(config.latents_mean, jnp.float32)
    self._std = jnp.asarray(config.latents_std, jnp.float32)

  # -- parameters --
  def param_shapes(self) -> Params:
    """Parameter ShapeDtypeStructs (the layout the converters fill), without allocating anything."""
    s = self.spatial_stride
    video = jax.ShapeDtypeStruct((1, 1 + self.temporal_stride, s, s, self.config.image_channels), jnp.float32)
    return jax.eval_shape(self.model.init, jax.random.key(0), video)["params"]

  def init_params(self, seed: int = 0) -> Params:
    """Random weights for tests and benchmarks (see `random_params`); real ones come from the converters."""
    return random_params(self.param_shapes(), seed)

  # -- checks --
  def _check_video(self, video: jax.Array, is_first: bool) -> None:
    chex.assert_rank(video, 5)
    _, t, h, w, c = video.shape
    ts, s = self.temporal_stride, self.spatial_stride
    frames_ok = (t - 1) % ts == 0 if is_first else (t > 0 and t % ts == 0)
    rule = f"1 + {ts}k" if is_first else f"{ts}k (k >= 1)"
    if not frames_ok or h % s or w % s or c != self.config.image_channels:
      raise ValueError(f"Wan VAE encode expects video [B, T, H, W, {self.config.image_channels}] with T = {rule} "
                       f"frames and H, W divisible by {s}; got shape {tuple(video.shape)}")

  def _check_latents(self, latents: jax.Array) -> None:
    chex.assert_rank(latents, 5)
    if latents.shape[1] < 1 or latents.shape[-1] != self.latent_channels:
      raise ValueError(f"Wan VAE decode expects latents [B, F >= 1, h, w, {self.latent_channels}]; "
                       f"got shape {tuple(latents.shape)}")

  # -- encode --
  def encode(self, params: Params, video: jax.Array) -> jax.Array:
    """[B, 1+4k, H, W, 3] video in [-1, 1] -> normalised posterior mean [B, 1+k, H/8, W/8, 16]."""
    return self.encode_chunk(params, None, video, is_first=True)[1]

  def init_encode_state(self, params: Params, batch: int, height: int, width: int) -> Cache:
    """Zero encoder cache for a stream of `height` x `width` video (fixed shapes for every chunk)."""
    video = jax.ShapeDtypeStruct((batch, 1, height, width, self.config.image_channels), jnp.float32)
    shapes = jax.eval_shape(lambda p, v: self.encode_chunk(p, None, v, is_first=True)[0], params, video)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def encode_chunk(self, params: Params, state: Cache, video: jax.Array,
                   is_first: bool) -> tuple[Cache, jax.Array]:
    """Encodes the next chunk of a stream; `is_first` starts a new stream (the given state is ignored)."""
    self._check_video(video, is_first)
    mu, state = self.model.apply({"params": params}, video, None if is_first else state, is_first,
                                 method=WanVAEModel.encode)
    chex.assert_shape(mu, (video.shape[0], None, video.shape[2] // self.spatial_stride,
                           video.shape[3] // self.spatial_stride, self.latent_channels))
    return state, (mu - self._mean) / self._std

  # -- decode --
  def decode_chunk(self, params: Params, state: Cache, latents: jax.Array,
                   is_first: bool) -> tuple[Cache, jax.Array]:
    """Decodes the next latent chunk; `is_first` starts a new stream (the given state is ignored)."""
    self._check_latents(latents)
    mu = latents.astype(jnp.float32) * self._std + self._mean
    video, state = self.model.apply({"params": params}, mu, None if is_first else state, is_first,
                                    method=WanVAEModel.decode)
    f = latents.shape[1]
    frames = config_utils.video_frames(f, self.temporal_stride) if is_first else f * self.temporal_stride
    chex.assert_shape(video, (latents.shape[0], frames, latents.shape[2] * self.spatial_stride,
                              latents.shape[3] * self.spatial_stride, self.config.image_channels))
    return state, video


def from_config(config: ml_collections.ConfigDict) -> WanVAECodec:
  """The Wan 2.1 VAE for a preset whose `codec.name` is 'wan'; checks strides and latent width agree."""
  dtype = config.codec.get("dtype", config.model.get("dtype", "float32"))
  codec = WanVAECodec(dataclasses.replace(WAN21_VAE, dtype=dtype))
  found = (config.codec.temporal_stride, config.codec.spatial_stride, config.codec.latent_channels)
  expected = (codec.temporal_stride, codec.spatial_stride, codec.latent_channels)
  if found != expected:
    raise config_utils.ConfigError(
        f"config.codec (temporal_stride, spatial_stride, latent_channels) = {found}, but the Wan 2.1 VAE "
        f"has {expected}")
  return codec
