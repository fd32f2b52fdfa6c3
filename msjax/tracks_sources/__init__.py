"""Where tracks come from when the user does not bring a tracks file (paper section 2.5).

  camera           a camera path (preset or per-frame poses) over a depth map: first-frame grid points are
                   lifted to 3-D and reprojected into every frame (camera control, paper section 7.2).
  motion_transfer  the motion of a source video, followed by OpenCV's pyramidal Lucas-Kanade tracker.
  __main__         the command line: `python -m msjax.tracks_sources {camera,transfer} ... --out tracks.npy`.

Every source returns `msjax.data.tracks.Tracks` in the shared pixel convention (pixel j covers [j, j+1)) and
follows tracks.py's rule for points that leave the frame: hidden for those frames, coordinates clipped just
inside the border.
"""

from __future__ import annotations

import warnings

import numpy as np

from msjax.data import tracks as tracks_lib


class TrackSourceError(ValueError):
  """An input of a track source (depth map, pose file, video) that cannot be used; names the file and why."""


class TrackSourceWarning(UserWarning):
  """An input that was usable after an adjustment the user should know about (e.g. a resized depth map)."""


def fit_to_frame(points: np.ndarray, visible: np.ndarray, *, height: int, width: int, source: str) -> tracks_lib.Tracks:
  """Validates raw tracks and hides/clips points outside the frame by tracks.py's rule.

  Leaving the frame is the expected outcome of a camera move or of a tracked object exiting, so tracks.py's
  warning about it is silenced here rather than shown to the user on every run.
  """
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", tracks_lib.TracksWarning)
    return tracks_lib.validate_tracks(points, visible, source=source, height=height, width=width)
