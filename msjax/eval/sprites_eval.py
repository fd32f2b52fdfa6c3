"""Motion-transfer evaluation on held-out `sprites` clips, for any generator (paper section 7.1 in the toy world).

A generator is a plain callable, so teachers, students and baselines are scored by the same code:

  generate_fn(first_frame uint8 [H, W, 3], prompt str, tracks Tracks, num_frames int)
      -> video uint8 [T, H, W, 3], or a mapping {"video": ..., "chunk_seconds": [...]} to report chunk timing.

`tracks` holds the clip's full first-frame grid (`Tracks.points` [T, N, 2], `Tracks.visible` [T, N]), the
reconstruction protocol's "ground-truth tracks as input". Scores cover the frames after the given first frame
(`metrics.FIRST_SCORED_FRAME`). Held-out seeds: training clips use seeds below `TRAIN_SEED_END` (validation clips follow
them), evaluation defaults to seeds from `EVAL_SEED_START` on, and seeds below `TRAIN_SEED_END` are refused so a
training clip is never scored.

Model code plugs into the CLI through `register_generator(name, factory)`: the factory receives a
`GeneratorContext` (config, checkpoint, world, seeds) and returns a generate_fn.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_collections
import numpy as np
from tqdm import tqdm

from msjax.data import sprites as sprites_lib
from msjax.data import tracks as tracks_lib
from msjax.data.tfds_sprites import VALIDATION_SEED_OFFSET
from msjax.eval import metrics

TRAIN_SEED_END = VALIDATION_SEED_OFFSET  # training seeds are [0, TRAIN_SEED_END)
EVAL_SEED_START = 10**7  # well clear of training and validation seeds
DETECT_AREA_FRACTION = 0.25  # a detection needs a quarter of the smallest sprite's area
GENERATOR = "generator"
FIRST_FRAME = "first_frame"
TRUE_VIDEO = "true_video"
DRIFT_SERIES = ("psnr", "background_error", "sprite_error")
TRACKS_GIVEN = "given"
TRACKS_SHUFFLED_IDS = "shuffled_ids"
TRACKS_NONE = "none"
TRACKS_LATENT_MEANS = "latent_means"
TRACK_CONDITIONS = (TRACKS_GIVEN, TRACKS_SHUFFLED_IDS, TRACKS_NONE, TRACKS_LATENT_MEANS)

GenerateFn = Callable[[np.ndarray, str, tracks_lib.Tracks, int], Any]


class GeneratorError(ValueError):
  """A generator returned something that is not a video of the requested size, or is not registered."""


# ----------------------------------------------------------------------------------------------------------
# Held-out clips.


def eval_seeds(num_clips: int, start: int = EVAL_SEED_START) -> list[int]:
  """`num_clips` consecutive held-out seeds starting at `start`."""
  if num_clips < 1:
    raise ValueError(f"need at least one evaluation clip, got num_clips={num_clips}")
  return check_seeds(range(start, start + num_clips))


def check_seeds(seeds: Iterable[int]) -> list[int]:
  """Refuses seeds that a training run may have used, and duplicates (each clip counts once)."""
  seeds = [int(s) for s in seeds]
  if not seeds:
    raise ValueError("need at least one evaluation seed, got none")
  used_in_training = [s for s in seeds if 0 <= s < TRAIN_SEED_END]
  if used_in_training:
    raise ValueError(f"evaluation seeds must be held out from training seeds [0, {TRAIN_SEED_END}); found "
                     f"{len(used_in_training)} inside it (first {used_in_training[0]}); use seeds >= "
                     f"{EVAL_SEED_START}")
  if min(seeds) < 0:
    raise ValueError(f"seeds must be non-negative, found {min(seeds)}")
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"evaluation seeds must be distinct, found {len(seeds) - len(set(seeds))} duplicates")
  return seeds


def world_config(config: ml_collections.ConfigDict, num_frames: int | None = None) -> sprites_lib.SpritesConfig:
  """The sprites world of a preset; `num_frames` (1 + 4k) lengthens clips to measure drift past training."""
  world = sprites_lib.SpritesConfig.from_config(config)
  return dataclasses.replace(world, num_frames=num_frames) if num_frames else world


def render_clips(seeds: Sequence[int], world: sprites_lib.SpritesConfig) -> list[sprites_lib.Clip]:
  return [sprites_lib.render_clip(seed, world) for seed in seeds]


def clip_tracks(clip: sprites_lib.Clip) -> tracks_lib.Tracks:
  """A copy of the clip's tracks, so a generator cannot alter the ground truth it is scored against."""
  return tracks_lib.Tracks(points=clip.tracks.copy(), visible=clip.visibility.copy())


