"""Writes the example tracks files that drive `example_scene()` (the scene `sample.py` starts from).

Each file is float32 (T, N, 3): pixel x, y and visibility, for a `--height` x `--width` clip of `--num_frames`
frames. Every dragged point starts on a sprite of the scene's first frame, and the points of one cluster move
together, the way a user drags an object with the mouse. Run from the repository root:

  python -m examples.make_examples [--num_frames 45] [--out_dir examples]
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

import numpy as np

from msjax.data import sprites
from msjax.data import tracks as tracks_lib

CLUSTER_SIDE = 3  # a dragged sprite carries CLUSTER_SIDE x CLUSTER_SIDE points
CLUSTER_SPACING_FRAC = 0.04  # spacing between them, as a fraction of min(height, width)
RED_CIRCLE, BLUE_SQUARE, YELLOW_TRIANGLE = 0, 1, 2  # sprite indices in `example_scene`
# A builder maps (scene clip, u = t / (T - 1) in [0, 1], frame size (width, height)) to [T, N, 2] points.
Builder = Callable[[sprites.Clip, np.ndarray, np.ndarray], np.ndarray]


def _ease(u: np.ndarray) -> np.ndarray:
  """0 -> 1 with zero speed at both ends, like a hand starting and stopping a drag."""
  return (1 - np.cos(np.pi * u)) / 2


def _on_sprite(clip: sprites.Clip, sprite: int, points: np.ndarray) -> np.ndarray:
  """Checks that [K, 2] first-frame points lie on `sprite`, so the drag grabs that sprite and nothing else."""
  pixel = np.floor(points).astype(np.int64)
  colour = clip.video[0, pixel[:, 1], pixel[:, 0]]
  if not (colour == clip.colors[sprite]).all():
    raise RuntimeError(f"example points {points.tolist()} do not all lie on sprite {sprite} "
                       f"({clip.shapes[sprite]}) in the first frame; the scene is too small for the cluster")
  return points


def _cluster(clip: sprites.Clip, sprite: int, side: int) -> np.ndarray:
  """[side * side, 2] points on a small square lattice around the sprite's first-frame centroid."""
  spacing = CLUSTER_SPACING_FRAC * min(clip.video.shape[1:3])
  offsets = (np.arange(side) - (side - 1) / 2) * spacing
  dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
  points = clip.centroids[0, sprite][None] + np.stack([dx.ravel(), dy.ravel()], axis=-1)
  return _on_sprite(clip, sprite, points)


def _drag(start: np.ndarray, displacement: np.ndarray) -> np.ndarray:
  """[K, 2] start points moved rigidly by [T, 2] displacements -> [T, K, 2]."""
  return start[None] + displacement[:, None]


def _drag_one(clip: sprites.Clip, u: np.ndarray, size: np.ndarray) -> np.ndarray:
  path = np.stack([0.25 * _ease(u), 0.15 * np.sin(np.pi * u)], axis=-1) * size
  return _drag(_cluster(clip, RED_CIRCLE, CLUSTER_SIDE), path)


def _drag_two(clip: sprites.Clip, u: np.ndarray, size: np.ndarray) -> np.ndarray:
  red_path = np.stack([np.zeros_like(u), 0.25 * _ease(u)], axis=-1) * size
  blue_path = np.stack([-0.1 * np.sin(np.pi * u), 0.25 * _ease(u)], axis=-1) * size
  return np.concatenate([_drag(_cluster(clip, RED_CIRCLE, CLUSTER_SIDE), red_path),
                         _drag(_cluster(clip, BLUE_SQUARE, CLUSTER_SIDE), blue_path)], axis=1)


def _circle(clip: sprites.Clip, u: np.ndarray, size: np.ndarray) -> np.ndarray:
  radius = 0.12 * size.min()
  angle = 2 * np.pi * u
  path = radius * np.stack([np.sin(angle), np.cos(angle) - 1], axis=-1)  # one loop, up and back
  return _drag(_cluster(clip, YELLOW_TRIANGLE, CLUSTER_SIDE), path)


def _pin_and_move(clip: sprites.Clip, u: np.ndarray, size: np.ndarray) -> np.ndarray:
  pinned = _cluster(clip, BLUE_SQUARE, 1)
  moving = _cluster(clip, RED_CIRCLE, 1)
  path = np.stack([0.08 * np.sin(2 * np.pi * u), 0.3 * _ease(u)], axis=-1) * size
  return np.concatenate([_drag(pinned, np.zeros_like(path)), _drag(moving, path)], axis=1)


EXAMPLES: dict[str, tuple[str, Builder]] = {  # name -> (description, builder)
    "drag_one": ("the red circle dragged right along an arc", _drag_one),
    "drag_two": ("the red circle and the blue square dragged down together", _drag_two),
    "circle": ("the yellow triangle dragged once around a circle", _circle),
    "pin_and_move": ("the blue square pinned while the red circle is dragged down", _pin_and_move),
}


def make_examples(out_dir: str, config: sprites.SpritesConfig) -> dict[str, tracks_lib.Tracks]:
  """Builds, validates and writes every example; returns them by name."""
  clip = sprites.example_scene(config)
  os.makedirs(out_dir, exist_ok=True)
  u = np.linspace(0.0, 1.0, config.num_frames)
  size = np.array([config.width, config.height], np.float64)
  written = {}
  for name, (description, build) in EXAMPLES.items():
    points = build(clip, u, size).astype(np.float32)
    path = os.path.join(out_dir, f"{name}.npy")
    tracks = tracks_lib.validate_tracks(points, source=path, height=config.height, width=config.width)
    tracks_lib.save_tracks(path, tracks)
    print(f"wrote {path}: (T, N, 3) = {(tracks.num_frames, tracks.num_tracks, 3)}, {description}")
    written[name] = tracks
  return written


def main() -> None:
  defaults = sprites.SpritesConfig()
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_frames", type=int, default=defaults.num_frames, help="1 + 4k frames")
  parser.add_argument("--height", type=int, default=defaults.height)
  parser.add_argument("--width", type=int, default=defaults.width)
  parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
  args = parser.parse_args()
  config = sprites.SpritesConfig(height=args.height, width=args.width, num_frames=args.num_frames)
  print(f"example scene: {sprites.example_scene(config).prompt}")
  make_examples(args.out_dir, config)


if __name__ == "__main__":
  main()
