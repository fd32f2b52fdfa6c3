"""The grain input pipeline: clips from a tfds data source -> compact host batches -> model inputs on the device.

Determinism: the pipeline is a `grain.MapDataset` (index based) up to the batch, so element i of the stream
is always the same clip with the same random choices, whatever the number of worker processes and however
the run was interrupted. Random choices per example (track subset, IDs, masked chunks) come from the rng that
`random_map` derives from (seed, global index); the global index runs over epochs, so every epoch draws anew
and is shuffled anew. The iterator's `get_state()` / `set_state()` resume exactly.

Per clip the host makes only what needs the example's random draws (`example_transform`):
  video             uint8   [T, H, W, 3]   the clip as stored
  track_points      float32 [T, N, 2]      a random subset of its tracks, padded to N = tracks.max_tracks
  track_visible     bool    [T, N]         False on padding and on the frames of masked chunks (section 3.3)
  track_embeddings  float32 [N, d]         sinusoidal embeddings of random IDs (zero on padding)
  chunk_masked      bool    [L]            which streaming chunks had their tracks hidden
  prompt            str_    []             fixed width MAX_PROMPT_CHARS, so prompts batch like arrays
The dense arrays the models read are made on the device by `device_inputs`, batched and jitted:
  latents [B, F, h, w, C] (the codec's encoding), first_latent [B, h, w, C] (latent frame 0) and
  track_grid [B, T, h, w, d] (the tracks rasterised, paper Eq. 1).
Why: a tiny-preset clip is ~0.7 MB this way against ~5.5 MB as dense float32 latents and track grid (a Wan-size
track grid alone is ~130 MB per clip). Worker processes, the batcher and the host-to-device copy move these
bytes; dense, they were what bounded training speed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import chex
import grain
import jax
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

# Host batch fields that `device_inputs` turns into model inputs.
VIDEO = "video"
TRACK_POINTS = "track_points"
TRACK_VISIBLE = "track_visible"
TRACK_EMBEDDINGS = "track_embeddings"
TRACK_FIELDS = (TRACK_POINTS, TRACK_VISIBLE, TRACK_EMBEDDINGS)
HOST_FIELDS = (VIDEO,) + TRACK_FIELDS


def video_to_unit_range(video: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1], the codecs' pixel range (numpy in, numpy out; jax in, jax out)."""
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


def _padded(array: np.ndarray, axis: int, size: int) -> np.ndarray:
  """`array` zero padded (False for bool) along `axis` to `size`."""
  widths = [(0, 0)] * array.ndim
  widths[axis] = (0, size - array.shape[axis])
  return np.pad(array, widths)