def min_detection_pixels(world: sprites_lib.SpritesConfig) -> int:
  """Matching pixels a detection needs: a fixed share of the smallest sprite a scene can draw."""
  smallest_area = math.pi * (world.min_radius_frac * world.scale)**2
  return max(metrics.MIN_SPRITE_PIXELS, math.ceil(DETECT_AREA_FRACTION * smallest_area))


# ----------------------------------------------------------------------------------------------------------
# Baselines and the generator registry.


def first_frame_generator(first_frame: np.ndarray, prompt: str, tracks: tracks_lib.Tracks,
                          num_frames: int) -> np.ndarray:
  """Baseline: the first frame, repeated (no motion, no effect)."""
  del prompt, tracks
  return np.repeat(first_frame[None], num_frames, axis=0)


def true_video_generator(clips: Sequence[sprites_lib.Clip]) -> GenerateFn:
  """Oracle baseline: returns the true video of the clip whose first frame and prompt it is given.

  Its EPE is the detector's noise floor, so it should be ~0.
  """
  by_input = {(clip.video[0].tobytes(), clip.prompt): clip.video for clip in clips}

  def generate(first_frame: np.ndarray, prompt: str, tracks: tracks_lib.Tracks, num_frames: int) -> np.ndarray:
    del tracks
    video = by_input.get((np.ascontiguousarray(first_frame).tobytes(), prompt))
    if video is None:
      raise GeneratorError(f"true_video: no clip with this first frame and prompt {prompt!r}; the oracle only "
                           f"knows the {len(by_input)} clips it was built from")
    return video[:num_frames]

  return generate


@dataclasses.dataclass(frozen=True)
class GeneratorContext:
  """What a generator factory may use to build its generate_fn.

  `track_condition` is how a model generator turns the true tracks into its motion condition
  (TRACK_CONDITIONS): as given; with the IDs of the frames after the first shuffled (`inference.track_grid`),
  which tells whether the model follows a point by its ID; none at all (the null motion condition); or with
  each latent frame's points held at their mean place (`tracks.latent_frame_means`), which tells whether the
  model reads how points move within a latent frame.
  """
  config: ml_collections.ConfigDict
  checkpoint: str
  world: sprites_lib.SpritesConfig
  seeds: tuple[int, ...]
  track_condition: str = TRACKS_GIVEN

  def __post_init__(self):
    if self.track_condition not in TRACK_CONDITIONS:
      raise GeneratorError(f"track condition must be one of {', '.join(TRACK_CONDITIONS)}, got "
                           f"{self.track_condition!r}")


GeneratorFactory = Callable[[GeneratorContext], GenerateFn]
_GENERATORS: dict[str, GeneratorFactory] = {}


def register_generator(name: str, factory: GeneratorFactory, *, overwrite: bool = False) -> None:
  """Makes `python -m msjax.eval --generator NAME` build its generator with `factory(context)`.

  Samplers call this when their module is imported (the CLI imports `--generator_modules`).
  """
  if not name or not name.replace("_", "").isalnum():
    raise ValueError(f"generator names are letters, digits and '_', got {name!r}")
  if name in _GENERATORS and _GENERATORS[name] is not factory and not overwrite:
    raise ValueError(f"a generator named {name!r} is already registered; pass overwrite=True to replace it")
  _GENERATORS[name] = factory


def generator_names() -> list[str]:
  return sorted(_GENERATORS)


def make_generator(name: str, context: GeneratorContext) -> GenerateFn:
  if name not in _GENERATORS:
    raise GeneratorError(f"unknown generator {name!r}; registered: {', '.join(generator_names())} (a model's "
                         f"generator is registered when its module is imported, see --generator_modules)")
  return _GENERATORS[name](context)


register_generator(FIRST_FRAME, lambda context: first_frame_generator)
register_generator(TRUE_VIDEO, lambda context: true_video_generator(render_clips(context.seeds, context.world)))


# ----------------------------------------------------------------------------------------------------------
# Scoring one clip.


