"""The `pack` codec: exact inverse, layout, streaming decode, config checks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from msjax import codecs
from msjax import config_utils
from msjax.codecs import base
from msjax.codecs.pack import PackCodec

# (temporal_stride, spatial_stride) pairs, including the degenerate identity codec.
STRIDES = [(4, 4), (2, 2), (4, 2), (1, 4), (1, 1)]


def _random_video(rng: np.random.Generator, codec: PackCodec, latent_frames: int, batch: int = 2,
                  cells: tuple[int, int] = (3, 2)) -> np.ndarray:
  frames = config_utils.video_frames(latent_frames, codec.temporal_stride)
  shape = (batch, frames, cells[0] * codec.spatial_stride, cells[1] * codec.spatial_stride, 3)
  return rng.uniform(-1.0, 1.0, shape).astype(np.float32)


@pytest.mark.parametrize("strides", STRIDES)
@pytest.mark.parametrize("latent_frames", [1, 2, 4])
def test_numpy_round_trip_is_exact(strides, latent_frames):
  codec = PackCodec(*strides)
  video = _random_video(np.random.default_rng(0), codec, latent_frames)
  latents = codec.encode(None, video)
  assert isinstance(latents, np.ndarray)
  b, _, h, w, _ = video.shape
  chex.assert_shape(latents, (b, latent_frames, h // codec.spatial_stride, w // codec.spatial_stride,
                              codec.latent_channels))
  assert latents.dtype == np.float32
  np.testing.assert_array_equal(codec.decode(None, latents), video)


@pytest.mark.parametrize("strides", [(4, 4), (2, 4)])
@pytest.mark.parametrize("latent_frames", [1, 3])
def test_jax_round_trip_under_jit_is_exact(strides, latent_frames):
  codec = PackCodec(*strides)
  video = _random_video(np.random.default_rng(1), codec, latent_frames)
  latents = jax.jit(lambda v: codec.encode(None, v))(jnp.asarray(video))
  assert isinstance(latents, jax.Array)
  np.testing.assert_array_equal(np.asarray(latents), codec.encode(None, video))
  decoded = jax.jit(lambda z: codec.decode(None, z))(latents)
  np.testing.assert_array_equal(np.asarray(decoded), video)


@pytest.mark.parametrize("strides", [(4, 4), (2, 3)])
def test_layout_packs_blocks_and_repeats_frame_zero(strides):
  ts, ss = strides
  codec = PackCodec(ts, ss)
  video = _random_video(np.random.default_rng(2), codec, latent_frames=3, batch=1)
  latents = codec.encode(None, video)
  _, f, lh, lw, _ = latents.shape
  for i in range(lh):
    for j in range(lw):
      rows, cols = slice(i * ss, (i + 1) * ss), slice(j * ss, (j + 1) * ss)
      cell0 = latents[0, 0, i, j].reshape(ts, ss, ss, 3)
      for dt in range(ts):  # latent frame 0 = frame 0 shown ts times
        np.testing.assert_array_equal(cell0[dt], video[0, 0, rows, cols])
      for k in range(1, f):
        first = 1 + (k - 1) * ts
        np.testing.assert_array_equal(latents[0, k, i, j].reshape(ts, ss, ss, 3),
                                      video[0, first:first + ts, rows, cols])


def test_streaming_decode_matches_full_decode():
  codec = PackCodec(4, 4)
  chunk_frames, num_chunks = 3, 4
  video = _random_video(np.random.default_rng(3), codec, latent_frames=chunk_frames * num_chunks)
  latents = jnp.asarray(codec.encode(None, video))
  b, _, lh, lw, _ = latents.shape
  state = codec.init_decode_state(None, b, lh, lw)
  assert jax.tree.leaves(state) == []
  step = jax.jit(codec.decode_chunk, static_argnums=(0, 3))
  pieces = []
  for c in range(num_chunks):
    chunk = latents[:, c * chunk_frames:(c + 1) * chunk_frames]
    state, frames = step(None, state, chunk, c == 0)
    expected = 1 + codec.temporal_stride * (chunk_frames - 1) if c == 0 else codec.temporal_stride * chunk_frames
    assert frames.shape[1] == expected
    pieces.append(np.asarray(frames))
  streamed = np.concatenate(pieces, axis=1)
  np.testing.assert_array_equal(streamed, np.asarray(codec.decode(None, latents)))
  np.testing.assert_array_equal(streamed, video)


@pytest.mark.parametrize("num_frames", [0, 2, 44, 46])
def test_encode_rejects_bad_frame_count(num_frames):
  codec = PackCodec(4, 4)
  video = np.zeros((1, num_frames, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match=r"1 \+ 4\*k.*got " + str(num_frames)):
    codec.encode(None, video)


def test_encode_rejects_indivisible_size_and_decode_wrong_channels():
  codec = PackCodec(4, 4)
  with pytest.raises(ValueError, match="divisible by spatial_stride 4"):
    codec.encode(None, np.zeros((1, 5, 8, 6, 3), np.float32))
  with pytest.raises(ValueError, match="expects 192 latent channels"):
    codec.decode(None, np.zeros((1, 2, 2, 2, 16), np.float32))


def test_make_codec_from_tiny_preset():
  config = models.tiny()
  codec = codecs.make_codec(config)
  assert isinstance(codec, PackCodec)
  assert isinstance(codec, base.Codec)
  geom = config_utils.geometry(config)
  assert codec.latent_channels == geom.latent_channels
  video = np.zeros((1, geom.num_frames, geom.height, geom.width, 3), np.float32)
  chex.assert_shape(codec.encode(None, video),
                    (1, geom.latent_frames, geom.latent_height, geom.latent_width, geom.latent_channels))


def test_make_codec_rejects_mismatched_channels_and_unknown_name():
  config = models.tiny()
  config.codec.latent_channels = 16
  with pytest.raises(config_utils.ConfigError, match="latent_channels is 16.*= 192"):
    codecs.make_codec(config)
  config.codec.name = "jpeg"
  with pytest.raises(ValueError, match="unknown config.codec.name 'jpeg'"):
    codecs.make_codec(config)
