"""The streaming sampler and the shared rollout: train/test parity, compiled programs, the sink, frame counts,
track sources, the EPE used by `sample.py --eval`, and the benchmark's FLOP count."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sample as sample_config
from msjax import codecs
from msjax import config_utils
from msjax import inference
from msjax.bench import stream as stream_bench
from msjax.data import sprites
from msjax.data import tracks as tracks_lib
from msjax.eval import metrics
from msjax.models import kv_cache
from msjax.models import text as text_lib
from msjax.models import track_head
from msjax.stream import rollout
from msjax.stream import sampler as sampler_lib
import dit_fixtures

SEED = 3
PROMPT = np.ones((2, 384), np.float32)  # a precomputed [L, text_dim] embedding
PARAM_SCALE = 0.05  # std of the random weights


def _config():
  """The DiT test fixtures' small model (32x32 px, 64 wide) with one layer, precomputed text embeddings (no
  encoder to compile) and the sampler's flow shift."""
  config = dit_fixtures.small_config()
  config.model.num_layers = 1
  config.text.encoder = "precomputed"
  config.flow = sample_config.get_config("tiny").flow
  return config


@functools.lru_cache(maxsize=None)
def _shared_model() -> inference.Model:
  return _random_model(_config())


def _random_model(config) -> inference.Model:
  """Random weights drawn directly at the traced shapes (every output depends on every layer and the cache)."""
  shapes = jax.eval_shape(lambda: inference.init_dit_params(config, jax.random.key(0)))
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(0)
  params = [jnp.asarray(PARAM_SCALE * rng.standard_normal(leaf.shape), jnp.float32) for leaf in leaves]
  return inference.Model(config=config, dit_params=jax.tree.unflatten(treedef, params),
                         text_encoder=text_lib.make_text_encoder(config), text_params={},
                         codec=codecs.make_codec(config), codec_params=None, stage="random")


def _context(model: inference.Model, seed: int = 0) -> jax.Array:
  """A prompt's context: random precomputed embeddings of a few tokens."""
  embedding = np.random.default_rng(seed).standard_normal((4, model.config.model.text_dim)).astype(np.float32)
  return sampler_lib.prompt_context(model, embedding)


@functools.lru_cache(maxsize=None)
def _shared_sampler() -> sampler_lib.StreamSampler:
  return sampler_lib.StreamSampler(_shared_model())


def _random_tracks(config, num_frames: int, num_tracks: int = 12, seed: int = 0) -> tracks_lib.Tracks:
  rng = np.random.default_rng(seed)
  size = np.array([config.video.width, config.video.height], np.float32)
  start = rng.uniform(0, 1, (num_tracks, 2)) * size
  steps = rng.normal(0, 0.5, (num_frames, num_tracks, 2)).cumsum(axis=0)
  points = np.clip(start + steps, 0, size - 1).astype(np.float32)
  return tracks_lib.Tracks(points=points, visible=rng.uniform(size=(num_frames, num_tracks)) < 0.9)


def _first_frame(config) -> np.ndarray:
  rng = np.random.default_rng(7)
  return rng.integers(0, 256, (config.video.height, config.video.width, 3), dtype=np.uint8)


def _stack(trees):
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


# ----------------------------------------------------------------------------------------------------------
# Parity: the DMD rollout (lax.scan) is the sampler's loop.


