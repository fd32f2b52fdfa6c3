"""Motion-transfer tracks: the motion of a source video, followed with OpenCV's pyramidal Lucas-Kanade tracker.

The paper extracts these with CoTracker3 (section 2.5); Lucas-Kanade needs no network and no download, so any
machine can turn a clip into tracks. It follows *texture*: a point is tracked by the image window around it
(`LucasKanadeConfig.window` px), so

  * points in flat regions cannot be tracked and are hidden (OpenCV's minimum-eigenvalue test);
  * a point next to a strong moving edge may follow that edge, even if its own pixel belongs to the
    untextured surface behind it;
  * visibility is only as sharp as the window: an occluder is noticed once it changes the point's window.

Visibility rule. Frame 0's window around each query point is the point's *appearance*. In frame t:
  1. a point visible in frame t-1 is tracked from t-1 to t and back; if it lands within `fb_threshold` px of
     where it started, that is its guess, otherwise (and for points already lost) the guess is its last
     position moved on by its last velocity;
  2. the appearance is searched from frame 0 into frame t, starting at the guess, and back again;
  3. the point is visible when that search is forward-backward consistent (within `fb_threshold` px) and, for a
     point that came through step 1's check, lands within `fb_threshold` px of the guess.
So a lost point stays hidden until its first-frame appearance is found again (it re-validates); while hidden
its reported position is the guess, clipped into the frame. Anchoring to frame 0 also stops drift, but it
hides points whose appearance changes a lot (large rotation, scale or lighting changes).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Iterable, Iterator

import chex
import cv2
import imageio.v2 as imageio
import numpy as np

from msjax import config_utils
from msjax.data import tracks as tracks_lib
from msjax.data.tfds_videos import CropResize
from msjax.tracks_sources import TrackSourceError, fit_to_frame

RGB = 3
RGBA = 4
OPENCV_PIXEL_CENTRE = 0.5  # tracks.py puts pixel j's centre at j + 0.5, OpenCV at j


@dataclasses.dataclass(frozen=True)
class LucasKanadeConfig:
  """Settings of `cv2.calcOpticalFlowPyrLK` and of the visibility rule (module docstring)."""
  window: int = 21  # side of the square window each point is matched by, px
  pyramid_levels: int = 3  # coarser levels above the full frame: larger motions are found
  max_iterations: int = 30  # per pyramid level
  epsilon: float = 0.01  # stop iterating once an update moves less than this, px
  fb_threshold: float = 1.0  # max forward-backward miss of a visible point, source px
  min_eigenvalue: float = 1e-4  # OpenCV's minEigThreshold: weaker texture is untrackable

  def __post_init__(self):
    if self.window < 3 or self.window % 2 == 0:
      raise ValueError(f"Lucas-Kanade window must be an odd number >= 3 px, got {self.window}")
    if self.pyramid_levels < 0 or self.max_iterations < 1:
      raise ValueError(f"need pyramid_levels >= 0 and max_iterations >= 1, got {self.pyramid_levels}, "
                       f"{self.max_iterations}")
    if not self.fb_threshold > 0:
      raise ValueError(f"forward-backward threshold must be positive, got {self.fb_threshold}")


# ----------------------------------------------------------------------------------------------------------
# Reading.


def _as_rgb(frame: np.ndarray, source: str, index: int) -> np.ndarray:
  """Grey, RGB or RGBA uint8 frames -> uint8 [H, W, 3]."""
  frame = np.asarray(frame)
  if frame.dtype != np.uint8:
    raise TrackSourceError(f"{source}: frame {index} has dtype {frame.dtype}; expected 8-bit video frames")
  if frame.ndim == 2:
    return np.repeat(frame[..., None], RGB, axis=-1)
  if frame.ndim == 3 and frame.shape[-1] in (RGB, RGBA):
    return np.ascontiguousarray(frame[..., :RGB])
  raise TrackSourceError(f"{source}: frame {index} has shape {frame.shape}; expected H x W grey, RGB or RGBA")


def read_frames(path: str | os.PathLike, *, max_frames: int | None = None) -> Iterator[np.ndarray]:
  """The frames of a video file (anything imageio reads: mp4, gif, ...) as uint8 RGB [H, W, 3], one at a time.

  Frames are yielded as they are decoded, so a long clip never has to fit in memory.
  """
  source = os.fspath(path)
  if not os.path.isfile(source):
    raise TrackSourceError(f"{source}: video file not found")
  if max_frames is not None and max_frames < 1:
    raise ValueError(f"max_frames must be >= 1, got {max_frames}")
  return _decode(source, max_frames)


def _decode(source: str, max_frames: int | None) -> Iterator[np.ndarray]:
  try:
    reader = imageio.get_reader(source)
  except Exception as e:  # imageio raises many types for unreadable files; all mean the same to the user
    raise TrackSourceError(f"{source}: could not open the video ({type(e).__name__}: {e})") from e
  try:
    decoded = iter(reader)  # iterate: ffmpeg readers report an unknown (infinite) length
    index = 0
    while max_frames is None or index < max_frames:
      try:
        frame = next(decoded)
      except StopIteration:
        return
      except Exception as e:
        raise TrackSourceError(f"{source}: could not decode frame {index} ({type(e).__name__}: {e})") from e
      yield _as_rgb(frame, source, index)
      index += 1
  finally:
    reader.close()


# ----------------------------------------------------------------------------------------------------------
# Tracking.


def _search(config: LucasKanadeConfig, start_image: np.ndarray, end_image: np.ndarray, points: np.ndarray,
            guess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """LK from `start_image` to `end_image` starting at `guess`, then back: (found [N, 2], consistent [N]).

  Consistent: both directions converged and the way back lands within `fb_threshold` of `points`. Points are
  in tracks.py's pixel convention on both sides; OpenCV's is used only inside.
  """
  criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, config.max_iterations, config.epsilon)
  options = dict(winSize=(config.window, config.window), maxLevel=config.pyramid_levels, criteria=criteria,
                 flags=cv2.OPTFLOW_USE_INITIAL_FLOW, minEigThreshold=config.min_eigenvalue)
  # OpenCV writes its answer into the initial-guess array, so only fresh arrays are handed to it.
  start = (np.array(points, np.float32) - OPENCV_PIXEL_CENTRE).reshape(-1, 1, tracks_lib.XY)
  initial = (np.array(guess, np.float32) - OPENCV_PIXEL_CENTRE).reshape(start.shape)
  found, forward_ok, _ = cv2.calcOpticalFlowPyrLK(start_image, end_image, start, initial, **options)
  back, backward_ok, _ = cv2.calcOpticalFlowPyrLK(end_image, start_image, found, start.copy(), **options)
  miss = np.linalg.norm(back - start, axis=-1)[:, 0]
  consistent = (forward_ok[:, 0] == 1) & (backward_ok[:, 0] == 1) & (miss <= config.fb_threshold)
  return found[:, 0] + OPENCV_PIXEL_CENTRE, consistent


def track_frames(frames: Iterable[np.ndarray], query_points: np.ndarray, *,
                 config: LucasKanadeConfig = LucasKanadeConfig(), source: str = "<frames>") -> tracks_lib.Tracks:
  """Tracks of `query_points` [N, 2] (pixels of the first frame) through uint8 RGB frames [H, W, 3].

  Implements the visibility rule of the module docstring; coordinates are in the frames' own pixels.
  """
  chex.assert_rank(query_points, 2)
  chex.assert_axis_dimension(query_points, 1, tracks_lib.XY)
  frames = iter(frames)
  first = next(frames, None)
  if first is None:
    raise TrackSourceError(f"{source}: the video has no frames")
  chex.assert_rank(first, 3)
  height, width = first.shape[:2]
  query = np.asarray(query_points, np.float32)
  # Frame 0 against itself: a point passes unless its window is untextured or leaves the image.
  _, visible = _search(config, first, first, query, query)
  all_points, all_visible = [query], [visible]
  position, velocity, previous = query, np.zeros_like(query), first
  for frame in frames:
    if frame.shape != first.shape:
      raise TrackSourceError(f"{source}: frame {len(all_points)} is {frame.shape}, frame 0 is {first.shape}; "
                             f"expected one frame size throughout")
    stepped, step_ok = _search(config, previous, frame, position, position)
    chained = visible & step_ok
    guess = np.where(chained[:, None], stepped, position + velocity)
    anchored, anchor_ok = _search(config, first, frame, query, guess)
    agrees = np.linalg.norm(anchored - guess, axis=-1) <= config.fb_threshold
    visible = anchor_ok & (agrees | ~chained)
    new_position = np.where(visible[:, None], anchored, guess)
    velocity = np.where((chained & visible)[:, None], new_position - position, velocity)
    position, previous = new_position, frame
    all_points.append(position)
    all_visible.append(visible)
  return fit_to_frame(np.stack(all_points), np.stack(all_visible), height=height, width=width, source=source)


def resample_frames(tracks: tracks_lib.Tracks, num_frames: int) -> tracks_lib.Tracks:
  """The same motion over `num_frames` frames: positions interpolated linearly in time, first and last kept.

  A resampled point is visible when the source frames on both sides of it are (one side at an exact frame).
  """
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  last = tracks.num_frames - 1
  time = np.linspace(0.0, last, num_frames) if num_frames > 1 else np.zeros(1)
  before = np.minimum(np.floor(time).astype(np.int64), last)
  after = np.minimum(before + 1, last)
  weight = (time - before).astype(np.float32)[:, None, None]
  points = (1 - weight) * tracks.points[before] + weight * tracks.points[after]
  visible = tracks.visible[before] & (tracks.visible[after] | (weight[..., 0] == 0))
  return tracks_lib.Tracks(points=points.astype(np.float32), visible=visible)


def transfer_tracks(video_path: str | os.PathLike, *, grid: int, size: tuple[int, int] | None = None,
                    num_frames: int | None = None, temporal_stride: int = 4, max_frames: int | None = None,
                    config: LucasKanadeConfig = LucasKanadeConfig()) -> tracks_lib.Tracks:
  """Tracks of a `grid` x `grid` lattice of first-frame points following the motion of a video file.

  `size` (height, width) fits the tracks to another frame size by the largest centred crop of that aspect ratio
  (the same map as the `VideoFolder` dataset); the grid covers the crop. Tracking runs at the source
  resolution on the first `max_frames` frames; `num_frames` (1 + temporal_stride * k) then resamples them in
  time (e.g. 150 frames at 30 fps -> 81 frames at 16 fps).
  """
  source = os.fspath(video_path)
  if grid < 1:
    raise ValueError(f"grid must be >= 1, got {grid}")
  if num_frames is not None:
    config_utils.latent_frames(num_frames, temporal_stride)  # ConfigError naming the 1 + s*k rule
  frames = read_frames(source, max_frames=max_frames)
  first = next(frames, None)
  if first is None:
    raise TrackSourceError(f"{source}: the video has no frames")
  source_height, source_width = first.shape[:2]
  height, width = size if size is not None else (source_height, source_width)
  crop = CropResize.centre(source_height, source_width, height, width)
  offset = np.array([crop.left, crop.top], np.float32)
  query = tracks_lib.grid_points(height, width, grid) / np.float32(crop.scale) + offset
  tracks = track_frames(itertools.chain([first], frames), query, config=config, source=source)
  if num_frames is not None:
    tracks = resample_frames(tracks, num_frames)
  return fit_to_frame(crop.points(tracks.points), tracks.visible, height=height, width=width, source=source)
