"""The grain training pipeline on a small sprites dataset at the `tiny` preset's size."""

import json
import os
import subprocess
import sys
import textwrap

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import models
from msjax import codecs
from msjax import config_utils
from msjax.data import pipeline
from msjax.data import tfds_sprites
from msjax.data import tracks as tracks_lib

N_TRAIN, N_VAL, BATCH = 8, 4, 2
MULTIPROCESS_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def config():
  return models.tiny()


@pytest.fixture(scope="module")
def codec(config):
  return codecs.make_codec(config)


@pytest.fixture(scope="module")
def builder_config(config):
  return tfds_sprites.SpritesBuilderConfig.from_config(config, n_train=N_TRAIN, n_val=N_VAL)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, builder_config):
  tfds.disable_progress_bar()
  path = tmp_path_factory.mktemp("tfds")
  tfds_sprites.Sprites(data_dir=os.fspath(path), config=builder_config).download_and_prepare()
  return path


@pytest.fixture(scope="module")
def train_source(data_dir, builder_config):
  return tfds_sprites.Sprites(data_dir=os.fspath(data_dir), config=builder_config).as_data_source()["train"]


def _pipeline(config, codec, source, seed=0, **kwargs):
  kwargs.setdefault("batch_size", BATCH)
  return pipeline.make_train_pipeline(config, data_source=source, codec=codec, seed=seed, **kwargs)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_host_batch_is_compact_and_the_device_makes_the_model_inputs(config, codec, train_source):
  geom = config_utils.geometry(config)
  iterator = _pipeline(config, codec, train_source)
  batch = next(iterator)
  iterator.close()
  max_tracks, dim = config.tracks.max_tracks, config.tracks.embed_dim
  num_chunks = geom.latent_frames // geom.chunk_frames
  chex.assert_shape(batch[pipeline.VIDEO], (BATCH, geom.num_frames, geom.height, geom.width, 3))
  chex.assert_shape(batch[pipeline.TRACK_POINTS], (BATCH, geom.num_frames, max_tracks, 2))
  chex.assert_shape(batch[pipeline.TRACK_VISIBLE], (BATCH, geom.num_frames, max_tracks))
  chex.assert_shape(batch[pipeline.TRACK_EMBEDDINGS], (BATCH, max_tracks, dim))
  chex.assert_shape(batch["chunk_masked"], (BATCH, num_chunks))
  chex.assert_shape(batch["prompt"], (BATCH,))
  assert batch[pipeline.VIDEO].dtype == np.uint8 and batch[pipeline.TRACK_VISIBLE].dtype == bool
  assert batch["prompt"].dtype.kind == "U" and all(len(str(p)) > 0 for p in batch["prompt"])
  dense_bytes = 4 * (geom.latent_frames * geom.latent_height * geom.latent_width * geom.latent_channels
                     + geom.num_frames * geom.latent_height * geom.latent_width * dim)
  compact_bytes = sum(batch[name].nbytes for name in pipeline.HOST_FIELDS) / BATCH
  assert compact_bytes < dense_bytes / 5

  inputs = pipeline.make_device_inputs(config, codec)({k: v for k, v in batch.items() if k != "prompt"})
  latent = (geom.latent_height, geom.latent_width, geom.latent_channels)
  chex.assert_shape(inputs["latents"], (BATCH, geom.latent_frames, *latent))
  chex.assert_shape(inputs["first_latent"], (BATCH, *latent))
  chex.assert_shape(inputs["track_grid"], (BATCH, geom.num_frames, geom.latent_height, geom.latent_width, dim))
  chex.assert_type([inputs["latents"], inputs["first_latent"], inputs["track_grid"]], np.float32)
  np.testing.assert_array_equal(inputs["first_latent"], inputs["latents"][:, 0])
  np.testing.assert_array_equal(inputs["chunk_masked"], batch["chunk_masked"])  # other fields pass through
  assert not set(pipeline.HOST_FIELDS) & set(inputs)
  for clip in range(BATCH):
    video = pipeline.video_to_unit_range(batch[pipeline.VIDEO][clip])
    np.testing.assert_allclose(codec.decode(None, inputs["latents"][clip][None])[0], video, atol=1e-6)
    expected = tracks_lib.rasterize(batch[pipeline.TRACK_POINTS][clip], batch[pipeline.TRACK_VISIBLE][clip],
                                    batch[pipeline.TRACK_EMBEDDINGS][clip], height=geom.height, width=geom.width,
                                    stride=codec.spatial_stride)
    np.testing.assert_allclose(inputs["track_grid"][clip], expected, atol=1e-6)

  only = pipeline.make_device_inputs(config, codec, keep=("track_grid",))(
      {name: batch[name] for name in pipeline.HOST_FIELDS})
  assert list(only) == ["track_grid"]
  bilinear = config.copy_and_resolve_references()
  bilinear.tracks.splat = "bilinear"
  shared = pipeline.make_device_inputs(bilinear, codec, keep=("track_grid",))(
      {name: batch[name] for name in pipeline.HOST_FIELDS})["track_grid"]
  expected = tracks_lib.rasterize(batch[pipeline.TRACK_POINTS][0], batch[pipeline.TRACK_VISIBLE][0],
                                  batch[pipeline.TRACK_EMBEDDINGS][0], height=geom.height, width=geom.width,
                                  stride=codec.spatial_stride, splat="bilinear")
  np.testing.assert_allclose(shared[0], expected, atol=1e-5)
  assert not np.allclose(shared[0], only["track_grid"][0], atol=1e-3)  # the sprites' points are off-centre
  with pytest.raises(KeyError, match="cannot give"):
    pipeline.make_device_inputs(config, codec, keep=("latents",))(
        {name: batch[name] for name in pipeline.TRACK_FIELDS})


