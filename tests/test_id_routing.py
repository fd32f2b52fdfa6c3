"""The ID-routing probe (msjax.bench.id_routing): its tile world and its short training run."""

import math

import jax
import numpy as np
import pytest

from configs import teacher as teacher_config_lib
from msjax.bench import id_routing
from msjax.data import pipeline
from msjax.models import dit
from msjax.models import text as text_lib
from msjax.train import teacher


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


def test_a_short_run_reports_the_three_losses_and_saves_params_a_teacher_can_start_from(tmp_path):
  config = id_routing.probe_config(track_input_scale=32.0, batch_size=2, learning_rate=5e-4, seed=0)
  config.optim.warmup_steps = 0  # so both steps move the params (the first reaches only the zero-initialised head)
  saved = tmp_path / "tiles_params"
  rows = id_routing.run(config, "shuffled", steps=2, eval_every=1, eval_clips=2, save_params=str(saved))
  assert [row["step"] for row in rows] == [0, 1, 2]
  for row in rows:
    assert all(math.isfinite(row[name]) for name in ("given", "shuffled_ids", "relabelled_ids"))
  # What --save_params writes is what a teacher run's init_checkpoint reads, and it is the trained model: the
  # run's own initialisation (same seed) moved by its steps.
  teacher_config = teacher_config_lib.get_config("tiny")
  model = dit.WanDiT(dit.DiTSpec.from_config(teacher_config))
  text_encoder = text_lib.make_text_encoder(teacher_config)
  params_key, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  initial = teacher.init_params(teacher_config, model, text_encoder, params_key)[teacher.DIT_PARAMS]
  loaded = teacher.load_dit_checkpoint(str(saved), initial)
  leaves = zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(initial))
  moved = [not np.allclose(a, b) for a, b in leaves]
  assert np.mean(moved) > 0.5
  with pytest.raises(FileExistsError, match="tiles_params"):
    id_routing.run(config, "shuffled", steps=1, eval_every=1, eval_clips=2, save_params=str(saved))


@pytest.mark.slow
def test_scaled_ids_are_followed_within_500_steps():
  """With model.track_input_scale = 32 the tiny teacher learns to fetch each tile by its IDs (docs/teacher_ids.md)."""
  config = id_routing.probe_config(track_input_scale=32.0, batch_size=16, learning_rate=5e-4, seed=0)
  last = id_routing.run(config, "shuffled", steps=500, eval_every=500, eval_clips=32)[-1]
  assert last["shuffled_ids"] > 3 * last["given"]
  assert last["relabelled_ids"] < 1.5 * last["given"]
