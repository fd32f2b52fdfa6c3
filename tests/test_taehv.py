"""TAEHV (taew2_1): streaming equals full decode, Wan frame counts, the checkpoint key map at full size, and parity
with a small PyTorch reference written here from the architecture description (reference/wan.md section 3)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from msjax import config_utils
from msjax.codecs import taehv
from msjax.convert import common
from msjax.convert import taehv as convert_taehv

SMALL = taehv.reduced_config(width_divisor=8)
LATENT_GRID = (2, 3)
NUM_LATENTS = 21
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def codec():
  return taehv.TAEHVCodec(SMALL)


@pytest.fixture(scope="module")
def params(codec):
  return codec.init_params(seed=0)


@pytest.fixture(scope="module")
def decode_full(codec):
  return jax.jit(codec.decode)


def _latents(frames, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((1, frames, *LATENT_GRID, SMALL.latent_channels),
                                                                 np.float32))


def _relative_error(got, want):
  chex.assert_equal_shape([got, want])
  return float(np.max(np.abs(np.asarray(got) - np.asarray(want))) / np.max(np.abs(np.asarray(want))))


@pytest.mark.parametrize("chunk", [3, 1])
def test_streaming_decode_matches_full_decode_chunk_by_chunk(codec, params, decode_full, chunk):
  latents = _latents(NUM_LATENTS)
  full = decode_full(params, latents)
  assert full.shape[1] == config_utils.video_frames(NUM_LATENTS, codec.temporal_stride)
  step = jax.jit(codec.decode_chunk, static_argnames="is_first")
  state = codec.init_decode_state(params, 1, *LATENT_GRID)
  state_shapes = jax.tree.map(jnp.shape, state)
  start = 0
  for i in range(NUM_LATENTS // chunk):
    state, video = step(params, state, latents[:, i * chunk:(i + 1) * chunk], is_first=i == 0)
    assert jax.tree.map(jnp.shape, state) == state_shapes
    frames = config_utils.video_frames(chunk, codec.temporal_stride) if i == 0 else chunk * codec.temporal_stride
    assert video.shape[1] == frames
    assert _relative_error(video, full[:, start:start + frames]) <= TOLERANCE
    start += frames
  assert start == full.shape[1]


def test_decode_is_causal_and_in_range(codec, params, decode_full):
  edited_frame = NUM_LATENTS // 2
  latents = _latents(NUM_LATENTS)
  a = decode_full(params, latents)
  b = decode_full(params, latents.at[:, edited_frame].add(1.0))
  first_affected = config_utils.video_frames(edited_frame, codec.temporal_stride)
  np.testing.assert_array_equal(np.asarray(a[:, :first_affected]), np.asarray(b[:, :first_affected]))
  assert float(jnp.max(jnp.abs(a[:, first_affected:] - b[:, first_affected:]))) > 0
  assert float(jnp.min(a)) >= -1.0 and float(jnp.max(a)) <= 1.0


def test_encode_follows_the_1_plus_4k_rule(codec, params):
  video = jnp.zeros((1, 9, 16, 24, 3))
  chex.assert_shape(jax.jit(codec.encode)(params, video), (1, 3, *LATENT_GRID, SMALL.latent_channels))
  with pytest.raises(ValueError, match=r"T = 1 \+ 4k"):
    codec.encode(params, jnp.zeros((1, 8, 16, 24, 3)))


def test_from_config_checks_the_preset():
  config = models.wan2_1_1_3b()
  config.codec.name = "taehv"
  codec = taehv.from_config(config)
  assert (codec.temporal_stride, codec.spatial_stride, codec.latent_channels) == (4, 8, 16)
  config.codec.spatial_stride = 16
  with pytest.raises(config_utils.ConfigError, match="spatial_stride"):
    taehv.from_config(config)


# ------------------------------------------------------------------------------------------------
# Checkpoint layout (reference/wan.md section 3.2), written out independently of the converter.


def _taew2_1_shapes():
  shapes = {}

  def conv(key, out, inp, window=3, bias=True):
    shapes[f"{key}.weight"] = (out, inp, window, window)
    if bias:
      shapes[f"{key}.bias"] = (out,)

  def mem(key, n):
    conv(f"{key}.conv.0", n, 2 * n)
    conv(f"{key}.conv.2", n, n)
    conv(f"{key}.conv.4", n, n)

  conv("encoder.0", 64, 3)
  for pool, pool_in in ((2, 128), (7, 128), (12, 64)):
    shapes[f"encoder.{pool}.conv.weight"] = (64, pool_in, 1, 1)
    conv(f"encoder.{pool + 1}", 64, 64, bias=False)
    for i in range(pool + 2, pool + 5):
      mem(f"encoder.{i}", 64)
  conv("encoder.17", 16, 64)
  conv("decoder.1", 256, 16)
  for first_mem, n, grow_out, proj_out in ((3, 256, 256, 128), (9, 128, 256, 64), (15, 64, 128, 64)):
    for i in range(first_mem, first_mem + 3):
      mem(f"decoder.{i}", n)
    shapes[f"decoder.{first_mem + 4}.conv.weight"] = (grow_out, n, 1, 1)
    conv(f"decoder.{first_mem + 5}", proj_out, n, bias=False)
  conv("decoder.22", 3, 64)
  return shapes


def test_every_taew2_1_key_maps_onto_the_full_size_model():
  shapes = _taew2_1_shapes()
  assert sum(k.startswith("encoder.") for k in shapes) == 64 and sum(k.startswith("decoder.") for k in shapes) == 64
  source = common.from_state_dict({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()})
  plan = convert_taehv.plan_taehv(source)  # raises on any unknown, missing or mismatched key
  assert {p.key for p in plan.placements} == set(shapes)
  total = sum(int(np.prod(s.shape)) for s in plan.expected.values())
  assert total == sum(int(np.prod(s)) for s in shapes.values())
  assert round(total / 1e6, 1) == 11.3  # wan.md: ~11.3 M parameters


def test_conversion_errors_name_every_problem():
  shapes = _taew2_1_shapes()
  shapes["decoder.23.weight"] = (3, 3, 3, 3)
  del shapes["encoder.9.conv.2.bias"]
  shapes["decoder.13.conv.weight"] = (128, 128, 1, 1)
  source = common.from_state_dict({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()})
  with pytest.raises(common.ConversionError) as info:
    convert_taehv.plan_taehv(source)
  message = str(info.value)
  assert "decoder.23.weight" in message
  assert "encoder/stage_1_mem_0/conv_1/bias" in message
  assert "decoder.13.conv.weight" in message


# ------------------------------------------------------------------------------------------------
# Parity with a PyTorch reference built from the architecture facts (NCHW, time folded into the batch).


def _torch_reference(config):
  torch = pytest.importorskip("torch")
  nn = torch.nn

  def conv(n_in, n_out, stride=1, bias=True):
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)

  class Mem(nn.Module):
    def __init__(self, n):
      super().__init__()
      self.conv = nn.Sequential(conv(2 * n, n), nn.ReLU(), conv(n, n), nn.ReLU(), conv(n, n))

    def forward(self, x, past):
      return torch.relu(self.conv(torch.cat([x, past], 1)) + x)

  class Pool(nn.Module):
    def __init__(self, n, stride):
      super().__init__()
      self.stride = stride
      self.conv = nn.Conv2d(n * stride, n, 1, bias=False)

    def forward(self, x):
      _, c, h, w = x.shape
      return self.conv(x.reshape(-1, self.stride * c, h, w))

  class Grow(nn.Module):
    def __init__(self, n, stride):
      super().__init__()
      self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x):
      _, c, h, w = x.shape
      return self.conv(x).reshape(-1, c, h, w)

  class SoftClamp(nn.Module):
    def forward(self, x):
      return torch.tanh(x / config.latent_clamp) * config.latent_clamp

  e, (d0, d1, d2, d3) = config.encoder_width, config.decoder_widths
  model = nn.Module()
  model.encoder = nn.Sequential(
      conv(3, e), nn.ReLU(),
      Pool(e, 2), conv(e, e, 2, False), Mem(e), Mem(e), Mem(e),
      Pool(e, 2), conv(e, e, 2, False), Mem(e), Mem(e), Mem(e),
      Pool(e, 1), conv(e, e, 2, False), Mem(e), Mem(e), Mem(e),
      conv(e, config.latent_channels))
  model.decoder = nn.Sequential(
      SoftClamp(), conv(config.latent_channels, d0), nn.ReLU(),
      Mem(d0), Mem(d0), Mem(d0), nn.Upsample(scale_factor=2), Grow(d0, 1), conv(d0, d1, bias=False),
      Mem(d1), Mem(d1), Mem(d1), nn.Upsample(scale_factor=2), Grow(d1, 2), conv(d1, d2, bias=False),
      Mem(d2), Mem(d2), Mem(d2), nn.Upsample(scale_factor=2), Grow(d2, 2), conv(d2, d3, bias=False),
      nn.ReLU(), conv(d3, 3))

  def run(sequence, x):  # x [N, T, C, H, W]; every time step at once, MemBlocks fed their input one step back
    n = x.shape[0]
    x = x.flatten(0, 1)
    for layer in sequence:
      if isinstance(layer, Mem):
        frames = x.reshape(n, -1, *x.shape[1:])
        past = torch.cat([torch.zeros_like(frames[:, :1]), frames[:, :-1]], 1).flatten(0, 1)
        x = layer(x, past)
      else:
        x = layer(x)
    return x.reshape(n, -1, *x.shape[1:])

  with torch.no_grad():
    for param in model.parameters():  # default conv init, plus non-zero biases
      if param.ndim == 1:
        param.normal_(0.0, 0.1)
  return torch, model.eval(), run


@pytest.mark.parity
def test_matches_a_pytorch_reference(codec):
  torch, reference, run = _torch_reference(SMALL)
  params, _ = convert_taehv.convert_taehv(reference.state_dict(), SMALL)
  rng = np.random.default_rng(3)
  latents = rng.standard_normal((1, 5, *LATENT_GRID, SMALL.latent_channels)).astype(np.float32)
  video = rng.uniform(-1, 1, (1, 9, 16, 24, 3)).astype(np.float32)
  with torch.no_grad():
    raw = run(reference.decoder, torch.from_numpy(np.moveaxis(latents, -1, 2))).clamp(0, 1)
    want_video = np.moveaxis(raw.numpy(), 2, -1)[:, SMALL.frames_to_trim:] * 2 - 1
    pixels = (video + 1) / 2
    padded = np.concatenate([np.repeat(pixels[:, :1], SMALL.frames_to_trim, axis=1), pixels], axis=1)
    want_latents = np.moveaxis(run(reference.encoder, torch.from_numpy(np.moveaxis(padded, -1, 2))).numpy(), 2, -1)
  assert _relative_error(jax.jit(codec.decode)(params, jnp.asarray(latents)), want_video) <= 1e-4
  assert _relative_error(jax.jit(codec.encode)(params, jnp.asarray(video)), want_latents) <= 1e-4
