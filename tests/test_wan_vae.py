"""Wan 2.1 VAE: streaming equals full encode/decode, causality, frame rules, and the checkpoint key map at full size."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from msjax import config_utils
from msjax.codecs import wan_vae
from msjax.convert import common
from msjax.convert import wan_vae as convert_wan_vae

# Small but complete: every block kind (shortcut, 2d/3d resample up and down, attention) is present.
SMALL = wan_vae.reduced_config(base_dim=4, num_res_blocks=1)
LATENT_GRID = (2, 3)  # latent height, width -> 16 x 24 pixels
TOLERANCE = 1e-4  # max |streamed - full| / max |full|: float32 noise of the same convs run at other shapes


@pytest.fixture(scope="module")
def codec():
  return wan_vae.WanVAECodec(SMALL)


@pytest.fixture(scope="module")
def params(codec):
  return codec.init_params(seed=0)


@pytest.fixture(scope="module")
def decode_step(codec):
  return jax.jit(codec.decode_chunk, static_argnames="is_first")


@pytest.fixture(scope="module")
def decode_full(codec):
  return jax.jit(codec.decode)


NUM_LATENTS = 21


def _latents(frames, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((1, frames, *LATENT_GRID, SMALL.z_dim), np.float32))


def _video(frames, seed=2):
  h, w = (n * SMALL.spatial_stride for n in LATENT_GRID)
  shape = (1, frames, h, w, SMALL.image_channels)
  return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32))


def _assert_close(got, want):
  chex.assert_equal_shape([got, want])
  err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  assert err <= TOLERANCE, f"relative error {err:.2e} > {TOLERANCE}"


def _stream_decode(codec, params, step, latents, chunk_sizes):
  """Decodes `latents` chunk by chunk; returns the chunks' outputs and checks the state keeps its shapes."""
  state = codec.init_decode_state(params, latents.shape[0], *latents.shape[2:4])
  state_shapes = jax.tree.map(jnp.shape, state)
  outputs, start = [], 0
  for i, size in enumerate(chunk_sizes):
    state, video = step(params, state, latents[:, start:start + size], is_first=i == 0)
    assert jax.tree.map(jnp.shape, state) == state_shapes, "decode state changed shape"
    outputs.append(video)
    start += size
  assert start == latents.shape[1]
  return outputs


