"""The demo's live track source: control points the page moves, turned into each chunk's per-frame tracks.

The page grabs, moves and releases points while the stream runs. `LiveTracks` keeps the current state of every
point (position, held or pinned, visible) and, when the sampler asks for the next chunk, interpolates each
point from where it was at the end of the previous chunk to where it is now, so a drag between two chunks
becomes smooth motion over the chunk's frames.

Points live in a fixed number of track slots (`capacity`, the most tracks the model was trained with), and an
empty slot is an invisible track. The sampler draws track IDs from a seed for a fixed track count, so a fixed
slot count keeps every point's ID the same from chunk to chunk, as it was over a training clip.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import threading
from typing import Iterator

import chex
import numpy as np

from msjax.data import tracks as tracks_lib
from msjax.stream import sampler as sampler_lib

GRID_SIDE = 3  # a grid grab moves GRID_SIDE x GRID_SIDE points together
GRID_REGION_FRAC = 1 / 8  # the grid spans this fraction of the frame's shorter side
XY = 2


class LiveTracksError(ValueError):
  """A pointer action that cannot be applied (unknown point, no free track slot); the message says which."""


class PointState(enum.Enum):
  HELD = "held"  # follows the pointer: a moving track
  PINNED = "pinned"  # stays where it was clicked or dropped: a static track


@dataclasses.dataclass
class _Group:
  """Points grabbed together (one, or a grid around the grab point); they share one displacement."""
  slots: np.ndarray  # int [K] track slots
  offsets: np.ndarray  # float32 [K, 2] from the anchor
  anchor: np.ndarray  # float32 [2] where the pointer put the group now
  state: PointState
  moved: bool = False


def grid_offsets(height: int, width: int, spatial_stride: int, side: int = GRID_SIDE) -> np.ndarray:
  """[side * side, 2] offsets of a grid grab around its anchor, row-major.

  The grid spans `GRID_REGION_FRAC` of the shorter side, with at least one codec cell (`spatial_stride` px)
  between points, so each point lands in its own latent cell of the track grid.
  """
  if side < 1:
    raise ValueError(f"grid side must be >= 1, got {side}")
  spacing = 0.0 if side == 1 else max(spatial_stride, GRID_REGION_FRAC * min(height, width) / (side - 1))
  steps = (np.arange(side, dtype=np.float32) - (side - 1) / 2) * np.float32(spacing)
  dy, dx = np.meshgrid(steps, steps, indexing="ij")
  return np.stack([dx.ravel(), dy.ravel()], axis=-1).astype(np.float32)


class LiveTracks:
  """Thread-safe control points: the event loop applies pointer actions, the sampler's thread reads chunks."""

  def __init__(self, *, height: int, width: int, capacity: int, spatial_stride: int):
    if capacity < 1:
      raise ValueError(f"capacity must be >= 1 track slot, got {capacity}")
    self.height, self.width, self.capacity = height, width, capacity
    self.grid_offsets = grid_offsets(height, width, spatial_stride)
    self._lock = threading.Lock()
    self._groups: dict[int, _Group] = {}
    # Per slot: the position now and at the end of the last chunk handed out (where the next chunk starts).
    self._position = np.zeros((capacity, XY), np.float32)
    self._previous = np.zeros((capacity, XY), np.float32)
    self._used = np.zeros(capacity, bool)
    self._seq = -1  # the newest pointer message applied
    self._chunk_seq = -1  # the newest pointer message the last chunk reflects

  # ---- pointer actions (event loop) ------------------------------------------------------------------------

  def grab(self, group_id: int, x: float, y: float, *, grid: bool, seq: int) -> None:
    """A new held point (or grid of points) at (x, y), moving from there."""
    offsets = self.grid_offsets if grid else np.zeros((1, XY), np.float32)
    with self._lock:
      if group_id in self._groups:
        raise LiveTracksError(f"point {group_id} exists already; grab with a new id")
      free = np.flatnonzero(~self._used)
      if len(free) < len(offsets):
        raise LiveTracksError(f"no room for {len(offsets)} more points: all {self.capacity} track slots are in "
                              "use (reset to clear them)")
      slots = free[:len(offsets)]
      anchor = np.array([x, y], np.float32)
      self._groups[group_id] = _Group(slots=slots, offsets=offsets, anchor=anchor, state=PointState.HELD)
      self._used[slots] = True
      self._position[slots] = anchor + offsets
      self._previous[slots] = self._position[slots]  # a new point starts where it was grabbed
      self._seq = max(self._seq, seq)

  def move(self, group_id: int, x: float, y: float, *, seq: int) -> None:
    """The held group's anchor follows the pointer to (x, y)."""
    with self._lock:
      group = self._held(group_id)
      group.anchor = np.array([x, y], np.float32)
      group.moved = True
      self._position[group.slots] = group.anchor + group.offsets
      self._seq = max(self._seq, seq)

  def release(self, group_id: int, *, keep: bool, seq: int) -> None:
    """Lets go: the group stays pinned where it is (always after a click), or its points vanish (`keep` False)."""
    with self._lock:
      group = self._held(group_id)
      if keep or not group.moved:
        group.state = PointState.PINNED
      else:
        self._used[group.slots] = False
        del self._groups[group_id]
      self._seq = max(self._seq, seq)

  def clear(self) -> None:
    """Forgets every point (a reset)."""
    with self._lock:
      self._groups.clear()
      self._used[:] = False

  def _held(self, group_id: int) -> _Group:
    group = self._groups.get(group_id)
    if group is None:
      raise LiveTracksError(f"no point with id {group_id} (grab it first)")
    if group.state is not PointState.HELD:
      raise LiveTracksError(f"point {group_id} is {group.state.value}, not held; grab a new point to move")
    return group

  # ---- reading (sampler thread) ----------------------------------------------------------------------------

  @property
  def chunk_seq(self) -> int:
    """The newest pointer message (its `seq`) that the last chunk handed out follows; -1 before any."""
    with self._lock:
      return self._chunk_seq

  def next_chunk(self, num_frames: int) -> tracks_lib.Tracks:
    """[num_frames, capacity] tracks: each point moves linearly from its last chunk's end to where it is now.

    Frame t of the chunk sits at weight (t + 1) / num_frames, so the last frame reaches the current position
    and the next chunk starts from there. Points outside the frame (a grid dragged over the border) are hidden
    in those frames and clipped onto the border.
    """
    if num_frames < 1:
      raise ValueError(f"a chunk needs >= 1 frame, got {num_frames}")
    with self._lock:
      start, end, visible = self._previous.copy(), self._position.copy(), self._used.copy()
      self._previous = end.copy()
      self._chunk_seq = self._seq
    weight = (np.arange(1, num_frames + 1, dtype=np.float32) / num_frames)[:, None, None]
    points = start[None] + (end - start)[None] * weight
    size = np.array([self.width, self.height], np.float32)
    inside = ((points >= 0) & (points < size)).all(axis=-1)
    points = np.clip(points, 0, np.nextafter(size, np.float32(0))).astype(np.float32)
    tracks = tracks_lib.Tracks(points=points, visible=np.broadcast_to(visible, inside.shape) & inside)
    chex.assert_shape(tracks.points, (num_frames, self.capacity, XY))
    return tracks

  def chunks(self, chunk_frames: int, temporal_stride: int) -> Iterator[tracks_lib.Tracks]:
    """An endless live source for `sampler.stream_chunks`: each chunk's tracks, made when it is asked for."""
    for index in itertools.count():
      start, end = sampler_lib.chunk_span(index, chunk_frames, temporal_stride)
      yield self.next_chunk(end - start)
