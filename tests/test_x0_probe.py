"""The one-step x0 probe (msjax.eval.x0_probe): its no-network reference, region PSNR and CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import models
from msjax import inference
from msjax.eval import sprites_eval
from msjax.eval import x0_probe


def small_config():
  config = models.get_preset("tiny")
  config.video.num_frames = 5  # 2 latent frames
  config.model.update(dim=32, num_layers=1, num_heads=2, ffn_dim=64, text_len=16)
  config.seed = 0
  return config


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_scalar_skip_minimises_the_error_of_rescaling_the_noisy_input(t):
  rng = np.random.default_rng(0)
  x0 = rng.choice([-0.9, -0.2, 0.7], size=200_000)  # flat colours, nonzero mean like the sprites latents
  z_t = (1 - t) * x0 + t * rng.standard_normal(x0.shape)
  c = x0_probe.scalar_skip(t, float(np.mean(x0**2)))
  mse = lambda scale: np.mean((scale * z_t - x0) ** 2)
  assert mse(c) < mse(c * 1.05) and mse(c) < mse(c * 0.95)
  assert x0_probe.scalar_skip(1.0, 0.3) == 0.0 and x0_probe.scalar_skip(0.0, 0.3) == 1.0


def test_squared_errors_split_background_from_sprites():
  config = small_config()
  clip = sprites_eval.render_clips([sprites_eval.EVAL_SEED_START], sprites_eval.world_config(config))[0]
  background = np.all(clip.video == clip.background[:, None, None, :], axis=-1)
  shift = np.where(clip.background > 127, -10, 10)[:, None, None, :]  # 10 levels, away from the uint8 bounds
  video = np.where(background[..., None], clip.video.astype(np.int16) + shift, clip.video).astype(np.uint8)
  errors = x0_probe.SquaredErrors()
  errors.add(video, clip)
  psnr = errors.psnr()
  assert psnr["background"] == pytest.approx(20 * np.log10(255 / 10), abs=1e-6)
  assert psnr["sprites"] == float("inf")
  assert psnr["background"] < psnr["all"] < float("inf")


def test_probe_on_a_random_model_reports_every_region_and_an_exact_reference():
  config = small_config()
  model = inference.random_model(config, seed=1)
  clips = sprites_eval.render_clips(sprites_eval.eval_seeds(2), sprites_eval.world_config(config))
  result = x0_probe.probe(model, clips, [0.9, 0.01])
  assert set(result) == {"0.9", "0.01"}
  for rows in result.values():
    assert set(rows) == {"model", "scalar_skip", "motion"}
    for psnr in (rows["model"], rows["scalar_skip"]):
      assert set(psnr) == set(x0_probe.REGIONS) and all(np.isfinite(list(psnr.values())))
    assert len(rows["motion"]["lead_by_place"]) == config.codec.temporal_stride
  # Nearly clean input: rescaling alone recovers the clip; at t = 0.9 it cannot.
  assert result["0.01"]["scalar_skip"]["all"] > 35.0
  assert result["0.9"]["scalar_skip"]["all"] < 20.0
  assert len(x0_probe.format_table(result).splitlines()) == 1 + len(result)


def test_recycled_estimates_start_from_the_models_own_earlier_x0():
  config = small_config()
  config.flow = ml_collections.ConfigDict({"shift": 6.0})
  model = inference.random_model(config, seed=1)
  # A fresh head writes zeros whatever it reads; jitter every weight so the estimate depends on the input.
  leaves, tree = jax.tree_util.tree_flatten(model.dit_params)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  jittered = [leaf + 0.05 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
  model = dataclasses.replace(model, dit_params=jax.tree_util.tree_unflatten(tree, jittered))
  clips = sprites_eval.render_clips(sprites_eval.eval_seeds(2), sprites_eval.world_config(config))
  result = x0_probe.probe(model, clips, [1.0, 0.5], recycle_gap=0.25)
  for rows in result.values():
    assert set(rows) == {"model", "scalar_skip", "motion", "recycled", "recycled_motion"}
  # At t = 1 the earlier time is 1 too and re-noising to t = 1 leaves only the same noise: the very input.
  assert result["1"]["recycled"] == result["1"]["model"]
  # At t = 0.5 the input carries the jittered model's own x0 instead of the clip, so its estimate differs.
  assert abs(result["0.5"]["recycled"]["all"] - result["0.5"]["model"]["all"]) > 0.01
  assert len(x0_probe.format_table(result).splitlines()) == 2 + 2 * len(result)


def test_patch_tokens_are_the_heads_layout_and_invert():
  latents = np.arange(2 * 4 * 6 * 8 * 3, dtype=np.float32).reshape(2, 4, 6, 8, 3)
  tokens = x0_probe.patch_tokens(latents, (2, 3, 2))
  assert tokens.shape == (2 * 2 * 2 * 4, 2 * 3 * 2 * 3)
  # Token 0 holds latent frames 0-1, rows 0-2, columns 0-1, channels fastest.
  np.testing.assert_array_equal(tokens[0, :3], latents[0, 0, 0, 0])
  np.testing.assert_array_equal(tokens[0, 3:6], latents[0, 0, 0, 1])
  np.testing.assert_array_equal(tokens[0, 6:9], latents[0, 0, 1, 0])
  np.testing.assert_array_equal(x0_probe.from_patch_tokens(tokens, latents.shape, (2, 3, 2)), latents)


def test_token_subspace_is_the_best_of_its_rank():
  rng = np.random.default_rng(0)
  # Points near a 2-D plane in 6-D, off the origin: rank 2 keeps almost all of them, rank 6 all of them.
  plane = rng.standard_normal((2, 6))
  tokens = rng.standard_normal((500, 2)) @ plane + 3.0 + 0.01 * rng.standard_normal((500, 6))
  error = lambda mean, basis: np.mean(((tokens - mean) @ basis.T @ basis + mean - tokens) ** 2)
  mean, basis = x0_probe.fit_token_subspace(tokens, 2)
  np.testing.assert_allclose(basis @ basis.T, np.eye(2), atol=1e-9)
  assert error(mean, basis) < 1e-3 * np.var(tokens)
  other = np.linalg.qr(rng.standard_normal((6, 2)))[0].T
  assert error(mean, basis) < error(mean, other)
  assert error(*x0_probe.fit_token_subspace(tokens, 6)) < 1e-20
  with pytest.raises(ValueError, match="rank 7"):
    x0_probe.fit_token_subspace(tokens, 7)


def test_head_ceiling_rises_with_the_models_width():
  config = small_config()
  model = inference.random_model(config, seed=1)
  world = sprites_eval.world_config(config)
  fit_clips, clips = sprites_eval.render_clips(range(20), world), sprites_eval.render_clips(
      sprites_eval.eval_seeds(2), world)
  narrow, _ = x0_probe.head_ceiling(model, fit_clips, clips)
  wide_config = config.copy_and_resolve_references()
  wide_config.model.dim = 2 * 2 * config.codec.latent_channels  # the whole patch space: nothing is lost
  full, full_motion = x0_probe.head_ceiling(dataclasses.replace(model, config=wide_config), fit_clips, clips)
  assert set(narrow) == set(x0_probe.REGIONS) and 15.0 < narrow["all"] < full["all"]
  assert full["all"] > 50.0
  # Nothing lost, nothing moved: the sprites are found where they are, with no lead at any place.
  assert full_motion["epe"] < 0.05
  lead = np.array(full_motion["lead_by_place"])
  assert np.isfinite(lead).any() and np.nanmax(np.abs(lead)) < 0.05


def test_cli_writes_the_table_and_refuses_bad_timesteps(tmp_path):
  config = small_config()
  model = inference.random_model(config, seed=2)
  checkpoint = str(tmp_path / "model")
  inference.save_model(checkpoint, {"dit": model.dit_params, "text": model.text_params}, config,
                       {"stage": "teacher", "step": 1, "source": "test"})
  flags = ["--config", "configs/teacher.py", "--config.video.num_frames=5", "--config.model.dim=32",
           "--config.model.num_layers=1", "--config.model.num_heads=2", "--config.model.ffn_dim=64",
           "--checkpoint", checkpoint, "--num_clips", "1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = tmp_path / "probe.json"
  done = subprocess.run([sys.executable, "-m", "msjax.eval.x0_probe", *flags, "--timesteps", "0.5",
                         "--ceiling_clips", "3", "--out", str(out)], capture_output=True, text=True, env=env,
                        check=False)
  assert done.returncode == 0, done.stderr
  report = json.loads(out.read_text())
  assert set(report["0.5"]) == {"model", "scalar_skip", "motion"}
  assert set(report["head_ceiling"]["motion"]) == {"epe", "lead_by_place"}
  assert report["head_ceiling"]["rank"] == 32 and report["head_ceiling"]["fit_clips"] == 3
  assert set(report["head_ceiling"]["psnr"]) == set(x0_probe.REGIONS) and "head ceiling" in done.stdout
  bad = subprocess.run([sys.executable, "-m", "msjax.eval.x0_probe", *flags, "--timesteps", "0,0.5"],
                       capture_output=True, text=True, env=env, check=False)
  assert bad.returncode == 2 and "--timesteps must lie in (0, 1]" in bad.stderr and "Traceback" not in bad.stderr
  bad_gap = subprocess.run([sys.executable, "-m", "msjax.eval.x0_probe", *flags, "--recycle_gap", "1.5"],
                           capture_output=True, text=True, env=env, check=False)
  assert bad_gap.returncode == 2 and "--recycle_gap must lie in [0, 1]" in bad_gap.stderr
  assert "Traceback" not in bad_gap.stderr
