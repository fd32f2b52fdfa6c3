"""Point tracks: the one in-memory form, the file formats users bring, and the conditioning built from them.

Coordinate convention (shared with `msjax.data.sprites`): a track point is a continuous pixel position (x, y);
pixel (row i, column j) covers [j, j+1) x [i, i+1), so a point lies in pixel (floor(y), floor(x)) and, after
a codec with spatial stride s, in latent cell (floor(y / s), floor(x / s)) (paper Eq. 1). With
config.tracks.splat = "bilinear" a point is instead shared among the four cells whose centres surround it; with
"nearest_offset" it is written into its own cell as in Eq. 1, and two more channels after the embedding hold its
(x, y) offset from that cell's centre in half cells, in [-1, 1), so the position inside a cell survives without
mixing the IDs of neighbouring cells.

Track ID embeddings are transformer-style sinusoids of a random integer ID: the first half of the channels are
sin(id * w_k), the second half cos(id * w_k), with w_k = EMBED_BASE ** (-k / (dim / 2)), k = 0 .. dim/2 - 1.

Rasterisation collision rule: when several visible tracks fall into the same cell of the same frame their
embeddings are SUMMED, so the grid does not depend on track order (up to float rounding) and no track is
silently dropped.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import zipfile
from typing import Any, BinaryIO, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from msjax import config_utils
from msjax import io_utils

EMBED_BASE = 10000.0  # geometric frequency base of the ID embedding (the transformer's)
VISIBLE_THRESHOLD = 0.5  # a visibility value above this counts as visible
XY = 2  # coordinates per point
XYV = 3  # coordinates plus a visibility channel
SUFFIXES = (".npy", ".npz")


class TracksError(ValueError):
  """A tracks file or array that cannot be used; the message names the source, what was expected and found."""


class TracksWarning(UserWarning):
  """Tracks that were usable only after a repair (e.g. points outside the frame hidden and clipped)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Tracks:
  """N point tracks over T frames: `points` float32 [T, N, 2] pixel (x, y), `visible` bool [T, N]."""
  points: np.ndarray
  visible: np.ndarray

  def __post_init__(self):
    chex.assert_rank(self.points, 3)
    chex.assert_axis_dimension(self.points, 2, XY)
    chex.assert_shape(self.visible, self.points.shape[:2])
    chex.assert_type(self.points, np.float32)
    chex.assert_type(self.visible, bool)

  @property
  def num_frames(self) -> int:
    return self.points.shape[0]

  @property
  def num_tracks(self) -> int:
    return self.points.shape[1]


# ----------------------------------------------------------------------------------------------------------
# Reading, validating and writing.


def _squeeze_batch(array: np.ndarray, rank: int, what: str, source: str) -> np.ndarray:
  """Accepts CoTracker's leading batch axis of size 1 and drops it."""
  if array.ndim == rank + 1:
    if array.shape[0] != 1:
      raise TracksError(f"{source}: {what} has shape {array.shape}; a leading batch axis must have size 1 "
                        f"(one video), found {array.shape[0]}")
    return array[0]
  return array


def _check_numeric(array: np.ndarray, what: str, source: str) -> None:
  """Integers and floats are accepted; bool, complex, strings and objects are not coordinates."""
  if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
    raise TracksError(f"{source}: {what} must hold real numbers (float or int), found dtype {array.dtype}")


def _check_finite(array: np.ndarray, what: str, source: str) -> None:
  bad = ~np.isfinite(array)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise TracksError(f"{source}: {what} must be finite, found {int(bad.sum())} NaN/inf values "
                      f"(first at index {first})")


