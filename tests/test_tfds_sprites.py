"""The sprites tfds builder: disjoint split seeds, stored clips equal freshly rendered ones."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import models
from configs import teacher as teacher_config
from msjax.data import sprites
from msjax.data import tfds_sprites


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  tfds.disable_progress_bar()
  builder = tfds_sprites.Sprites(data_dir=os.fspath(tmp_path_factory.mktemp("tfds")))  # default: tiny_test
  builder.download_and_prepare()
  return builder.builder_config, builder.as_data_source()


def _seeds(source):
  return [int(source[i]["seed"]) for i in range(len(source))]


def test_splits_have_the_configured_sizes_and_disjoint_seeds(sources):
  config, source = sources
  train, validation = _seeds(source["train"]), _seeds(source["validation"])
  assert sorted(train) == list(range(config.n_train))
  offset = tfds_sprites.VALIDATION_SEED_OFFSET
  assert sorted(validation) == list(range(offset, offset + config.n_val))
  assert not set(train) & set(validation)


def test_stored_example_equals_the_rendered_clip(sources):
  config, source = sources
  example = source["validation"][1]
  clip = sprites.render_clip(int(example["seed"]), config.sprites)
  num_sprites = len(clip.shapes)
  for key, expected in [("video", clip.video), ("tracks", clip.tracks), ("visibility", clip.visibility),
                        ("background", clip.background)]:
    np.testing.assert_array_equal(example[key], expected, err_msg=key)
    assert example[key].dtype == expected.dtype, key
  max_sprites = config.sprites.max_sprites
  np.testing.assert_array_equal(example["sprite_valid"], np.arange(max_sprites) < num_sprites)
  np.testing.assert_array_equal(example["centroids"][:, :num_sprites], clip.centroids)
  np.testing.assert_array_equal(example["sprite_colors"][:num_sprites], clip.colors)
  np.testing.assert_array_equal(example["sprite_visible"][:, :num_sprites], clip.sprite_visible)
  assert example["centroids"].shape == (config.sprites.num_frames, max_sprites, 2)
  assert not example["centroids"][:, num_sprites:].any()
  assert example["prompt"].decode() == clip.prompt
  assert example["effect"].decode() == clip.effect


def test_builder_config_from_preset_matches_its_video():
  config = models.tiny()
  builder_config = tfds_sprites.SpritesBuilderConfig.from_config(config, n_train=3, n_val=2)
  s = builder_config.sprites
  assert (s.height, s.width, s.num_frames, s.grid) == (64, 64, 45, 16)
  assert builder_config.name == "64x64x45_g16_3_2"


def test_jumping_sprites_are_prepared_under_their_own_name():
  config = teacher_config.get_config()
  config.data.sprite_motion = sprites.MOTION_JUMP
  builder_config = tfds_sprites.SpritesBuilderConfig.from_config(config, n_train=3, n_val=2)
  assert builder_config.sprites.motion == sprites.MOTION_JUMP
  assert builder_config.name == "64x64x45_g16_3_2_jump"
  centroids = tfds_sprites.rendered_split(config, "train", n_train=3, n_val=2)[0]["centroids"]
  np.testing.assert_array_equal(centroids[1:5], np.broadcast_to(centroids[1], centroids[1:5].shape))  # held
  assert (centroids[1:] != centroids[:1]).any()  # and jumped from frame 0


def test_train_split_may_not_reach_validation_seeds():
  with pytest.raises(ValueError, match="n_train must be in"):
    tfds_sprites.SpritesBuilderConfig(name="too_big", n_train=tfds_sprites.VALIDATION_SEED_OFFSET + 1)


def test_a_split_too_big_for_the_write_buffer_is_refused_up_front():
  """Without TensorFlow tfds cannot spill a split to disk: refuse it before rendering anything."""
  with pytest.raises(ValueError, match=r"tfds' in-memory write buffer .* use at most \d+ clips per split"):
    tfds_sprites.SpritesBuilderConfig(name="huge", sprites=sprites.SpritesConfig(), n_train=20_000, n_val=4)


def test_rendered_source_serves_the_stored_examples(sources):
  config, source = sources
  stored = source["validation"]
  offset = tfds_sprites.VALIDATION_SEED_OFFSET
  rendered = tfds_sprites.RenderedSprites(sprites=config.sprites, seeds=range(offset, offset + config.n_val))
  assert len(rendered) == len(stored)
  by_seed = {int(stored[i]["seed"]): stored[i] for i in range(len(stored))}
  for index in range(len(rendered)):
    example = rendered[index]
    expected = by_seed[int(example["seed"])]
    assert set(example) == set(expected)
    for key, value in expected.items():
      if isinstance(value, bytes):
        assert example[key] == value.decode(), key
      else:
        np.testing.assert_array_equal(example[key], value, err_msg=key)


def test_rendered_split_of_a_preset_has_no_size_limit_and_renders_only_what_is_read():
  config = models.tiny()
  train = tfds_sprites.rendered_split(config, "train", n_train=500_000, n_val=2)
  assert len(train) == 500_000  # 10x what a stored split may hold; nothing is rendered up front
  example = train[123_456]
  assert int(example["seed"]) == 123_456 and example["video"].shape == (45, 64, 64, 3)
  validation = tfds_sprites.rendered_split(config, "validation", n_train=500_000, n_val=2)
  assert [int(validation[i]["seed"]) for i in range(2)] == [tfds_sprites.VALIDATION_SEED_OFFSET + i for i in (0, 1)]
  with pytest.raises(ValueError, match="not 'test'"):
    tfds_sprites.rendered_split(config, "test", n_train=4, n_val=2)
  with pytest.raises(ValueError, match="train seeds stay below the validation seeds"):
    tfds_sprites.rendered_split(config, "train", n_train=tfds_sprites.VALIDATION_SEED_OFFSET + 1, n_val=2)