def test_rollout_scan_equals_sampler_loop_chunk_by_chunk():
  sampler = _shared_sampler()
  model, config = sampler.model, sampler.config
  geo = config_utils.geometry(config)
  num_chunks = geo.latent_frames // geo.chunk_frames
  tracks = _random_tracks(config, geo.num_frames)
  first = inference.first_latent(model, _first_frame(config))
  context = _context(model)
  grid = inference.track_grid(tracks, config, seed=SEED)
  cond = inference.conditioning(model, context, first, grid)

  # The sampler: one jitted chunk step at a time, tracks rasterised per chunk as a live stream does.
  state = sampler.start(cond.replace(track_grid=None), seed=SEED)
  loop_frames, loop_caches = [], []
  for index in range(num_chunks):
    start, end = sampler_lib.chunk_span(index, geo.chunk_frames, config.codec.temporal_stride)
    chunk = tracks_lib.Tracks(points=tracks.points[start:end], visible=tracks.visible[start:end])
    state, frames = sampler.chunk_step(state, inference.track_grid(chunk, config, seed=SEED)[None])
    loop_frames.append(np.asarray(frames[0]))
    loop_caches.append(jax.tree.map(np.asarray, (state.cache.sink_k, state.cache.window_k, state.cache.window_v)))

  # The trainer's rollout: one lax.scan over the same chunks, noise drawn by the same rule.
  shape = (1, geo.chunk_frames, geo.latent_height, geo.latent_width, geo.latent_channels)
  noises = jnp.concatenate([rollout.chunk_noise(jax.random.key(SEED), i, shape) for i in range(num_chunks)], axis=1)
  cache = kv_cache.init_cache(model.dit_params, config, cond, 1)
  scan = jax.jit(rollout.rollout)
  cache, x0s = scan(model.dit_params, cache, noises, cond, sampler.timesteps, jax.random.key(SEED))
  chex.assert_shape(x0s, (1, geo.latent_frames, geo.latent_height, geo.latent_width, geo.latent_channels))

  # The final caches agree, so every committed chunk did; decoded chunks give the sampler's frames.
  for got, want in zip((cache.sink_k, cache.window_k, cache.window_v), loop_caches[-1]):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  video = inference.to_uint8(model.codec.decode(model.codec_params, x0s))[0]
  np.testing.assert_array_equal(video, np.concatenate(loop_frames))
  # The user's first frame is the stream's first frame, exactly (pack is lossless).
  np.testing.assert_array_equal(loop_frames[0][0], _first_frame(config))
  assert int(cache.committed) == num_chunks


def test_rollout_rejects_a_grid_that_does_not_fit():
  sampler = _shared_sampler()
  config, geo = sampler.config, sampler.geometry
  cache = kv_cache.init_cache(sampler.model.dit_params, config, track_head.Conditioning(
      context=jnp.zeros((1, config.model.text_len, config.model.text_dim))), 1)
  noises = jnp.zeros((1, 2 * geo.chunk_frames, geo.latent_height, geo.latent_width, geo.latent_channels))
  grid = jnp.zeros((1, 7, geo.latent_height, geo.latent_width, config.tracks.embed_dim))
  with pytest.raises(ValueError, match="track grid has 7 frames"):
    rollout.rollout(sampler.model.dit_params, cache, noises, track_head.Conditioning(track_grid=grid),
                    sampler.timesteps, jax.random.key(0))
  with pytest.raises(ValueError, match="whole chunks"):
    rollout.rollout(sampler.model.dit_params, cache, noises[:, 1:], track_head.Conditioning(),
                    sampler.timesteps, jax.random.key(0))


@pytest.mark.parametrize("num_chunks", [1, 3])
def test_a_clip_grid_splits_into_its_chunks(num_chunks):
  c, s = 3, 4
  frames = config_utils.video_frames(num_chunks * c, s)
  grid = jnp.arange(frames, dtype=jnp.float32).reshape(1, frames, 1, 1, 1)
  first, later = rollout._split_track_grid(grid, num_chunks, c, s)  # pylint: disable=protected-access
  chex.assert_shape([first, later], [(1, 1 + s * (c - 1), 1, 1, 1), (num_chunks - 1, 1, s * c, 1, 1, 1)])
  pieces = [first[0, :, 0, 0, 0]] + [chunk[0, :, 0, 0, 0] for chunk in later]
  spans = [sampler_lib.chunk_span(i, c, s) for i in range(num_chunks)]
  for piece, (start, end) in zip(pieces, spans):
    np.testing.assert_array_equal(piece, np.arange(start, end))
  continuing = jnp.zeros((1, s * c * num_chunks, 1, 1, 1))  # a clip that continues a stream: whole chunks
  none, rest = rollout._split_track_grid(continuing, num_chunks, c, s)  # pylint: disable=protected-access
  assert none is None and rest.shape[:3] == (num_chunks, 1, s * c)