def example_transform(example: dict, *, config: ml_collections.ConfigDict, codec: Codec,
                      rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One stored clip -> the compact host example (fields in the module docstring)."""
  geom = config_utils.geometry(config)
  _check_example(example, geom)
  tc = config.tracks

  points, visible = example["tracks"], example["visibility"]
  subset = tracks_lib.sample_track_subset(rng, points.shape[1], tc.min_tracks, tc.max_tracks)
  ids = tracks_lib.random_track_ids(rng, len(subset), tc.max_id)
  embeddings = tracks_lib.track_embeddings(ids, tc.embed_dim)
  visible = visible[:, subset]
  chunking = dict(chunk_latent_frames=geom.chunk_frames, temporal_stride=codec.temporal_stride)
  if tc.mask_prob > 0:
    visible, chunk_masked = tracks_lib.mask_mid_chunks(visible, rng, prob=tc.mask_prob, **chunking)
  else:
    chunk_masked = np.zeros(len(tracks_lib.chunk_frame_ranges(geom.num_frames, **chunking)), bool)

  prompt = _as_text(example["prompt"])[:MAX_PROMPT_CHARS]
  return {
      VIDEO: np.asarray(example["video"], np.uint8),
      TRACK_POINTS: _padded(np.asarray(points[:, subset], np.float32), 1, tc.max_tracks),
      TRACK_VISIBLE: _padded(np.asarray(visible, bool), 1, tc.max_tracks),
      TRACK_EMBEDDINGS: _padded(embeddings, 0, tc.max_tracks),
      "chunk_masked": chunk_masked,
      "prompt": np.array(prompt, dtype=f"<U{MAX_PROMPT_CHARS}"),
  }


def _real_track_order(embeddings: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A random order of one clip's real tracks; padding rows (all-zero embeddings, at the end) stay in place."""
  real = int(np.count_nonzero(np.any(embeddings != 0, axis=-1)))
  return np.concatenate([rng.permutation(real), np.arange(real, embeddings.shape[0])])


def shuffle_later_ids(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A host batch whose track IDs after frame 0 are shuffled among each clip's real (not padded) tracks
  (`tracks.shuffle_later_ids`); the video and everything else are left alone."""
  shuffled = dict(batch)
  points, visible = [], []
  for clip_points, clip_visible, embeddings in zip(*(batch[name] for name in TRACK_FIELDS)):
    order = _real_track_order(embeddings, rng)
    clip_points, clip_visible = tracks_lib.shuffle_later_ids(clip_points, clip_visible, order)
    points.append(clip_points)
    visible.append(clip_visible)
  shuffled[TRACK_POINTS], shuffled[TRACK_VISIBLE] = np.stack(points), np.stack(visible)
  return shuffled


def relabel_ids(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A host batch whose real tracks swap ID embeddings, each track keeping its new ID in every frame.

  The control for `shuffle_later_ids`: both put other ID values at each point, but only the shuffle breaks the
  link between a point's ID in frame 0 and later. A model's loss moves a little under any change of ID values;
  only the part of the shuffle's change beyond this one comes from following IDs.
  """
  relabelled = dict(batch)
  relabelled[TRACK_EMBEDDINGS] = np.stack([embeddings[_real_track_order(embeddings, rng)]
                                           for embeddings in batch[TRACK_EMBEDDINGS]])
  return relabelled


def device_inputs(batch: dict[str, Any], *, codec: Codec, height: int, width: int,
                  splat: str) -> dict[str, jax.Array]:
  """Compact batch -> model inputs (jittable): `video` becomes `latents` and `first_latent`, the track fields
  become `track_grid`; every other field passes through. Either group may be absent (ODE pairs store no video)."""
  inputs = {name: value for name, value in batch.items() if name not in HOST_FIELDS}
  if VIDEO in batch:
    chex.assert_rank(batch[VIDEO], 5)  # [B, T, H, W, 3]
    latents = codec.encode(None, video_to_unit_range(batch[VIDEO]))
    inputs["latents"], inputs["first_latent"] = latents, latents[:, 0]
  if TRACK_POINTS in batch:
    chex.assert_rank([batch[name] for name in TRACK_FIELDS], [4, 3, 3])  # [B, T, N, 2], [B, T, N], [B, N, d]
    rasterize = functools.partial(tracks_lib.rasterize_jax, height=height, width=width,
                                  stride=codec.spatial_stride, splat=splat)
    inputs["track_grid"] = jax.vmap(rasterize)(*(batch[name] for name in TRACK_FIELDS))
  return inputs


def make_device_inputs(config: ml_collections.ConfigDict, codec: Codec, keep: tuple[str, ...] | None = None,
                       out_shardings: Any = None) -> Callable[[dict[str, Any]], dict[str, jax.Array]]:
  """`device_inputs` for the config's frame size, jitted (outputs placed by `out_shardings`, e.g. the batch
  sharding of a training mesh); with `keep`, only those outputs are made and returned."""
  geom = config_utils.geometry(config)

  def expand(batch: dict[str, Any]) -> dict[str, jax.Array]:
    inputs = device_inputs(batch, codec=codec, height=geom.height, width=geom.width, splat=config.tracks.splat)
    if keep is None:
      return inputs
    missing = [name for name in keep if name not in inputs]
    if missing:
      raise KeyError(f"the batch cannot give {missing}: it has {sorted(batch)}")
    return {name: inputs[name] for name in keep}

  return jax.jit(expand, out_shardings=out_shardings)


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
