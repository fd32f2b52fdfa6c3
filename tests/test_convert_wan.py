"""Wan DiT key maps: the full 1.3B checkpoint (official and diffusers names) against WanDiT's shapes, errors, CLI.

Checkpoints here are shape-only (`jax.ShapeDtypeStruct`) so the 1.4 B-parameter layout is checked without
allocating it; only the CLI round trip writes real (tiny, random) weights.
"""

from __future__ import annotations

import math

from flax import traverse_util
import jax
import numpy as np
import pytest

from configs import models
from msjax import config_utils
from msjax.convert import __main__ as convert_main
from msjax.convert import common, wan
from msjax.convert.common import ConversionError

# Facts about the real Wan2.1-T2V-1.3B checkpoint (reference/wan.md section 1.6).
WAN_1_3B_KEYS = 825
WAN_1_3B_PARAMS = 1_418_996_800


def official_wan_keys(config, in_channels: int, image_cross_attn: bool = False,
                      make=lambda shape: jax.ShapeDtypeStruct(shape, np.float32)) -> dict:
  """Every key of an official `WanModel` state dict with its shape (wan.md section 1.6), in PyTorch layout."""
  m = config.model
  dim, ffn, freq = m.dim, m.ffn_dim, m.freq_dim
  out = math.prod(m.patch_size) * config.codec.latent_channels
  keys = {}

  def linear(name: str, fan_in: int, fan_out: int) -> None:
    keys[f"{name}.weight"] = make((fan_out, fan_in))
    keys[f"{name}.bias"] = make((fan_out,))

  keys["patch_embedding.weight"] = make((dim, in_channels, *m.patch_size))
  keys["patch_embedding.bias"] = make((dim,))
  linear("text_embedding.0", m.text_dim, dim)
  linear("text_embedding.2", dim, dim)
  linear("time_embedding.0", freq, dim)
  linear("time_embedding.2", dim, dim)
  linear("time_projection.1", dim, 6 * dim)
  if image_cross_attn:
    width = m.image_embed_dim
    keys.update({"img_emb.proj.0.weight": make((width,)), "img_emb.proj.0.bias": make((width,))})
    linear("img_emb.proj.1", width, width)
    linear("img_emb.proj.3", width, dim)
    keys.update({"img_emb.proj.4.weight": make((dim,)), "img_emb.proj.4.bias": make((dim,))})
  for layer in range(m.num_layers):
    block = f"blocks.{layer}"
    keys[f"{block}.modulation"] = make((1, 6, dim))
    projections = {"self_attn": "qkvo", "cross_attn": ["q", "k", "v", "o"] + ["k_img", "v_img"] * image_cross_attn}
    for attn, names in projections.items():
      for name in names:
        linear(f"{block}.{attn}.{name}", dim, dim)
      norms = ["norm_q", "norm_k"] + ["norm_k_img"] * (image_cross_attn and attn == "cross_attn")
      keys.update({f"{block}.{attn}.{norm}.weight": make((dim,)) for norm in norms})
    keys.update({f"{block}.norm3.weight": make((dim,)), f"{block}.norm3.bias": make((dim,))})
    linear(f"{block}.ffn.0", dim, ffn)
    linear(f"{block}.ffn.2", ffn, dim)
  keys["head.modulation"] = make((1, 2, dim))
  linear("head.head", dim, out)
  return keys


def _i2v_config():
  config = models.wan2_1_1_3b()
  config.model.image_cross_attn = True
  return config


def _i2v_in_channels(config) -> int:
  return 2 * config.codec.latent_channels + config.model.mask_channels


def _placements(plan: common.Plan) -> set:
  return {(p.target, p.layer, p.shape) for p in plan.placements}


@pytest.fixture(scope="module")
def wan_1_3b():
  config = models.wan2_1_1_3b()
  keys = official_wan_keys(config, in_channels=config.codec.latent_channels)
  return config, keys, wan.plan_wan(wan.as_source(keys), config)


