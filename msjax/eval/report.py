"""Evaluation reports: a JSON file of every metric and a side-by-side video grid (GIF, plus mp4 when possible).

The grid has one row per sample clip and three columns: true | generated | baseline (the first frame
repeated). Tracks that move are drawn as dots, white on dark pixels and black on light ones, so they show on any
background; static background tracks are left out so they do not cover the frame.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import chex
import numpy as np

from msjax import io_utils
from msjax.data import tracks as tracks_lib
from msjax.eval import sprites_eval

REPORT_JSON = "report.json"
GRID_GIF = "samples.gif"
GRID_MP4 = "samples.mp4"
GRID_COLUMNS = ("true", "generated", "baseline")
SAMPLES_KEY = "samples"  # arrays in an `evaluate` result; not part of the JSON
SEPARATOR_LEVEL = 255  # white lines between grid cells
UINT8_MAX = 255


def json_ready(value: Any) -> Any:
  """Plain-JSON copy of a result: numpy scalars and arrays become Python numbers and lists, NaN/inf null."""
  if isinstance(value, dict):
    return {str(k): json_ready(v) for k, v in value.items() if k != SAMPLES_KEY}
  if isinstance(value, (list, tuple)):
    return [json_ready(v) for v in value]
  if isinstance(value, np.ndarray):
    return json_ready(value.tolist())
  if isinstance(value, (np.integer, np.bool_)):
    return value.item()
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  return value


def write_json(path: str, result: dict[str, Any]) -> None:
  """Writes an `evaluate` result (without its sample videos) atomically as strict JSON."""
  text = json.dumps(json_ready(result), indent=1, allow_nan=False)
  io_utils.atomic_write_bytes(path, (text + "\n").encode())


def _draw_tracks(frames: np.ndarray, tracks: tracks_lib.Tracks, scale: int) -> np.ndarray:
  """Marks each visible point of a moving track with a `scale`-pixel dot, white on dark pixels, else black."""
  chex.assert_axis_dimension(frames, 0, tracks.num_frames)
  _, height, width, _ = frames.shape
  moving = np.any(tracks.points != tracks.points[:1], axis=(0, 2))  # [N]
  time, track = np.nonzero(tracks.visible & moving[None])
  corner = np.floor(tracks.points[time, track]).astype(np.int64) * scale  # (x, y) of the dot's top-left pixel
  offsets = np.arange(scale)
  rows = corner[:, 1, None, None] + offsets[:, None]  # [P, scale, 1]
  cols = corner[:, 0, None, None] + offsets[None, :]  # [P, 1, scale]
  rows, cols = np.broadcast_arrays(rows, cols)
  times = np.broadcast_to(time[:, None, None], rows.shape)
  inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
  index = (times[inside], rows[inside], cols[inside])
  frames = frames.copy()
  dark = frames[index].mean(axis=-1, keepdims=True) < UINT8_MAX / 2
  frames[index] = np.where(dark, UINT8_MAX, 0).astype(np.uint8)
  return frames


def grid_video(samples: Sequence[sprites_eval.Sample], *, scale: int = 2, draw_tracks: bool = True) -> np.ndarray:
  """uint8 [T, rows * (s*H + 1) - 1, 3 * (s*W + 1) - 1, 3]: samples side by side, upscaled by `scale`."""
  if not samples:
    raise ValueError("a sample grid needs at least one sample clip")
  if scale < 1:
    raise ValueError(f"scale must be a positive integer, got {scale}")
  shape = samples[0].true_video.shape
  rows = []
  for sample in samples:
    cells = []
    for video in (sample.true_video, sample.generated, sample.baseline):
      chex.assert_shape(video, shape)
      big = video.repeat(scale, axis=1).repeat(scale, axis=2)
      cells.append(_draw_tracks(big, sample.tracks, scale) if draw_tracks else big)
    rows.append(_join(cells, axis=2))
  return _join(rows, axis=1)


def _join(videos: list[np.ndarray], axis: int) -> np.ndarray:
  """Concatenates [T, H, W, 3] videos along `axis` with one separator line between neighbours."""
  line_shape = list(videos[0].shape)
  line_shape[axis] = 1
  line = np.full(line_shape, SEPARATOR_LEVEL, np.uint8)
  parts = [videos[0]]
  for video in videos[1:]:
    parts += [line, video]
  return np.concatenate(parts, axis=axis)


def write_report(out_dir: str, result: dict[str, Any], *, fps: float, scale: int = 2,
                 draw_tracks: bool = True) -> dict[str, str]:
  """Writes report.json and, when `result` holds samples, samples.gif (and samples.mp4 when possible).

  Returns {kind: path} of what was written.
  """
  os.makedirs(out_dir, exist_ok=True)
  written = {"json": os.path.join(out_dir, REPORT_JSON)}
  samples = result.get(SAMPLES_KEY) or []
  report = dict(result)
  if samples:
    report["grid"] = {"columns": list(GRID_COLUMNS), "seeds": [s.seed for s in samples], "scale": scale,
                      "prompts": [s.prompt for s in samples]}
  write_json(written["json"], report)
  if samples:
    frames = grid_video(samples, scale=scale, draw_tracks=draw_tracks)
    written["gif"] = os.path.join(out_dir, GRID_GIF)
    io_utils.write_video(written["gif"], frames, fps)
    if io_utils.mp4_available():
      written["mp4"] = os.path.join(out_dir, GRID_MP4)
      io_utils.write_video(written["mp4"], frames, fps)
  return written


SUMMARY_METRICS = (("epe", "EPE px"), ("epe_track", "track EPE px"), ("epe_missed_fraction", "missed"),
                   ("psnr", "PSNR dB"), ("ssim", "SSIM"), ("effect_adherence", "effect"),
                   ("drift.psnr.slope", "PSNR slope/frame"), ("fps", "FPS"))


LEAD_PLACE_PREFIX = "lead_by_place."
BY_SPRITES_METRICS = (("epe", "EPE px"), ("epe_missed_fraction", "missed"), ("psnr", "PSNR dB"),
                      ("ssim", "SSIM"))


def _table(rows: list[tuple[str, dict[str, Any]]], columns: tuple[tuple[str, str], ...]) -> list[str]:
  """Right-aligned means of `columns` (metric key, label) for each (row label, {metric: summary}) row."""
  width = max(len(label) for label, _ in rows) + 2
  lines = [" " * width + "".join(f"{label:>18}" for _, label in columns)]
  for label, summaries in rows:
    cells = []
    for key, _ in columns:
      mean = summaries[key]["mean"] if key in summaries else math.nan
      cells.append(f"{mean:>18.3f}" if math.isfinite(mean) else f"{'-':>18}")
    lines.append(f"{label:<{width}}" + "".join(cells))
  return lines


def format_summary(result: dict[str, Any]) -> str:
  """Plain-text tables: the mean of the headline metrics per generator, then per generator and sprite count."""
  results = result["results"]
  lines = _table([(name, results[name]["aggregate"]) for name in results], SUMMARY_METRICS)
  by_sprites = [(f"{name}, {count} sprite{'s' if count != '1' else ''} ({group['clips']} clips)", group)
                for name in results for count, group in results[name].get("by_num_sprites", {}).items()]
  if by_sprites:
    lines += ["", "by sprites per clip:"] + _table(by_sprites, BY_SPRITES_METRICS)
  lead_rows = [(name, results[name]["aggregate"]) for name in results
               if "lead" in results[name]["aggregate"]]
  if lead_rows:
    places = sorted((key for key in lead_rows[0][1] if key.startswith(LEAD_PLACE_PREFIX)),
                    key=lambda key: int(key[len(LEAD_PLACE_PREFIX):]))
    columns = (("lead", "all frames"),) + tuple(
        (key, f"place {key[len(LEAD_PLACE_PREFIX):]}") for key in places)
    lines += ["", "lead along the true motion, px (+ ahead, - behind), by a frame's place in its latent frame:"]
    lines += _table(lead_rows, columns)
  across = result.get("across_sample_seeds")
  if across:
    lines += ["", f"generator over sample seeds {result['sample_seeds']} (mean +- std of the per-seed means):"]
    lines += [f"  {label:<18}{across[key]['mean']:.3f} +- {across[key]['std']:.3f}  (per seed: "
              + ", ".join(f"{v:.3f}" for v in across[key]["per_seed"]) + ")"
              for key, label in SUMMARY_METRICS if key in across]
  return "\n".join(lines)
