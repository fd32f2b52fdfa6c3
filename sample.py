"""Stream a motion-controlled video: `python sample.py --tracks tracks.npy`.

The streaming sampler itself lands with the sampler issue; this entry point already validates its inputs
(the tracks file against the preset's frame size) and the checkpoint, and says clearly what is missing.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sample.py", "Sampler config (file[:preset]).")
_TRACKS = flags.DEFINE_string("tracks", None, "Tracks file: .npy (T,N,2)/(T,N,3)/(1,T,N,2) or .npz (tracks, visibility).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Student checkpoint directory (default: the shipped tiny student).")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv: list[str]) -> None:
  del argv
  from msjax.data import tracks as tracks_lib  # imported late so --help stays fast

  config = _CONFIG.value
  if not _TRACKS.value:
    _fail("--tracks is required (e.g. --tracks examples/drag_one.npy)")
  try:
    tracks = tracks_lib.load_tracks(_TRACKS.value, height=config.video.height, width=config.video.width)
  except tracks_lib.TracksError as e:
    _fail(str(e))
  print(f"tracks: {_TRACKS.value}: {tracks.num_frames} frames x {tracks.num_tracks} points "
        f"({int(tracks.visible.sum())} visible point-frames)")
  checkpoint = _CHECKPOINT.value or config.checkpoint
  if not os.path.isdir(checkpoint):
    print(f"no checkpoint yet: {checkpoint} does not exist. The trained tiny student ships with the distillation "
          "issue; until then there is nothing to sample from.")
    return
  _fail(f"{checkpoint} exists, but the streaming sampler is not part of this build yet")


if __name__ == "__main__":
  app.run(main)
