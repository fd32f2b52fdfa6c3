"""The `sprites` toy world: determinism, layout, prompts, and exact tracks / visibility / centroids."""

import dataclasses
import os
import time
import warnings

import chex
import numpy as np
import pytest

from configs import models
from configs import teacher as teacher_config
from examples import make_examples
from msjax import config_utils
from msjax.data import sprites
from msjax.data import tracks as tracks_lib

SEEDS = range(12)
SMALL = sprites.SpritesConfig(height=32, width=48, num_frames=9, grid=6)
JUMP = dataclasses.replace(SMALL, num_frames=13, motion=sprites.MOTION_JUMP)
EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _arrays(clip: sprites.Clip) -> dict:
  return {f.name: getattr(clip, f.name) for f in dataclasses.fields(clip)}


def _colour_at(clip: sprites.Clip) -> np.ndarray:
  """uint8 [T, N, 3]: the video colour in the pixel under each tracked point (frame-clipped for lookup)."""
  num_frames, height, width = clip.video.shape[:3]
  pixel = np.floor(clip.tracks).astype(np.int64)
  return clip.video[np.arange(num_frames)[:, None], np.clip(pixel[..., 1], 0, height - 1),
                    np.clip(pixel[..., 0], 0, width - 1)]


def _surface_colour(clip: sprites.Clip) -> np.ndarray:
  """uint8 [T, N, 3]: each point's own surface colour per frame (its sprite's, or the background's)."""
  start = _colour_at(clip)[0]
  on_background = (start == clip.background[0]).all(-1)
  return np.where(on_background[None, :, None], clip.background[:, None], start[None])


def _colour_name(rgb: np.ndarray) -> str:
  names = [name for name, value in sprites.palette().items() if (value == rgb).all()]
  assert len(names) == 1, rgb
  return names[0]


def _scene(shapes, colors, radii, centres, background="grey"):
  """A hand-built scene; `centres` is [T, S, 2] centre pixels (x, y)."""
  return sprites.Scene(shapes=tuple(shapes), color_names=tuple(colors), radii=tuple(radii),
                       centres=np.asarray(centres, np.int32), background_name=background)


def test_same_seed_same_clip_different_seed_different_clip():
  first, again, other = sprites.render_clip(7), sprites.render_clip(7), sprites.render_clip(8)
  for name, value in _arrays(first).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(_arrays(again)[name]), err_msg=name)
  assert not np.array_equal(first.video, other.video)
  assert not np.array_equal(first.tracks, other.tracks)


@pytest.mark.parametrize("config", [sprites.SpritesConfig(), SMALL], ids=["default", "small"])
def test_shapes_and_dtypes(config):
  for seed in range(3):
    clip = sprites.render_clip(seed, config)
    num_frames, num_tracks, num_sprites = config.num_frames, config.grid**2, len(clip.shapes)
    assert config.min_sprites <= num_sprites <= config.max_sprites
    chex.assert_shape(clip.video, (num_frames, config.height, config.width, 3))
    chex.assert_shape([clip.tracks, clip.visibility], [(num_frames, num_tracks, 2), (num_frames, num_tracks)])
    chex.assert_shape([clip.centroids, clip.sprite_visible],
                      [(num_frames, num_sprites, 2), (num_frames, num_sprites)])
    chex.assert_shape([clip.colors, clip.background], [(num_sprites, 3), (num_frames, 3)])
    chex.assert_type([clip.video, clip.tracks, clip.visibility, clip.centroids, clip.sprite_visible, clip.colors,
                      clip.background], [np.uint8, np.float32, bool, np.float32, bool, np.uint8, np.uint8])
    assert set(clip.shapes) <= set(sprites.SHAPES)
    config_utils.latent_frames(num_frames, config.temporal_stride)  # 1 + 4k


def test_config_checks():
  with pytest.raises(config_utils.ConfigError, match="1 \\+ 4"):
    sprites.SpritesConfig(num_frames=44)
  with pytest.raises(config_utils.ConfigError, match="do not fit"):
    sprites.SpritesConfig(max_radius_frac=0.45)
  with pytest.raises(config_utils.ConfigError, match="min_sprites"):
    sprites.SpritesConfig(min_sprites=3, max_sprites=2)
  with pytest.raises(config_utils.ConfigError, match="motion must be one of smooth, jump, mixed, got 'teleport'"):
    sprites.SpritesConfig(motion="teleport")


def test_from_config_reads_the_tiny_preset():
  preset = models.tiny()
  config = sprites.SpritesConfig.from_config(preset)
  assert (config.height, config.width, config.num_frames, config.grid) == (
      preset.video.height, preset.video.width, preset.video.num_frames, preset.tracks.grid)
  assert config.temporal_stride == preset.codec.temporal_stride


