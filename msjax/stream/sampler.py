"""The streaming sampler: a compiled chunk step (make, then commit), and a frame iterator on top of it.

  sampler = StreamSampler(model)
  state = sampler.start(cond, seed)                       # text cross-attention K/V computed here, once
  state, frames = sampler.chunk_step(state, track_grid)   # generate + decode, then commit, one chunk

The first chunk (latent frame 0, 1 + s(c-1) pixel frames, the user's first frame) has its own compiled programs
and becomes the attention sink; every later chunk (s*c pixel frames) reuses the same two, because the cache
has fixed shapes and its counters are traced values. `stream(...)` wraps this into an iterator of uint8 frames
that takes its tracks from a `Tracks` object or from any iterator of per-chunk point arrays (a live source).

Randomness follows `rollout.chunk_keys`, so this loop and the DMD trainer's `rollout` make the same chunks.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from typing import Any, Iterable, Iterator

import chex
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msjax import codecs
from msjax import config_utils
from msjax import inference
from msjax.data import tracks as tracks_lib
from msjax.eval import metrics
from msjax.models import kv_cache
from msjax.models import track_head
from msjax.stream import rollout

TracksSource = tracks_lib.Tracks | Iterable[Any]


@struct.dataclass
class StreamState:
  """Everything a stream carries from one chunk to the next (fixed shapes: one program serves every chunk)."""
  cache: kv_cache.CacheState
  decode_state: Any  # the codec's streaming decode state
  rng: jax.Array  # the stream's key; chunk keys are derived from it and the chunk index
  first_latent: jax.Array | None  # [B, h, w, C] the user's first frame, read by the first chunk only

  @property
  def chunk_index(self) -> jax.Array:
    """Chunks made so far (= the index of the next chunk); the cache counts them."""
    return self.cache.committed


def _distinct_buffers(tree: Any) -> Any:
  """`tree` with every leaf in a buffer of its own: the chunk step donates the state, and XLA refuses to take
  one buffer twice (a fresh cache may share one zero scalar between its counters)."""
  seen = set()

  def own(leaf):
    if id(leaf) in seen:
      return jnp.array(leaf, copy=True)
    seen.add(id(leaf))
    return leaf

  return jax.tree.map(own, tree)


class StreamSampler:
  """A model's compiled chunk step. Holds no stream: every stream's state is a `StreamState` passed in and out."""

  def __init__(self, model: inference.Model):
    self.model = model
    self.config = model.config
    self.geometry = config_utils.geometry(model.config)
    self.timesteps = rollout.student_timesteps(model.config)
    self.first_chunk_frames = 1 + self.temporal_stride * (self.chunk_frames - 1)
    self.later_chunk_frames = self.temporal_stride * self.chunk_frames
    # A chunk is two compiled calls: make (denoise + decode) and commit. The frames reach the host as soon as
    # make has run, while the commit (one more DiT pass) runs behind them on the device. `is_first` and
    # `decode` are static: one program per combination, the same for every later chunk.
    self._make = jax.jit(self._make_chunk, static_argnames=("is_first", "decode"),
                         donate_argnames=("decode_state",))
    self._commit = jax.jit(self._commit_chunk, static_argnames=("is_first",), donate_argnames=("cache",))
    # Starting a stream is compiled too: run eagerly, the first-frame encoder and the cross-attention K/V of a
    # large preset dispatch hundreds of small ops and dominate the first-frame latency.
    self.encode_first = jax.jit(model.codec.encode)
    self._start = jax.jit(self._start_state)

  @property
  def chunk_frames(self) -> int:
    return self.config.stream.chunk_frames

  @property
  def temporal_stride(self) -> int:
    return self.config.codec.temporal_stride

  def compiled_programs(self) -> int:
    """How many programs the chunk step has compiled: make and commit, each for the first and later chunks."""
    return self._make._cache_size() + self._commit._cache_size()  # pylint: disable=protected-access

  def start(self, cond: track_head.Conditioning, seed: int) -> StreamState:
    """A new stream for `cond` (context [B, L, D], first_latent [B, h, w, C] or None, CLIP tokens if used)."""
    chex.assert_rank(cond.context, 3)
    geo = self.geometry
    if cond.first_latent is not None:
      chex.assert_shape(cond.first_latent, (cond.context.shape[0], geo.latent_height, geo.latent_width,
                                            geo.latent_channels))
    state = self._start(self.model.dit_params, self.model.codec_params, cond, jax.random.key(seed))
    return _distinct_buffers(state)

  def _start_state(self, dit_params, codec_params, cond: track_head.Conditioning, rng: jax.Array) -> StreamState:
    batch = cond.context.shape[0]
    geo = self.geometry
    cache = kv_cache.init_cache(dit_params, self.config, cond, batch)
    decode_state = self.model.codec.init_decode_state(codec_params, batch, geo.latent_height, geo.latent_width)
    return StreamState(cache=cache, decode_state=decode_state, rng=rng, first_latent=cond.first_latent)

  def _latent_shape(self, batch: int) -> tuple[int, ...]:
    geo = self.geometry
    return (batch, self.chunk_frames, geo.latent_height, geo.latent_width, geo.latent_channels)

  @staticmethod
  def _chunk_condition(first_latent: jax.Array | None, track_grid: jax.Array | None,
                       is_first: bool) -> track_head.Conditioning:
    # Later chunks never read the first frame (its image channels are zero there), so they are not given it.
    return track_head.Conditioning(first_latent=first_latent if is_first else None, track_grid=track_grid)

  def _make_chunk(self, dit_params, codec_params, timesteps, cache: kv_cache.CacheState, decode_state: Any,
                  rng: jax.Array, first_latent: jax.Array | None, track_grid: jax.Array | None, *, is_first: bool,
                  decode: bool) -> tuple[jax.Array, Any, jax.Array | None]:
    """(x0 [B, c, h, w, C], decode state, uint8 frames or None): the next chunk, denoised and decoded."""
    batch = cache.text_k.shape[1]
    noise = rollout.chunk_noise(rng, cache.committed, self._latent_shape(batch))
    _, step_key = rollout.chunk_keys(rng, cache.committed)
    cond = self._chunk_condition(first_latent, track_grid, is_first)
    x0 = rollout.generate_chunk(dit_params, cache, noise, cond, timesteps, step_key)
    frames = None
    if decode:
      decode_state, video = self.model.codec.decode_chunk(codec_params, decode_state, x0, is_first)
      frames = inference.to_uint8(video)
    return x0, decode_state, frames

  def _commit_chunk(self, dit_params, cache: kv_cache.CacheState, x0: jax.Array, first_latent: jax.Array | None,
                    track_grid: jax.Array | None, *, is_first: bool) -> kv_cache.CacheState:
    return kv_cache.commit(dit_params, cache, x0, self._chunk_condition(first_latent, track_grid, is_first))

  def chunk_step(self, state: StreamState, track_grid: jax.Array | np.ndarray | None, *, is_first: bool | None = None,
                 decode: bool = True) -> tuple[StreamState, jax.Array | None]:
    """Generates, commits and decodes the next chunk: uint8 frames [B, T, H, W, 3] (None when not `decode`).

    `track_grid` [B, T, h, w, d] covers the chunk's pixel frames (T = 1 + s(c-1) for the first chunk, s*c
    after), or is None for a model without tracks (then `is_first` must say which chunk this is). `state` is
    consumed: its cache and decode state are donated to the new state.
    """
    if track_grid is not None:
      track_grid = jnp.asarray(track_grid, jnp.float32)  # numpy and jax inputs share one dispatch entry
      chex.assert_rank(track_grid, 5)
      frames = track_grid.shape[1]
      if frames not in (self.first_chunk_frames, self.later_chunk_frames):
        raise ValueError(f"a chunk's track grid must have {self.first_chunk_frames} (first chunk) or "
                         f"{self.later_chunk_frames} (later chunks) frames, got {frames}")
      is_first = frames == self.first_chunk_frames
    elif is_first is None:
      raise ValueError("chunk_step without a track grid needs is_first (is this the stream's first chunk?)")
    # Make reads the cache and consumes the decode state; commit then consumes the cache. On an accelerator
    # both are queued at once, and the frames are ready before the commit has run.
    first_latent = state.first_latent if is_first else None
    x0, decode_state, frames = self._make(self.model.dit_params, self.model.codec_params, self.timesteps,
                                          state.cache, state.decode_state, state.rng, first_latent, track_grid,
                                          is_first=is_first, decode=decode)
    cache = self._commit(self.model.dit_params, state.cache, x0, first_latent, track_grid, is_first=is_first)
    return state.replace(cache=cache, decode_state=decode_state), frames

  def dummy_grid(self, batch: int, is_first: bool) -> jax.Array | None:
    """An all-zero track grid of one chunk (no motion condition), or None for a model without tracks."""
    if not self.config.model.track_channels:
      return None
    geo = self.geometry
    frames = self.first_chunk_frames if is_first else self.later_chunk_frames
    return jnp.zeros((batch, frames, geo.latent_height, geo.latent_width,
                      config_utils.track_grid_channels(self.config)))

  def warmup(self, *, decode: bool = True) -> float:
    """Compiles everything a stream runs (text encoder, first-frame encoder, cross-attention K/V, the first-
    and later-chunk programs) on a throwaway batch-1 stream; returns the seconds it took."""
    begin = time.perf_counter()
    geo = self.geometry
    first_frame = np.zeros((geo.height, geo.width, 3), np.uint8)
    state = start_stream(self, first_frame, "", seed=0)
    for is_first in (True, False):
      state, frames = self.chunk_step(state, self.dummy_grid(1, is_first), is_first=is_first, decode=decode)
    jax.block_until_ready((state, frames))
    return time.perf_counter() - begin


# ----------------------------------------------------------------------------------------------------------
# The model, with the decoder asked for.


class DecoderError(ValueError):
  """A decoder that cannot decode the preset's latents; the message names both."""