def validate_tracks(points: Any, visible: Any = None, *, source: str = "<array>", height: int | None = None,
                    width: int | None = None) -> Tracks:
  """Checks and normalises raw track arrays into `Tracks`.

  `points` is (T, N, 2), (T, N, 3) with a visibility channel (> 0.5 = visible), or either with a leading batch
  axis of size 1 (CoTracker's layout). `visible` is an optional separate (T, N) / (1, T, N) visibility. When
  `height` and `width` are given, points outside the frame are hidden for those frames and clipped onto the
  border, with one warning that counts them, so downstream indexing can never go out of range.
  """
  if (height is None) != (width is None):
    raise ValueError(f"give both height and width to check the frame, or neither; got {height=}, {width=}")
  points = np.asarray(points)
  _check_numeric(points, "tracks", source)
  points = _squeeze_batch(points, 3, "tracks", source)
  if points.ndim != 3 or points.shape[-1] not in (XY, XYV):
    raise TracksError(f"{source}: tracks must have shape (T, N, 2) or (T, N, 3) (optionally with a leading "
                      f"batch axis of 1), found {points.shape}")
  num_frames, num_tracks = points.shape[:2]
  if num_frames == 0 or num_tracks == 0:
    raise TracksError(f"{source}: tracks must have at least one frame and one track, found T={num_frames}, "
                      f"N={num_tracks}")
  _check_finite(points, "tracks", source)

  channel_visible = points[..., XY] if points.shape[-1] == XYV else None
  if visible is not None and channel_visible is not None:
    raise TracksError(f"{source}: visibility given twice (a third tracks channel and a separate visibility "
                      f"array); expected one of them")
  if visible is not None:
    visible = np.asarray(visible)
    if visible.dtype != bool:
      _check_numeric(visible, "visibility", source)
    visible = _squeeze_batch(visible, 2, "visibility", source)
    if visible.shape != (num_frames, num_tracks):
      raise TracksError(f"{source}: visibility must have shape (T, N) = {(num_frames, num_tracks)} to match "
                        f"tracks, found {visible.shape}")
  else:
    visible = channel_visible
  if visible is None:
    visible = np.ones((num_frames, num_tracks), bool)
  elif visible.dtype != bool:
    _check_finite(visible, "visibility", source)
    visible = visible > VISIBLE_THRESHOLD

  xy = points[..., :XY].astype(np.float32)
  visible = visible.copy()
  if height is not None:
    xy, visible = _hide_out_of_frame(xy, visible, height=height, width=width, source=source)
  return Tracks(points=xy, visible=visible)


def _hide_out_of_frame(xy: np.ndarray, visible: np.ndarray, *, height: int, width: int,
                       source: str) -> tuple[np.ndarray, np.ndarray]:
  """Hides points outside [0, width) x [0, height) and clips them just inside, warning once."""
  size = np.array([width, height], np.float32)
  outside = ((xy < 0) | (xy >= size)).any(axis=-1)
  if not outside.any():
    return xy, visible
  largest_inside = np.nextafter(size, np.float32(0))
  xy = np.clip(xy, 0, largest_inside).astype(np.float32)
  visible = visible & ~outside
  warnings.warn(
      f"{source}: {int(outside.sum())} of {outside.size} track points ({int(outside.any(axis=0).sum())} tracks, "
      f"{int(outside.any(axis=1).sum())} frames) lie outside the {height}x{width} frame; they are hidden and "
      f"clipped to the border", TracksWarning, stacklevel=3)
  return xy, visible


def load_tracks(path: str | os.PathLike, *, height: int | None = None, width: int | None = None) -> Tracks:
  """Reads a `.npy` or `.npz` tracks file (formats in `validate_tracks`; `.npz` keys `tracks`, `visibility`).

  Give the frame's `height` and `width` to hide and clip points outside it (with a warning).
  """
  source = os.fspath(path)
  suffix = os.path.splitext(source)[1].lower()
  if suffix not in SUFFIXES:
    raise TracksError(f"{source}: expected a {' or '.join(SUFFIXES)} tracks file, found suffix {suffix!r}")
  if not os.path.exists(source):
    raise TracksError(f"{source}: tracks file not found")
  if not os.path.isfile(source):
    raise TracksError(f"{source}: expected a tracks file, found a directory or special file")
  visible = None
  try:
    if suffix == ".npy":
      points = np.load(source, allow_pickle=False)
    else:
      with np.load(source, allow_pickle=False) as archive:
        if "tracks" not in archive.files:
          raise TracksError(f"{source}: expected a 'tracks' array in the .npz, found keys {sorted(archive.files)}")
        points = archive["tracks"]
        visible = archive["visibility"] if "visibility" in archive.files else None
  except TracksError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise TracksError(f"{source}: could not read as a {suffix} array ({type(e).__name__}: {e})") from e
  return validate_tracks(points, visible, source=source, height=height, width=width)


def _atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
  try:
    io_utils.atomic_write(path, write)
  except FileNotFoundError as e:
    raise TracksError(str(e)) from e


