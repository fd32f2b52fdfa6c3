"""WanDiT: the Wan 2.1 / 2.2 video diffusion transformer in flax.linen (teacher, critic and student).

Build it from a preset and call it functionally:

  spec = DiTSpec.from_config(config)          # every size derives from config.model + geometry(config)
  model = WanDiT(spec)
  params = model.init(rng, latents, t, cond)['params']
  out = model.apply({'params': params}, latents, t, cond)                  # bidirectional
  out = model.apply({'params': params}, latents, t, cond, mask=token_mask)  # e.g. block-causal (attention.py)

  latents  [B, F, h, w, C] float32 noisy latents (C = latent channels, h x w = latent grid)
  t        [B, F] flow time in [0, 1] per latent frame (the sinusoid sees t * TIMESTEP_SCALE, Wan's scale)
  cond     track_head.Conditioning (text context, optional first-frame latent, track grid, CLIP tokens)
  out      [B, F, h, w, C] float32 flow velocity (Wan's prediction, or derived from an x0 head: model.prediction)

The streamed path (`WanDiT.stream`, `WanDiT.cross_kv`) is driven by `kv_cache.py` (`init_cache`, `denoise`,
`commit`); call those rather than the methods directly.

Parameter tree (flax names, Dense kernels [in, out], L = num_layers, leading layer axis under `blocks`):
  patch_embedding {kernel [pt, ph, pw, in_channels, D], bias}, text_embedding {fc1, fc2},
  time_embedding {fc1, fc2}, time_projection [D, 6D], image_embedding {norm_in, fc1, fc2, norm_out} (optional),
  track_head {fc1, fc2} (msjax only), blocks {modulation [L, 6, D], self_attn {q, k, v, o, norm_q, norm_k},
  norm3, cross_attn {q, k, v, o, norm_q, norm_k (+ k_img, v_img, norm_k_img)}, ffn {fc1, fc2}},
  head {modulation [2, D], linear [D, pt*ph*pw*C]}.
Input channels of patch_embedding: [noisy latent | mask | first-frame latent | track features].

Dtype policy: parameters, norms, modulation, time embedding, RoPE, the head and the residual stream are float32;
projections and attention run in `config.model.dtype`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
from flax import linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msjax import config_utils
from msjax.diffusion import flow
from msjax.models import attention
from msjax.models import rope
from msjax.models import track_head as track_head_lib

# Wan feeds the sinusoid the scheduler timestep on its 0..num_train_timesteps scale; msjax's t lives in [0, 1].
TIMESTEP_SCALE = 1000.0
# Max period of the timestep sinusoid (Wan's `sinusoidal_embedding_1d`).
SINUSOID_MAX_PERIOD = 10000.0
# Wan's CLIP-token projector uses torch.nn.LayerNorm's default epsilon, not the model's.
IMAGE_EMBED_NORM_EPS = 1e-5
# Standard deviation of Wan's initialisation of the text and time embedding kernels.
EMBED_INIT_STD = 0.02

Params = Any


PREDICTIONS = ("velocity", "x0")


@dataclasses.dataclass(frozen=True)
class DiTSpec:
  """The static description of a WanDiT (hashable, so it can live in a jit-static field)."""
  dim: int
  num_layers: int
  num_heads: int
  head_dim: int
  ffn_dim: int
  freq_dim: int
  patch_size: tuple[int, int, int]
  latent_channels: int
  in_channels: int
  eps: float
  qk_norm: bool
  cross_attn_norm: bool
  rope_theta: float
  image_condition: str
  mask_channels: int
  image_cross_attn: bool
  image_embed_dim: int
  text_dim: int
  track_channels: int
  track_input_scale: float
  track_embed_dim: int
  track_offset_channels: int
  temporal_stride: int
  dtype: str
  attention: str
  remat: bool
  scan_layers: bool
  prediction: str  # what the head outputs: velocity (Wan) | x0 (turned into a velocity, see WanDiT._velocity)
  x0_min_t: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> DiTSpec:
    geo = config_utils.geometry(config)
    m = config.model
    attention.implementation_for(m.attention)  # validates the name early
    prediction = m.prediction
    if prediction not in PREDICTIONS:
      raise config_utils.ConfigError(f"model.prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if not (math.isfinite(m.track_input_scale) and m.track_input_scale > 0):
      raise config_utils.ConfigError(f"model.track_input_scale must be a positive number, got {m.track_input_scale!r}")
    return cls(
        dim=m.dim, num_layers=m.num_layers, num_heads=m.num_heads, head_dim=geo.head_dim, ffn_dim=m.ffn_dim,
        freq_dim=m.freq_dim, patch_size=tuple(m.patch_size), latent_channels=geo.latent_channels,
        in_channels=geo.in_channels, eps=m.eps, qk_norm=m.qk_norm, cross_attn_norm=m.cross_attn_norm,
        rope_theta=m.rope_theta, image_condition=m.image_condition, mask_channels=m.mask_channels,
        image_cross_attn=m.image_cross_attn, image_embed_dim=m.image_embed_dim, text_dim=m.text_dim,
        track_channels=m.track_channels, track_input_scale=float(m.track_input_scale),
        track_embed_dim=config.tracks.embed_dim,
        track_offset_channels=config_utils.track_offset_channels(config.tracks.splat),
        temporal_stride=config.codec.temporal_stride, dtype=m.dtype, attention=m.attention, remat=m.remat,
        scan_layers=m.scan_layers, prediction=prediction, x0_min_t=float(m.x0_min_t))

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def implementation(self) -> str | None:
    return attention.implementation_for(self.attention)

  @property
  def patch_volume(self) -> int:
    return math.prod(self.patch_size)


@struct.dataclass
class StreamContext:
  """What one streamed pass reads from the KV cache (built by kv_cache.py; arrays carry the layer axis L).

  sink_k / sink_v:      [L, B, S, Nc, H, hd], keys already RoPE'd at their sink positions.
  window_k / window_v:  [L, B, W, Nc, H, hd] in ring-slot order.
  window_order:         [W] int32, ring slots oldest first (valid ones form a prefix).
  window_rope:          RoPE table for the window keys in age order, or None when they are stored RoPE'd.
  valid_keys:           int32 scalar, number of valid keys in [current | sink | window-by-age].
  text_k / text_v:      [L, B, text_len, H, hd] cross-attention K/V; image_k / image_v likewise or None.
  rope_frame:           int32, temporal RoPE position (grid frames) of the chunk's first frame.
  latent_frame:         int32, absolute latent-frame index of the chunk's first frame (image conditioning).
  """
  sink_k: jax.Array
  sink_v: jax.Array
  window_k: jax.Array
  window_v: jax.Array
  window_order: jax.Array
  window_rope: rope.RopeTable | None
  valid_keys: jax.Array
  text_k: jax.Array
  text_v: jax.Array
  image_k: jax.Array | None
  image_v: jax.Array | None
  rope_frame: jax.Array
  latent_frame: jax.Array


@struct.dataclass
class ChunkKV:
  """Per-layer self-attention K/V of a streamed chunk, [L, B, Nc, H, hd]: keys before and after RoPE."""
  key: jax.Array
  key_rope: jax.Array
  value: jax.Array


@struct.dataclass
class CrossKV:
  """Per-layer cross-attention K/V, [L, B, tokens, H, hd] (image ones None without the CLIP branch)."""
  text_k: jax.Array
  text_v: jax.Array
  image_k: jax.Array | None
  image_v: jax.Array | None


@struct.dataclass
class _Shared:
  """Inputs every block reads (broadcast over the layer scan)."""
  modulation: jax.Array  # [B, F, 6, D] projected time embedding per grid frame
  rope: rope.RopeTable  # for the tokens being processed
  mask: jax.Array | None  # [N, N] token mask (full path only)
  context: jax.Array | None  # [B, text_len, D] embedded text (full path only)
  image_context: jax.Array | None  # [B, image_tokens, D] (full path with the CLIP branch only)
  window_order: jax.Array | None  # cache path only, see StreamContext
  window_rope: rope.RopeTable | None
  valid_keys: jax.Array | None


@struct.dataclass
class _LayerCache:
  """One layer's slice of the cache (scanned over the layer axis)."""
  sink_k: jax.Array
  sink_v: jax.Array
  window_k: jax.Array
  window_v: jax.Array
  text_k: jax.Array
  text_v: jax.Array
  image_k: jax.Array | None
  image_v: jax.Array | None


