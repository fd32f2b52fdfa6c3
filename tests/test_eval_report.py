"""Evaluation reports (strict JSON, the sample grid as GIF / mp4) and the `python -m msjax.eval` CLI."""

import json
import math
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest

from configs import models
from msjax import io_utils
from msjax.eval import report
from msjax.eval import sprites_eval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_FRAMES = 9  # short clips keep the report tests fast
SCALE = 2


def _strict_json(path: str):
  def refuse(constant):
    raise AssertionError(f"non-standard JSON constant {constant}")

  with open(path) as f:
    return json.load(f, parse_constant=refuse)


@pytest.fixture(scope="module")
def result():
  seeds = sprites_eval.eval_seeds(3)
  return sprites_eval.evaluate(sprites_eval.first_frame_generator, seeds=seeds, config=models.tiny(),
                               num_frames=NUM_FRAMES, num_samples=2)


def test_json_is_strict_and_leaves_out_the_videos(tmp_path, result):
  path = str(tmp_path / "r.json")
  report.write_json(path, result)
  loaded = _strict_json(path)
  assert "samples" not in loaded
  assert loaded["seeds"] == result["seeds"]
  clips = loaded["results"]["generator"]["clips"]
  for clip, original in zip(clips, result["results"]["generator"]["clips"]):
    if math.isnan(original["metrics"]["effect_adherence"]):
      assert clip["metrics"]["effect_adherence"] is None  # NaN becomes null
  assert loaded["results"]["true_video"]["aggregate"]["epe"]["mean"] < 0.5
  assert os.listdir(tmp_path) == ["r.json"]  # no temporary file left behind


def test_json_ready_converts_numpy_and_non_finite():
  converted = report.json_ready({"a": np.float32(1.5), "b": np.arange(3), "c": [math.inf, np.int64(2)],
                                 "samples": ["dropped"]})
  assert converted == {"a": 1.5, "b": [0, 1, 2], "c": [None, 2]}


def test_report_writes_a_gif_with_every_frame(tmp_path, result):
  written = report.write_report(str(tmp_path), result, fps=16, scale=SCALE)
  assert set(written) >= {"json", "gif"}
  frames = iio.imread(written["gif"], index=None)
  samples = result["samples"]
  height, width = samples[0].true_video.shape[1:3]
  columns = len(report.GRID_COLUMNS)
  assert frames.shape == (NUM_FRAMES, len(samples) * (SCALE * height + 1) - 1, columns * (SCALE * width + 1) - 1, 3)
  assert _strict_json(written["json"])["grid"]["seeds"] == [s.seed for s in samples]
  if io_utils.mp4_available():
    assert sum(1 for _ in iio.imiter(written["mp4"])) == NUM_FRAMES


def test_grid_cells_and_track_dots(result):
  sample = result["samples"][0]
  plain = report.grid_video([sample], scale=1, draw_tracks=False)
  height, width = sample.true_video.shape[1:3]
  np.testing.assert_array_equal(plain[:, :, :width], sample.true_video)
  np.testing.assert_array_equal(plain[:, :, width + 1:2 * width + 1], sample.generated)
  dotted = report.grid_video([sample], scale=1, draw_tracks=True)
  changed = np.any(dotted != plain, axis=-1)[:, :, :width]  # [T, H, W] in the true column
  tracks = sample.tracks
  moving = np.any(tracks.points != tracks.points[:1], axis=(0, 2))
  assert moving.any() and not moving.all()
  # Every changed pixel holds a visible moving track point; static tracks are not drawn.
  time, rows, cols = np.nonzero(changed)
  pixel = np.floor(tracks.points).astype(int)
  drawn = tracks.visible & moving[None]
  for t, r, c in zip(time, rows, cols):
    assert np.any(drawn[t] & (pixel[t, :, 0] == c) & (pixel[t, :, 1] == r))
  assert changed[0].sum() == len({tuple(p) for p in pixel[0][drawn[0]]})


def test_write_video_rejects_unknown_suffix(tmp_path):
  with pytest.raises(ValueError, match=r"x\.avi: expected a video suffix"):
    io_utils.write_video(str(tmp_path / "x.avi"), np.zeros((2, 8, 8, 3), np.uint8), fps=8)


def test_summary_table_lists_every_generator(result):
  table = report.format_summary(result)
  assert all(name in table for name in ("generator", "first_frame", "true_video"))
  by_sprites = table.split("by sprites per clip:")[1]
  for name in ("generator", "first_frame", "true_video"):
    for count, group in result["results"][name]["by_num_sprites"].items():
      assert f"{name}, {count} sprite" in by_sprites and f"({group['clips']} clips)" in by_sprites
  lead = table.split("lead along the true motion")[1]
  assert "place 1" in lead and "place 4" in lead and "place 5" not in lead


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "msjax.eval", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)


def test_cli_runs_the_true_video_generator(tmp_path):
  out = tmp_path / "eval"
  run = _cli("--generator", "true_video", "--num_clips", "3", "--num_frames", str(NUM_FRAMES), "--num_samples",
             "2", "--out", str(out))
  assert run.returncode == 0, run.stderr
  loaded = _strict_json(str(out / report.REPORT_JSON))
  assert loaded["generator_name"] == "true_video" and len(loaded["seeds"]) == 3
  assert loaded["track_condition"] == "given"
  assert loaded["results"]["generator"]["aggregate"]["epe"]["mean"] < 0.5
  assert loaded["results"]["first_frame"]["aggregate"]["epe"]["mean"] > 0.5
  assert iio.imread(str(out / report.GRID_GIF), index=None).shape[0] == NUM_FRAMES
  assert "true_video" in run.stdout


def test_cli_sample_seeds_report_each_run_and_their_spread(tmp_path):
  out = tmp_path / "eval"
  run = _cli("--generator", "true_video", "--num_clips", "2", "--num_frames", str(NUM_FRAMES), "--num_samples",
             "0", "--sample_seeds", "3,5", "--out", str(out), "--config", "configs/teacher_ids.py")
  assert run.returncode == 0, run.stderr
  loaded = _strict_json(str(out / report.REPORT_JSON))
  assert loaded["sample_seeds"] == [3, 5]
  assert set(loaded["results"]) == {"generator", "generator_seed5", "first_frame", "true_video"}
  psnr = loaded["across_sample_seeds"]["psnr"]
  assert psnr["per_seed"][0] == psnr["per_seed"][1] == psnr["mean"] and psnr["std"] == 0.0  # the oracle ignores it
  assert "over sample seeds [3, 5]" in run.stdout
  assert "sprite_motion is 'mixed'" in run.stdout  # the recipe's training world is not the targets' world
  refused = _cli("--generator", "true_video", "--num_clips", "2", "--sample_seeds", "1,1", "--out", str(tmp_path / "x"))
  assert refused.returncode == 2 and "distinct" in refused.stderr and "Traceback" not in refused.stderr


def test_cli_refuses_training_seeds(tmp_path):
  run = _cli("--generator", "first_frame", "--num_clips", "2", "--seed_start", "0", "--out", str(tmp_path))
  assert run.returncode == 2
  assert "held out" in run.stderr and "Traceback" not in run.stderr
  assert not os.listdir(tmp_path)