def save_tracks(path: str | os.PathLike, tracks: Tracks) -> None:
  """Writes `.npy` as float32 (T, N, 3) with visibility as the 3rd channel, or `.npz` with tracks + visibility."""
  target = os.fspath(path)
  suffix = os.path.splitext(target)[1].lower()
  if suffix == ".npy":
    packed = np.concatenate([tracks.points, tracks.visible[..., None].astype(np.float32)], axis=-1)
    _atomic_write(target, lambda f: np.save(f, packed, allow_pickle=False))
  elif suffix == ".npz":
    _atomic_write(target, lambda f: np.savez(f, tracks=tracks.points, visibility=tracks.visible))
  else:
    raise TracksError(f"{target}: expected a {' or '.join(SUFFIXES)} path to save tracks, found suffix {suffix!r}")


# ----------------------------------------------------------------------------------------------------------
# Query points, sampling and IDs.


def grid_points(height: int, width: int, grid: int) -> np.ndarray:
  """[grid * grid, 2] (x, y) cell centres of a grid x grid lattice over the frame, row-major (y outer)."""
  xs = (np.arange(grid, dtype=np.float32) + 0.5) * np.float32(width / grid)
  ys = (np.arange(grid, dtype=np.float32) + 0.5) * np.float32(height / grid)
  y, x = np.meshgrid(ys, xs, indexing="ij")
  return np.stack([x.ravel(), y.ravel()], axis=-1)


def sample_track_subset(rng: np.random.Generator, num_tracks: int, min_tracks: int, max_tracks: int) -> np.ndarray:
  """Sorted indices of a random subset whose size is uniform in [min_tracks, max_tracks], capped at num_tracks."""
  if not 0 <= min_tracks <= max_tracks:
    raise ValueError(f"need 0 <= min_tracks <= max_tracks, got min_tracks={min_tracks}, max_tracks={max_tracks}")
  count = min(int(rng.integers(min_tracks, max_tracks + 1)), num_tracks)
  return np.sort(rng.choice(num_tracks, size=count, replace=False))


def random_track_ids(rng: np.random.Generator, num: int, max_id: int) -> np.ndarray:
  """`num` distinct int32 IDs drawn uniformly from [0, max_id)."""
  if num > max_id:
    raise ValueError(f"cannot draw {num} distinct track IDs from [0, {max_id})")
  return rng.choice(max_id, size=num, replace=False).astype(np.int32)