def test_example_transform_draws_a_padded_track_subset(config, codec, train_source):
  example = train_source[0]
  out = pipeline.example_transform(example, config=config, codec=codec, rng=np.random.default_rng(0))
  np.testing.assert_array_equal(out[pipeline.VIDEO], example["video"])
  assert str(out["prompt"]) == example["prompt"].decode()

  # Frame 0 is never masked. Padding rows are hidden and carry no embedding; every real row is one of the
  # clip's tracks (its points) with a unit-per-frequency embedding.
  visible0 = out[pipeline.TRACK_VISIBLE][0]
  norms = np.linalg.norm(out[pipeline.TRACK_EMBEDDINGS], axis=-1)
  real = norms > 0
  assert config.tracks.min_tracks <= real.sum() <= config.tracks.max_tracks
  np.testing.assert_allclose(norms[real], np.sqrt(config.tracks.embed_dim / 2), rtol=1e-5)
  assert not visible0[~real].any()
  assert not out[pipeline.TRACK_POINTS][:, ~real].any()
  points = out[pipeline.TRACK_POINTS][:, real]
  matches = (points[:, :, None] == example["tracks"][:, None]).all(axis=(0, 3))  # [subset, all tracks]
  assert (matches.sum(axis=1) == 1).all()
  source = matches.argmax(axis=1)
  np.testing.assert_array_equal(visible0[real], example["visibility"][0, source])

  other = pipeline.example_transform(example, config=config, codec=codec, rng=np.random.default_rng(1))
  assert not np.array_equal(other[pipeline.TRACK_EMBEDDINGS], out[pipeline.TRACK_EMBEDDINGS])  # fresh IDs