def test_official_1_3b_checkpoint_covers_the_preset(wan_1_3b):
  config, keys, plan = wan_1_3b
  assert len(keys) == WAN_1_3B_KEYS
  assert sum(math.prod(s.shape) for s in keys.values()) == WAN_1_3B_PARAMS
  assert len(plan.placements) == WAN_1_3B_KEYS and not plan.dropped
  shapes = common.flatten_shapes(wan.param_shapes(config))
  loaded = {p.target for p in plan.placements}
  assert set(shapes) - loaded == set(plan.initialised)
  assert plan.initialised and all(p.startswith("track_head/") for p in plan.initialised)
  in_channels = config_utils.geometry(config).in_channels
  assert plan.zero_filled == (
      common.ZeroFill("patch_embedding/kernel", axis=3, loaded=config.codec.latent_channels, total=in_channels),)
  layers = {p.layer for p in plan.placements if p.target == "blocks/ffn/fc1/kernel"}
  assert layers == set(range(config.model.num_layers))


def test_wan2_2_5b_layout_maps_onto_its_preset():
  config = models.wan2_2_5b()
  keys = official_wan_keys(config, in_channels=config.codec.latent_channels)
  plan = wan.plan_wan(wan.as_source(keys), config)
  assert len(plan.placements) == len(keys)
  (fill,) = plan.zero_filled  # only the track channels: Wan 2.2 TI2V puts the image in the latent itself
  assert fill.total - fill.loaded == config.model.track_channels


def test_diffusers_names_map_exactly_like_official_names(wan_1_3b):
  convert_to_diffusers = pytest.importorskip("diffusers.loaders.single_file_utils").convert_wan_transformer_to_diffusers
  config, keys, plan = wan_1_3b
  diffusers_keys = convert_to_diffusers(dict(keys))  # diffusers' own renaming, not our table
  assert set(diffusers_keys).isdisjoint(keys.keys() - {"patch_embedding.weight", "patch_embedding.bias"})
  source = wan.as_source(diffusers_keys)
  assert wan.detect_names(source) == "diffusers"
  assert wan.detect_names(wan.as_source(keys)) == "official"
  assert _placements(wan.plan_wan(source, config)) == _placements(plan)


@pytest.mark.parametrize("names", ["official", "diffusers"])
def test_i2v_checkpoint_fills_image_channels_and_branch(names):
  config = _i2v_config()
  keys = official_wan_keys(config, in_channels=_i2v_in_channels(config), image_cross_attn=True)
  if names == "diffusers":
    keys = pytest.importorskip("diffusers.loaders.single_file_utils").convert_wan_transformer_to_diffusers(keys)
  plan = wan.plan_wan(wan.as_source(keys), config, names=names)
  assert len(plan.placements) == len(keys)
  (fill,) = plan.zero_filled
  assert (fill.loaded, fill.total) == (_i2v_in_channels(config), config_utils.geometry(config).in_channels)
  targets = {p.target for p in plan.placements}
  assert {"image_embedding/norm_in/scale", "image_embedding/fc2/kernel", "blocks/cross_attn/k_img/kernel",
          "blocks/cross_attn/norm_k_img/scale"} <= targets


def test_image_branch_mismatch_is_reported():
  t2v_config, i2v_config = models.wan2_1_1_3b(), _i2v_config()
  t2v_keys = official_wan_keys(t2v_config, in_channels=t2v_config.codec.latent_channels)
  with pytest.raises(ConversionError, match="image_embedding/fc1/kernel") as info:
    wan.plan_wan(wan.as_source(t2v_keys), i2v_config)
  assert "blocks/cross_attn/k_img/kernel" in str(info.value)
  i2v_keys = official_wan_keys(i2v_config, in_channels=_i2v_in_channels(i2v_config), image_cross_attn=True)
  with pytest.raises(ConversionError, match="does not have") as info:
    wan.plan_wan(wan.as_source(i2v_keys), t2v_config)
  unexpected = info.value.problems["keys for parameters this model does not have"]
  assert "img_emb.proj.1.weight -> image_embedding/fc1/kernel" in unexpected
  assert "blocks.N.cross_attn.k_img.weight -> blocks/cross_attn/k_img/kernel (layers 0-29)" in unexpected


def test_malformed_checkpoint_names_every_problem(wan_1_3b):
  config, keys, _ = wan_1_3b
  keys = dict(keys)
  keys["blocks.7.self_attn.rotary.weight"] = keys["blocks.7.norm3.weight"]  # unknown
  del keys["blocks.4.ffn.2.bias"]  # missing
  keys["head.head.weight"] = jax.ShapeDtypeStruct((63, config.model.dim), np.float32)  # wrong shape
  with pytest.raises(ConversionError) as info:
    wan.plan_wan(common.from_state_dict(keys, name="broken.safetensors"), config)
  message = str(info.value)
  assert "broken.safetensors" in message
  assert "blocks.7.self_attn.rotary.weight" in message
  assert "blocks/ffn/fc2/bias (layers 4)" in message
  assert "head.head.weight -> head/linear/kernel" in message and "[63, 1536]" in message