def load_stream_model(config: ml_collections.ConfigDict, *, checkpoint: str | None, decoder: str,
                      decoder_checkpoint: str = "") -> inference.Model:
  """The student at `checkpoint` (None: random weights) with `decoder` as its codec.

  `decoder` must share the preset's latent space (e.g. 'taehv' for a 'wan' preset); it encodes the first frame
  and decodes the chunks. Its weights come from `decoder_checkpoint`, or are random only with random DiT
  weights. `config.seed` seeds random weights.
  """
  decoder_config = copy.deepcopy(config)
  decoder_config.codec.name = decoder
  try:
    codec = codecs.make_codec(decoder_config)
  except ValueError as e:  # a ConfigError: other strides or latent channels than the preset's
    raise DecoderError(f"decoder {decoder!r} cannot decode the {config.preset!r} preset's latents: {e}") from e
  same_codec = decoder == config.codec.name
  if checkpoint is None:
    model = inference.random_model(config, int(config.get("seed", 0)))
    if same_codec and not decoder_checkpoint:
      return model
  else:
    # A different decoder replaces the preset's codec below, so the preset's own needs no weights here.
    model = inference.load_model(checkpoint, config, codec_checkpoint=decoder_checkpoint if same_codec else "",
                                 random_codec=not same_codec)
    if same_codec:
      return model
  codec_params = inference.codec_params(
      decoder_config, decoder_checkpoint, checkpoint is None, codec)
  return dataclasses.replace(model, codec=codec, codec_params=codec_params)