@dataclasses.dataclass(frozen=True)
class ClipTruth:
  """What metrics need from a clip's ground truth, computed once and shared by every generator."""
  clip: sprites_lib.Clip
  seed: int
  unoccluded: np.ndarray  # bool [T, S]
  members: np.ndarray  # bool [S, N] tracks starting on each sprite
  regions: np.ndarray  # bool [T, 1 + S, H, W]
  region_truth: np.ndarray  # uint8 [T, 1 + S, 3] true colour of each region


def clip_truth(clip: sprites_lib.Clip, seed: int, *, tolerance: float, min_pixels: int) -> ClipTruth:
  detection = metrics.detect_sprites(clip.video, clip.colors, tolerance=tolerance, min_pixels=min_pixels)
  num_frames = clip.video.shape[0]
  region_truth = np.concatenate(
      [clip.background[:, None], np.broadcast_to(clip.colors, (num_frames,) + clip.colors.shape)], axis=1)
  return ClipTruth(
      clip=clip, seed=seed, unoccluded=metrics.unoccluded_frames(detection, clip.sprite_visible),
      members=metrics.sprite_track_members(clip.video[0], clip.tracks, clip.visibility, clip.colors, tolerance),
      regions=metrics.true_regions(clip.video, clip.background, clip.colors, tolerance),
      region_truth=region_truth)


def _generated_video(output: Any, truth: ClipTruth, name: str) -> tuple[np.ndarray, list[float] | None]:
  """Unpacks and checks a generator's output: (video, chunk seconds or None)."""
  chunk_seconds = None
  if isinstance(output, Mapping):
    if "video" not in output:
      raise GeneratorError(f"{name} (seed {truth.seed}): returned a mapping without a 'video' entry, keys "
                           f"{sorted(output)}")
    chunk_seconds = output.get("chunk_seconds")
    output = output["video"]
  video = np.asarray(output)
  expected = truth.clip.video.shape
  if video.shape != expected or video.dtype != np.uint8:
    raise GeneratorError(f"{name} (seed {truth.seed}): expected a uint8 video of shape {expected}, found "
                         f"{video.dtype} {video.shape}")
  return video, None if chunk_seconds is None else [float(s) for s in chunk_seconds]