def test_masked_chunks_hide_their_tracks_so_their_grid_is_empty(config, codec, train_source):
  masking = config.copy_and_resolve_references()
  masking.tracks.mask_prob = 1.0
  out = pipeline.example_transform(train_source[1], config=masking, codec=codec, rng=np.random.default_rng(0))
  geom = config_utils.geometry(config)
  np.testing.assert_array_equal(out["chunk_masked"], np.arange(len(out["chunk_masked"])) > 0)
  first_chunk_end = config_utils.video_frames(geom.chunk_frames, codec.temporal_stride)
  assert out[pipeline.TRACK_VISIBLE][:first_chunk_end].any()
  assert not out[pipeline.TRACK_VISIBLE][first_chunk_end:].any()
  batch = {name: out[name][None] for name in pipeline.TRACK_FIELDS}
  grid = pipeline.make_device_inputs(masking, codec)(batch)["track_grid"][0]
  assert np.abs(grid[:first_chunk_end]).sum() > 0
  assert not np.asarray(grid[first_chunk_end:]).any()


def test_shuffle_later_ids_permutes_only_the_real_tracks_of_each_clip(config, codec, train_source):
  batch = next(_pipeline(config, codec, train_source))
  shuffled = pipeline.shuffle_later_ids(batch, np.random.default_rng(1))
  np.testing.assert_array_equal(shuffled[pipeline.VIDEO], batch[pipeline.VIDEO])
  np.testing.assert_array_equal(shuffled[pipeline.TRACK_EMBEDDINGS], batch[pipeline.TRACK_EMBEDDINGS])
  for name in (pipeline.TRACK_POINTS, pipeline.TRACK_VISIBLE):
    np.testing.assert_array_equal(shuffled[name][:, 0], batch[name][:, 0])
    assert not np.array_equal(shuffled[name][:, 1:], batch[name][:, 1:])
  for clip in range(BATCH):
    real = int(np.count_nonzero(np.any(batch[pipeline.TRACK_EMBEDDINGS][clip] != 0, axis=-1)))
    assert 0 < real <= config.tracks.max_tracks
    # Padding rows stay where they are, invisible; the real tracks' later paths are the same paths, reordered.
    assert not shuffled[pipeline.TRACK_VISIBLE][clip, :, real:].any()
    paths = lambda fields: sorted(fields[pipeline.TRACK_POINTS][clip, 1:, :real].transpose(1, 0, 2)
                                  .reshape(real, -1).tolist())
    assert paths(shuffled) == paths(batch)


def test_relabel_ids_swaps_embeddings_among_real_tracks_only(config, codec, train_source):
  batch = next(_pipeline(config, codec, train_source))
  relabelled = pipeline.relabel_ids(batch, np.random.default_rng(1))
  for name in (pipeline.VIDEO, pipeline.TRACK_POINTS, pipeline.TRACK_VISIBLE):
    np.testing.assert_array_equal(relabelled[name], batch[name])
  embeddings, swapped = batch[pipeline.TRACK_EMBEDDINGS], relabelled[pipeline.TRACK_EMBEDDINGS]
  assert not np.array_equal(swapped, embeddings)
  for clip in range(BATCH):
    real = int(np.count_nonzero(np.any(embeddings[clip] != 0, axis=-1)))
    np.testing.assert_array_equal(swapped[clip, real:], 0)  # padding stays padding
    assert sorted(map(tuple, swapped[clip, :real].tolist())) == sorted(map(tuple, embeddings[clip, :real].tolist()))


def test_same_seed_same_batches_other_seed_other_order(config, codec, train_source):
  first, again, other = (_pipeline(config, codec, train_source, seed=s) for s in (7, 7, 8))
  a, b, c = _take(first, 3), _take(again, 3), _take(other, 3)
  for iterator in (first, again, other):
    iterator.close()
  for x, y in zip(a, b):
    _assert_batches_equal(x, y)
  assert any(not np.array_equal(x[pipeline.VIDEO], z[pipeline.VIDEO]) for x, z in zip(a, c))


def test_one_epoch_visits_every_clip_once(config, codec, train_source):
  iterator = _pipeline(config, codec, train_source, num_epochs=1)
  batches = list(iterator)
  iterator.close()
  assert len(batches) == N_TRAIN // BATCH
  first_frames = {b[pipeline.VIDEO][i, 0].tobytes() for b in batches for i in range(BATCH)}
  assert len(first_frames) == N_TRAIN


