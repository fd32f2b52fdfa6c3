"""tfds builder for the `sprites` toy world, rendered locally (no download) into array_record files.

TensorFlow is not installed, so the builders here only use what works without it: `GeneratorBasedBuilder`,
the array_record file format, `Tensor`/`Text` features, and reading back through `builder.as_data_source()`
(which grain consumes directly). `ArrayRecordBuilder` makes array_record the default so
`builder.download_and_prepare()` needs no arguments.

Splits come from disjoint seed ranges, so a validation clip can never be a training clip:
train seeds [0, n_train), validation seeds [VALIDATION_SEED_OFFSET, VALIDATION_SEED_OFFSET + n_val).

`RenderedSprites` serves the same examples without preparing anything: each clip is rendered from its seed when
it is read (~6 ms at 64x64x45, against ~2 ms to read a stored one). It has no split-size limit, so a long run
can draw fresh clips instead of cycling a stored split of at most ~10k clips many times.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

from msjax.data.sprites import MOTION_SMOOTH, Clip, SpritesConfig, render_clip

VALIDATION_SEED_OFFSET = 10**6


def split_seeds(n_train: int, n_val: int, owner: str) -> dict[str, range]:
  """The seeds of each split (module docstring); `owner` names the dataset in the error of a bad size."""
  if not 0 <= n_train <= VALIDATION_SEED_OFFSET:
    raise ValueError(f"{owner}: n_train must be in [0, {VALIDATION_SEED_OFFSET}] so the train seeds stay below "
                     f"the validation seeds, got {n_train}")
  if n_val < 0:
    raise ValueError(f"{owner}: n_val must be >= 0, got {n_val}")
  return {"train": range(n_train), "validation": range(VALIDATION_SEED_OFFSET, VALIDATION_SEED_OFFSET + n_val)}


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A generator builder that writes array_record by default (the one format readable without TensorFlow)."""

  def __init__(self, **kwargs: Any):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)


@dataclasses.dataclass(eq=False)
class SpritesBuilderConfig(tfds.core.BuilderConfig):
  """What one prepared sprites dataset holds (`name` names its folder under data_dir).

  `sprites` sets the clips (size, length, track grid, scene ranges); sprite arrays are padded to its
  `max_sprites`. The default is a tiny world for tests.
  """
  sprites: SpritesConfig = SpritesConfig(height=32, width=32, num_frames=9, grid=8)
  n_train: int = 8
  n_val: int = 4

  def __post_init__(self):
    self.split_seeds()  # checks the split sizes
    split_bytes = max(self.n_train, self.n_val) * self.example_track_bytes()
    if split_bytes > tfds_shuffle.MAX_MEM_BUFFER_SIZE:
      fitting = tfds_shuffle.MAX_MEM_BUFFER_SIZE // self.example_track_bytes()
      raise ValueError(f"sprites config {self.name!r}: a split of {max(self.n_train, self.n_val)} clips holds "
                       f"{split_bytes / 2**30:.2f} GiB of tracks, more than tfds' in-memory write buffer "
                       f"({tfds_shuffle.MAX_MEM_BUFFER_SIZE / 2**30:.2f} GiB), and spilling it to disk needs "
                       f"TensorFlow; use at most {fitting} clips per split")

  def example_track_bytes(self) -> int:
    """Serialized bytes of one clip's tracks and visibility (the bulk of an example: the video is zlib'd)."""
    s = self.sprites
    points = s.num_frames * s.grid * s.grid
    return points * (2 * np.dtype(np.float32).itemsize + np.dtype(np.bool_).itemsize)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *, n_train: int, n_val: int,
                  name: str | None = None) -> SpritesBuilderConfig:
    """The builder config whose clips match a preset (size, length, temporal stride, track grid)."""
    sprites = SpritesConfig.from_config(config)
    default_name = f"{sprites.height}x{sprites.width}x{sprites.num_frames}_g{sprites.grid}_{n_train}_{n_val}"
    if sprites.motion != MOTION_SMOOTH:
      default_name += f"_{sprites.motion}"
    return cls(name=name or default_name, sprites=sprites, n_train=n_train, n_val=n_val)

  def split_seeds(self) -> dict[str, range]:
    return split_seeds(self.n_train, self.n_val, f"sprites config {self.name!r}")


