"""Toy-world metrics on constructed cases (known shifts, noise, occlusion, effects) and the evaluation harness."""

import math

import numpy as np
import pytest

from configs import models
from msjax.data import sprites
from msjax.eval import metrics
from msjax.eval import sprites_eval

WORLD = sprites.SpritesConfig(height=48, width=48, num_frames=9, grid=8)


def _scene(shapes, colors, radii, centres, background="grey", effect=""):
  return sprites.Scene(shapes=tuple(shapes), color_names=tuple(colors), radii=tuple(radii),
                       centres=np.asarray(centres, np.int32), background_name=background, effect=effect)


def _moving_scene(effect: str = "") -> sprites.Clip:
  """Two well separated squares moving on straight lines (never occluded, never near the border)."""
  t = np.arange(WORLD.num_frames)
  centres = np.stack([np.stack([12 + t, 12 + 0 * t], -1), np.stack([34 - t, 34 - t // 2], -1)], axis=1)
  return sprites.render_scene(_scene(["square", "circle"], ["red", "blue"], [5.0, 5.0], centres, effect=effect),
                              WORLD)


def _shift(video: np.ndarray, dx: int, dy: int) -> np.ndarray:
  return np.roll(video, (dy, dx), axis=(1, 2))


def _everywhere(clip: sprites.Clip) -> np.ndarray:
  return np.ones(clip.sprite_visible.shape, bool)


# ----------------------------------------------------------------------------------------------------------
# Detection and EPE.


def test_detection_on_the_true_video_finds_the_true_centroids():
  clip = _moving_scene()
  detection = metrics.detect_sprites(clip.video, clip.colors)
  assert detection.found.all()
  np.testing.assert_allclose(detection.centroids, clip.centroids, atol=1e-5)


@pytest.mark.parametrize("dx, dy, expected", [(3, 0, 3.0), (0, -2, 2.0), (3, 4, 5.0)])
def test_video_shifted_by_k_pixels_has_epe_k(dx, dy, expected):
  clip = _moving_scene()
  detection = metrics.detect_sprites(_shift(clip.video, dx, dy), clip.colors)
  errors = metrics.centroid_epe(detection, clip.centroids, _everywhere(clip))
  np.testing.assert_allclose(errors.errors, expected, atol=1e-5)
  assert errors.summary()["mean"] == pytest.approx(expected, abs=1e-5)
  assert errors.summary()["missed_fraction"] == 0.0


def test_detection_ignores_other_sprites_and_tolerates_noise():
  # Red and orange are the two closest sprite colours; the squares touch.
  centres = [[[14, 24], [14 + 11, 24]]]
  world = sprites.SpritesConfig(height=48, width=48, num_frames=1, grid=4)
  clip = sprites.render_scene(_scene(["square", "square"], ["red", "orange"], [5.0, 5.0], centres), world)
  noisy = np.clip(clip.video + np.random.default_rng(0).normal(0, 8, clip.video.shape), 0, 255).astype(np.uint8)
  detection = metrics.detect_sprites(noisy, clip.colors)
  np.testing.assert_allclose(detection.centroids, clip.centroids, atol=0.5)
  # Without the red square, red is not found (NaN), rather than the centroid of nearby orange pixels.
  no_red = noisy.copy()
  no_red[metrics.color_mask(clip.video, clip.colors[0], metrics.default_tolerance())] = clip.background[0]
  detection = metrics.detect_sprites(no_red, clip.colors)
  assert detection.counts[0, 0] == 0 and np.isnan(detection.centroids[0, 0]).all()
  np.testing.assert_allclose(detection.centroids[0, 1], clip.centroids[0, 1], atol=0.5)


def test_too_few_pixels_is_not_a_detection():
  video = np.full((1, 16, 16, 3), 120, np.uint8)
  red = sprites.palette()["red"]
  video[0, 3, 3] = red
  detection = metrics.detect_sprites(video, red[None], min_pixels=2)
  assert not detection.found[0, 0] and np.isnan(detection.centroids[0, 0]).all()
  video[0, 3, 4] = red
  detection = metrics.detect_sprites(video, red[None], min_pixels=2)
  np.testing.assert_allclose(detection.centroids[0, 0], [4.0, 3.5])


def test_occluded_frames_are_excluded():
  """Sprite 0 is free at frame 0, half covered by sprite 1 at frame 1 and hidden at frame 2."""
  world = sprites.SpritesConfig(height=48, width=48, num_frames=5, grid=4)
  centres = [[[20, 20], [36, 36]], [[20, 20], [26, 20]], [[20, 20], [20, 20]], [[20, 20], [36, 36]],
             [[20, 20], [36, 36]]]
  clip = sprites.render_scene(_scene(["square", "square"], ["green", "yellow"], [4.0, 4.0], centres), world)
  assert not clip.sprite_visible[2, 0] and clip.sprite_visible[1, 0]
  truth = metrics.detect_sprites(clip.video, clip.colors)
  frames = metrics.unoccluded_frames(truth, clip.sprite_visible)
  np.testing.assert_array_equal(frames[:, 0], [True, False, False, True, True])
  assert frames[:, 1].all()
  # A generated video that is wrong only where sprite 0 is covered scores EPE 0 for it.
  generated = clip.video.copy()
  generated[1:3] = _shift(clip.video[1:3], 5, 0)
  errors = metrics.centroid_epe(metrics.detect_sprites(generated, clip.colors), clip.centroids, frames)
  assert np.nanmax(errors.errors[:, 0]) < 1e-5
  assert errors.summary()["frames"] == int(frames.sum())


def test_track_epe_measures_displacement_up_to_a_constant_offset():
  clip = _moving_scene()
  members = metrics.sprite_track_members(clip.video[0], clip.tracks, clip.visibility, clip.colors)
  assert members.any(axis=1).all() and not (members[0] & members[1]).any()
  frames = _everywhere(clip)
  shifted = metrics.detect_sprites(_shift(clip.video, 2, 1), clip.colors)
  assert metrics.track_epe(shifted, clip.tracks, clip.visibility, members, frames).summary()["mean"] < 1e-5
  # Frozen first frame: error(t) = |D(t) - mean D| with D the true centroid displacement.
  frozen = metrics.detect_sprites(np.repeat(clip.video[:1], WORLD.num_frames, axis=0), clip.colors)
  errors = metrics.track_epe(frozen, clip.tracks, clip.visibility, members, frames).errors
  displacement = clip.centroids - clip.centroids[:1]
  expected = np.linalg.norm(displacement - displacement.mean(axis=0), axis=-1)
  np.testing.assert_allclose(errors, expected, atol=1e-5)
  assert errors.max() > 1.0


def _held_per_latent_frame(video: np.ndarray, temporal_stride: int) -> np.ndarray:
  """Every frame t >= 1 replaced by the first frame of its latent frame: sprites move only between latent frames."""
  frames = np.arange(video.shape[0])
  first_of_latent = np.where(frames == 0, 0, 1 + (frames - 1) // temporal_stride * temporal_stride)
  return video[first_of_latent]


def test_motion_lead_measures_along_the_motion_and_splits_by_place_in_the_latent_frame():
  clip = _moving_scene()  # sprite 0 moves +1 px per frame in x; sprite 1 up and left
  frames = _everywhere(clip)
  np.testing.assert_allclose(metrics.true_motion(clip.centroids)[:, 0], [[1.0, 0.0]] * WORLD.num_frames)
  ahead = metrics.motion_lead(metrics.detect_sprites(_shift(clip.video, 3, 0), clip.colors), clip.centroids, frames)
  np.testing.assert_allclose(ahead[:, 0], 3.0, atol=1e-5)
  sideways = metrics.motion_lead(metrics.detect_sprites(_shift(clip.video, 0, 3), clip.colors), clip.centroids,
                                 frames)
  np.testing.assert_allclose(sideways[:, 0], 0.0, atol=1e-5)  # across the motion is not lead
  truth = metrics.motion_lead(metrics.detect_sprites(clip.video, clip.colors), clip.centroids, frames)
  np.testing.assert_allclose(truth, 0.0, atol=1e-5)
  # Held still within each latent frame of 4 pixel frames: 0, 1, 2, 3 px behind at places 1-4.
  held = metrics.detect_sprites(_held_per_latent_frame(clip.video, 4), clip.colors)
  lead = metrics.motion_lead(held, clip.centroids, frames)
  np.testing.assert_allclose(lead[1:, 0], -((np.arange(1, WORLD.num_frames) - 1) % 4), atol=1e-5)
  by_place = metrics.lead_by_place(lead, 4)
  assert by_place.shape == (4,) and np.all(np.diff(by_place) < 0) and abs(by_place[0]) < 1e-5
  np.testing.assert_allclose(metrics.lead_by_place(lead[:, :1], 4), [0.0, -1.0, -2.0, -3.0], atol=1e-5)
  np.testing.assert_allclose(metrics.lead_by_place(lead, 1), [np.nanmean(lead[1:])])
  # A frame left out, or a sprite too slow to have a direction, is not measured.
  frames[5, 0] = False
  assert np.isnan(metrics.motion_lead(held, clip.centroids, frames)[5, 0])
  assert np.isnan(metrics.motion_lead(held, clip.centroids, _everywhere(clip), min_speed=10.0)).all()
  with pytest.raises(ValueError, match="at least 1"):
    metrics.lead_by_place(lead, 0)


# ----------------------------------------------------------------------------------------------------------
# PSNR, SSIM.


def test_identical_videos_score_the_psnr_ceiling_and_ssim_one():
  clip = _moving_scene()
  psnr = metrics.psnr_per_frame(clip.video, clip.video)
  assert np.isfinite(psnr).all() and (psnr == metrics.psnr_ceiling(clip.video.shape[1:])).all()
  assert psnr.min() > 80.0
  np.testing.assert_allclose(metrics.ssim_per_frame(clip.video, clip.video), 1.0, atol=1e-12)


def test_psnr_of_a_constant_offset():
  video = np.full((2, 16, 16, 3), 100, np.uint8)
  psnr = metrics.psnr_per_frame(video + 10, video)
  np.testing.assert_allclose(psnr, 20 * math.log10(255 / 10))


def test_ssim_of_flat_frames_is_the_luminance_term():
  # Flat frames have no variance, so SSIM reduces to (2 mx my + C1) / (mx^2 + my^2 + C1).
  x, y = 51, 153
  a, b = np.full((1, 16, 16, 3), x, np.uint8), np.full((1, 16, 16, 3), y, np.uint8)
  mx, my, c1 = x / 255, y / 255, metrics.SSIM_K1**2
  np.testing.assert_allclose(metrics.ssim_per_frame(a, b), (2 * mx * my + c1) / (mx**2 + my**2 + c1))


def test_ssim_decreases_with_noise():
  clip = _moving_scene()
  rng = np.random.default_rng(0)
  scores = []
  for sigma in (4, 16, 48):
    noisy = np.clip(clip.video + rng.normal(0, sigma, clip.video.shape), 0, 255).astype(np.uint8)
    scores.append(metrics.ssim_per_frame(noisy, clip.video).mean())
  assert scores[0] < 1.0 and scores[0] > scores[1] > scores[2]


# ----------------------------------------------------------------------------------------------------------
# Drift and effect adherence.


def test_drift_of_a_linear_series():
  series = 30.0 - 0.5 * np.arange(8)
  summary = metrics.drift(series)
  assert summary["slope"] == pytest.approx(-0.5)
  assert summary["first_quarter"] == pytest.approx(np.mean(series[:2]))
  assert summary["last_quarter"] == pytest.approx(np.mean(series[-2:]))
  series[3] = np.nan  # skipped, not propagated
  assert metrics.drift(series)["slope"] == pytest.approx(-0.5)


def test_region_colour_error_grows_with_a_tint():
  clip = _moving_scene()
  regions = metrics.true_regions(clip.video, clip.background, clip.colors)
  truth = np.concatenate([clip.background[:, None], np.broadcast_to(clip.colors, (WORLD.num_frames, 2, 3))], 1)
  np.testing.assert_allclose(metrics.region_color_errors(clip.video, regions, truth), 0.0)
  tinted = (clip.video.astype(int) + [0, 0, 12]).clip(0, 255).astype(np.uint8)
  errors = metrics.region_color_errors(tinted, regions, truth)
  np.testing.assert_allclose(errors[:, 0], 12.0)  # the grey background takes the full tint


def _background(video: np.ndarray, clip: sprites.Clip) -> np.ndarray:
  regions = metrics.true_regions(clip.video, clip.background, clip.colors)
  return metrics.region_colors(video, regions[:, :1])[:, 0]


@pytest.mark.parametrize("effect", ["darken", "brighten", "turn_navy"])
def test_effect_adherence_true_video_positive_repeated_frame_zero(effect):
  clip = _moving_scene(effect)
  assert metrics.effect_adherence(_background(clip.video, clip), clip.background) == pytest.approx(1.0)
  frozen = np.repeat(clip.video[:1], WORLD.num_frames, axis=0)
  assert metrics.effect_adherence(_background(frozen, clip), clip.background) == pytest.approx(0.0)
  reversed_video = clip.video[::-1]  # the background moves against the prompt
  assert metrics.effect_adherence(_background(reversed_video, clip), clip.background) < -0.5


def test_effect_adherence_is_undefined_without_an_effect():
  clip = _moving_scene()
  assert math.isnan(metrics.effect_adherence(_background(clip.video, clip), clip.background))


def test_summarize_skips_missing_values():
  summary = metrics.summarize([1.0, None, 3.0, math.nan])
  assert summary == {"mean": 2.0, "median": 2.0, "std": 1.0, "count": 2}


# ----------------------------------------------------------------------------------------------------------
# The harness on held-out clips.


def _noisy_truth(clips):
  truth = sprites_eval.true_video_generator(clips)
  rng = np.random.default_rng(1)

  def generate(first_frame, prompt, tracks, num_frames):
    video = truth(first_frame, prompt, tracks, num_frames)
    noisy = np.clip(video + rng.normal(0, 6, video.shape), 0, 255).astype(np.uint8)
    return {"video": noisy, "chunk_seconds": [0.5, 0.1, 0.1]}

  return generate


@pytest.fixture(scope="module")
def ten_clips():
  config = models.tiny()
  seeds = sprites_eval.eval_seeds(10)
  clips = sprites_eval.render_clips(seeds, sprites_eval.world_config(config))
  return sprites_eval.evaluate(_noisy_truth(clips), seeds=seeds, config=config, num_samples=2)


def test_true_video_epe_is_near_zero_and_first_frame_epe_is_large(ten_clips):
  results = ten_clips["results"]
  true_epe = results[sprites_eval.TRUE_VIDEO]["aggregate"]["epe"]
  first_epe = results[sprites_eval.FIRST_FRAME]["aggregate"]["epe"]
  assert true_epe["count"] == 10 and true_epe["mean"] < 0.5
  assert first_epe["mean"] > 3.0 and first_epe["mean"] > 10 * true_epe["mean"]
  # A slightly noisy copy of the truth is still followed to within half a pixel, at a lower PSNR.
  noisy = results[sprites_eval.GENERATOR]["aggregate"]
  assert noisy["epe"]["mean"] < 0.5 and noisy["epe_track"]["mean"] < 0.5
  assert noisy["psnr"]["mean"] < results[sprites_eval.TRUE_VIDEO]["aggregate"]["psnr"]["mean"]


def test_motion_lead_of_the_truth_is_zero_and_the_frozen_frame_falls_behind(ten_clips):
  results = ten_clips["results"]
  places = [f"lead_by_place.{p}" for p in range(1, 5)]  # the tiny codec packs 4 pixel frames per latent frame
  truth, frozen = results[sprites_eval.TRUE_VIDEO]["aggregate"], results[sprites_eval.FIRST_FRAME]["aggregate"]
  for key in ["lead"] + places:
    assert truth[key]["count"] == 10 and abs(truth[key]["mean"]) < 1e-6
    assert frozen[key]["mean"] < -1.0, (key, frozen[key])
  assert all("lead_by_place.4" in group for group in results[sprites_eval.GENERATOR]["by_num_sprites"].values())


def test_metrics_by_sprite_count_partition_the_clips(ten_clips):
  generated = ten_clips["results"][sprites_eval.GENERATOR]
  groups = generated["by_num_sprites"]
  counts = {str(c["num_sprites"]) for c in generated["clips"]}
  assert set(groups) == counts and len(counts) > 1  # the ten clips hold more than one sprite count
  assert sum(group["clips"] for group in groups.values()) == len(generated["clips"])
  for count, group in groups.items():
    members = [c for c in generated["clips"] if str(c["num_sprites"]) == count]
    assert group["clips"] == len(members)
    np.testing.assert_allclose(group["psnr"]["mean"], np.mean([c["metrics"]["psnr"] for c in members]))
    assert group["drift.psnr.slope"]["count"] == len(members)


def test_effect_adherence_over_clips(ten_clips):
  results = ten_clips["results"]
  effects = sum(1 for c in results[sprites_eval.TRUE_VIDEO]["clips"] if c["effect"])
  assert effects > 0
  assert results[sprites_eval.TRUE_VIDEO]["aggregate"]["effect_adherence"]["count"] == effects
  assert results[sprites_eval.TRUE_VIDEO]["aggregate"]["effect_adherence"]["mean"] > 0.9
  assert abs(results[sprites_eval.FIRST_FRAME]["aggregate"]["effect_adherence"]["mean"]) < 1e-9


def test_drift_curves_and_chunk_timing_pass_through(ten_clips):
  generated = ten_clips["results"][sprites_eval.GENERATOR]
  assert len(generated["per_frame"]["psnr"]) == ten_clips["world"]["num_frames"]
  assert generated["aggregate"]["first_chunk_seconds"]["mean"] == pytest.approx(0.5)
  assert generated["aggregate"]["chunk_seconds"]["mean"] == pytest.approx(0.1)
  assert generated["clips"][0]["timing"]["chunk_seconds"] == [0.5, 0.1, 0.1]
  first = ten_clips["results"][sprites_eval.FIRST_FRAME]
  assert "chunk_seconds" not in first["aggregate"]
  # The frozen first frame falls behind the moving truth over time.
  assert first["aggregate"]["drift.psnr.slope"]["mean"] < 0


def test_samples_hold_the_first_clips(ten_clips):
  samples = ten_clips["samples"]
  assert [s.seed for s in samples] == ten_clips["seeds"][:2]
  np.testing.assert_array_equal(samples[0].baseline, np.repeat(samples[0].true_video[:1], 45, axis=0))


def test_training_seeds_are_refused():
  with pytest.raises(ValueError, match="held out"):
    sprites_eval.check_seeds([sprites_eval.EVAL_SEED_START, 5])
  with pytest.raises(ValueError, match="distinct"):
    sprites_eval.check_seeds([sprites_eval.EVAL_SEED_START] * 2)


def test_a_wrong_video_shape_names_the_generator_and_seed():
  def short(first_frame, prompt, tracks, num_frames):
    return np.repeat(first_frame[None], num_frames - 4, axis=0)

  with pytest.raises(sprites_eval.GeneratorError, match=r"generator \(seed 10000000\).*shape"):
    sprites_eval.evaluate(short, seeds=[sprites_eval.EVAL_SEED_START], config=models.tiny(), baselines=False,
                          num_frames=WORLD.num_frames)


def test_generator_registry():
  assert {"first_frame", "true_video"} <= set(sprites_eval.generator_names())
  context = sprites_eval.GeneratorContext(config=models.tiny(), checkpoint="", world=WORLD,
                                          seeds=(sprites_eval.EVAL_SEED_START,))
  clip = sprites.render_clip(sprites_eval.EVAL_SEED_START, WORLD)
  oracle = sprites_eval.make_generator("true_video", context)
  np.testing.assert_array_equal(oracle(clip.video[0], clip.prompt, None, WORLD.num_frames), clip.video)
  with pytest.raises(sprites_eval.GeneratorError, match="unknown generator 'nope'.*first_frame"):
    sprites_eval.make_generator("nope", context)
  with pytest.raises(sprites_eval.GeneratorError, match="track condition must be one of given, shuffled_ids, none, latent_means"):
    sprites_eval.GeneratorContext(config=models.tiny(), checkpoint="", world=WORLD, seeds=(1,), track_condition="x")
  with pytest.raises(ValueError, match="already registered"):
    sprites_eval.register_generator("first_frame", lambda c: None)


def test_scores_leave_out_the_given_first_frame():
  """Frame 0 is the input: a generator differing from the repeated-frame baseline only there scores the same,
  while the per-frame curve still shows the baseline's exact copy at the PSNR ceiling."""
  config = models.tiny()
  seeds = sprites_eval.eval_seeds(3)

  def blank_first(first_frame, prompt, tracks, num_frames):
    video = sprites_eval.first_frame_generator(first_frame, prompt, tracks, num_frames).copy()
    video[0] = 0
    return video

  results = sprites_eval.evaluate(blank_first, seeds=seeds, config=config)["results"]
  blanked, baseline = results[sprites_eval.GENERATOR], results[sprites_eval.FIRST_FRAME]
  for ours, theirs in zip(blanked["clips"], baseline["clips"]):
    for name in ("epe", "epe_track", "epe_frames", "epe_missed_fraction", "psnr", "ssim"):
      assert ours["metrics"][name] == theirs["metrics"][name], name
  world = sprites_eval.world_config(config)
  ceiling = metrics.psnr_ceiling((world.height, world.width, 3))
  curve = np.asarray(baseline["per_frame"]["psnr"])
  assert curve[0] == pytest.approx(ceiling) and blanked["per_frame"]["psnr"][0] < 20
  assert baseline["aggregate"]["psnr"]["mean"] == pytest.approx(curve[1:].mean())
  assert baseline["aggregate"]["psnr"]["mean"] < curve.mean() - 1.0


def test_sample_seeds_are_scored_on_the_same_clips_and_summarised():
  """A generator whose error grows with its sampling seed: each seed's run is kept, and the spread is the
  sample std of the per-seed means."""
  config = models.tiny()
  seeds = sprites_eval.eval_seeds(4)
  world = sprites_eval.world_config(config, WORLD.num_frames)
  truth = sprites_eval.true_video_generator(sprites_eval.render_clips(seeds, world))
  built = []

  def make_generate_fn(sample_seed):
    built.append(sample_seed)

    def generate(first_frame, prompt, tracks, num_frames):
      return _shift(truth(first_frame, prompt, tracks, num_frames), sample_seed, 0)

    return generate

  result = sprites_eval.evaluate_sample_seeds(make_generate_fn, [0, 2, 1], seeds=seeds, config=config,
                                              num_frames=WORLD.num_frames, num_samples=1)
  assert built == [0, 2, 1]
  results = result["results"]
  assert set(results) == {sprites_eval.GENERATOR, sprites_eval.FIRST_FRAME, sprites_eval.TRUE_VIDEO,
                          sprites_eval.seed_result_name(2), sprites_eval.seed_result_name(1)}
  assert len(result["samples"]) == 1 and result["sample_seeds"] == [0, 2, 1]
  runs = [results[sprites_eval.GENERATOR]] + [results[sprites_eval.seed_result_name(s)] for s in (2, 1)]
  assert all([c["seed"] for c in run["clips"]] == seeds for run in runs)
  epe = result["across_sample_seeds"]["epe"]
  assert epe["per_seed"] == [run["aggregate"]["epe"]["mean"] for run in runs]
  np.testing.assert_allclose(epe["per_seed"], [0.0, 2.0, 1.0], atol=0.3)  # a shift of k px is k px of EPE
  assert epe["mean"] == pytest.approx(np.mean(epe["per_seed"]))
  assert epe["std"] == pytest.approx(np.std(epe["per_seed"], ddof=1))
  assert set(result["across_sample_seeds"]) == set(sprites_eval.ACROSS_SEED_METRICS)
  with pytest.raises(ValueError, match="distinct"):
    sprites_eval.evaluate_sample_seeds(make_generate_fn, [1, 1], seeds=seeds, config=config)
  with pytest.raises(ValueError, match="at least one"):
    sprites_eval.check_sample_seeds([])