def test_generate_chunk_exit_step_returns_that_steps_x0():
  """DMD's exit step: at K-1 it is the full sampler; at 0 it is a one-step sample from the same noise."""
  sampler = _shared_sampler()
  model, config, geo = sampler.model, sampler.config, sampler.geometry
  context = _context(model)
  cache = kv_cache.init_cache(model.dit_params, config, track_head.Conditioning(context=context), 1)
  noise = rollout.chunk_noise(jax.random.key(0), 0, (1, geo.chunk_frames, geo.latent_height, geo.latent_width,
                                                      geo.latent_channels))
  cond = track_head.Conditioning()
  generate = jax.jit(rollout.generate_chunk)
  timesteps, key = sampler.timesteps, jax.random.key(5)
  full = generate(model.dit_params, cache, noise, cond, timesteps, key)
  np.testing.assert_allclose(generate(model.dit_params, cache, noise, cond, timesteps, key,
                                      exit_step=timesteps.shape[0] - 1), full, atol=1e-6)
  one_step = generate(model.dit_params, cache, noise, cond, timesteps[:1], key)
  np.testing.assert_allclose(generate(model.dit_params, cache, noise, cond, timesteps, key, exit_step=0), one_step,
                             atol=1e-6)
  assert not np.allclose(one_step, full, atol=1e-3)


@pytest.mark.slow
def test_rollout_gradient_flows_only_through_the_exit_step():
  sampler = _shared_sampler()
  model, config, geo = sampler.model, sampler.config, sampler.geometry
  context = _context(model)
  cond = track_head.Conditioning(context=context)
  cache = kv_cache.init_cache(model.dit_params, config, cond, 1)
  noises = jax.random.normal(jax.random.key(0), (1, 2 * geo.chunk_frames, geo.latent_height, geo.latent_width,
                                                  geo.latent_channels))

  def loss(params, exit_steps):
    return jnp.mean(rollout.rollout(params, cache, noises, cond, sampler.timesteps, jax.random.key(1),
                                    exit_steps=exit_steps)[1] ** 2)

  grads = jax.jit(jax.grad(loss))(model.dit_params, jnp.array([1, 2], jnp.int32))
  chex.assert_tree_all_finite(grads)
  assert float(jnp.abs(grads["blocks"]["ffn"]["fc1"]["kernel"]).max()) > 0


# ----------------------------------------------------------------------------------------------------------
# The sampler: compiled programs, the sink, frame counts.


def test_one_program_for_every_later_chunk_and_the_first_chunk_is_the_sink():
  sampler = _shared_sampler()
  config = sampler.config
  state = sampler_lib.start_stream(sampler, _first_frame(config), _context(sampler.model)[0, :4], seed=SEED)
  state, frames = sampler.chunk_step(state, sampler.dummy_grid(1, True))
  chex.assert_shape(frames, (1, sampler.first_chunk_frames, config.video.height, config.video.width, 3))
  assert (int(state.chunk_index), int(state.cache.window_filled)) == (1, 0)
  sink = np.asarray(state.cache.sink_k)
  assert np.abs(sink).max() > 0
  np.testing.assert_array_equal(state.cache.window_k, 0.0)
  programs = None
  for index in range(1, 6):
    state, frames = sampler.chunk_step(state, sampler.dummy_grid(1, False))
    chex.assert_shape(frames, (1, sampler.later_chunk_frames, config.video.height, config.video.width, 3))
    if index == 1:
      programs = sampler.compiled_programs()
  assert sampler.compiled_programs() == programs <= 4  # make and commit, for the first and later chunks
  np.testing.assert_array_equal(state.cache.sink_k, sink)  # the sink is the first chunk, forever
  assert int(state.chunk_index) == 6


def test_starting_a_stream_is_compiled_once_and_keeps_the_callers_first_latent():
  """The first-frame encode and the cache set-up run as compiled programs (eagerly they dominated the first-
  frame latency of a large preset), reused by every later stream; the donated state owns its buffers."""
  sampler = _shared_sampler()
  config = sampler.config
  frame = _first_frame(config)
  for seed in (SEED, SEED + 1):
    first = inference.first_latent(sampler.model, frame, sampler.encode_first)
    cond = inference.conditioning(sampler.model, _context(sampler.model), first, None)
    state = sampler.start(cond, seed)
    state, _ = sampler.chunk_step(state, sampler.dummy_grid(1, True))
    assert not first.is_deleted()  # the chunk step donated the state's copy, not the caller's latent
  np.testing.assert_allclose(first, inference.first_latent(sampler.model, frame), rtol=1e-5, atol=1e-5)
  assert sampler.encode_first._cache_size() == 1  # pylint: disable=protected-access
  assert sampler._start._cache_size() == 1  # pylint: disable=protected-access


