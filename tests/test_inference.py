"""Model loading/exporting and the conditioning built from user inputs (msjax.inference), and the teacher
generator of `python -m msjax.eval`."""

from __future__ import annotations

import json
import os

import chex
import jax
import numpy as np
import pytest

from configs import models
from msjax import inference
from msjax.data import sprites
from msjax.data import tracks as tracks_lib
from msjax.diffusion import flow
from msjax.eval import generators
from msjax.eval import sprites_eval
from msjax.models import dit
from msjax.train import teacher


def small_config(preset: str = "tiny"):
  config = models.get_preset(preset)
  config.video.num_frames = 9  # 3 latent frames
  config.model.update(dim=32, num_layers=1, num_heads=2, ffn_dim=64, text_len=16)
  config.text.update(width=32, num_layers=1, num_heads=2)
  config.seed = 0
  return config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  config = small_config()
  model = inference.random_model(config, seed=3)
  out = str(tmp_path_factory.mktemp("models") / "tiny_random")
  inference.save_model(out, {"dit": model.dit_params, "text": model.text_params}, config,
                       {"stage": "teacher", "step": 7, "source": "test"})
  return config, model, out


def test_export_round_trip_keeps_every_parameter(exported):
  config, model, out = exported
  loaded = inference.load_model(out, small_config())
  assert loaded.stage == "teacher"
  chex.assert_trees_all_equal(loaded.dit_params, model.dit_params)
  chex.assert_trees_all_equal(loaded.text_params, model.text_params)
  assert sorted(os.listdir(os.path.dirname(out))) == ["tiny_random"]  # no staging folder left behind
  with open(os.path.join(out, inference.MODEL_FILE)) as f:
    assert json.load(f)["step"] == 7


def test_checkpoint_of_another_model_is_refused_with_the_differences(exported):
  _, _, out = exported
  other = small_config()
  other.model.dim = 64
  with pytest.raises(inference.ModelError, match=r"model\.dim: checkpoint 32, config 64"):
    inference.load_model(out, other)
  with pytest.raises(inference.ModelError, match="no such checkpoint folder"):
    inference.load_model(out + "_missing", other)


def test_track_grid_is_seeded_and_places_points_in_their_cells():
  config = small_config()
  points = np.zeros((9, 1, 2), np.float32)
  points[:, 0] = [13.0, 42.0]  # pixel (x=13, y=42) -> cell (row 10, column 3) at stride 4
  tracks = tracks_lib.Tracks(points=points, visible=np.ones((9, 1), bool))
  grid = inference.track_grid(tracks, config, seed=1)
  chex.assert_shape(grid, (9, 16, 16, config.tracks.embed_dim))
  assert np.count_nonzero(np.abs(grid).sum(-1)) == 9
  assert np.abs(grid[:, 10, 3]).sum() > 0
  np.testing.assert_array_equal(grid, inference.track_grid(tracks, config, seed=1))
  assert not np.array_equal(grid, inference.track_grid(tracks, config, seed=2))  # another ID
  config.tracks.splat = "bilinear"  # (13, 42) is 1/4 cell left of the centre (14, 42) of cell (10, 3)
  shared = np.abs(inference.track_grid(tracks, config, seed=1)).sum(-1)
  np.testing.assert_allclose(shared[0, 10, 2:4] / shared[0, 10, 2:4].sum(), [0.25, 0.75], atol=1e-6)
  assert np.count_nonzero(shared) == 2 * 9


def test_first_latent_is_the_codec_encoding_of_the_frame(exported):
  config, model, _ = exported
  clip = sprites.render_clip(5, sprites_eval.world_config(config))
  latent = inference.first_latent(model, clip.video[0])
  decoded = model.codec.decode(None, latent[None, None])
  np.testing.assert_array_equal(inference.to_uint8(decoded[0, 0]), clip.video[0])


def _generator_and_clip(config, checkpoint: str, name: str):
  """The named eval generator on `checkpoint` and held-out clip 5 of the config's world (teacher shift 6)."""
  config.flow = {"shift": 6.0}
  world = sprites_eval.world_config(config)
  context = sprites_eval.GeneratorContext(config=config, checkpoint=checkpoint, world=world, seeds=(5,))
  return sprites_eval.make_generator(name, context), sprites.render_clip(5, world), world


@pytest.mark.parametrize("sampler", [teacher.EULER, teacher.RENOISE])
def test_teacher_generator_returns_the_asked_for_video(exported, sampler):
  config, _, out = exported
  config.guidance = generators.guidance_config(config).copy_and_resolve_references()
  config.guidance.update(num_steps=2, sampler=sampler)
  generate, clip, world = _generator_and_clip(config, out, generators.TEACHER)
  video = generate(clip.video[0], clip.prompt, sprites_eval.clip_tracks(clip), world.num_frames)
  chex.assert_shape(video, clip.video.shape)
  assert video.dtype == np.uint8
  again = generate(clip.video[0], clip.prompt, sprites_eval.clip_tracks(clip), world.num_frames)
  np.testing.assert_array_equal(video, again)  # noise and track IDs are seeded per clip