def _xavier() -> nn.initializers.Initializer:
  return nn.initializers.xavier_uniform()


def _dense(features: int, dtype: jnp.dtype, name: str | None = None, kernel_init=None) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init or _xavier(),
                  bias_init=nn.initializers.zeros, name=name)


def _layer_norm(eps: float, affine: bool, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, use_scale=affine, use_bias=affine, dtype=jnp.float32,
                      param_dtype=jnp.float32, use_fast_variance=False, name=name)


def _rms_norm(eps: float, name: str | None = None) -> nn.RMSNorm:
  return nn.RMSNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


def timestep_sinusoid(t: jax.Array, freq_dim: int) -> jax.Array:
  """Wan's timestep features of flow time t (any shape): [cos | sin] of t * TIMESTEP_SCALE, float32."""
  half = freq_dim // 2
  freqs = np.power(SINUSOID_MAX_PERIOD, -np.arange(half, dtype=np.float64) / half).astype(np.float32)
  angles = (t.astype(jnp.float32) * TIMESTEP_SCALE)[..., None] * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x [B, N, D] with per-grid-frame shift / scale [B, F, D]: x * (1 + scale) + shift, frame by frame."""
  batch, tokens, dim = x.shape
  frames = shift.shape[1]
  x = x.reshape(batch, frames, tokens // frames, dim)
  return (x * (1.0 + scale[:, :, None]) + shift[:, :, None]).reshape(batch, tokens, dim)


def _gate(y: jax.Array, gate: jax.Array) -> jax.Array:
  """Per-grid-frame gate of a block's branch output, in float32."""
  batch, tokens, dim = y.shape
  frames = gate.shape[1]
  y = y.astype(jnp.float32).reshape(batch, frames, tokens // frames, dim)
  return (y * gate[:, :, None]).reshape(batch, tokens, dim)


class _Projections(nn.Module):
  """The q/k/v/o projections and the RMS norms of q and k across all heads (Wan's `qk_norm`) that self- and
  cross-attention share, under Wan's parameter names."""
  spec: DiTSpec

  def setup(self):
    s = self.spec
    dtype = s.compute_dtype
    self.q = _dense(s.dim, dtype)
    self.k = _dense(s.dim, dtype)
    self.v = _dense(s.dim, dtype)
    self.o = _dense(s.dim, dtype)
    if s.qk_norm:
      self.norm_q = _rms_norm(s.eps)
      self.norm_k = _rms_norm(s.eps)

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[:-1] + (self.spec.num_heads, self.spec.head_dim)).astype(self.spec.compute_dtype)