@pytest.mark.parametrize("num_frames", [1, 13, 30])
def test_stream_yields_exactly_num_frames(num_frames):
  sampler = _shared_sampler()
  config = sampler.config
  tracks = _random_tracks(config, 8)  # shorter than the stream: the last position is held
  chunks = list(sampler_lib.stream_chunks(sampler.model, _first_frame(config), PROMPT, tracks, num_frames,
                                          sampler=sampler))
  c, s = config.stream.chunk_frames, config.codec.temporal_stride
  assert len(chunks) == sampler_lib.num_chunks_for(num_frames, c, s)
  lengths = [chunk.frames.shape[0] for chunk in chunks]
  full = [sampler.first_chunk_frames] + [sampler.later_chunk_frames] * (len(chunks) - 1)
  assert sum(lengths) == num_frames
  assert lengths[:-1] == full[:-1] and 1 <= lengths[-1] <= full[-1]  # only the last chunk is trimmed
  assert all(chunk.tracks.num_frames == chunk.frames.shape[0] for chunk in chunks)
  frames = list(sampler_lib.stream(sampler.model, _first_frame(config), PROMPT, tracks, num_frames, sampler=sampler))
  assert len(frames) == num_frames and frames[0].dtype == np.uint8


@pytest.mark.parametrize("splat", ["nearest", "nearest_offset"])
def test_only_a_nearest_offset_stream_sees_where_points_sit_inside_their_cells(splat):
  config = _config()
  config.tracks.splat = splat
  sampler = sampler_lib.StreamSampler(_random_model(config))
  tracks = _random_tracks(config, 13)
  stride = config.codec.spatial_stride
  inside = np.random.default_rng(3).uniform(0.05, 0.95, tracks.points.shape)
  moved = tracks_lib.Tracks(points=((tracks.points // stride + inside) * stride).astype(np.float32),
                            visible=tracks.visible)
  assert not np.allclose(moved.points, tracks.points, atol=0.1)
  videos = [np.stack(list(sampler_lib.stream(sampler.model, _first_frame(config), PROMPT, t, 13, sampler=sampler)))
            for t in (tracks, moved)]
  assert np.array_equal(videos[0], videos[1]) == (splat == "nearest")


def test_a_live_source_drives_the_stream_until_it_ends():
  sampler = _shared_sampler()
  config = sampler.config
  rng = np.random.default_rng(0)
  positions = [rng.uniform(0, config.video.width, (5, 2)).astype(np.float32) for _ in range(2)]  # one per chunk
  frames = list(sampler_lib.stream(sampler.model, _first_frame(config), PROMPT, iter(positions), sampler=sampler))
  assert len(frames) == sampler.first_chunk_frames + sampler.later_chunk_frames


def test_prompt_embeddings_are_padded_and_checked():
  model = _shared_model()
  text_len, text_dim = model.config.model.text_len, model.config.model.text_dim
  embedding = np.ones((3, text_dim), np.float32)
  context = sampler_lib.prompt_context(model, embedding)
  chex.assert_shape(context, (1, text_len, text_dim))
  np.testing.assert_array_equal(context[0, :3], 1.0)
  np.testing.assert_array_equal(context[0, 3:], 0.0)
  with pytest.raises(ValueError, match=f"\\[L <= {text_len}, {text_dim}\\]"):
    sampler_lib.prompt_context(model, np.ones((3, text_dim + 1), np.float32))


# ----------------------------------------------------------------------------------------------------------
# Tracks chunk by chunk (host only).


def test_chunk_span_is_the_chunk_frame_rule():
  for c, s in ((3, 4), (1, 4), (2, 2)):
    num_frames = config_utils.video_frames(5 * c, s)
    assert [sampler_lib.chunk_span(i, c, s) for i in range(5)] == tracks_lib.chunk_frame_ranges(num_frames, c, s)


@pytest.mark.parametrize("loop", [False, True])
def test_short_tracks_hold_their_last_position_or_loop(loop):
  config = _config()
  tracks = _random_tracks(config, 10)
  chunks = list(sampler_lib.chunk_tracks(tracks, config, 3, loop=loop))
  points = np.concatenate([chunk.points for chunk in chunks])
  visible = np.concatenate([chunk.visible for chunk in chunks])
  frames = np.arange(points.shape[0])
  source = frames % 10 if loop else np.minimum(frames, 9)
  assert points.shape[0] == config_utils.video_frames(3 * config.stream.chunk_frames, config.codec.temporal_stride)
  np.testing.assert_array_equal(points, tracks.points[source])
  np.testing.assert_array_equal(visible, tracks.visible[source])
  if not loop:
    np.testing.assert_array_equal(points[-1], tracks.points[-1])


def test_tracks_leaving_the_frame_are_hidden_with_a_warning():
  config = _config()
  tracks = _random_tracks(config, 9)
  points = tracks.points.copy()
  points[4:, 0] = [config.video.width + 5, 3]  # track 0 leaves through the right edge at frame 4
  with pytest.warns(tracks_lib.TracksWarning, match="outside"):
    chunk = next(sampler_lib.chunk_tracks(tracks_lib.Tracks(points=points, visible=tracks.visible), config, 1))
  assert not chunk.visible[4:, 0].any()
  np.testing.assert_array_equal(chunk.visible[:4, 0], tracks.visible[:4, 0])
  live = [points[:sampler_lib.chunk_span(0, 3, 4)[1]]]
  with pytest.warns(tracks_lib.TracksWarning, match="tracks chunk 0"):
    next(sampler_lib.chunk_tracks(iter(live), config, None))


def test_live_items_are_checked_and_cannot_loop():
  config = _config()
  first_frames = sampler_lib.chunk_span(0, config.stream.chunk_frames, config.codec.temporal_stride)[1]
  with pytest.raises(tracks_lib.TracksError, match=f"expected {first_frames} frames"):
    next(sampler_lib.chunk_tracks(iter([np.zeros((first_frames + 1, 4, 2))]), config, None))
  with pytest.raises(ValueError, match="loop"):
    next(sampler_lib.chunk_tracks(iter([]), config, None, loop=True))
  with_visibility = np.concatenate([np.ones((4, 2)), np.zeros((4, 1))], axis=-1)  # [N, 3]: all hidden
  chunk = next(sampler_lib.chunk_tracks(iter([with_visibility]), config, None))
  assert chunk.num_frames == first_frames and not chunk.visible.any()


# ----------------------------------------------------------------------------------------------------------
# --eval's EPE and the benchmark's FLOPs.


def test_track_following_epe_is_small_on_the_true_video_and_large_on_a_frozen_one():
  world = sprites.SpritesConfig()
  clip = sprites.example_scene(world)
  tracks = tracks_lib.Tracks(points=clip.tracks, visible=clip.visibility)
  true = sampler_lib.track_following_epe(clip.video, tracks, clip.colors)
  frozen = sampler_lib.track_following_epe(np.repeat(clip.video[:1], world.num_frames, axis=0), tracks, clip.colors)
  assert true["frames"] == len(clip.colors) * (world.num_frames - metrics.FIRST_SCORED_FRAME)  # not the given frame
  assert true["missed_fraction"] == 0.0
  assert true["mean"] < 0.5
  assert frozen["mean"] > 4 * max(true["mean"], 0.25)


def test_flops_per_chunk_match_the_wan_reference():
  """wan.md section 6: 12.15 + 1.346 N TFLOP per pass with N = 9 context frames (c3s1w1), 4 passes ~ 97 TFLOP."""
  config = sample_config.get_config("wan2_1_1_3b")
  assert stream_bench.flops_per_chunk(config) / 1e12 == pytest.approx(4 * (12.15 + 1.346 * 9), rel=0.01)
  config.stream.window_chunks = 2  # one more chunk of keys: + 4 passes x 3 frames x 1.346 TFLOP
  assert stream_bench.flops_per_chunk(config) / 1e12 == pytest.approx(4 * (12.15 + 1.346 * 12), rel=0.01)


@pytest.mark.slow
def test_chunk_time_and_memory_stay_flat_over_a_long_stream():
  sampler = _shared_sampler()
  result = stream_bench.flatness(sampler, num_chunks=300)
  # CPU time rather than wall time, and a loose bound: CI machines are shared.
  assert result["cpu_late_over_early"] < 1 + 4 * stream_bench.FLAT_TOLERANCE, result
  assert result["rss_end_mib"] < result["rss_at_110_mib"] * 1.02 + 10, result  # no growth after warm-up
