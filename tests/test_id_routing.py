"""The ID-routing probe (msjax.bench.id_routing): its tile world and its short training run."""

import math

import numpy as np
import pytest

from msjax.bench import id_routing
from msjax.data import pipeline


def _colours_under_points(clip, frame):
  points = clip[pipeline.TRACK_POINTS][frame].astype(int)
  return clip[pipeline.VIDEO][frame][points[:, 1], points[:, 0]]


@pytest.mark.parametrize("tiles", id_routing.TILE_MODES)
def test_every_track_stays_on_its_tile(tiles):
  config = id_routing.probe_config(track_input_scale=1.0, batch_size=2, learning_rate=5e-4, seed=0)
  clip = id_routing.tile_clip(np.random.default_rng(3), config, tiles)
  video, points = clip[pipeline.VIDEO], clip[pipeline.TRACK_POINTS]
  assert video.shape == (config.video.num_frames, config.video.height, config.video.width, 3)
  assert points.shape == (config.video.num_frames, config.tracks.grid ** 2, 2)
  assert clip[pipeline.TRACK_VISIBLE].all()
  for frame in range(1, config.video.num_frames):
    np.testing.assert_array_equal(_colours_under_points(clip, frame), _colours_under_points(clip, 0))
    np.testing.assert_array_equal(video[frame], video[1])
  moved = np.linalg.norm(points[1] - points[0], axis=-1) > 0
  if tiles == "identity":
    assert not moved.any()
    np.testing.assert_array_equal(video[1], video[0])
  else:
    assert moved.mean() > 0.9  # a random permutation of 64 tiles leaves about one in place
  # Every latent cell still holds exactly one point after the shuffle: positions alone say nothing.
  cell = config.codec.spatial_stride
  occupied = {tuple(p) for p in (points[1] // cell).astype(int).tolist()}
  assert len(occupied) == config.tracks.grid ** 2


def test_a_short_run_reports_the_three_losses():
  config = id_routing.probe_config(track_input_scale=32.0, batch_size=2, learning_rate=5e-4, seed=0)
  rows = id_routing.run(config, "shuffled", steps=1, eval_every=1, eval_clips=2)
  assert [row["step"] for row in rows] == [0, 1]
  for row in rows:
    assert all(math.isfinite(row[name]) for name in ("given", "shuffled_ids", "relabelled_ids"))


@pytest.mark.slow
def test_scaled_ids_are_followed_within_500_steps():
  """With model.track_input_scale = 32 the tiny teacher learns to fetch each tile by its IDs (README)."""
  config = id_routing.probe_config(track_input_scale=32.0, batch_size=16, learning_rate=5e-4, seed=0)
  last = id_routing.run(config, "shuffled", steps=500, eval_every=500, eval_clips=32)[-1]
  assert last["shuffled_ids"] > 3 * last["given"]
  assert last["relabelled_ids"] < 1.5 * last["given"]