# ----------------------------------------------------------------------------------------------------------
# Tracks, chunk by chunk.


def chunk_span(index: int, chunk_frames: int, temporal_stride: int) -> tuple[int, int]:
  """Pixel frames [start, end) of chunk `index` of an endless stream (the rule of `tracks.chunk_frame_ranges`)."""
  end = config_utils.video_frames((index + 1) * chunk_frames, temporal_stride)
  start = 0 if index == 0 else config_utils.video_frames(index * chunk_frames, temporal_stride)
  return start, end


def num_chunks_for(num_frames: int, chunk_frames: int, temporal_stride: int) -> int:
  """Chunks needed to make at least `num_frames` frames (the last one is trimmed)."""
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  latent_frames = 1 + math.ceil((num_frames - 1) / temporal_stride)
  return math.ceil(latent_frames / chunk_frames)


def _source_frames(index: np.ndarray, num_source_frames: int, loop: bool) -> np.ndarray:
  """Stream frame -> tracks frame: the same frame while the tracks last, then the last one held, or looped."""
  return index % num_source_frames if loop else np.minimum(index, num_source_frames - 1)


def _chunk_from_item(item: Any, frames: int, index: int, height: int, width: int) -> tracks_lib.Tracks:
  """A live source's item for one chunk: Tracks, [T, N, 2|3] with T = the chunk's frames, or [N, 2|3] (one
  position for the whole chunk). Points outside the frame are hidden for those frames, with a warning."""
  source = f"tracks chunk {index}"
  if isinstance(item, tracks_lib.Tracks):
    points, visible = item.points, item.visible
  else:
    points, visible = np.asarray(item), None
    if points.ndim == 2:
      points = np.broadcast_to(points[None], (frames,) + points.shape)
  chunk = tracks_lib.validate_tracks(points, visible, source=source, height=height, width=width)
  if chunk.num_frames != frames:
    raise tracks_lib.TracksError(f"{source}: expected {frames} frames (this chunk's), found {chunk.num_frames}")
  return chunk


