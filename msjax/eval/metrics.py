"""Video metrics for the toy world, in numpy: sprite detection by colour, EPE, PSNR, SSIM, drift, effect adherence.

Videos are uint8 [T, H, W, 3]. Pixel coordinates follow `msjax.data.tracks`: pixel (row i, column j) has its
centre at (x, y) = (j + 0.5, i + 0.5), the convention of `Clip.centroids` and `Clip.tracks`.

Why colour detection works: the `sprites` palette keeps every pair of colours at least `min_color_distance`
apart in RGB, so balls of radius half that distance around the colours never overlap. A generated pixel is
assigned to a colour when it lies inside that colour's ball, which tolerates generation noise of a few tens of
levels while never confusing two sprites (or a sprite and the background).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import chex
import numpy as np
from scipy import ndimage

from msjax.data import sprites as sprites_lib

RGB = 3
UINT8_LEVELS = 255.0  # the range of a uint8 channel; metrics work on [0, 1] = level / UINT8_LEVELS
TOLERANCE_FRACTION = 0.5  # of the smallest palette distance: colour balls touch but never overlap
# Frame 0 is the given first frame, an input: every score covers the frames after it, the ones a generator makes.
# (Scoring it let a copy of the input reach the PSNR ceiling: +1.6 dB on the first-frame baseline's mean over 45
# frames.) Per-frame curves keep it, for reference.
FIRST_SCORED_FRAME = 1
MIN_SPRITE_PIXELS = 4  # below this many matching pixels a "detection" is stray noise, not a sprite

# SSIM of Wang et al. (2004): 11x11 Gaussian window, sigma 1.5, stabilisers K1, K2 on a dynamic range of 1.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# Motion lead: the true velocity is measured over +-MOTION_WINDOW frames; slower sprites have no direction.
MOTION_WINDOW = 2
MIN_LEAD_SPEED = 0.5  # px per frame

DRIFT_QUARTER = 4  # drift compares the first and the last 1/DRIFT_QUARTER of the frames


def scored_frames(num_frames: int) -> np.ndarray:
  """bool [num_frames]: the frames every score covers (FIRST_SCORED_FRAME on)."""
  return np.arange(num_frames) >= FIRST_SCORED_FRAME


def _check_video(video: np.ndarray, name: str) -> None:
  chex.assert_rank(video, 4)
  chex.assert_axis_dimension(video, 3, RGB)
  if video.dtype != np.uint8:
    raise TypeError(f"{name} must be uint8 [T, H, W, 3], found dtype {video.dtype}")


def _check_pair(video: np.ndarray, reference: np.ndarray) -> None:
  _check_video(video, "video")
  _check_video(reference, "reference video")
  chex.assert_equal_shape([video, reference])


# ----------------------------------------------------------------------------------------------------------
# Colour detection.


def min_color_distance(colors: Mapping[str, np.ndarray] | None = None) -> float:
  """Smallest RGB distance between two distinct colours of `colors` (default: the sprites palette)."""
  table = np.array(list((colors or sprites_lib.palette()).values()), np.float64)
  if len(table) < 2:
    raise ValueError(f"need at least two colours to measure their separation, got {len(table)}")
  distance = np.linalg.norm(table[:, None] - table[None], axis=-1)
  return float(distance[np.triu_indices(len(table), k=1)].min())


def default_tolerance() -> float:
  """RGB radius within which a pixel counts as a palette colour (half the palette's smallest separation)."""
  return TOLERANCE_FRACTION * min_color_distance()


def color_mask(video: np.ndarray, color: np.ndarray, tolerance: float) -> np.ndarray:
  """bool [T, H, W]: pixels within `tolerance` (RGB distance) of `color`, one [3] or one per frame [T, 3]."""
  _check_video(video, "video")
  color = np.asarray(color, np.int32)
  if color.ndim == 1:
    color = np.broadcast_to(color, (video.shape[0], RGB))
  chex.assert_shape(color, (video.shape[0], RGB))
  difference = video.astype(np.int32) - color[:, None, None, :]
  return np.einsum("thwc,thwc->thw", difference, difference) <= tolerance**2


@dataclasses.dataclass(frozen=True)
class Detection:
  """Colour-detected sprites: `centroids` float64 [T, S, 2] (x, y), NaN where `found` is False."""
  centroids: np.ndarray
  counts: np.ndarray  # int [T, S] matching pixels
  found: np.ndarray  # bool [T, S] at least min_pixels matched


def detect_sprites(video: np.ndarray, colors: np.ndarray, *, tolerance: float | None = None,
                   min_pixels: int = MIN_SPRITE_PIXELS) -> Detection:
  """Finds each sprite as the centroid of the pixels within `tolerance` of its colour ([S, 3] uint8)."""
  _check_video(video, "video")
  chex.assert_rank(colors, 2)
  chex.assert_axis_dimension(colors, 1, RGB)
  tolerance = default_tolerance() if tolerance is None else tolerance
  num_frames, height, width, _ = video.shape
  column_centres = np.arange(width) + 0.5
  row_centres = np.arange(height) + 0.5
  centroids = np.full((num_frames, len(colors), 2), np.nan)
  counts = np.zeros((num_frames, len(colors)), np.int64)
  for index, color in enumerate(colors):
    mask = color_mask(video, color, tolerance)
    counts[:, index] = mask.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
      centroids[:, index, 0] = mask.sum(axis=1) @ column_centres / counts[:, index]
      centroids[:, index, 1] = mask.sum(axis=2) @ row_centres / counts[:, index]
  found = counts >= min_pixels
  centroids[~found] = np.nan
  return Detection(centroids=centroids, counts=counts, found=found)


def unoccluded_frames(detection: Detection, sprite_visible: np.ndarray) -> np.ndarray:
  """bool [T, S]: frames where a sprite shows its whole stamp in the TRUE video (detected on that video).

  A sprite is a rigid stamp translated by whole pixels, so its visible area is largest exactly when nothing
  covers it; there its colour centroid is its true centroid. Partly covered frames would bias any centroid
  detector, so EPE leaves them out. (A sprite covered in every frame keeps its least covered frames.)
  """
  chex.assert_shape(sprite_visible, detection.counts.shape)
  largest = detection.counts.max(axis=0, keepdims=True)
  return sprite_visible & (detection.counts == largest) & detection.found


# ----------------------------------------------------------------------------------------------------------
# End-point error.


@dataclasses.dataclass(frozen=True)
class PointErrors:
  """Per sprite-frame errors in pixels: NaN where not evaluated (masked out) or not detected."""
  errors: np.ndarray  # float64 [T, S]
  evaluated: np.ndarray  # bool [T, S]: frames that should be scored
  detected: np.ndarray  # bool [T, S]: evaluated and the sprite was found

  def summary(self) -> dict[str, float]:
    """Mean error over detected frames and the fraction of evaluated frames where the sprite was missed."""
    num_evaluated = int(self.evaluated.sum())
    if num_evaluated == 0:
      return {"mean": math.nan, "missed_fraction": math.nan, "frames": 0}
    scored = self.errors[self.detected]
    return {"mean": float(scored.mean()) if scored.size else math.nan,
            "missed_fraction": 1.0 - float(self.detected.sum()) / num_evaluated, "frames": num_evaluated}


def centroid_epe(detected: Detection, true_centroids: np.ndarray, frames: np.ndarray) -> PointErrors:
  """Distance from detected to true centroids [T, S, 2] over `frames` [T, S] (e.g. `unoccluded_frames`)."""
  chex.assert_shape(true_centroids, detected.centroids.shape)
  chex.assert_shape(frames, detected.found.shape)
  errors = np.linalg.norm(detected.centroids - true_centroids, axis=-1)
  hit = frames & detected.found
  return PointErrors(errors=np.where(hit, errors, np.nan), evaluated=frames.copy(), detected=hit)


def true_motion(true_centroids: np.ndarray, window: int = MOTION_WINDOW) -> np.ndarray:
  """float64 [T, S, 2]: each sprite's velocity in px per frame, c[t + w] - c[t - w] over the frames between them
  (clipped to the clip). Stamps move by whole pixels, so one frame's step points along the pixel grid, not the
  path. In jump clips the window spans jumps, so there this (and the lead along it) means little."""
  chex.assert_rank(true_centroids, 3)
  frames = np.arange(true_centroids.shape[0])
  later = np.minimum(frames + window, frames[-1])
  earlier = np.maximum(frames - window, 0)
  span = np.maximum(later - earlier, 1)[:, None, None]
  centroids = true_centroids.astype(np.float64)
  return (centroids[later] - centroids[earlier]) / span


def motion_lead(detected: Detection, true_centroids: np.ndarray, frames: np.ndarray,
                min_speed: float = MIN_LEAD_SPEED) -> np.ndarray:
  """float64 [T, S]: how far the drawn sprite is ahead (+) of or behind (-) the true one along its motion.

  EPE says how far off a sprite is, not how. A generator that holds a sprite still for a few frames and then
  catches up (say, one that moves sprites only from one latent frame to the next) is ahead early and behind late
  in every latent frame; `lead_by_place` shows that pattern. NaN where `frames` [T, S] leaves a frame out, the
  sprite was not found, or it moves slower than `min_speed` px per frame (no direction to measure along).
  """
  chex.assert_shape(true_centroids, detected.centroids.shape)
  chex.assert_shape(frames, detected.found.shape)
  velocity = true_motion(true_centroids)
  speed = np.linalg.norm(velocity, axis=-1)
  moving = frames & detected.found & (speed >= min_speed)
  with np.errstate(invalid="ignore", divide="ignore"):
    along = np.einsum("tsc,tsc->ts", detected.centroids - true_centroids, velocity) / speed
  return np.where(moving, along, np.nan)


def lead_by_place(lead: np.ndarray, temporal_stride: int) -> np.ndarray:
  """float64 [temporal_stride]: the mean `motion_lead` [T, S] over the pixel frames at each place within their
  latent frame. Latent frame 0 holds frame 0 alone and latent frame k >= 1 frames 4k-3 .. 4k (stride 4), so
  frame t >= 1 sits at place (t - 1) % stride (entry 0: a latent frame's first pixel frame, which reports and
  tables call place 1). NaN where no frame at that place was measured."""
  chex.assert_rank(lead, 2)
  if temporal_stride < 1:
    raise ValueError(f"temporal stride must be at least 1, got {temporal_stride}")
  place = (np.arange(lead.shape[0]) - 1) % temporal_stride
  later = np.arange(lead.shape[0]) >= 1
  return np.array([nanmean(lead[later & (place == p)].ravel(), 0) for p in range(temporal_stride)], np.float64)


def sprite_track_members(first_frame: np.ndarray, points: np.ndarray, visible: np.ndarray, colors: np.ndarray,
                         tolerance: float | None = None) -> np.ndarray:
  """bool [S, N]: tracks that start, visible, on a pixel of sprite s's colour in the first frame."""
  tolerance = default_tolerance() if tolerance is None else tolerance
  chex.assert_rank([first_frame, points, visible], [3, 3, 2])
  height, width = first_frame.shape[:2]
  start = np.floor(points[0]).astype(np.int64)
  inside = (start[:, 0] >= 0) & (start[:, 0] < width) & (start[:, 1] >= 0) & (start[:, 1] < height)
  pixel = first_frame[np.clip(start[:, 1], 0, height - 1), np.clip(start[:, 0], 0, width - 1)]
  difference = pixel[None].astype(np.int32) - np.asarray(colors, np.int32)[:, None]
  matches = np.einsum("snc,snc->sn", difference, difference) <= tolerance**2
  return matches & (inside & visible[0])[None]


def track_epe(detected: Detection, points: np.ndarray, visible: np.ndarray, members: np.ndarray,
              frames: np.ndarray) -> PointErrors:
  """Detected centroid displacement vs the mean displacement of each sprite's visible tracks.

  Track displacement D_s(t) is the mean of p[t] - p[0] over sprite s's member tracks visible at t. The detected
  path c_s(t) should equal D_s(t) plus a constant (where the sprite started); that constant is fitted by least
  squares over the scored frames, so no single reference frame's noise or occlusion shifts every error.
  """
  chex.assert_rank([points, visible, members], [3, 2, 2])
  chex.assert_shape(frames, detected.found.shape)
  chex.assert_shape(members, (detected.found.shape[1], points.shape[1]))
  displacement = points - points[:1]  # [T, N, 2]
  weight = (visible[:, None, :] & members[None]).astype(np.float64)  # [T, S, N]
  member_count = weight.sum(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    track_shift = np.einsum("tsn,tnc->tsc", weight, displacement) / member_count[..., None]
  hit = frames & detected.found & (member_count > 0)
  residual = np.where(hit[..., None], detected.centroids - track_shift, 0.0)
  offset = residual.sum(axis=0) / np.maximum(hit.sum(axis=0), 1)[:, None]  # [S, 2]
  errors = np.linalg.norm(residual - offset, axis=-1)
  evaluated = frames & (member_count > 0)
  return PointErrors(errors=np.where(hit, errors, np.nan), evaluated=evaluated, detected=hit)


# ----------------------------------------------------------------------------------------------------------
# Image quality.


def psnr_ceiling(frame_shape: tuple[int, ...]) -> float:
  """The highest finite PSNR between two uint8 frames of this shape: a single value off by one level."""
  return 10.0 * math.log10(math.prod(frame_shape) * UINT8_LEVELS**2)


def psnr_per_frame(video: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """float64 [T] PSNR in dB on [0, 1] pixels; identical frames get `psnr_ceiling` so means stay finite."""
  _check_pair(video, reference)
  difference = (video.astype(np.float64) - reference.astype(np.float64)) / UINT8_LEVELS
  mse = np.mean(difference**2, axis=(1, 2, 3))
  ceiling = psnr_ceiling(video.shape[1:])
  with np.errstate(divide="ignore"):
    return np.minimum(-10.0 * np.log10(mse), ceiling)


def _gaussian_window() -> np.ndarray:
  offsets = np.arange(SSIM_WINDOW) - (SSIM_WINDOW - 1) / 2
  window = np.exp(-offsets**2 / (2 * SSIM_SIGMA**2))
  return window / window.sum()


def _local_mean(images: np.ndarray) -> np.ndarray:
  """Gaussian-weighted mean over each SSIM window of [T, H, W, C], cropped to windows fully inside the frame."""
  window = _gaussian_window()
  filtered = ndimage.correlate1d(images, window, axis=1, mode="reflect")
  filtered = ndimage.correlate1d(filtered, window, axis=2, mode="reflect")
  border = (SSIM_WINDOW - 1) // 2
  return filtered[:, border:-border, border:-border]


def ssim_per_frame(video: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """float64 [T] SSIM on [0, 1] RGB, the SSIM map averaged over valid window positions and channels."""
  _check_pair(video, reference)
  if min(video.shape[1:3]) < SSIM_WINDOW:
    raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, found "
                     f"{video.shape[1]}x{video.shape[2]}")
  x = video.astype(np.float64) / UINT8_LEVELS
  y = reference.astype(np.float64) / UINT8_LEVELS
  mean_x, mean_y = _local_mean(x), _local_mean(y)
  var_x = _local_mean(x * x) - mean_x**2
  var_y = _local_mean(y * y) - mean_y**2
  cov = _local_mean(x * y) - mean_x * mean_y
  c1, c2 = SSIM_K1**2, SSIM_K2**2  # dynamic range 1
  ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
  return ssim_map.mean(axis=(1, 2, 3))


# ----------------------------------------------------------------------------------------------------------
# Colour drift and text-effect adherence.


def true_regions(true_video: np.ndarray, background: np.ndarray, colors: np.ndarray,
                 tolerance: float | None = None) -> np.ndarray:
  """bool [T, 1 + S, H, W]: where the TRUE video shows the background (region 0) and each sprite."""
  tolerance = default_tolerance() if tolerance is None else tolerance
  masks = [color_mask(true_video, background, tolerance)]
  masks += [color_mask(true_video, color, tolerance) for color in colors]
  return np.stack(masks, axis=1)


def region_colors(video: np.ndarray, regions: np.ndarray) -> np.ndarray:
  """float64 [T, R, 3]: per-channel median colour of `video` over each region [T, R, H, W]; NaN if empty.

  The median, not the mean, so a sprite drawn a few pixels off does not tint the background's estimate.
  """
  _check_video(video, "video")
  chex.assert_rank(regions, 4)
  chex.assert_shape(regions, (video.shape[0], regions.shape[1]) + video.shape[1:3])
  num_frames, num_regions = regions.shape[:2]
  pixels = video.reshape(num_frames, 1, -1, RGB).astype(np.float64)
  inside = regions.reshape(num_frames, num_regions, -1, 1)
  ordered = np.sort(np.where(inside, pixels, np.nan), axis=2)  # NaN (outside) sorts last
  count = inside.sum(axis=2, keepdims=True)  # [T, R, 1, 1]
  lower = np.take_along_axis(ordered, np.maximum(count - 1, 0) // 2, axis=2)
  upper = np.take_along_axis(ordered, count // 2, axis=2)
  median = (0.5 * (lower + upper))[:, :, 0]
  return np.where(count[:, :, 0] > 0, median, np.nan)


def region_color_errors(video: np.ndarray, regions: np.ndarray, true_colors: np.ndarray) -> np.ndarray:
  """float64 [T, R]: RGB distance (levels) between each region's median colour and its true colour [T, R, 3].

  Regions come from the true video, so a sprite drawn in the wrong place also raises its region's error; EPE
  tells motion errors apart from colour drift.
  """
  chex.assert_shape(true_colors, regions.shape[:2] + (RGB,))
  return np.linalg.norm(region_colors(video, regions) - true_colors, axis=-1)


def drift(series: np.ndarray) -> dict[str, float]:
  """How a per-frame quality series [T] changes over the clip: least-squares slope per frame and the means of
  its first and last quarter (NaN frames are skipped)."""
  chex.assert_rank(series, 1)
  frames = np.arange(len(series), dtype=np.float64)
  finite = np.isfinite(series)
  quarter = max(1, len(series) // DRIFT_QUARTER)
  first, last = series[:quarter], series[-quarter:]
  slope = np.polyfit(frames[finite], series[finite], 1)[0] if finite.sum() >= 2 else math.nan
  return {"slope": float(slope),
          "first_quarter": float(np.nanmean(first)) if np.isfinite(first).any() else math.nan,
          "last_quarter": float(np.nanmean(last)) if np.isfinite(last).any() else math.nan}


def effect_adherence(generated_colors: np.ndarray, true_colors: np.ndarray) -> float:
  """Signed agreement in [-1, 1] of the generated and true background colour changes, [T, 3] each.

  With g(t), r(t) the colour changes since frame 0: 2 <g, r> / (|g|^2 + |r|^2) summed over frames. It is 1 only
  when the generated background follows the true one exactly, 0 when it does not change (a repeated first
  frame), negative when it moves against the prompt; under- and overshooting both lower it. NaN when the true
  background does not change (no effect to adhere to).
  """
  chex.assert_rank([generated_colors, true_colors], 2)
  chex.assert_equal_shape([generated_colors, true_colors])
  generated = np.nan_to_num(generated_colors - generated_colors[:1])
  true = true_colors.astype(np.float64) - true_colors[:1]
  scale = np.sum(generated**2) + np.sum(true**2)
  if not np.any(true):
    return math.nan
  return float(2.0 * np.sum(generated * true) / scale)


def nanmean(values: np.ndarray, axis: int) -> np.ndarray:
  """Mean over the finite entries along `axis`; NaN (without a warning) where there are none."""
  finite = np.isfinite(values)
  count = finite.sum(axis=axis)
  total = np.where(finite, values, 0.0).sum(axis=axis)
  return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def summarize(values: Any) -> dict[str, float | int]:
  """Mean, median and std (population) over the finite entries of `values` (None counts as missing)."""
  array = np.array([math.nan if v is None else v for v in values], np.float64)
  finite = array[np.isfinite(array)]
  if not finite.size:
    return {"mean": math.nan, "median": math.nan, "std": math.nan, "count": 0}
  return {"mean": float(finite.mean()), "median": float(np.median(finite)), "std": float(finite.std()),
          "count": int(finite.size)}
