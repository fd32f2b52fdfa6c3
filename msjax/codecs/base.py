"""The Codec protocol: how every video <-> latent codec (pack, Wan VAE, TAEHV) looks to the rest of msjax.

Layout conventions, shared by all codecs:
  video   float32 [B, T, H, W, 3] in [-1, 1], T = 1 + temporal_stride * k
  latents float32 [B, F, H/s, W/s, C], F = 1 + k (Wan's rule: latent frame 0 holds video frame 0 alone)

Codecs are functional: a codec object holds only static structure (strides, channel counts, module
definitions); learned weights, if any, are a `params` pytree passed to every call (`None` for `pack`).
Streaming decode carries an explicit `state` pytree so a jitted step can decode one chunk at a time; the
first chunk (which contains latent frame 0) yields 1 + s*(f-1) frames, every later chunk s*f frames.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

Params = Any
DecodeState = Any


@runtime_checkable
class Codec(Protocol):
  """What the data pipeline, trainer and streaming sampler need from a codec."""

  temporal_stride: int
  spatial_stride: int
  latent_channels: int

  def encode(self, params: Params, video: jax.Array) -> jax.Array:
    """[B, T, H, W, 3] video in [-1, 1] -> [B, F, h, w, C] latents."""
    ...

  def decode(self, params: Params, latents: jax.Array) -> jax.Array:
    """[B, F, h, w, C] latents -> [B, T, H, W, 3] video in [-1, 1]."""
    ...

  def init_decode_state(self, params: Params, batch: int, latent_height: int, latent_width: int) -> DecodeState:
    """Fixed-shape state for streaming decode (empty pytree when the codec needs none)."""
    ...

  def decode_chunk(self, params: Params, state: DecodeState, latents: jax.Array,
                   is_first: bool) -> tuple[DecodeState, jax.Array]:
    """Decodes the next [B, f, h, w, C] chunk; `is_first` marks the chunk holding latent frame 0."""
    ...


class StreamingDecoder:
  """Mixin for codecs with learned, stateful streaming decoders (Wan VAE, TAEHV): the full decode and the
  initial decode state both follow from the codec's `decode_chunk`, so the three can never disagree."""

  latent_channels: int

  def decode(self, params: Params, latents: jax.Array) -> jax.Array:
    """[B, F, h, w, C] latents -> [B, 1 + s(F-1), H, W, 3] video: the whole clip as one first chunk."""
    return self.decode_chunk(params, None, latents, is_first=True)[1]

  def init_decode_state(self, params: Params, batch: int, latent_height: int, latent_width: int) -> DecodeState:
    """Zeros shaped like the state a one-latent-frame first chunk leaves (fixed for every later chunk)."""
    latents = jax.ShapeDtypeStruct((batch, 1, latent_height, latent_width, self.latent_channels), jnp.float32)
    shapes = jax.eval_shape(lambda p, z: self.decode_chunk(p, None, z, is_first=True)[0], params, latents)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def decode_chunk(self, params: Params, state: DecodeState, latents: jax.Array,
                   is_first: bool) -> tuple[DecodeState, jax.Array]:
    raise NotImplementedError
