"""`python -m msjax.tracks_sources {camera,transfer} ... --out tracks.npy`: tracks for sampling without a tracker.

  camera    tracks of a camera move (a preset or a pose file) over a depth map, or over a plane without one:
              python -m msjax.tracks_sources camera --preset pan --amount 0.3 --frames 45 --size 64x64 \\
                  [--depth depth.npy] --out tracks.npy
  transfer  tracks that follow the motion of a video:
              python -m msjax.tracks_sources transfer --video clip.mp4 --grid 16 [--size 64x64 --frames 45] \\
                  --out tracks.npy

Output is written atomically by `msjax.data.tracks.save_tracks` (`.npy`: [T, N, 3] x, y, visibility; or `.npz`).
A bad input file ends the run with exit code 1 and one line naming the file; nothing is written then.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

import numpy as np

from msjax.data import tracks as tracks_lib
from msjax.tracks_sources import TrackSourceWarning, camera, motion_transfer

PAPER_GRID = 50  # the paper tracks a 50 x 50 first-frame grid (section 2.1)
SIZE_SEPARATOR = "x"


def parse_size(text: str) -> tuple[int, int]:
  """'HEIGHTxWIDTH' (e.g. '480x832') -> (height, width)."""
  parts = text.lower().split(SIZE_SEPARATOR)
  try:
    height, width = (int(part) for part in parts)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels such as 480x832, found {text!r}") from None
  if height <= 0 or width <= 0:
    raise argparse.ArgumentTypeError(f"height and width must be positive, found {text!r}")
  return height, width


def _add_common(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--grid", type=int, default=PAPER_GRID,
                      help=f"track a GRID x GRID lattice of first-frame points (default {PAPER_GRID}, the paper's)")
  parser.add_argument("--out", required=True, help="tracks file to write: .npy ([T, N, 3] x, y, visible) or .npz")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m msjax.tracks_sources", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sources = parser.add_subparsers(dest="source", required=True)

  cam = sources.add_parser("camera", help="tracks of a camera move over a depth map",
                           description=camera.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  path = cam.add_mutually_exclusive_group(required=True)
  path.add_argument("--preset", choices=camera.PRESETS, help="named camera move (see the table above)")
  path.add_argument("--poses", help=".npy of [T, 4, 4] or [T, 3, 4] camera-to-world poses, OpenCV axes")
  cam.add_argument("--amount", type=float, default=0.25, help="size of the preset's move (see the table above)")
  cam.add_argument("--easing", choices=tuple(camera.EASINGS), default="linear", help="pace of the preset's move")
  cam.add_argument("--frames", type=int, help="number of frames (required with --preset; --poses fixes it)")
  cam.add_argument("--size", type=parse_size, required=True, help="frame size HEIGHTxWIDTH, e.g. 480x832")
  cam.add_argument("--depth", help="depth map: .npy H x W float, or 16-bit .png (see --png-scale); "
                                   "without it the scene is a fronto-parallel plane")
  cam.add_argument("--png-scale", type=float, default=camera.PNG_DEPTH_SCALE,
                   help=f"depth units per 16-bit PNG step (default {camera.PNG_DEPTH_SCALE}: millimetres)")
  cam.add_argument("--fov", type=float, default=camera.DEFAULT_FOV_DEGREES,
                   help=f"horizontal field of view in degrees (default {camera.DEFAULT_FOV_DEGREES})")
  cam.add_argument("--intrinsics", type=float, nargs=4, metavar=("FX", "FY", "CX", "CY"),
                   help="pinhole intrinsics in pixels of the --size frame (replaces --fov)")
  _add_common(cam)

  transfer = sources.add_parser("transfer", help="tracks that follow the motion of a video",
                                description=motion_transfer.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
  transfer.add_argument("--video", required=True, help="source video: mp4, gif or anything imageio reads")
  transfer.add_argument("--size", type=parse_size, help="fit the tracks to a HEIGHTxWIDTH frame (centre crop)")
  transfer.add_argument("--frames", type=int, help="resample the clip in time to this many frames (1 + s*k)")
  transfer.add_argument("--temporal-stride", type=int, default=4, help="the codec's s in the 1 + s*k rule")
  transfer.add_argument("--max-frames", type=int, help="track only the first MAX_FRAMES frames of the video")
  defaults = motion_transfer.LucasKanadeConfig()
  transfer.add_argument("--window", type=int, default=defaults.window, help="Lucas-Kanade window side, px (odd)")
  transfer.add_argument("--levels", type=int, default=defaults.pyramid_levels, help="Lucas-Kanade pyramid levels")
  transfer.add_argument("--fb-threshold", type=float, default=defaults.fb_threshold,
                        help="forward-backward miss (px) beyond which a point is hidden")
  _add_common(transfer)
  return parser


def _run(args: argparse.Namespace) -> tracks_lib.Tracks:
  if args.source == "camera":
    height, width = args.size
    if args.intrinsics is not None:
      fx, fy, cx, cy = args.intrinsics
      intrinsics = camera.Intrinsics(height=height, width=width, fx=fx, fy=fy, cx=cx, cy=cy)
    else:
      intrinsics = camera.Intrinsics.from_fov(height, width, args.fov)
    return camera.camera_tracks(intrinsics, grid=args.grid, preset=args.preset, amount=args.amount,
                                num_frames=args.frames, easing=args.easing, poses_path=args.poses,
                                depth_path=args.depth, png_scale=args.png_scale)
  config = motion_transfer.LucasKanadeConfig(window=args.window, pyramid_levels=args.levels,
                                             fb_threshold=args.fb_threshold)
  return motion_transfer.transfer_tracks(args.video, grid=args.grid, size=args.size, num_frames=args.frames,
                                         temporal_stride=args.temporal_stride, max_frames=args.max_frames,
                                         config=config)


def main(argv: Sequence[str] | None = None) -> int:
  """Parses `argv`, computes the tracks and writes them; returns the exit code (1 for a bad input)."""
  args = build_parser().parse_args(argv)
  try:
    with warnings.catch_warnings(record=True) as caught:  # shown as one line each, after the run
      warnings.simplefilter("always", TrackSourceWarning)
      tracks = _run(args)
      tracks_lib.save_tracks(args.out, tracks)
  except ValueError as e:  # every input check raises a ValueError subclass with a message naming the file
    print(f"error: {e}", file=sys.stderr)
    return 1
  finally:
    for warning in caught:
      print(f"warning: {warning.message}", file=sys.stderr)
  print(f"wrote {args.out}: {tracks.num_frames} frames x {tracks.num_tracks} tracks, "
        f"{100 * float(np.mean(tracks.visible)):.1f}% of points visible")
  return 0


if __name__ == "__main__":
  sys.exit(main())