def test_from_config_reads_the_sprite_motion_of_a_training_config():
  config = teacher_config.get_config()
  assert sprites.SpritesConfig.from_config(config).motion == sprites.MOTION_SMOOTH
  config.data.sprite_motion = sprites.MOTION_JUMP
  assert sprites.SpritesConfig.from_config(config).motion == sprites.MOTION_JUMP


def _per_latent_frame(series: np.ndarray, config: sprites.SpritesConfig) -> list[np.ndarray]:
  """A per-pixel-frame series split by latent frame: frame 0 alone, then `temporal_stride` frames each."""
  stride = config.temporal_stride
  later_latent = config_utils.latent_frames(config.num_frames, stride) - 1
  return [series[:1]] + [series[1 + stride * k:1 + stride * (k + 1)] for k in range(later_latent)]


def test_jumping_sprites_hold_each_latent_frame_and_move_between_them():
  """Frame 0 is a latent frame of its own; each later latent frame holds one place for its `stride` pixel frames."""
  later_latent = config_utils.latent_frames(JUMP.num_frames, JUMP.temporal_stride) - 1
  jumps = possible_jumps = 0
  for seed in SEEDS:
    clip = sprites.render_clip(seed, JUMP)
    latent = _per_latent_frame(clip.centroids, JUMP)
    for held in latent:
      np.testing.assert_array_equal(held, np.broadcast_to(held[:1], held.shape))
    places = np.stack([held[0] for held in latent])  # [F, S, 2]
    jumps += int((np.abs(np.diff(places, axis=0)).sum(-1) > 0).sum())
    possible_jumps += later_latent * len(clip.shapes)
    assert sprites.render_clip(seed, JUMP).prompt == clip.prompt  # deterministic like smooth clips
  assert jumps >= 0.8 * possible_jumps


def test_drifting_jump_clips_jump_at_the_same_places_then_move_within_each_latent_frame():
  """`jump_drift` keeps the places jumped to (drawn first) and adds steps of smooth-clip size inside latent frames."""
  drifting = dataclasses.replace(JUMP, jump_drift=True)
  config = teacher_config.get_config()
  config.data.jump_drift = True
  assert sprites.SpritesConfig.from_config(config).jump_drift
  moved = 0
  for seed in SEEDS:
    held = _per_latent_frame(sprites.random_scene(seed, JUMP).centres, JUMP)
    drift = _per_latent_frame(sprites.random_scene(seed, drifting).centres, drifting)
    for still, moving in zip(held, drift):
      np.testing.assert_array_equal(still[0], moving[0])  # the jump lands where the held clip's does
      steps = np.abs(np.diff(moving, axis=0))
      assert steps.max(initial=0) <= 2  # at most 1.5 px per frame, rounded
      moved += int((steps.sum(-1) > 0).any(axis=0).sum())
  later_latent = config_utils.latent_frames(JUMP.num_frames, JUMP.temporal_stride) - 1
  assert moved >= 0.8 * later_latent * sum(len(sprites.random_scene(s, JUMP).shapes) for s in SEEDS)


def _held_every_latent_frame(seed: int, config: sprites.SpritesConfig) -> bool:
  """Whether every sprite centre stays put within each latent frame after frame 0 (jump motion's mark)."""
  later = _per_latent_frame(sprites.random_scene(seed, config).centres, config)[1:]
  return all((held == held[0]).all() for held in later)


def test_mixed_motion_draws_smooth_or_jump_per_clip():
  """Each mixed clip is one of the two worlds whole; about half of them jump."""
  mixed = dataclasses.replace(JUMP, motion=sprites.MOTION_MIXED)
  smooth = dataclasses.replace(JUMP, motion=sprites.MOTION_SMOOTH)
  seeds = range(40)
  jumping = [_held_every_latent_frame(seed, mixed) for seed in seeds]
  assert 10 <= sum(jumping) <= 30
  assert not any(_held_every_latent_frame(seed, smooth) for seed in seeds)
  assert all(_held_every_latent_frame(seed, JUMP) for seed in seeds)
  for seed, jumped in zip(seeds, jumping):
    steps = np.abs(np.diff(sprites.random_scene(seed, mixed).centres, axis=0)).max()
    assert (steps > 2) if jumped else (steps <= 2)  # smooth: at most 1.5 px per frame, rounded
  assert sprites.render_clip(7, mixed).video.shape == (mixed.num_frames, mixed.height, mixed.width, 3)