def test_streaming_decode_matches_full_decode_chunk_by_chunk(codec, params, decode_step, decode_full):
  num_latents, chunk = NUM_LATENTS, 3
  latents = _latents(num_latents)
  full = decode_full(params, latents)
  assert full.shape[1] == config_utils.video_frames(num_latents, codec.temporal_stride)
  outputs = _stream_decode(codec, params, decode_step, latents, [chunk] * (num_latents // chunk))
  start = 0
  for i, video in enumerate(outputs):
    expected_frames = config_utils.video_frames(chunk, codec.temporal_stride) if i == 0 else chunk * 4
    assert video.shape[1] == expected_frames
    _assert_close(video, full[:, start:start + expected_frames])
    start += expected_frames


@pytest.mark.slow
def test_streaming_decode_one_latent_frame_at_a_time(codec, params, decode_step, decode_full):
  latents = _latents(NUM_LATENTS)
  full = decode_full(params, latents)
  outputs = _stream_decode(codec, params, decode_step, latents, [1] * NUM_LATENTS)
  _assert_close(jnp.concatenate(outputs, axis=1), full)


def test_streaming_encode_matches_full_encode(codec, params):
  num_latents = 9
  video = _video(config_utils.video_frames(num_latents, codec.temporal_stride))
  full = jax.jit(codec.encode)(params, video)
  chex.assert_shape(full, (1, num_latents, *LATENT_GRID, SMALL.z_dim))
  step = jax.jit(codec.encode_chunk, static_argnames="is_first")
  state = codec.init_encode_state(params, 1, *video.shape[2:4])
  state_shapes = jax.tree.map(jnp.shape, state)
  state, first = step(params, state, video[:, :1], is_first=True)
  _assert_close(first, full[:, :1])
  for k in range(1, num_latents):
    state, latent = step(params, state, video[:, 1 + 4 * (k - 1):1 + 4 * k], is_first=False)
    assert jax.tree.map(jnp.shape, state) == state_shapes
    _assert_close(latent, full[:, k:k + 1])


def test_decode_is_causal(codec, params, decode_full):
  """Changing latent frame k leaves every video frame before its first one (1 + 4(k-1)) unchanged."""
  edited_frame = NUM_LATENTS // 2
  latents = _latents(NUM_LATENTS)
  a = decode_full(params, latents)
  b = decode_full(params, latents.at[:, edited_frame].add(1.0))
  first_affected = config_utils.video_frames(edited_frame, codec.temporal_stride)
  np.testing.assert_array_equal(np.asarray(a[:, :first_affected]), np.asarray(b[:, :first_affected]))
  assert float(jnp.max(jnp.abs(a[:, first_affected:] - b[:, first_affected:]))) > 0


@pytest.mark.parametrize("frames", [4, 6])
def test_encode_rejects_frame_counts_off_the_1_plus_4k_rule(codec, params, frames):
  with pytest.raises(ValueError, match=r"T = 1 \+ 4k"):
    codec.encode(params, _video(frames))


def test_later_encode_chunks_must_hold_whole_latent_frames(codec, params):
  state = codec.init_encode_state(params, 1, 16, 24)
  with pytest.raises(ValueError, match=r"T = 4k"):
    codec.encode_chunk(params, state, _video(3), is_first=False)


def test_from_config_matches_the_wan_preset():
  codec = wan_vae.from_config(models.wan2_1_1_3b())
  assert (codec.temporal_stride, codec.spatial_stride, codec.latent_channels) == (4, 8, 16)
  config = models.wan2_1_1_3b()
  config.codec.latent_channels = 48
  with pytest.raises(config_utils.ConfigError, match="latent_channels"):
    wan_vae.from_config(config)


# ------------------------------------------------------------------------------------------------
# The official checkpoint layout (reference/wan.md section 2.3), written out independently of the converter.


def _official_wan21_vae_shapes():
  """key -> shape of every tensor in `Wan2.1_VAE.pth`."""
  shapes = {}

  def conv(key, out, inp, window):
    shapes[f"{key}.weight"] = (out, inp, *window)
    shapes[f"{key}.bias"] = (out,)

  def res(key, inp, out):
    shapes[f"{key}.residual.0.gamma"] = (inp, 1, 1, 1)
    conv(f"{key}.residual.2", out, inp, (3, 3, 3))
    shapes[f"{key}.residual.3.gamma"] = (out, 1, 1, 1)
    conv(f"{key}.residual.6", out, out, (3, 3, 3))
    if inp != out:
      conv(f"{key}.shortcut", out, inp, (1, 1, 1))

  def middle(prefix, c):
    res(f"{prefix}.middle.0", c, c)
    shapes[f"{prefix}.middle.1.norm.gamma"] = (c, 1, 1)
    conv(f"{prefix}.middle.1.to_qkv", 3 * c, c, (1, 1))
    conv(f"{prefix}.middle.1.proj", c, c, (1, 1))
    res(f"{prefix}.middle.2", c, c)

  conv("encoder.conv1", 96, 3, (3, 3, 3))
  encoder = [("res", 96, 96), ("res", 96, 96), ("down2d", 96), ("res", 96, 192), ("res", 192, 192),
             ("down3d", 192), ("res", 192, 384), ("res", 384, 384), ("down3d", 384), ("res", 384, 384),
             ("res", 384, 384)]
  for i, layer in enumerate(encoder):
    key = f"encoder.downsamples.{i}"
    if layer[0] == "res":
      res(key, *layer[1:])
    else:
      conv(f"{key}.resample.1", layer[1], layer[1], (3, 3))
      if layer[0] == "down3d":
        conv(f"{key}.time_conv", layer[1], layer[1], (3, 1, 1))
  middle("encoder", 384)
  shapes["encoder.head.0.gamma"] = (384, 1, 1, 1)
  conv("encoder.head.2", 32, 384, (3, 3, 3))
  conv("conv1", 32, 32, (1, 1, 1))
  conv("conv2", 16, 16, (1, 1, 1))
  conv("decoder.conv1", 384, 16, (3, 3, 3))
  middle("decoder", 384)
  decoder = [("res", 384, 384)] * 3 + [("up3d", 384, 192), ("res", 192, 384)] + [("res", 384, 384)] * 2 + [
      ("up3d", 384, 192)] + [("res", 192, 192)] * 3 + [("up2d", 192, 96)] + [("res", 96, 96)] * 3
  for i, (kind, inp, out) in enumerate(decoder):
    key = f"decoder.upsamples.{i}"
    if kind == "res":
      res(key, inp, out)
    else:
      conv(f"{key}.resample.1", out, inp, (3, 3))
      if kind == "up3d":
        conv(f"{key}.time_conv", 2 * inp, inp, (3, 1, 1))
  shapes["decoder.head.0.gamma"] = (96, 1, 1, 1)
  conv("decoder.head.2", 3, 96, (3, 3, 3))
  return shapes


def test_every_official_key_maps_onto_the_full_size_model():
  shapes = _official_wan21_vae_shapes()
  assert len(shapes) == 194 and sum(int(np.prod(s)) for s in shapes.values()) == 126_892_531
  source = common.from_state_dict({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()})
  assert convert_wan_vae.detect_names(source) == "official"
  plan = convert_wan_vae.plan_wan_vae(source, wan_vae.WAN21_VAE, names="official")  # raises on any problem
  assert {p.key for p in plan.placements} == set(shapes) and not plan.dropped
  expected = plan.expected
  assert sum(int(np.prod(s.shape)) for s in expected.values()) == 126_892_531
  # The attention projections become Dense kernels [in, out]; the 3D convs [t, h, w, in, out].
  by_key = {p.key: p for p in plan.placements}
  assert by_key["decoder.middle.1.to_qkv.weight"].shape == (384, 1152)
  assert by_key["decoder.upsamples.3.time_conv.weight"].shape == (3, 1, 1, 384, 768)


def test_conversion_errors_name_every_problem():
  shapes = _official_wan21_vae_shapes()
  shapes["encoder.extra.weight"] = (1,)
  del shapes["decoder.head.2.bias"]
  shapes["decoder.conv1.weight"] = (384, 32, 3, 3, 3)
  source = common.from_state_dict({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()})
  with pytest.raises(common.ConversionError) as info:
    convert_wan_vae.plan_wan_vae(source, wan_vae.WAN21_VAE, names="official")
  message = str(info.value)
  assert "encoder.extra.weight" in message
  assert "decoder/head/conv_out/conv/bias" in message
  assert "decoder.conv1.weight" in message and "[384, 32, 3, 3, 3]" in message