def _pad_sprites(values: np.ndarray, axis: int, max_sprites: int) -> np.ndarray:
  """Zero-pads the sprite axis to `max_sprites` so every example has the same shape."""
  count = values.shape[axis]
  if count > max_sprites:
    raise ValueError(f"clip has {count} sprites but the dataset stores at most max_sprites={max_sprites}")
  widths = [(0, 0)] * values.ndim
  widths[axis] = (0, max_sprites - count)
  return np.pad(values, widths)


def clip_to_example(clip: Clip, seed: int, max_sprites: int) -> dict[str, Any]:
  """One rendered clip -> the feature dict stored on disk."""
  num_sprites = len(clip.shapes)
  return {
      "video": clip.video,
      "tracks": clip.tracks,
      "visibility": clip.visibility,
      "centroids": _pad_sprites(clip.centroids, 1, max_sprites),
      "sprite_visible": _pad_sprites(clip.sprite_visible, 1, max_sprites),
      "sprite_colors": _pad_sprites(clip.colors, 0, max_sprites),
      "sprite_valid": np.arange(max_sprites) < num_sprites,
      "background": clip.background,
      "prompt": clip.prompt,
      "effect": clip.effect,
      "seed": np.int64(seed),
  }


@dataclasses.dataclass(frozen=True)
class RenderedSprites:
  """A random-access source (grain reads it like a tfds data source) whose item i is the clip of `seeds[i]`,
  rendered on demand: the examples the builder would store for those seeds."""
  sprites: SpritesConfig
  seeds: range

  def __len__(self) -> int:
    return len(self.seeds)

  def __getitem__(self, index: int) -> dict[str, Any]:
    seed = self.seeds[int(index)]
    return clip_to_example(render_clip(seed, self.sprites), seed, self.sprites.max_sprites)


def rendered_split(config: ml_collections.ConfigDict, split: str, *, n_train: int, n_val: int) -> RenderedSprites:
  """The `split` ('train' or 'validation') of a preset's sprites, rendered on demand (same seeds as the builder)."""
  seeds = split_seeds(n_train, n_val, "rendered sprites")
  if split not in seeds:
    raise ValueError(f"rendered sprites have the splits {', '.join(seeds)}, not {split!r}")
  return RenderedSprites(sprites=SpritesConfig.from_config(config), seeds=seeds[split])


class Sprites(ArrayRecordBuilder):
  """Procedural sprites clips with exact tracks, sprite centroids and prompts."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SpritesBuilderConfig(name="tiny_test", description="32x32, 9 frames, 8 + 4 clips: for tests."),
      SpritesBuilderConfig(name="toy64", sprites=SpritesConfig(), n_train=8_000, n_val=256,
                           description="The `tiny` preset's clips: 64x64, 45 frames, 16x16 tracks."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config.sprites
    t, n, s = c.num_frames, c.grid * c.grid, c.max_sprites
    tensor = tfds.features.Tensor
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            # Flat colours compress well; zlib keeps a 45-frame clip to a few KB on disk.
            "video": tensor(shape=(t, c.height, c.width, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB),
            "tracks": tensor(shape=(t, n, 2), dtype=np.float32),
            "visibility": tensor(shape=(t, n), dtype=np.bool_),
            "centroids": tensor(shape=(t, s, 2), dtype=np.float32),
            "sprite_visible": tensor(shape=(t, s), dtype=np.bool_),
            "sprite_colors": tensor(shape=(s, 3), dtype=np.uint8),
            "sprite_valid": tensor(shape=(s,), dtype=np.bool_),
            "background": tensor(shape=(t, 3), dtype=np.uint8),
            "prompt": tfds.features.Text(),
            "effect": tfds.features.Text(),
            "seed": tensor(shape=(), dtype=np.int64),
        }),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    del dl_manager  # rendered locally
    return {split: self._generate_examples(seeds) for split, seeds in self.builder_config.split_seeds().items()}

  def _generate_examples(self, seeds: range) -> Iterator[tuple[int, dict[str, Any]]]:
    sprites = self.builder_config.sprites
    for seed in seeds:
      yield seed, clip_to_example(render_clip(seed, sprites), seed, sprites.max_sprites)
