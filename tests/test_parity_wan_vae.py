"""Wan 2.1 VAE against diffusers' `AutoencoderKLWan` (random weights, reduced width): encode, decode, key names.

diffusers' model works on unnormalised latents (its pipelines apply latents_mean / latents_std); our Codec
works on normalised ones, so the comparison normalises the reference's posterior mean and un-normalises the
latents fed to its decoder.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msjax.codecs import wan_vae
from msjax.convert import common
from msjax.convert import wan_vae as convert_wan_vae

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity

CONFIG = wan_vae.reduced_config(base_dim=4)  # full depth (num_res_blocks=2), narrow
TOLERANCE = 1e-4  # max |ours - reference| / max |reference|, float32


def _reference_model(config, seed=0):
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKLWan(base_dim=config.base_dim, z_dim=config.z_dim, dim_mult=list(config.dim_mult),
                                     num_res_blocks=config.num_res_blocks,
                                     temperal_downsample=list(config.temporal_downsample),
                                     latents_mean=list(config.latents_mean), latents_std=list(config.latents_std))
  with torch.no_grad():  # conv weights keep their random init; gains and biases move off 1 and 0
    for name, param in model.named_parameters():
      if name.endswith("gamma"):
        param.uniform_(0.5, 1.5)
      elif name.endswith("bias"):
        param.normal_(0.0, 0.1)
  return model.eval()


@pytest.fixture(scope="module")
def reference():
  return _reference_model(CONFIG)


@pytest.fixture(scope="module")
def params(reference):
  source = common.from_state_dict(reference.state_dict())
  assert convert_wan_vae.detect_names(source) == "diffusers"
  converted, plan = convert_wan_vae.convert_wan_vae(source, CONFIG)
  assert len(plan.placements) == len(reference.state_dict())
  return converted


def _to_torch(x):  # [B, T, H, W, C] -> [B, C, T, H, W]
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def _from_torch(x):
  return np.moveaxis(x.detach().numpy(), 1, -1)


def _relative_error(got, want):
  chex.assert_equal_shape([got, want])
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def test_encode_matches_diffusers(reference, params):
  video = np.random.default_rng(0).uniform(-1, 1, (1, 9, 16, 24, 3)).astype(np.float32)
  with torch.no_grad():
    mu = _from_torch(reference.encode(_to_torch(video)).latent_dist.mode())
  want = (mu - np.asarray(CONFIG.latents_mean)) / np.asarray(CONFIG.latents_std)
  got = jax.jit(wan_vae.WanVAECodec(CONFIG).encode)(params, jnp.asarray(video))
  assert _relative_error(got, want) <= TOLERANCE


def test_decode_matches_diffusers(reference, params):
  latents = np.random.default_rng(1).standard_normal((1, 5, 2, 3, CONFIG.z_dim)).astype(np.float32)
  unnormalised = latents * np.asarray(CONFIG.latents_std, np.float32) + np.asarray(CONFIG.latents_mean, np.float32)
  with torch.no_grad():
    want = _from_torch(reference.decode(_to_torch(unnormalised)).sample)
  got = jax.jit(wan_vae.WanVAECodec(CONFIG).decode)(params, jnp.asarray(latents))
  assert got.shape[1] == 17
  assert np.mean(np.abs(want) >= 1.0) < 0.01, "reference saturates; the comparison would be vacuous"
  assert _relative_error(got, want) <= TOLERANCE


def _official_names(state):
  """diffusers key names -> the official Wan names (reference/wan.md section 2.3, `convert_vae()` reversed)."""
  per_stage = CONFIG.num_res_blocks + 2  # official decoder list: num_res_blocks + 1 residual blocks, 1 resample
  renamed = {}
  for key, value in state.items():
    new = re.sub(r"^quant_conv", "conv1", key)
    new = re.sub(r"^post_quant_conv", "conv2", new)
    new = re.sub(r"^(encoder|decoder)\.conv_in", r"\1.conv1", new)
    new = re.sub(r"^(encoder|decoder)\.norm_out", r"\1.head.0", new)
    new = re.sub(r"^(encoder|decoder)\.conv_out", r"\1.head.2", new)
    new = new.replace("mid_block.resnets.0", "middle.0").replace("mid_block.attentions.0", "middle.1")
    new = new.replace("mid_block.resnets.1", "middle.2").replace("encoder.down_blocks.", "encoder.downsamples.")
    new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                 lambda m: f"decoder.upsamples.{int(m[1]) * per_stage + int(m[2])}", new)
    new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                 lambda m: f"decoder.upsamples.{int(m[1]) * per_stage + per_stage - 1}", new)
    for ours, theirs in (("norm1", "residual.0"), ("conv1", "residual.2"), ("norm2", "residual.3"),
                         ("conv2", "residual.6"), ("conv_shortcut", "shortcut")):
      new = re.sub(rf"(\.(?:downsamples|upsamples|middle)\.\d+)\.{ours}\.", rf"\1.{theirs}.", new)
    renamed[new] = value
  assert len(renamed) == len(state)
  return renamed


def test_official_names_convert_to_the_same_params(reference, params):
  official = _official_names(reference.state_dict())
  assert "decoder.upsamples.3.time_conv.weight" in official and "encoder.head.2.weight" in official
  source = common.from_state_dict(official)
  assert convert_wan_vae.detect_names(source) == "official"
  converted, _ = convert_wan_vae.convert_wan_vae(source, CONFIG)
  chex.assert_trees_all_equal(converted, params)


def test_every_diffusers_key_maps_onto_the_full_size_model():
  with torch.device("meta"):
    model = diffusers.AutoencoderKLWan()  # the released Wan 2.1 configuration
  state = {k: jax.ShapeDtypeStruct(tuple(v.shape), jnp.float32) for k, v in model.state_dict().items()}
  plan = convert_wan_vae.plan_wan_vae(common.from_state_dict(state), wan_vae.WAN21_VAE, names="auto")
  assert {p.key for p in plan.placements} == set(state) and not plan.dropped
  assert sum(int(np.prod(s.shape)) for s in plan.expected.values()) == 126_892_531
