"""The grain input pipeline: clips from a tfds data source -> batches of model inputs.

Determinism: the pipeline is a `grain.MapDataset` (index based) up to the batch, so element i of the stream
is always the same clip with the same random choices, whatever the number of worker processes and however
the run was interrupted. Random choices per example (track subset, IDs, masked chunks) come from the rng that
`random_map` derives from (seed, global index); the global index runs over epochs, so every epoch draws anew
and is shuffled anew. The iterator's `get_state()` / `set_state()` resume exactly.

Per clip (`example_transform`):
  latents       float32 [F, h, w, C]   the codec's encoding of the clip (numpy path; params=None)
  first_latent  float32 [h, w, C]      latent frame 0 alone: the first-frame conditioning
  track_grid    float32 [T, h, w, d]   a random subset of tracks with random IDs, rasterised (paper Eq. 1)
  chunk_masked  bool    [L]            which streaming chunks had their track grid zeroed (paper section 3.3)
  prompt        str_    []             fixed width MAX_PROMPT_CHARS, so prompts batch like arrays
"""

from __future__ import annotations

from typing import Any

import chex
import grain
import ml_collections
import numpy as np
from absl import flags

from msjax import config_utils
from msjax.codecs.base import Codec
from msjax.data import tracks as tracks_lib

# Prompts longer than this are cut; text encoders truncate far earlier (tokens), so nothing usable is lost.
MAX_PROMPT_CHARS = 1024
# grain's default read-ahead (16 threads, 500 elements) would hold hundreds of batches of track grids in
# memory; a couple of batches per thread keeps the accelerator fed at a small, predictable footprint.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
_UINT8_MAX = 255.0


def video_to_unit_range(video: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], the codecs' pixel range."""
  return video.astype(np.float32) * np.float32(2.0 / _UINT8_MAX) - np.float32(1.0)


def _as_text(value: Any) -> str:
  """tfds `Text` features come back from array_record data sources as bytes."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _check_example(example: dict, geom: config_utils.Geometry) -> None:
  """Catches a dataset prepared for another preset before it reaches the codec or the model."""
  video, points, visible = example["video"], example["tracks"], example["visibility"]
  expected = (geom.num_frames, geom.height, geom.width, 3)
  if video.shape != expected or video.dtype != np.uint8:
    raise ValueError(f"data example video is {video.dtype}{list(video.shape)}; the config expects "
                     f"uint8{list(expected)} (config.video: num_frames, height, width). Prepare the dataset "
                     f"with the same video settings as the model config.")
  if points.ndim != 3 or points.shape[0] != geom.num_frames or visible.shape != points.shape[:2]:
    raise ValueError(f"data example tracks {list(points.shape)} / visibility {list(visible.shape)} do not "
                     f"match [T={geom.num_frames}, N, 2] / [T, N]")


def example_transform(example: dict, *, config: ml_collections.ConfigDict, codec: Codec,
                      rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One stored clip -> the model inputs of one training example (keys in the module docstring)."""
  geom = config_utils.geometry(config)
  _check_example(example, geom)
  tc = config.tracks

  video = video_to_unit_range(example["video"])
  latents = np.asarray(codec.encode(None, video[None])[0], np.float32)
  chex.assert_shape(latents, (geom.latent_frames, geom.latent_height, geom.latent_width, geom.latent_channels))

  points, visible = example["tracks"], example["visibility"]
  subset = tracks_lib.sample_track_subset(rng, points.shape[1], tc.min_tracks, tc.max_tracks)
  ids = tracks_lib.random_track_ids(rng, len(subset), tc.max_id)
  embeddings = tracks_lib.track_embeddings(ids, tc.embed_dim)
  track_grid = tracks_lib.rasterize(points[:, subset], visible[:, subset], embeddings, height=geom.height,
                                    width=geom.width, stride=codec.spatial_stride)
  chunking = dict(chunk_latent_frames=geom.chunk_frames, temporal_stride=codec.temporal_stride)
  if tc.mask_prob > 0:
    track_grid, chunk_masked = tracks_lib.mask_mid_chunks(track_grid, rng, prob=tc.mask_prob, **chunking)
  else:
    chunk_masked = np.zeros(len(tracks_lib.chunk_frame_ranges(geom.num_frames, **chunking)), bool)
  chex.assert_shape(track_grid, (geom.num_frames, geom.latent_height, geom.latent_width, tc.embed_dim))

  prompt = _as_text(example["prompt"])[:MAX_PROMPT_CHARS]
  return {
      "latents": latents,
      "first_latent": latents[0],
      "track_grid": track_grid.astype(np.float32),
      "chunk_masked": chunk_masked,
      "prompt": np.array(prompt, dtype=f"<U{MAX_PROMPT_CHARS}"),
  }


class ExampleTransform(grain.transforms.RandomMap):
  """`example_transform` as a picklable grain transform (worker processes receive it by pickling)."""

  def __init__(self, config: ml_collections.ConfigDict, codec: Codec):
    self.config = config
    self.codec = codec

  def random_map(self, element: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return example_transform(element, config=self.config, codec=self.codec, rng=rng)


def make_train_pipeline(config: ml_collections.ConfigDict, *, data_source: Any, codec: Codec, seed: int,
                        batch_size: int, num_epochs: int | None = None, worker_count: int = 0,
                        drop_remainder: bool = True,
                        read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """A shuffled, repeated (forever when num_epochs is None), batched iterator with get_state()/set_state().

  `data_source` is any random-access source of stored clips, e.g. `builder.as_data_source()['train']`.
  `worker_count` > 0 runs the transform in that many processes (same batches as 0, in the same order).
  """
  if len(data_source) == 0:
    raise ValueError(f"data source {data_source} is empty; prepare the dataset (or pick a non-empty split)")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  dataset = (grain.MapDataset.source(data_source)
             .seed(seed)
             .shuffle()
             .repeat(num_epochs)
             .random_map(ExampleTransform(config, codec))
             .batch(batch_size, drop_remainder=drop_remainder))
  iter_dataset = dataset.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app nobody parsed them
      flags.FLAGS.mark_as_parsed()
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(iter_dataset)