def test_teacher_renoise_sampler_is_the_few_step_sampler_on_guided_velocities(exported):
  config, model, _ = exported
  guide = generators.guidance_config(config).copy_and_resolve_references()
  guide.update(num_steps=3, sampler=teacher.RENOISE)
  clip = sprites.render_clip(5, sprites_eval.world_config(config))
  context, null = inference.encode_prompt(model, [clip.prompt])
  cond = inference.conditioning(model, context, inference.first_latent(model, clip.video[0]),
                                inference.track_grid(sprites_eval.clip_tracks(clip), config, seed=1))
  noise = jax.random.normal(jax.random.PRNGKey(2), (1, 3, 16, 16, config.codec.latent_channels))
  # Fresh params put x0 near a constant, which every sampler reproduces; perturbed ones tell samplers apart.
  leaves, treedef = jax.tree.flatten(model.dit_params)
  keys = jax.random.split(jax.random.PRNGKey(6), len(leaves))
  params = jax.tree.unflatten(treedef, [leaf + 0.1 * jax.random.normal(key, leaf.shape)
                                        for leaf, key in zip(leaves, keys)])
  network, shift, rng = dit.WanDiT(model.spec), 6.0, jax.random.PRNGKey(4)
  renoised = teacher.sample(network, params, noise, cond, null, guide, shift, rng)
  velocity_fn = teacher.guided_velocity_fn(network, params, cond, null, guide)
  expected = flow.consistency_sample(velocity_fn, noise, flow.consistency_timesteps(3, shift), rng)
  np.testing.assert_allclose(renoised, expected, atol=1e-4)
  other_draws = teacher.sample(network, params, noise, cond, null, guide, shift, jax.random.PRNGKey(5))
  assert not np.allclose(renoised, other_draws, atol=1e-3)
  guide.sampler = teacher.EULER
  euler = teacher.sample(network, params, noise, cond, null, guide, shift, rng)
  np.testing.assert_allclose(euler, flow.euler_sample(velocity_fn, noise, flow.euler_timesteps(3, shift)),
                             atol=1e-4)
  assert not np.allclose(euler, renoised, atol=1e-3)


def test_teacher_generator_refuses_an_unknown_sampler(exported):
  config, _, out = exported
  config.guidance = generators.guidance_config(config).copy_and_resolve_references()
  config.guidance.sampler = "heun"
  with pytest.raises(sprites_eval.GeneratorError, match="guidance.sampler must be one of euler, renoise, got 'heun'"):
    _generator_and_clip(config, out, generators.TEACHER)


def test_shuffled_track_grid_keeps_frame_zero_and_the_occupied_cells():
  config = small_config()
  tracks = sprites_eval.clip_tracks(sprites.render_clip(5, sprites_eval.world_config(config)))
  given = inference.track_grid(tracks, config, seed=1)
  shuffled = inference.track_grid(tracks, config, seed=1, shuffle_later_ids=True)
  np.testing.assert_array_equal(shuffled[0], given[0])
  np.testing.assert_array_equal(np.abs(shuffled).sum(-1) > 0, np.abs(given).sum(-1) > 0)
  assert not np.allclose(shuffled[1:], given[1:])


@pytest.mark.parametrize("condition", [sprites_eval.TRACKS_SHUFFLED_IDS, sprites_eval.TRACKS_NONE,
                                       sprites_eval.TRACKS_LATENT_MEANS])
def test_teacher_generator_runs_the_track_ablations_and_the_student_refuses_them(exported, condition):
  config, _, out = exported
  config.guidance = generators.guidance_config(config).copy_and_resolve_references()
  config.guidance.update(num_steps=2, sampler=teacher.EULER)
  config.flow = {"shift": 6.0}
  world = sprites_eval.world_config(config)
  context = sprites_eval.GeneratorContext(config=config, checkpoint=out, world=world, seeds=(5,),
                                          track_condition=condition)
  clip = sprites.render_clip(5, world)
  video = sprites_eval.make_generator(generators.TEACHER, context)(
      clip.video[0], clip.prompt, sprites_eval.clip_tracks(clip), world.num_frames)
  chex.assert_shape(video, clip.video.shape)
  with pytest.raises(sprites_eval.GeneratorError, match="student generator streams the tracks as given"):
    sprites_eval.make_generator(generators.STUDENT, context)


def test_teacher_generator_without_checkpoint_says_so():
  config = small_config()
  context = sprites_eval.GeneratorContext(config=config, checkpoint="", world=sprites_eval.world_config(config),
                                          seeds=(5,))
  with pytest.raises(sprites_eval.GeneratorError, match="needs --checkpoint"):
    sprites_eval.make_generator(generators.TEACHER, context)


def test_student_generator_streams_the_clip_and_reports_chunk_times(exported):
  config, _, out = exported
  generate, clip, world = _generator_and_clip(config, out, generators.STUDENT)
  output = generate(clip.video[0], clip.prompt, sprites_eval.clip_tracks(clip), world.num_frames)
  chex.assert_shape(output["video"], clip.video.shape)
  assert output["video"].dtype == np.uint8
  np.testing.assert_array_equal(output["video"][0], clip.video[0])  # the user's first frame is pinned
  assert len(output["chunk_seconds"]) == 1 and output["chunk_seconds"][0] > 0  # 3 latent frames = 1 chunk


def test_export_cli_copies_a_model_and_names_a_missing_source(exported, tmp_path, capsys):
  _, model, out = exported
  copy = str(tmp_path / "copy")
  assert inference.main(["export", out, copy, "--stage", "student"]) == 0
  loaded = inference.load_model(copy, small_config())
  assert loaded.stage == "student"
  chex.assert_trees_all_equal(loaded.dit_params, model.dit_params)
  assert inference.main(["export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
  assert "no such checkpoint folder" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "x")