def score_clip(video: np.ndarray, truth: ClipTruth, *, tolerance: float, min_pixels: int,
               temporal_stride: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """JSON-ready metrics of one generated clip over frames metrics.FIRST_SCORED_FRAME on, and its per-frame drift
  series [T] (every frame). `temporal_stride` (the model codec's) splits the motion lead by a frame's place in
  its latent frame."""
  clip = truth.clip
  scored = metrics.scored_frames(video.shape[0])
  detection = metrics.detect_sprites(video, clip.colors, tolerance=tolerance, min_pixels=min_pixels)
  epe_frames = truth.unoccluded & scored[:, None]
  centroid = metrics.centroid_epe(detection, clip.centroids, epe_frames).summary()
  track = metrics.track_epe(detection, clip.tracks, clip.visibility, truth.members, epe_frames).summary()
  lead = metrics.motion_lead(detection, clip.centroids, epe_frames)
  by_place = metrics.lead_by_place(lead, temporal_stride)
  psnr = metrics.psnr_per_frame(video, clip.video)
  ssim = metrics.ssim_per_frame(video, clip.video)
  region_error = metrics.region_color_errors(video, truth.regions, truth.region_truth)  # [T, 1 + S]
  sprite_error = region_error[:, 1:]  # NaN where a sprite is hidden
  series = {"psnr": psnr, "background_error": region_error[:, 0], "sprite_error": metrics.nanmean(sprite_error, 1)}
  background = metrics.region_colors(video, truth.regions[:, :1])[:, 0]
  adherence = metrics.effect_adherence(background, clip.background) if clip.effect else math.nan
  record = {
      "epe": centroid["mean"], "epe_missed_fraction": centroid["missed_fraction"], "epe_frames": centroid["frames"],
      "epe_track": track["mean"], "epe_track_missed_fraction": track["missed_fraction"],
      "lead": float(metrics.nanmean(lead.ravel(), 0)),
      "lead_by_place": {str(place): float(value) for place, value in enumerate(by_place, start=1)},
      "psnr": float(psnr[scored].mean()), "ssim": float(ssim[scored].mean()), "effect_adherence": adherence,
      "drift": {name: metrics.drift(values[scored]) for name, values in series.items()},
  }
  return record, series


# ----------------------------------------------------------------------------------------------------------
# Whole runs.


def _flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in nested.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _aggregate(clips: list[dict[str, Any]], series: list[dict[str, np.ndarray]]) -> dict[str, Any]:
  """Mean / median / std of every metric over clips, timing, and the mean per-frame drift curves."""
  flat = [_flatten(record["metrics"]) for record in clips]
  aggregate = _summaries(flat)
  timing = [record["timing"] for record in clips]
  aggregate["seconds"] = metrics.summarize([t["seconds"] for t in timing])
  aggregate["fps"] = metrics.summarize([t["fps"] for t in timing])
  chunked = [t["chunk_seconds"] for t in timing if t["chunk_seconds"]]
  if chunked:  # a stream's first chunk includes warm-up, so it is reported apart from the steady ones
    aggregate["first_chunk_seconds"] = metrics.summarize([c[0] for c in chunked])
    aggregate["chunk_seconds"] = metrics.summarize([s for c in chunked for s in c[1:]])
  per_frame = {name: metrics.nanmean(np.stack([s[name] for s in series]), 0).tolist() for name in DRIFT_SERIES}
  return {"aggregate": aggregate, "by_num_sprites": _by_num_sprites(clips, flat), "per_frame": per_frame}


def _summaries(flat: list[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
  """`metrics.summarize` of every flattened clip metric over the given clips."""
  return {name: metrics.summarize([f[name] for f in flat]) for name in flat[0]}


def _by_num_sprites(clips: list[dict[str, Any]], flat: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """The clip metrics summarised separately for clips with 1, 2, ... sprites (JSON keys are the counts).

  A one-sprite clip can be generated without telling sprites apart; with more, the model must keep each one's
  colour and shape on its own tracks, so a gap between the groups shows where a generator fails.
  """
  groups: dict[int, list[int]] = {}
  for index, record in enumerate(clips):
    groups.setdefault(record["num_sprites"], []).append(index)
  return {str(count): {"clips": len(members), **_summaries([flat[i] for i in members])}
          for count, members in sorted(groups.items())}


@dataclasses.dataclass(frozen=True)
class Sample:
  """One clip's videos for the side-by-side report."""
  seed: int
  prompt: str
  true_video: np.ndarray  # uint8 [T, H, W, 3]
  generated: np.ndarray
  baseline: np.ndarray  # the first frame repeated
  tracks: tracks_lib.Tracks


def _run(name: str, generate_fn: GenerateFn, truths: list[ClipTruth], *, tolerance: float, min_pixels: int,
         temporal_stride: int, progress: bool, keep: int) -> tuple[dict[str, Any], list[np.ndarray]]:
  """Scores one generator on every clip; returns its results and the first `keep` generated videos."""
  clips, series, kept = [], [], []
  for truth in tqdm(truths, desc=name, disable=not progress, leave=False):
    clip = truth.clip
    num_frames = clip.video.shape[0]
    start = time.perf_counter()
    output = generate_fn(clip.video[0].copy(), clip.prompt, clip_tracks(clip), num_frames)
    seconds = time.perf_counter() - start
    video, chunk_seconds = _generated_video(output, truth, name)
    record, clip_series = score_clip(video, truth, tolerance=tolerance, min_pixels=min_pixels,
                                     temporal_stride=temporal_stride)
    clips.append({"seed": truth.seed, "prompt": clip.prompt, "effect": clip.effect,
                  "num_sprites": len(clip.shapes), "metrics": record,
                  "timing": {"seconds": seconds, "fps": num_frames / seconds if seconds > 0 else math.nan,
                             "chunk_seconds": chunk_seconds}})
    series.append(clip_series)
    if len(kept) < keep:
      kept.append(video)
  return {"clips": clips, **_aggregate(clips, series)}, kept


def evaluate(generate_fn: GenerateFn, *, seeds: Sequence[int], config: ml_collections.ConfigDict,
             baselines: bool = True, num_frames: int | None = None, num_samples: int = 0,
             progress: bool = False) -> dict[str, Any]:
  """Scores `generate_fn` (and the first-frame and true-video baselines) on held-out sprites clips.

  Returns {"world": sizes and detection settings, "seeds", "results": {name: {"clips": per-clip records,
  "aggregate": {metric: {mean, median, std, count}}, "by_num_sprites": {"1": {"clips": n, metric: {...}}, ...},
  "per_frame": mean drift curves over every frame, frame 0 included}}, "samples": `Sample`s of the first
  `num_samples` clips}; names are "generator", "first_frame", "true_video". Everything but "samples" (arrays,
  left out by `report.write_json`) is plain JSON data. NaN marks a metric that does not apply (effect adherence of
  a clip without an effect) or could not be measured (EPE when the sprite was never found).
  """
  seeds = check_seeds(seeds)
  world = world_config(config, num_frames)
  tolerance = metrics.default_tolerance()
  min_pixels = min_detection_pixels(world)
  clips = render_clips(seeds, world)
  truths = [clip_truth(c, s, tolerance=tolerance, min_pixels=min_pixels) for c, s in zip(clips, seeds)]
  generators = {GENERATOR: generate_fn}
  if baselines:
    generators.update({FIRST_FRAME: first_frame_generator, TRUE_VIDEO: true_video_generator(clips)})
  results, kept = {}, {}
  for name, fn in generators.items():
    results[name], kept[name] = _run(name, fn, truths, tolerance=tolerance, min_pixels=min_pixels,
                                     temporal_stride=world.temporal_stride, progress=progress,
                                     keep=num_samples if name == GENERATOR else 0)
  samples = [Sample(seed=seed, prompt=clip.prompt, true_video=clip.video, generated=video,
                    baseline=first_frame_generator(clip.video[0], clip.prompt, clip_tracks(clip),
                                                   clip.video.shape[0]),
                    tracks=clip_tracks(clip)) for seed, clip, video in zip(seeds, clips, kept[GENERATOR])]
  return {
      "world": {"height": world.height, "width": world.width, "num_frames": world.num_frames,
                "grid": world.grid, "color_tolerance": tolerance, "min_detection_pixels": min_pixels},
      "seeds": seeds,
      "results": results,
      "samples": samples,
  }


# Headline metrics compared across sampling seeds (flattened aggregate keys).
ACROSS_SEED_METRICS = ("epe", "epe_missed_fraction", "epe_track", "psnr", "ssim")


def seed_result_name(sample_seed: int) -> str:
  """The results key of a generator run with `config.seed = sample_seed` after the first sample seed."""
  return f"{GENERATOR}_seed{sample_seed}"


def check_sample_seeds(sample_seeds: Iterable[int]) -> list[int]:
  """Sampling seeds as ints; refuses none and repeats (a repeated seed would count one run twice)."""
  sample_seeds = [int(s) for s in sample_seeds]
  if not sample_seeds:
    raise ValueError("need at least one sample seed, got none")
  if len(set(sample_seeds)) != len(sample_seeds):
    raise ValueError(f"sample seeds must be distinct, got {sample_seeds}")
  return sample_seeds


def evaluate_sample_seeds(make_generate_fn: Callable[[int], GenerateFn], sample_seeds: Sequence[int], *,
                          seeds: Sequence[int], config: ml_collections.ConfigDict, **evaluate_kwargs: Any
                          ) -> dict[str, Any]:
  """`evaluate` once per sampling seed (the model's noise and track IDs), on the same clips.

  Near a target, one seed's mean EPE can land on either side of it (on 100 clips the tiny teachers' seeds
  differ by up to 0.6 px), so a claim needs several. `make_generate_fn(sample_seed)` builds the generator for
  one seed. The first seed's run is the result's "generator" (with the baselines and sample grid); each later
  one is added under `seed_result_name(seed)`, and "across_sample_seeds" holds, for each of
  `ACROSS_SEED_METRICS`, the per-seed means, their mean and their sample standard deviation (ddof 1; 0 for one
  seed).
  """
  sample_seeds = check_sample_seeds(sample_seeds)
  result = evaluate(make_generate_fn(sample_seeds[0]), seeds=seeds, config=config, **evaluate_kwargs)
  runs = [result["results"][GENERATOR]]
  later_kwargs = dict(evaluate_kwargs, baselines=False, num_samples=0)
  for sample_seed in sample_seeds[1:]:
    later = evaluate(make_generate_fn(sample_seed), seeds=seeds, config=config, **later_kwargs)
    runs.append(later["results"][GENERATOR])
    result["results"][seed_result_name(sample_seed)] = runs[-1]
  across = {}
  for name in ACROSS_SEED_METRICS:
    per_seed = [run["aggregate"][name]["mean"] for run in runs]
    finite = np.array([v for v in per_seed if math.isfinite(v)], np.float64)
    across[name] = {"per_seed": per_seed, "mean": float(finite.mean()) if finite.size else math.nan,
                    "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0 if finite.size else math.nan}
  result["sample_seeds"] = sample_seeds
  result["across_sample_seeds"] = across
  return result