def chunk_tracks(source: TracksSource, config: ml_collections.ConfigDict, num_chunks: int | None, *,
                 loop: bool = False) -> Iterator[tracks_lib.Tracks]:
  """Per-chunk `Tracks` (exactly each chunk's pixel frames) from a whole `Tracks` or a live iterator.

  A `Tracks` shorter than the stream holds its last position, or loops when `loop`. A live iterator gives one
  item per chunk (`_chunk_from_item`); the stream ends when it does. `num_chunks` None = until the source ends
  (never, for a `Tracks` with `loop`, so give a count).
  """
  c, s = config.stream.chunk_frames, config.codec.temporal_stride
  height, width = config.video.height, config.video.width
  indices = range(num_chunks) if num_chunks is not None else itertools.count()
  if isinstance(source, tracks_lib.Tracks):
    whole = tracks_lib.validate_tracks(source.points, source.visible, source="tracks", height=height, width=width)
    if num_chunks is None and not loop:
      indices = range(num_chunks_for(whole.num_frames, c, s))
    for index in indices:
      frame = _source_frames(np.arange(*chunk_span(index, c, s)), whole.num_frames, loop)
      yield tracks_lib.Tracks(points=whole.points[frame], visible=whole.visible[frame])
    return
  if loop:
    raise ValueError("loop needs a whole Tracks object; a live iterator of chunks cannot be replayed")
  items = iter(source)
  for index in indices:
    try:
      item = next(items)
    except StopIteration:
      return
    start, end = chunk_span(index, c, s)
    yield _chunk_from_item(item, end - start, index, height, width)