def test_prompt_names_colours_shapes_and_effect():
  effects = set()
  for seed in SEEDS:
    clip = sprites.render_clip(seed)
    for rgb, shape in zip(clip.colors, clip.shapes):
      assert f"{_colour_name(rgb)} {shape}" in clip.prompt, clip.prompt
    assert f"{_colour_name(clip.background[0])} background" in clip.prompt
    assert ("the background slowly" in clip.prompt) == bool(clip.effect)
    effects.add(bool(clip.effect))
  assert effects == {True, False}


def test_colours_are_distinct_from_each_other_and_the_background():
  for seed in SEEDS:
    clip = sprites.render_clip(seed)
    assert len({tuple(c) for c in clip.colors}) == len(clip.colors)
    assert not (clip.colors[None, :] == clip.background[:, None]).all(-1).any()


def test_effects_change_only_the_background():
  never = sprites.SpritesConfig(effect_prob=0.0)
  always = sprites.SpritesConfig(effect_prob=1.0)
  for seed in range(6):
    plain = sprites.render_clip(seed, never)
    assert plain.effect == "" and (plain.background == plain.background[0]).all()
    changed = sprites.render_clip(seed, always)
    assert changed.effect and not np.array_equal(changed.background[0], changed.background[-1])
    np.testing.assert_array_equal(changed.tracks, plain.tracks)  # the effect is text-only: motion is the same
    np.testing.assert_array_equal(changed.visibility, plain.visibility)


def test_tracks_follow_rendered_pixels_exactly():
  """Visible <=> the tracked pixel still shows the point's own surface (its sprite, or the background)."""
  moved = 0
  for seed in SEEDS:
    for config in (sprites.SpritesConfig(), SMALL, JUMP):
      clip = sprites.render_clip(seed, config)
      colour, own = _colour_at(clip), _surface_colour(clip)
      np.testing.assert_array_equal(clip.visibility, (colour == own).all(-1), err_msg=f"seed {seed}")
      assert clip.visibility[0].all()
      on_background = (own[0] == clip.background[0]).all(-1)
      np.testing.assert_array_equal(clip.tracks[:, on_background], np.broadcast_to(
          clip.tracks[0, on_background], clip.tracks[:, on_background].shape))  # background points stay put
      moved += int((clip.tracks[-1] != clip.tracks[0]).any(-1).sum())
  assert moved > 0


def test_sprite_points_move_with_their_sprite_centroid():
  for seed in SEEDS:
    clip = sprites.render_clip(seed)
    start_colour = _colour_at(clip)[0]
    for index, rgb in enumerate(clip.colors):
      on_sprite = (start_colour == rgb).all(-1)
      shift = clip.tracks[:, on_sprite] - clip.tracks[:1, on_sprite]
      centroid_shift = clip.centroids[:, index] - clip.centroids[:1, index]
      np.testing.assert_allclose(shift, np.broadcast_to(centroid_shift[:, None], shift.shape), atol=1e-4)


def test_centroids_match_the_colour_mask_of_a_lone_sprite():
  config = sprites.SpritesConfig(min_sprites=1, max_sprites=1, num_frames=9)
  for seed in range(6):
    clip = sprites.render_clip(seed, config)
    mask = (clip.video == clip.colors[0]).all(-1)
    rows, cols = np.arange(config.height) + 0.5, np.arange(config.width) + 0.5
    area = mask.sum(axis=(1, 2))
    measured = np.stack([(mask.sum(1) * cols).sum(-1) / area, (mask.sum(2) * rows).sum(-1) / area], -1)
    np.testing.assert_allclose(clip.centroids[:, 0], measured, atol=1e-4)
    assert clip.sprite_visible.all()


def test_occluded_points_are_hidden_and_show_the_occluder():
  """A big front square sweeps across a back circle and the background behind it."""
  config = sprites.SpritesConfig(num_frames=9, grid=16)
  num_frames = config.num_frames
  back = np.tile([[32, 32]], (num_frames, 1))
  front = np.stack([np.linspace(10, 54, num_frames), np.full(num_frames, 33)], -1).round()
  scene = _scene(["circle", "square"], ["red", "blue"], [6.0, 9.0], np.stack([back, front], 1))
  clip = sprites.render_scene(scene, config)
  colour = _colour_at(clip)
  start = colour[0]
  red, blue = clip.colors
  on_red = (start == red).all(-1)
  assert on_red.sum() >= 4
  hidden_red = ~clip.visibility & on_red[None]
  assert hidden_red.any(), "the square never covered a tracked point of the circle"
  assert (colour[hidden_red] == blue).all()
  hidden_background = ~clip.visibility & (start == clip.background[0]).all(-1)[None]
  assert hidden_background.any() and (colour[hidden_background] == blue).all()
  np.testing.assert_array_equal(clip.tracks[:, on_red], np.broadcast_to(clip.tracks[0, on_red],
                                                                        clip.tracks[:, on_red].shape))
  assert clip.visibility[:, on_red].any(axis=0).all()  # uncovered before and after the sweep


