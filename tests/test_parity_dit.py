"""WanDiT with converted weights equals diffusers' `WanTransformer3DModel` (random weights, tiny sizes, fp32, CPU).

How the inputs line up: our DiT assembles its patch-embedding input itself, [noisy latent | mask | first-frame
latent | track features]. Diffusers takes that concatenation as `hidden_states` (channels first). So
  * T2V: diffusers sees only the noisy latent (in_channels = C). Our model also gets a first frame and a random
    track grid; the converter zero-fills the patch-embedding rows of those channels, so the outputs must still be
    equal - this checks the "converted model computes what the checkpoint did" claim end to end.
  * I2V: diffusers sees [latent | mask | first-frame latent] (36-style), built here independently of our model:
    mask 1 on latent frame 0 and 0 elsewhere, the first-frame latent on frame 0 and zeros elsewhere; plus the CLIP
    branch (image_dim, added_kv_proj_dim). Diffusers splits CLIP tokens from text by a hard-coded 512 text tokens,
    so the I2V config uses text_len = 512.
Timesteps: diffusers takes one timestep per sample ([B]) or one per token ([B, N]); we compare a shared t per
sample and per-latent-frame t (repeated over each frame's tokens for diffusers), with diffusers' timestep = 1000 t.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
import pytest

from configs import models
from msjax import config_utils
from msjax.convert import common, wan
from msjax.models import dit
from msjax.models.track_head import Conditioning

pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TIMESTEP_SCALE = dit.TIMESTEP_SCALE  # diffusers' timestep = 1000 t
TOLERANCE = 1e-4  # max |ours - diffusers| / max |diffusers|
DIFFUSERS_TEXT_TOKENS = 512  # WanAttnProcessor's hard-coded text length when CLIP tokens are present
BATCH, LATENT_FRAMES, LATENT_HEIGHT, LATENT_WIDTH = 2, 3, 4, 6
IMAGE_TOKENS = 5


def _parity_config(image: bool):
  config = models.tiny()
  m = config.model
  m.dim, m.num_layers, m.num_heads, m.ffn_dim, m.freq_dim = 64, 2, 2, 128, 32
  m.text_dim = 32
  m.text_len = DIFFUSERS_TEXT_TOKENS if image else 8
  m.track_channels = 8
  m.image_cross_attn = image
  m.image_embed_dim = 24
  m.image_tokens = IMAGE_TOKENS
  m.dtype, m.attention = "float32", "xla"
  m.prediction = "velocity"  # diffusers predicts the flow velocity
  config.codec.latent_channels = 4
  m.mask_channels = 4
  return config


def _diffusers_model(config, image: bool, seed: int):
  m, geo = config.model, config_utils.geometry(config)
  in_channels = geo.latent_channels + (m.mask_channels + geo.latent_channels if image else 0)
  model = diffusers.WanTransformer3DModel(
      patch_size=tuple(m.patch_size), num_attention_heads=m.num_heads, attention_head_dim=geo.head_dim,
      in_channels=in_channels, out_channels=geo.latent_channels, text_dim=m.text_dim, freq_dim=m.freq_dim,
      ffn_dim=m.ffn_dim, num_layers=m.num_layers, cross_attn_norm=m.cross_attn_norm, eps=m.eps,
      qk_norm="rms_norm_across_heads", image_dim=m.image_embed_dim if image else None,
      added_kv_proj_dim=m.dim if image else None, rope_max_seq_len=m.rope_max_positions)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=gen)
      if "norm" in name and name.endswith("weight"):
        param.copy_(1.0 + 0.2 * noise)  # norm scales away from 1 so a dropped scale shows
      elif name.endswith("bias") or "scale_shift_table" in name:
        param.copy_(0.2 * noise)
      else:  # weights: unit-variance outputs, so two layers neither vanish nor explode
        param.copy_(noise / np.sqrt(np.prod(param.shape[1:])))
  return model.eval()


def _inputs(config, image: bool, seed: int):
  geo = config_utils.geometry(config)
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  latents = normal(BATCH, LATENT_FRAMES, LATENT_HEIGHT, LATENT_WIDTH, geo.latent_channels)
  pixel_frames = config_utils.video_frames(LATENT_FRAMES, config.codec.temporal_stride)
  cond = Conditioning(
      context=normal(BATCH, config.model.text_len, config.model.text_dim),
      first_latent=normal(BATCH, LATENT_HEIGHT, LATENT_WIDTH, geo.latent_channels),
      track_grid=normal(BATCH, pixel_frames, LATENT_HEIGHT, LATENT_WIDTH, config.tracks.embed_dim),
      image_tokens=normal(BATCH, IMAGE_TOKENS, config.model.image_embed_dim) if image else None)
  return latents, cond


def _diffusers_hidden_states(config, latents: np.ndarray, cond: Conditioning, image: bool) -> np.ndarray:
  """The patch-embedding input diffusers expects, [B, C_in, F, h, w], built from the Wan I2V convention."""
  channels = [latents]
  if image:
    mask = np.zeros(latents.shape[:-1] + (config.model.mask_channels,), np.float32)
    mask[:, 0] = 1.0
    first = np.zeros_like(latents)
    first[:, 0] = cond.first_latent
    channels += [mask, first]
  return np.concatenate(channels, axis=-1).transpose(0, 4, 1, 2, 3)


@dataclasses.dataclass(frozen=True)
class _Case:
  config: Any
  reference: Any  # the diffusers model
  plan: common.Plan
  params: dict
  latents: np.ndarray
  cond: Conditioning
  forward: Callable


@functools.lru_cache(maxsize=None)
def _case(image: bool) -> _Case:
  config = _parity_config(image)
  reference = _diffusers_model(config, image, seed=1)
  params, plan = wan.convert_wan(reference.state_dict(), config)
  latents, cond = _inputs(config, image, seed=2)
  model = dit.WanDiT(dit.DiTSpec.from_config(config))
  forward = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
  return _Case(config, reference, plan, params, latents, cond, forward)


@pytest.fixture(scope="module", params=[False, True], ids=["t2v", "i2v"])
def case(request) -> _Case:
  return _case(request.param)


def _compare(case: _Case, params: dict, t_frames: np.ndarray, per_token: bool) -> float:
  """Relative error of our forward against diffusers at flow times t_frames [B, F]."""
  image = case.cond.image_tokens is not None
  pt, ph, pw = case.config.model.patch_size
  if per_token:  # diffusers' [B, N] form: each grid frame's time repeated over its tokens
    timestep = np.repeat(t_frames[:, ::pt], (LATENT_HEIGHT // ph) * (LATENT_WIDTH // pw), axis=1)
  else:
    timestep = t_frames[:, 0]
  ours = np.asarray(case.forward(params, case.latents, t_frames, case.cond))
  with torch.no_grad():
    ref = case.reference(
        torch.from_numpy(_diffusers_hidden_states(case.config, case.latents, case.cond, image)),
        torch.from_numpy(TIMESTEP_SCALE * timestep), torch.from_numpy(case.cond.context),
        encoder_hidden_states_image=None if not image else torch.from_numpy(case.cond.image_tokens),
        return_dict=False)[0]
  ref = ref.numpy().transpose(0, 2, 3, 4, 1)
  assert ours.shape == ref.shape
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def test_diffusers_state_dict_converts_completely(case):
  state = case.reference.state_dict()
  assert wan.detect_names(wan.as_source(state)) == "diffusers"
  assert len(case.plan.placements) == len(state) and not case.plan.dropped


def test_shared_timestep_matches_diffusers(case):
  t = np.broadcast_to(np.array([[0.37], [0.81]], np.float32), (BATCH, LATENT_FRAMES))
  error = _compare(case, case.params, t, per_token=False)
  assert error <= TOLERANCE, f"relative error {error:.2e}"


def test_per_frame_timesteps_match_diffusers_per_token_timesteps(case):
  t = np.array([[0.9, 0.5, 0.2], [0.05, 0.6, 0.99]], np.float32)
  error = _compare(case, case.params, t, per_token=True)
  assert error <= TOLERANCE, f"relative error {error:.2e}"


def test_zero_filled_rows_are_what_make_t2v_parity_hold():
  """Control: give the conditioning rows of the patch embedding weights and the outputs must differ."""
  case = _case(False)  # positional, so the lru_cache shares the fixture's case
  kernel = np.array(case.params["patch_embedding"]["kernel"])
  rows = slice(case.config.codec.latent_channels, None)  # mask, first-frame latent and track channels
  # Random, not constant: a constant row adds the same value to every channel, which every LayerNorm removes.
  kernel[..., rows, :] = 0.1 * np.random.default_rng(5).standard_normal(kernel[..., rows, :].shape)
  params = dict(case.params, patch_embedding=dict(case.params["patch_embedding"], kernel=kernel))
  t = np.full((BATCH, LATENT_FRAMES), 0.5, np.float32)
  assert _compare(case, params, t, per_token=False) > 100 * TOLERANCE