def track_embeddings(ids: np.ndarray, dim: int = 64) -> np.ndarray:
  """[N] integer IDs -> [N, dim] float32 sinusoidal embeddings (formula in the module docstring)."""
  ids = np.asarray(ids)
  chex.assert_rank(ids, 1)
  if not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f"track IDs must be integers, got dtype {ids.dtype}")
  if dim <= 0 or dim % 2:
    raise ValueError(f"embedding dim must be a positive even number, got {dim}")
  half = dim // 2
  frequencies = EMBED_BASE ** (-np.arange(half, dtype=np.float64) / half)
  angles = ids.astype(np.float64)[:, None] * frequencies[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


def shuffle_later_ids(points: np.ndarray, visible: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[T, N, 2] points and [T, N] visibility whose frames after the first are those of the tracks in `order` (a
  permutation of the N tracks). Rasterised with the same embeddings, every ID sits on its own point in frame 0
  and on another point later, while the positions and the set of IDs of every frame stay as they were: the
  ablation that shows whether a model follows points by their IDs (paper Eq. 1) or only reads where they are.
  """
  chex.assert_rank([points, visible], [3, 2])
  num_tracks = visible.shape[1]
  if sorted(np.asarray(order).tolist()) != list(range(num_tracks)):
    raise ValueError(f"order must be a permutation of the {num_tracks} tracks (each index once), got "
                     f"{len(order)} entries with {len(set(np.asarray(order).tolist()))} distinct")
  return (np.concatenate([points[:1], points[1:, order]]), np.concatenate([visible[:1], visible[1:, order]]))


def latent_frame_means(points: np.ndarray, temporal_stride: int) -> np.ndarray:
  """[T, N, 2] points with each latent frame's pixel frames (frame 0 alone, then `temporal_stride` each) all at
  their mean place. Rasterised, these tracks say where each point is per latent frame but not how it moves
  within one: the ablation that shows whether a model reads that motion from the tracks."""
  chex.assert_rank(points, 3)
  if temporal_stride < 1 or (points.shape[0] - 1) % temporal_stride:
    raise ValueError(f"{points.shape[0]} frames do not split into frame 0 and latent frames of {temporal_stride}")
  later = points[1:].reshape(-1, temporal_stride, *points.shape[1:])
  means = np.broadcast_to(later.mean(axis=1, keepdims=True), later.shape).reshape(points[1:].shape)
  return np.concatenate([points[:1], means]).astype(points.dtype)


# ----------------------------------------------------------------------------------------------------------
# Rasterisation (paper Eq. 1).


def _check_raster_args(points, visible, embeddings, height: int, width: int, stride: int) -> tuple[int, int]:
  chex.assert_rank([points, visible, embeddings], [3, 2, 2])
  chex.assert_axis_dimension(points, 2, XY)
  chex.assert_shape(visible, points.shape[:2])
  chex.assert_axis_dimension(embeddings, 0, points.shape[1])
  if stride <= 0 or height % stride or width % stride:
    raise ValueError(f"frame {height}x{width} must be divisible by the positive stride, got stride {stride}")
  return height // stride, width // stride


def _splat_corners(xp, points, visible, cells_high: int, cells_wide: int, stride: int, splat: str):
  """Where each point is written: flat (frame, row, column) cells, weights and keep masks, each [K, T, N], and
  the channels written after the embedding, [K, T, N, E].

  nearest: K = 1, the cell holding the point, weight 1, E = 0. bilinear: K = 4, the cells whose centres surround
  the point, with bilinear weights (a point on a cell centre puts all its weight there), E = 0. nearest_offset:
  nearest's cell and weight, E = 2, the point's offset from the cell centre in half cells. Only visible points
  inside the frame count, and corners outside the grid are dropped. `xp` is numpy or jax.numpy, so the numpy and
  jax rasterisers share these exact maths.
  """
  if splat not in config_utils.TRACK_SPLATS:
    raise ValueError(f"splat must be one of {config_utils.TRACK_SPLATS}, got {splat!r}")
  num_frames = points.shape[0]
  x, y = points[..., 0] / stride, points[..., 1] / stride  # in cells
  # Clipping to one cell beyond each edge keeps far-away points out of the grid without int32 overflow.
  column = xp.clip(xp.floor(x), -1, cells_wide).astype(xp.int32)
  row = xp.clip(xp.floor(y), -1, cells_high).astype(xp.int32)
  on_grid = lambda r, c: (c >= 0) & (c < cells_wide) & (r >= 0) & (r < cells_high)
  in_frame = visible & on_grid(row, column)
  num_extra = config_utils.track_offset_channels(splat)
  extra = xp.zeros(row.shape + (num_extra,), xp.float32)
  if splat in ("nearest", "nearest_offset"):
    corners = [(row, column, xp.ones(row.shape, xp.float32))]
    if num_extra:
      offset = xp.stack([2 * (x - column) - 1, 2 * (y - row) - 1], axis=-1).astype(xp.float32)
      extra = xp.where(in_frame[..., None], offset, 0.0).astype(xp.float32)
  else:
    x, y = xp.clip(x, -1, cells_wide) - 0.5, xp.clip(y, -1, cells_high) - 0.5  # relative to cell centres
    left, top = xp.floor(x), xp.floor(y)
    fx, fy = (x - left).astype(xp.float32), (y - top).astype(xp.float32)
    left, top = left.astype(xp.int32), top.astype(xp.int32)
    corners = [(top + dy, left + dx, wy * wx) for dy, wy in ((0, 1 - fy), (1, fy)) for dx, wx in ((0, 1 - fx), (1, fx))]
  frame = xp.arange(num_frames, dtype=xp.int32)[:, None]
  flats, weights, keeps = [], [], []
  for r, c, weight in corners:
    flats.append((frame * cells_high + r) * cells_wide + c)
    weights.append(weight)
    keeps.append(in_frame & on_grid(r, c))
  return xp.stack(flats), xp.stack(weights), xp.stack(keeps), xp.stack([extra] * len(corners))


def rasterize(points: np.ndarray, visible: np.ndarray, embeddings: np.ndarray, *, height: int, width: int,
              stride: int, splat: str = "nearest") -> np.ndarray:
  """[T, N, 2] points, [T, N] visibility, [N, D] embeddings -> [T, H/s, W/s, D + E] float32 grid (Eq. 1, summed).

  Points outside the frame contribute nothing; `splat` is config.tracks.splat (see `_splat_corners`), E its
  offset channels (config_utils.track_offset_channels).
  """
  points = np.asarray(points, np.float32)
  visible = np.asarray(visible, bool)
  embeddings = np.asarray(embeddings, np.float32)
  cells_high, cells_wide = _check_raster_args(points, visible, embeddings, height, width, stride)
  num_frames, num_tracks = visible.shape
  flat, weight, keep, extra = _splat_corners(np, points, visible, cells_high, cells_wide, stride, splat)
  track = np.broadcast_to(np.arange(num_tracks), flat.shape)
  values = np.concatenate([embeddings[track[keep]], extra[keep]], axis=-1) * weight[keep][:, None]
  dim = values.shape[1]
  # One scalar scatter-add over (cell, channel) pairs: numpy's 1-D `add.at` is ~3x faster than the row form.
  element = (flat[keep].astype(np.int64)[:, None] * dim + np.arange(dim)).ravel()
  grid = np.zeros(num_frames * cells_high * cells_wide * dim, np.float32)
  np.add.at(grid, element, values.ravel())
  return grid.reshape(num_frames, cells_high, cells_wide, dim)


def rasterize_jax(points: jax.Array, visible: jax.Array, embeddings: jax.Array, *, height: int, width: int,
                  stride: int, splat: str = "nearest") -> jax.Array:
  """The jittable twin of `rasterize` (height, width, stride and splat are static)."""
  points = jnp.asarray(points, jnp.float32)
  visible = jnp.asarray(visible, bool)
  embeddings = jnp.asarray(embeddings, jnp.float32)
  cells_high, cells_wide = _check_raster_args(points, visible, embeddings, height, width, stride)
  num_cells = points.shape[0] * cells_high * cells_wide
  flat, weight, keep, extra = _splat_corners(jnp, points, visible, cells_high, cells_wide, stride, splat)
  index = jnp.where(keep, flat, num_cells).reshape(-1)  # out-of-range rows are dropped by the scatter
  per_point = jnp.concatenate([jnp.broadcast_to(embeddings, extra.shape[:-1] + embeddings.shape[-1:]), extra], -1)
  values = (weight[..., None] * per_point).reshape(-1, per_point.shape[-1])  # [K*T*N, D + E]
  grid = jnp.zeros((num_cells, per_point.shape[-1]), jnp.float32).at[index].add(values, mode="drop")
  return grid.reshape(points.shape[0], cells_high, cells_wide, -1)


# ----------------------------------------------------------------------------------------------------------
# Streaming chunks and mid-chunk masking (paper section 3.3).


def chunk_frame_ranges(num_frames: int, chunk_latent_frames: int, temporal_stride: int) -> list[tuple[int, int]]:
  """Pixel-frame [start, end) of each streaming chunk under the 1 + s*k rule.

  Chunk 0 holds latent frame 0 (pixel frame 0 alone) plus c-1 latent frames, i.e. frames [0, 1 + s*(c-1));
  every later chunk holds s*c frames. When the latent frame count is not a multiple of c (e.g. Wan 2.2's 31),
  the last chunk is shorter.
  """
  if chunk_latent_frames <= 0:
    raise ValueError(f"chunk_latent_frames must be positive, got {chunk_latent_frames}")
  num_latent = config_utils.latent_frames(num_frames, temporal_stride)
  ranges = []
  for first_latent in range(0, num_latent, chunk_latent_frames):
    last_latent = min(first_latent + chunk_latent_frames, num_latent)  # exclusive
    start = 0 if first_latent == 0 else config_utils.video_frames(first_latent, temporal_stride)
    ranges.append((start, config_utils.video_frames(last_latent, temporal_stride)))
  return ranges


def mask_mid_chunks(grid: np.ndarray, rng: np.random.Generator, *, chunk_latent_frames: int, temporal_stride: int,
                    prob: float) -> tuple[np.ndarray, np.ndarray]:
  """Zeroes every chunk after the first, each independently with probability `prob`, over its pixel frames.

  `grid` is any array whose leading axis is pixel frames (a track grid, or visibility before rasterising).
  Chunk 0 is never masked: it carries the start of the motion. Returns (a masked copy, bool [num_chunks]).
  """
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"mask probability must be in [0, 1], got {prob}")
  ranges = chunk_frame_ranges(grid.shape[0], chunk_latent_frames, temporal_stride)
  masked = np.zeros(len(ranges), bool)
  masked[1:] = rng.random(len(ranges) - 1) < prob
  out = np.array(grid, copy=True)
  for (start, end), is_masked in zip(ranges, masked):
    if is_masked:
      out[start:end] = 0
  return out, masked