def test_checkpoint_with_more_input_channels_is_refused(wan_1_3b):
  config, keys, _ = wan_1_3b
  too_many = config_utils.geometry(config).in_channels + 1
  keys = dict(keys, **{"patch_embedding.weight": jax.ShapeDtypeStruct(
      (config.model.dim, too_many, *config.model.patch_size), np.float32)})
  with pytest.raises(ConversionError, match="patch_embedding.weight -> patch_embedding/kernel"):
    wan.plan_wan(wan.as_source(keys), config)


def test_wrapper_prefixes_are_stripped_and_unknown_names_refused(wan_1_3b):
  config, keys, plan = wan_1_3b
  wrapped = {f"model.diffusion_model.{k}": v for k, v in keys.items()}
  assert _placements(wan.plan_wan(wan.as_source(wrapped), config)) == _placements(plan)
  with pytest.raises(ConversionError, match="--names"):
    wan.detect_names(common.from_state_dict({"encoder.conv.weight": keys["patch_embedding.weight"]}))


def test_cli_round_trip_on_the_tiny_preset(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  config = models.tiny()
  channels = config.codec.latent_channels
  gen = torch.Generator().manual_seed(0)
  state = official_wan_keys(config, in_channels=channels, make=lambda shape: torch.randn(shape, generator=gen))
  state["text_embedding.0.weight"] = state["text_embedding.0.weight"].to(torch.bfloat16)  # bf16 path
  src = tmp_path / "wan_tiny.safetensors"
  safetensors_torch.save_file(state, str(src))

  argv = ["wan", "--src", str(src), "--preset", "tiny", "--out", str(tmp_path / "out")]
  assert convert_main.main(argv) == 0
  printed = capsys.readouterr().out
  assert "official names" in printed and "zero-initialised: patch_embedding/kernel" in printed
  assert "track_head" in printed
  assert convert_main.main(argv) == 1  # refuses to overwrite
  assert "--overwrite" in capsys.readouterr().err

  params = common.load_params(tmp_path / "out")
  expected = wan.param_shapes(config)
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  jax.tree.map(lambda p, s: np.testing.assert_equal(p.shape, s.shape), params, expected)

  weights = {k: v.float().numpy() for k, v in state.items()}
  for layer in range(config.model.num_layers):
    np.testing.assert_array_equal(params["blocks"]["self_attn"]["q"]["kernel"][layer],
                                  weights[f"blocks.{layer}.self_attn.q.weight"].T)
    np.testing.assert_array_equal(params["blocks"]["modulation"][layer], weights[f"blocks.{layer}.modulation"][0])
    np.testing.assert_array_equal(params["blocks"]["cross_attn"]["norm_k"]["scale"][layer],
                                  weights[f"blocks.{layer}.cross_attn.norm_k.weight"])
  np.testing.assert_array_equal(params["text_embedding"]["fc1"]["kernel"], weights["text_embedding.0.weight"].T)
  np.testing.assert_array_equal(params["head"]["modulation"], weights["head.modulation"][0])
  kernel = params["patch_embedding"]["kernel"]
  np.testing.assert_array_equal(kernel[..., :channels, :],
                                weights["patch_embedding.weight"].transpose(2, 3, 4, 1, 0))
  np.testing.assert_array_equal(kernel[..., channels:, :], 0.0)
  for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
    assert np.all(np.isfinite(leaf)), path
    if not path.endswith("bias"):  # flax inits biases to zero; every other leaf holds random values now
      assert np.any(leaf != 0), path


def test_preset_overrides_for_the_cli():
  config = wan.apply_overrides(models.wan2_1_1_3b(), ["model.image_cross_attn=True", "model.track_channels=8"])
  assert config.model.image_cross_attn is True and config.model.track_channels == 8
  assert models.wan2_1_1_3b().model.image_cross_attn is False  # the preset itself is untouched
  for bad in (["model.no_such_field=1"], ["model.track_channels=eight"], ["model.dim"]):
    with pytest.raises(ValueError):
      wan.apply_overrides(models.wan2_1_1_3b(), bad)


def test_cli_rejects_unknown_converter(capsys):
  assert convert_main.main(["nope"]) == 2
  assert "unknown converter" in capsys.readouterr().err