def test_resumes_from_saved_state_to_the_same_next_batch(config, codec, train_source):
  iterator = _pipeline(config, codec, train_source, seed=3)
  _take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))  # must survive a JSON checkpoint
  batch4 = next(iterator)
  iterator.close()
  fresh = _pipeline(config, codec, train_source, seed=3)
  fresh.set_state(state)
  _assert_batches_equal(next(fresh), batch4)
  fresh.close()


# Runs in its own interpreter so a hung worker cannot hang the test session (no pytest-timeout here).
_MULTIPROCESS_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    import numpy as np
    from configs import models
    from msjax import codecs
    from msjax.data import pipeline, tfds_sprites
    data_dir, n_train, n_val, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    config = models.tiny()
    builder_config = tfds_sprites.SpritesBuilderConfig.from_config(config, n_train=n_train, n_val=n_val)
    source = tfds_sprites.Sprites(data_dir=data_dir, config=builder_config).as_data_source()["train"]
    codec = codecs.make_codec(config)
    def make(workers):
      return pipeline.make_train_pipeline(config, data_source=source, codec=codec, seed=5, batch_size=batch,
                                          worker_count=workers)
    def same(a, b):
      return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    single = make(0)
    expected = [next(single) for _ in range(4)]
    single.close()
    workers = make(2)
    got = [next(workers) for _ in range(3)]
    state = workers.get_state()
    got.append(next(workers))
    workers.close()
    fresh = make(2)
    fresh.set_state(json.loads(json.dumps(state)))
    resumed = next(fresh)
    fresh.close()
    result = {"same_batches": all(same(a, b) for a, b in zip(expected, got)),
              "resumed": same(resumed, expected[3])}
    del single, workers, fresh, got, resumed
    gc.collect()
    print("RESULT " + json.dumps(result), flush=True)
""")


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # subprocess forks and execs at once: safe
def test_worker_processes_give_the_same_batches_and_resume(data_dir, tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", _MULTIPROCESS_SCRIPT, os.fspath(data_dir), str(N_TRAIN), str(N_VAL), str(BATCH)],
      capture_output=True, text=True, timeout=MULTIPROCESS_TIMEOUT_S, env=env, cwd=tmp_path)
  lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
  assert result.returncode == 0 and lines, (
      f"exit code {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}")
  assert json.loads(lines[-1][len("RESULT "):]) == {"same_batches": True, "resumed": True}


def test_rejects_a_dataset_prepared_for_another_size(config, codec, train_source):
  example = dict(train_source[0])
  example["video"] = example["video"][:, ::2, ::2]
  with pytest.raises(ValueError, match=r"uint8\[45, 32, 32, 3\]; the config expects uint8\[45, 64, 64, 3\]"):
    pipeline.example_transform(example, config=config, codec=codec, rng=np.random.default_rng(0))


def test_rejects_an_empty_source(config, codec):
  with pytest.raises(ValueError, match="is empty"):
    _pipeline(config, codec, [])


def test_rendered_sprites_feed_the_same_pipeline(codec):
  from configs import teacher as teacher_config  # pylint: disable=g-import-not-at-top
  from msjax.train import teacher  # pylint: disable=g-import-not-at-top
  config = teacher_config.get_config()
  config.data.dataset = "sprites_rendered"
  config.data.num_train = 200_000
  source = teacher.make_data_source(config, "train")
  assert len(source) == 200_000
  iterator = _pipeline(config, codec, source, seed=1)
  batch = next(iterator)
  iterator.close()
  assert batch[pipeline.VIDEO].shape == (BATCH, 45, 64, 64, 3)
  assert batch[pipeline.TRACK_VISIBLE][:, 0].any()
  config.data.dataset = "somewhere"
  with pytest.raises(ValueError, match="'sprites', 'sprites_rendered' or 'video_folder'"):
    teacher.make_data_source(config, "train")