# ----------------------------------------------------------------------------------------------------------
# The frame iterator.


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One streamed chunk: its frames (trimmed at the requested length), the tracks it followed, its wall time."""
  index: int
  frames: np.ndarray  # uint8 [T, H, W, 3]
  tracks: tracks_lib.Tracks  # the same T frames
  seconds: float  # from asking for the chunk to having its frames on the host


def prompt_context(model: inference.Model, prompt: str | np.ndarray) -> jax.Array:
  """[1, text_len, text_dim]: a prompt through the model's text encoder, or a precomputed [L, text_dim]
  embedding (zero padded to text_len; e.g. umT5 outputs made elsewhere)."""
  if isinstance(prompt, str):
    context, _ = inference.encode_prompt(model, [prompt])
    return context
  embedding = np.asarray(prompt, np.float32)
  text_len, text_dim = model.config.model.text_len, model.config.model.text_dim
  if embedding.ndim != 2 or embedding.shape[1] != text_dim or embedding.shape[0] > text_len:
    raise ValueError(f"a prompt embedding must be [L <= {text_len}, {text_dim}], got {embedding.shape}")
  padded = np.zeros((text_len, text_dim), np.float32)
  padded[:embedding.shape[0]] = embedding
  return jnp.asarray(padded)[None]


def start_stream(sampler: StreamSampler, first_frame: np.ndarray | None, prompt: str | np.ndarray,
                 seed: int) -> StreamState:
  """A batch-1 stream from user inputs: the prompt is embedded and the first frame encoded here, once."""
  model = sampler.model
  first = None if first_frame is None else inference.first_latent(model, first_frame, sampler.encode_first)
  context = prompt_context(model, prompt)
  return sampler.start(inference.conditioning(model, context, first, None), seed)


def stream_chunks(model: inference.Model, first_frame: np.ndarray | None, prompt: str | np.ndarray,
                  tracks_source: TracksSource, num_frames: int | None = None, *, loop_tracks: bool = False,
                  seed: int = 0, sampler: StreamSampler | None = None) -> Iterator[Chunk]:
  """Streams chunks as they are made. `first_frame` uint8 [H, W, 3] (None: no image condition); `prompt` a
  string or a precomputed embedding; `num_frames` None = as long as the tracks (a live source: until it ends).

  Pass a warmed-up `sampler` to keep compilation out of the first chunk's time.
  """
  sampler = sampler or StreamSampler(model)
  config = model.config
  c, s = config.stream.chunk_frames, config.codec.temporal_stride
  num_chunks = None if num_frames is None else num_chunks_for(num_frames, c, s)
  state = start_stream(sampler, first_frame, prompt, seed)
  made = 0
  for index, tracks in enumerate(chunk_tracks(tracks_source, config, num_chunks, loop=loop_tracks)):
    begin = time.perf_counter()
    grid = inference.conditioning(model, None, None, inference.track_grid(tracks, config, seed=seed)).track_grid
    state, frames = sampler.chunk_step(state, grid, is_first=index == 0)
    frames = np.asarray(frames[0])
    seconds = time.perf_counter() - begin
    keep = frames.shape[0] if num_frames is None else min(frames.shape[0], num_frames - made)
    made += keep
    yield Chunk(index=index, frames=frames[:keep],
                tracks=tracks_lib.Tracks(points=tracks.points[:keep], visible=tracks.visible[:keep]),
                seconds=seconds)


def stream(model: inference.Model, first_frame: np.ndarray | None, prompt: str | np.ndarray,
           tracks_source: TracksSource, num_frames: int | None = None, **kwargs) -> Iterator[np.ndarray]:
  """uint8 [H, W, 3] frames, yielded as soon as their chunk is made (arguments: `stream_chunks`)."""
  for chunk in stream_chunks(model, first_frame, prompt, tracks_source, num_frames, **kwargs):
    yield from chunk.frames


# ----------------------------------------------------------------------------------------------------------
# Following the tracks, measured.


def track_following_epe(video: np.ndarray, tracks: tracks_lib.Tracks, colors: np.ndarray,
                        min_pixels: int = metrics.MIN_SPRITE_PIXELS) -> dict[str, float]:
  """How far the sprites of `colors` [S, 3] in `video` [T, H, W, 3] are from where their tracks lead (pixels).

  A sprite's tracks are those starting on it in frame 0; its detected centroid path is compared with their
  mean displacement over the frames after the given one (`metrics.track_epe`, `metrics.FIRST_SCORED_FRAME`).
  Only meaningful where sprite colours are known (the built-in scene).
  """
  chex.assert_axis_dimension(video, 0, tracks.num_frames)
  detected = metrics.detect_sprites(video, colors, min_pixels=min_pixels)
  members = metrics.sprite_track_members(video[0], tracks.points, tracks.visible, colors)
  scored = np.broadcast_to(metrics.scored_frames(tracks.num_frames)[:, None], detected.found.shape)
  return metrics.track_epe(detected, tracks.points, tracks.visible, members, scored).summary()