def test_fully_covered_sprite_is_not_visible():
  config = sprites.SpritesConfig(num_frames=5, grid=8)
  num_frames = config.num_frames
  small = np.tile([[20, 20]], (num_frames, 1))
  cover = np.array([[50, 50], [20, 20], [20, 20], [50, 50], [50, 50]])
  scene = _scene(["circle", "square"], ["green", "yellow"], [3.0, 9.0], np.stack([small, cover], 1))
  clip = sprites.render_scene(scene, config)
  np.testing.assert_array_equal(clip.sprite_visible[:, 0], [True, False, False, True, True])
  assert clip.sprite_visible[:, 1].all()


def test_points_leaving_the_frame_are_invisible_and_not_clipped():
  config = sprites.SpritesConfig(num_frames=5, grid=16)
  path = np.array([[32, 32], [50, 32], [62, 32], [70, 32], [90, 32]])  # a hand-built scene may leave the frame
  scene = _scene(["square"], ["cyan"], [8.0], path[:, None])
  clip = sprites.render_scene(scene, config)
  on_sprite = (_colour_at(clip)[0] == clip.colors[0]).all(-1)
  x = clip.tracks[:, on_sprite, 0]
  np.testing.assert_array_equal(clip.visibility[:, on_sprite], x < config.width)
  assert x.max() >= config.width  # true coordinates, not clipped
  assert not clip.sprite_visible[-1, 0]


def test_rendering_is_fast_enough_for_the_data_pipeline():
  sprites.render_clip(0)
  start = time.perf_counter()
  for seed in range(20):
    sprites.render_clip(seed)
  per_clip = (time.perf_counter() - start) / 20
  assert per_clip < 0.05, f"{per_clip * 1e3:.1f} ms per 45x64x64 clip"  # ~3 ms measured; loose for busy CPUs


# ----------------------------------------------------------------------------------------------------------
# The example scene and the example tracks files.

def test_example_scene_is_well_separated_and_plain():
  clip = sprites.example_scene()
  assert len(clip.shapes) >= 2 and clip.effect == "" and "the background slowly" not in clip.prompt
  assert clip.sprite_visible.all()
  areas = np.stack([(clip.video == rgb).all(-1).sum(axis=(1, 2)) for rgb in clip.colors], -1)
  assert (areas == areas[0]).all()  # never occluded, never cut by the border
  gaps = np.linalg.norm(clip.centroids[:, :, None] - clip.centroids[:, None], axis=-1)
  off_diagonal = ~np.eye(len(clip.shapes), dtype=bool)
  assert gaps[:, off_diagonal].min() > 0.3 * min(clip.video.shape[1:3])


def test_example_files_start_on_sprites_and_move_in_clusters():
  clip = sprites.example_scene()
  height, width = clip.video.shape[1:3]
  for name in make_examples.EXAMPLES:
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      tracks = tracks_lib.load_tracks(os.path.join(EXAMPLES_DIR, f"{name}.npy"), height=height, width=width)
    assert tracks.num_frames == clip.video.shape[0] and tracks.visible.all()
    pixel = np.floor(tracks.points[0]).astype(np.int64)
    start_colour = clip.video[0, pixel[:, 1], pixel[:, 0]]
    sprite_of = [int(np.flatnonzero((clip.colors == c).all(-1))[0]) for c in start_colour]  # raises if off-sprite
    for sprite in set(sprite_of):
      cluster = tracks.points[:, np.array(sprite_of) == sprite]
      shift = cluster - cluster[:1]
      np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1], shift.shape), atol=1e-4)
    moving = np.abs(tracks.points[-1] - tracks.points[0]).max() + np.abs(
        tracks.points[len(tracks.points) // 2] - tracks.points[0]).max()
    assert moving > 1.0, name


def test_example_files_are_reproduced_by_the_script(tmp_path, capsys):
  written = make_examples.make_examples(str(tmp_path), sprites.SpritesConfig())
  assert set(written) == set(make_examples.EXAMPLES)
  for name in written:
    np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), np.load(os.path.join(EXAMPLES_DIR, f"{name}.npy")))
  assert "drag_one.npy" in capsys.readouterr().out