class SelfAttention(_Projections):
  """Self-attention projections: q and k are normed here, RoPE and the attention itself are the block's."""

  def project(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B, N, D] -> q, k, v [B, N, heads, head_dim] in the compute dtype (q, k normed, no RoPE yet)."""
    h = h.astype(self.spec.compute_dtype)
    q, k, v = self.q(h), self.k(h), self.v(h)
    if self.spec.qk_norm:
      q, k = self.norm_q(q), self.norm_k(k)
    return self._heads(q), self._heads(k), self._heads(v)

  def output(self, y: jax.Array) -> jax.Array:
    return self.o(y.reshape(y.shape[:2] + (self.spec.dim,)))


class CrossAttention(_Projections):
  """Attention from the video tokens to the text (and, for Wan 2.1 I2V, CLIP image) tokens; no RoPE, no mask."""

  def setup(self):
    super().setup()
    s = self.spec
    if s.image_cross_attn:
      self.k_img = _dense(s.dim, s.compute_dtype)
      self.v_img = _dense(s.dim, s.compute_dtype)
      if s.qk_norm:
        self.norm_k_img = _rms_norm(s.eps)

  def text_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Embedded text [B, text_len, D] -> K, V [B, text_len, heads, head_dim]."""
    context = context.astype(self.spec.compute_dtype)
    k = self.k(context)
    if self.spec.qk_norm:
      k = self.norm_k(k)
    return self._heads(k), self._heads(self.v(context))

  def image_kv(self, image_context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Embedded CLIP tokens [B, image_tokens, D] -> K, V through k_img / v_img."""
    image_context = image_context.astype(self.spec.compute_dtype)
    k = self.k_img(image_context)
    if self.spec.qk_norm:
      k = self.norm_k_img(k)
    return self._heads(k), self._heads(self.v_img(image_context))

  def __call__(self, x: jax.Array, text_kv: tuple[jax.Array, jax.Array],
               image_kv: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    q = self.q(x.astype(self.spec.compute_dtype))
    if self.spec.qk_norm:
      q = self.norm_q(q)
    q = self._heads(q)
    impl = self.spec.implementation
    y = attention.attend(q, *text_kv, implementation=impl)
    if image_kv is not None:
      y = y + attention.attend(q, *image_kv, implementation=impl)
    return self.o(y.reshape(y.shape[:2] + (self.spec.dim,)))


class FeedForward(nn.Module):
  """Linear -> GELU(tanh) -> Linear."""
  spec: DiTSpec

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.spec.compute_dtype
    hidden = _dense(self.spec.ffn_dim, dtype, name="fc1")(x.astype(dtype))
    return _dense(self.spec.dim, dtype, name="fc2")(jax.nn.gelu(hidden, approximate=True))


class WanBlock(nn.Module):
  """One Wan transformer block: modulated self-attention, affine-normed cross-attention, modulated FFN."""
  spec: DiTSpec

  def setup(self):
    s = self.spec
    self.modulation = self.param("modulation", nn.initializers.normal(stddev=s.dim ** -0.5), (6, s.dim),
                                 jnp.float32)
    self.norm1 = _layer_norm(s.eps, affine=False)
    self.norm2 = _layer_norm(s.eps, affine=False)
    self.self_attn = SelfAttention(s)
    if s.cross_attn_norm:
      self.norm3 = _layer_norm(s.eps, affine=True)
    self.cross_attn = CrossAttention(s)
    self.ffn = FeedForward(s)

  def cross_kv(self, context: jax.Array, image_context: jax.Array | None):
    """This layer's cross-attention K/V (computed once per stream by the cache)."""
    text = self.cross_attn.text_kv(context)
    image = None if image_context is None else self.cross_attn.image_kv(image_context)
    return text, image

  def __call__(self, x: jax.Array, shared: _Shared, layer: _LayerCache | None,
               collect_kv: bool) -> tuple[jax.Array, ChunkKV | None]:
    s = self.spec
    mod = self.modulation[None, None] + shared.modulation  # [B, F, 6, D]
    shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (mod[:, :, i] for i in range(6))

    q, k, v = self.self_attn.project(_modulate(self.norm1(x), shift_sa, scale_sa))
    q = rope.apply_rope(q, shared.rope).astype(s.compute_dtype)
    k_rope = rope.apply_rope(k, shared.rope).astype(s.compute_dtype)
    chunk_kv = None
    if layer is None:
      y = attention.attend(q, k_rope, v, implementation=s.implementation, mask=shared.mask)
    else:
      window_k = self._window_by_age(layer.window_k, shared.window_order)
      window_v = self._window_by_age(layer.window_v, shared.window_order)
      if shared.window_rope is not None:
        window_k = rope.apply_rope(window_k, shared.window_rope).astype(s.compute_dtype)
      y = attention.cached_self_attention(q, k_rope, v, layer.sink_k, layer.sink_v, window_k, window_v,
                                          shared.valid_keys, implementation=s.implementation)
      if collect_kv:
        chunk_kv = ChunkKV(key=k, key_rope=k_rope, value=v)
    x = x + _gate(self.self_attn.output(y), gate_sa)

    if layer is None:
      text_kv, image_kv = self.cross_kv(shared.context, shared.image_context)
    else:
      text_kv = (layer.text_k, layer.text_v)
      image_kv = None if layer.image_k is None else (layer.image_k, layer.image_v)
    normed = self.norm3(x) if s.cross_attn_norm else x
    x = x + self.cross_attn(normed, text_kv, image_kv).astype(jnp.float32)

    x = x + _gate(self.ffn(_modulate(self.norm2(x), shift_ff, scale_ff)), gate_ff)
    return x, chunk_kv

  @staticmethod
  def _window_by_age(window: jax.Array, order: jax.Array) -> jax.Array:
    """[B, W, Nc, H, hd] ring slots -> [B, W * Nc, H, hd] oldest slot first."""
    window = jnp.take(window, order, axis=1)
    return window.reshape((window.shape[0], -1) + window.shape[3:])


class TextEmbedding(nn.Module):
  """Linear -> GELU(tanh) -> Linear from the text encoder's width to the model width."""
  spec: DiTSpec

  @nn.compact
  def __call__(self, context: jax.Array) -> jax.Array:
    s = self.spec
    init = nn.initializers.normal(stddev=EMBED_INIT_STD)
    hidden = _dense(s.dim, s.compute_dtype, name="fc1", kernel_init=init)(context.astype(s.compute_dtype))
    return _dense(s.dim, s.compute_dtype, name="fc2", kernel_init=init)(jax.nn.gelu(hidden, approximate=True))


class TimeEmbedding(nn.Module):
  """Sinusoid -> Linear -> SiLU -> Linear, in float32."""
  spec: DiTSpec

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    s = self.spec
    init = nn.initializers.normal(stddev=EMBED_INIT_STD)
    hidden = _dense(s.dim, jnp.float32, name="fc1", kernel_init=init)(timestep_sinusoid(t, s.freq_dim))
    return _dense(s.dim, jnp.float32, name="fc2", kernel_init=init)(nn.silu(hidden))


class ImageEmbedding(nn.Module):
  """Wan 2.1 I2V projector of CLIP tokens: LayerNorm -> Linear -> GELU (exact) -> Linear -> LayerNorm."""
  spec: DiTSpec

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    s = self.spec
    x = _layer_norm(IMAGE_EMBED_NORM_EPS, affine=True, name="norm_in")(tokens.astype(jnp.float32))
    x = _dense(s.image_embed_dim, s.compute_dtype, name="fc1")(x)
    x = _dense(s.dim, s.compute_dtype, name="fc2")(jax.nn.gelu(x, approximate=False))
    return _layer_norm(IMAGE_EMBED_NORM_EPS, affine=True, name="norm_out")(x)


class Head(nn.Module):
  """Output head: per-frame modulated LayerNorm (from the time embedding e, not e0) and a linear map."""
  spec: DiTSpec

  @nn.compact
  def __call__(self, x: jax.Array, e: jax.Array) -> jax.Array:
    s = self.spec
    table = self.param("modulation", nn.initializers.normal(stddev=s.dim ** -0.5), (2, s.dim), jnp.float32)
    mod = table[None, None] + e[:, :, None]  # [B, F, 2, D]
    h = _modulate(_layer_norm(s.eps, affine=False)(x), mod[:, :, 0], mod[:, :, 1])
    out_features = s.patch_volume * s.latent_channels
    return _dense(out_features, jnp.float32, name="linear", kernel_init=nn.initializers.zeros)(h)


def _block_body(collect_kv: bool):
  """The scanned step over layers (collect_kv is static: only `commit` needs the chunk's K/V)."""
  def body(block: WanBlock, x: jax.Array, shared: _Shared, layer: _LayerCache | None):
    return block(x, shared, layer, collect_kv)
  return body


def _cross_kv_body(block: WanBlock, carry: None, context: jax.Array, image_context: jax.Array | None):
  return carry, block.cross_kv(context, image_context)


class WanDiT(nn.Module):
  """The Wan DiT with msjax's conditioning channels; see the module docstring for the call API."""
  spec: DiTSpec

  def setup(self):
    s = self.spec
    fan_in_axes = (0, 1, 2, 3)
    patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=fan_in_axes, out_axis=-1)
    self.patch_embedding = nn.Conv(s.dim, kernel_size=s.patch_size, strides=s.patch_size, padding="VALID",
                                   dtype=s.compute_dtype, param_dtype=jnp.float32, kernel_init=patch_init,
                                   bias_init=nn.initializers.zeros)
    self.text_embedding = TextEmbedding(s)
    self.time_embedding = TimeEmbedding(s)
    self.time_projection = _dense(6 * s.dim, jnp.float32)
    if s.image_cross_attn:
      self.image_embedding = ImageEmbedding(s)
    if s.track_channels:
      self.track_head = track_head_lib.TrackHead(s.track_embed_dim, s.temporal_stride, s.track_channels,
                                                 input_scale=s.track_input_scale,
                                                 offset_channels=s.track_offset_channels, dtype=s.compute_dtype)
    self.blocks = WanBlock(s)
    self.head = Head(s)

  # ---- shared pieces -------------------------------------------------------------------------------------

  def _scan(self, body, in_axes):
    s = self.spec
    if s.remat:
      body = nn.remat(body, prevent_cse=False)
    return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
                   length=s.num_layers, unroll=1 if s.scan_layers else s.num_layers)

  def _embed_context(self, cond: track_head_lib.Conditioning) -> tuple[jax.Array, jax.Array | None]:
    s = self.spec
    if cond.context is None:
      raise ValueError("Conditioning.context is required here (the text encoder output, [B, text_len, text_dim])")
    chex.assert_rank(cond.context, 3)
    chex.assert_axis_dimension(cond.context, -1, s.text_dim)
    context = self.text_embedding(cond.context)
    image_context = None
    if s.image_cross_attn:
      if cond.image_tokens is None:
        raise ValueError("model.image_cross_attn is on but Conditioning.image_tokens is None")
      chex.assert_axis_dimension(cond.image_tokens, -1, s.image_embed_dim)
      image_context = self.image_embedding(cond.image_tokens)
    elif cond.image_tokens is not None:
      raise ValueError("Conditioning.image_tokens given but model.image_cross_attn is off")
    return context, image_context

  def _track_features(self, cond: track_head_lib.Conditioning, batch: int, frames: int, height: int,
                      width: int) -> jax.Array:
    s = self.spec
    if cond.track_grid is None:
      # No motion condition = an all-zero grid; the head is pointwise, so one cell per frame suffices.
      zeros = jnp.zeros((batch, frames * s.temporal_stride, 1, 1, s.track_embed_dim + s.track_offset_channels),
                        jnp.float32)
      features = self.track_head(zeros)
      return jnp.broadcast_to(features, (batch, frames, height, width, s.track_channels))
    chex.assert_rank(cond.track_grid, 5)
    if cond.track_grid.shape[2:4] != (height, width):
      raise ValueError(f"track grid cells {cond.track_grid.shape[2:4]} must match the latent grid {(height, width)}")
    features = self.track_head(cond.track_grid)
    if features.shape[1] != frames:
      raise ValueError(f"track grid with {cond.track_grid.shape[1]} pixel frames gives {features.shape[1]} latent "
                       f"frames, but the latents have {frames}")
    return features

  def _embed(self, latents: jax.Array, t: jax.Array, cond: track_head_lib.Conditioning,
             latent_frame: jax.Array | int):
    """Channel assembly, patch embedding and time embedding.

    Returns tokens [B, N, D] float32, e [B, Fg, D], e0 [B, Fg, 6, D] and the token grid (Fg, Hg, Wg).
    """
    s = self.spec
    chex.assert_rank(latents, 5)
    chex.assert_axis_dimension(latents, -1, s.latent_channels)
    batch, frames, height, width, _ = latents.shape
    if t.ndim == 1:
      t = jnp.broadcast_to(t[:, None], (batch, frames))
    chex.assert_shape(t, (batch, frames))
    pt, ph, pw = s.patch_size
    if frames % pt or height % ph or width % pw:
      raise ValueError(f"latents {frames}x{height}x{width} are not divisible by the patch {s.patch_size}")
    latents = latents.astype(jnp.float32)
    t = t.astype(jnp.float32)

    channels = [latents]
    if s.image_condition == "concat":
      channels.append(track_head_lib.image_condition_channels(
          cond.first_latent, batch, frames, height, width, s.latent_channels, s.mask_channels, latent_frame))
    elif s.image_condition == "replace":
      if cond.first_latent is not None:
        # Wan 2.2 TI2V: latent frame 0 is the clean image latent, denoised at t = 0.
        is_first = (jnp.asarray(latent_frame, jnp.int32) + jnp.arange(frames)) == 0
        latents = jnp.where(is_first[None, :, None, None, None], cond.first_latent[:, None], latents)
        channels[0] = latents
        t = jnp.where(is_first[None], 0.0, t)
    elif cond.first_latent is not None:
      raise ValueError("Conditioning.first_latent given but model.image_condition is 'none'")
    if s.track_channels:
      channels.append(self._track_features(cond, batch, frames, height, width))
    elif cond.track_grid is not None:
      raise ValueError("Conditioning.track_grid given but model.track_channels is 0")
    x = jnp.concatenate(channels, axis=-1)
    chex.assert_axis_dimension(x, -1, s.in_channels)

    x = self.patch_embedding(x.astype(s.compute_dtype))  # [B, Fg, Hg, Wg, D]
    grid = x.shape[1:4]
    tokens = x.reshape(batch, -1, s.dim).astype(jnp.float32)

    t_grid = t[:, ::pt]  # one time per grid frame (the first latent frame of each temporal patch)
    e = self.time_embedding(t_grid)
    e0 = self.time_projection(nn.silu(e)).reshape(batch, grid[0], 6, s.dim)
    return tokens, e, e0, grid

  def _unpatchify(self, out: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
    """[B, N, pt*ph*pw*C] (C fastest) -> [B, F, h, w, C]."""
    s = self.spec
    pt, ph, pw = s.patch_size
    fg, hg, wg = grid
    out = out.reshape(out.shape[0], fg, hg, wg, pt, ph, pw, s.latent_channels)
    out = out.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return out.reshape(out.shape[0], fg * pt, hg * ph, wg * pw, s.latent_channels).astype(jnp.float32)

  def _rope(self, grid: tuple[int, int, int], frame_start: jax.Array | int) -> rope.RopeTable:
    return rope.rope_table(*grid, frame_start, self.spec.head_dim, self.spec.rope_theta)

  def _velocity(self, out: jax.Array, latents: jax.Array, t: jax.Array) -> jax.Array:
    """The head's output as a flow velocity. With `prediction == 'x0'` the head predicts the clean latent and
    v = (z_t - x0) / max(t, x0_min_t): a clean toy video lies on a low-dimensional set that fits through a
    residual stream narrower than the patch vector, while the noise inside v does not (JiT, Li & He 2025)."""
    if self.spec.prediction == "velocity":
      return out
    batch, frames = latents.shape[:2]
    t = jnp.asarray(t, jnp.float32)
    t = jnp.broadcast_to(t[:, None], (batch, frames)) if t.ndim == 1 else t
    chex.assert_shape(t, (batch, frames))
    return flow.velocity_from_x0(latents.astype(jnp.float32), jnp.maximum(t, self.spec.x0_min_t), out)

  # ---- entry points --------------------------------------------------------------------------------------

  def __call__(self, latents: jax.Array, t: jax.Array, cond: track_head_lib.Conditioning,
               mask: jax.Array | None = None) -> jax.Array:
    """Full-sequence forward (bidirectional, or masked by a token mask [N, N] from attention.py)."""
    tokens, e, e0, grid = self._embed(latents, t, cond, latent_frame=0)
    context, image_context = self._embed_context(cond)
    shared = _Shared(modulation=e0, rope=self._rope(grid, 0), mask=mask, context=context,
                     image_context=image_context, window_order=None, window_rope=None, valid_keys=None)
    scan = self._scan(_block_body(collect_kv=False), in_axes=(nn.broadcast, 0))
    x, _ = scan(self.blocks, tokens, shared, None)
    return self._velocity(self._unpatchify(self.head(x, e), grid), latents, t)

  def cross_kv(self, cond: track_head_lib.Conditioning) -> CrossKV:
    """Every layer's cross-attention K/V for this conditioning (computed once per stream)."""
    context, image_context = self._embed_context(cond)
    scan = self._scan(_cross_kv_body, in_axes=(nn.broadcast, nn.broadcast))
    _, (text, image) = scan(self.blocks, None, context, image_context)
    return CrossKV(text_k=text[0], text_v=text[1], image_k=None if image is None else image[0],
                   image_v=None if image is None else image[1])

  def stream(self, latents: jax.Array, t: jax.Array, cond: track_head_lib.Conditioning, cache: StreamContext,
             collect_kv: bool = False) -> tuple[jax.Array, ChunkKV | None]:
    """One chunk against the cache; returns the prediction and (if collect_kv) the chunk's per-layer K/V."""
    tokens, e, e0, grid = self._embed(latents, t, cond, latent_frame=cache.latent_frame)
    shared = _Shared(modulation=e0, rope=self._rope(grid, cache.rope_frame), mask=None, context=None,
                     image_context=None, window_order=cache.window_order, window_rope=cache.window_rope,
                     valid_keys=cache.valid_keys)
    sink_shape = (self.spec.num_layers, tokens.shape[0], -1, self.spec.num_heads, self.spec.head_dim)
    layers = _LayerCache(sink_k=cache.sink_k.reshape(sink_shape), sink_v=cache.sink_v.reshape(sink_shape),
                         window_k=cache.window_k, window_v=cache.window_v, text_k=cache.text_k,
                         text_v=cache.text_v, image_k=cache.image_k, image_v=cache.image_v)
    scan = self._scan(_block_body(collect_kv), in_axes=(nn.broadcast, 0))
    x, chunk_kv = scan(self.blocks, tokens, shared, layers)
    return self._velocity(self._unpatchify(self.head(x, e), grid), latents, t), chunk_kv


def example_inputs(config: ml_collections.ConfigDict, batch_size: int) -> tuple[jax.Array, jax.Array,
                                                                             track_head_lib.Conditioning]:
  """Zero (latents, t, conditioning) of a full clip for `config`: what `init` and shape checks need.

  Optional inputs are present exactly when the config uses them (image channels, tracks, CLIP tokens).
  """
  geo = config_utils.geometry(config)
  m = config.model
  latents = jnp.zeros((batch_size, geo.latent_frames, geo.latent_height, geo.latent_width, geo.latent_channels))
  cond = track_head_lib.Conditioning(
      context=jnp.zeros((batch_size, m.text_len, m.text_dim)),
      first_latent=None if m.image_condition == "none" else latents[:, 0],
      track_grid=(jnp.zeros((batch_size, geo.num_frames, geo.latent_height, geo.latent_width,
                             config_utils.track_grid_channels(config))) if m.track_channels > 0 else None),
      image_tokens=(jnp.zeros((batch_size, m.image_tokens, m.image_embed_dim)) if m.image_cross_attn else None))
  return latents, jnp.zeros((batch_size,)), cond
