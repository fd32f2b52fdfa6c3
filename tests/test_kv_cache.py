"""The streaming cache: parity with masked forwards, bounded RoPE positions, purity, one compiled program."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msjax import config_utils
from msjax.models import attention
from msjax.models import kv_cache
import dit_fixtures

NOISY_T = 0.7


def _chunk(x: jax.Array, index: int, chunk_frames: int) -> jax.Array:
  return x[:, index * chunk_frames:(index + 1) * chunk_frames]


def _masked_forward(model, params, config, x, t, cond, sink, window):
  geo = config_utils.geometry(config)
  num_chunks = x.shape[1] // geo.chunk_frames
  mask = attention.expand_chunk_mask(attention.block_causal_chunk_mask(num_chunks, sink, window),
                                     geo.tokens_per_chunk)
  return jax.jit(model.apply)({"params": params}, x, t, cond, mask=mask)


def _stream_clip(params, config, clean, noisy, cond):
  """Streams the clip: chunks before the last are denoised at t = 0 (the commit pass's own output) and
  committed clean; the last is denoised from `noisy` at NOISY_T. Returns the concatenated outputs."""
  c = config.stream.chunk_frames
  num_chunks = clean.shape[1] // c
  batch = clean.shape[0]
  state = kv_cache.init_cache(params, config, cond, batch)
  denoise, commit = jax.jit(kv_cache.denoise), jax.jit(kv_cache.commit)
  outputs = []
  for i in range(num_chunks):
    chunk_cond = dit_fixtures.chunk_cond(cond, i, config)
    if i < num_chunks - 1:
      outputs.append(denoise(params, state, _chunk(clean, i, c), jnp.zeros((batch,)), chunk_cond))
      state = commit(params, state, _chunk(clean, i, c), chunk_cond)
    else:
      outputs.append(denoise(params, state, noisy, jnp.full((batch,), NOISY_T), chunk_cond))
  return jnp.concatenate(outputs, axis=1), state


def _clip_with_noisy_last(clean, noisy):
  c = noisy.shape[1]
  x = clean.at[:, -c:].set(noisy)
  t = jnp.zeros(clean.shape[:2]).at[:, -c:].set(NOISY_T)
  return x, t


@pytest.mark.parametrize("rope_mode,sink,window", [("cache", 1, 3), ("absolute", 1, 1)])
def test_streaming_equals_one_block_causal_forward(rope_mode, sink, window):
  """(a) Streaming chunk by chunk equals ONE block-causal masked forward over the clip in which the committed
  chunks are clean at t = 0 and the last chunk is noisy. 'cache' with S + W covering the clip (positions are
  absolute while the cache fills); 'absolute' with c3s1w1, so the ring evicts and keys keep absolute
  positions, exactly what the (S=1, W=1) mask describes."""
  config = dit_fixtures.small_config(sink_chunks=sink, window_chunks=window, rope_mode=rope_mode)
  _, model, params, clean, cond = dit_fixtures.small_setup()
  c = config.stream.chunk_frames
  noisy = jax.random.normal(jax.random.key(11), _chunk(clean, 0, c).shape)
  streamed, state = _stream_clip(params, config, clean, noisy, cond)
  x, t = _clip_with_noisy_last(clean, noisy)
  reference = _masked_forward(model, params, config, x, t, cond, sink, window)
  assert int(state.committed) == clean.shape[1] // c - 1
  np.testing.assert_allclose(streamed, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_streaming_noisy_chunks_equal_prefix_forwards():
  """Every chunk denoised at a noisy t against the cache equals a masked forward over its prefix."""
  config = dit_fixtures.small_config(sink_chunks=1, window_chunks=3)
  _, model, params, clean, cond = dit_fixtures.small_setup()
  c = config.stream.chunk_frames
  noisy = jax.random.normal(jax.random.key(12), clean.shape)
  state = kv_cache.init_cache(params, config, cond, 1)
  denoise, commit = jax.jit(kv_cache.denoise), jax.jit(kv_cache.commit)
  for i in range(1, clean.shape[1] // c):
    chunk_cond = dit_fixtures.chunk_cond(cond, i - 1, config)
    state = commit(params, state, _chunk(clean, i - 1, c), chunk_cond)
    got = denoise(params, state, _chunk(noisy, i, c), jnp.full((1,), NOISY_T),
                  dit_fixtures.chunk_cond(cond, i, config))
    prefix_end = (i + 1) * c
    prefix_cond = cond.replace(track_grid=cond.track_grid[:, :1 + config.codec.temporal_stride * (prefix_end - 1)])
    x, t = _clip_with_noisy_last(clean[:, :prefix_end], _chunk(noisy, i, c))
    reference = _masked_forward(model, params, config, x, t, prefix_cond, 1, 3)
    np.testing.assert_allclose(got, _chunk(reference, i, c), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope_mode,num_chunks", [("cache", 100), ("absolute", 8)])
def test_long_stream_positions_shapes_and_one_program(rope_mode, num_chunks):
  """(b) c3s1w1 over 100 chunks: RoPE positions stay in [0, (S+W+1) c) (cache mode) or grow (absolute mode),
  shapes never change; (d) after warm-up, chunks 3..100 reuse one compiled denoise and one compiled commit."""
  config = dit_fixtures.small_config(sink_chunks=1, window_chunks=1, rope_mode=rope_mode)
  _, _, params, clean, cond = dit_fixtures.small_setup()
  c = config.stream.chunk_frames
  s, w = config.stream.sink_chunks, config.stream.window_chunks
  state = kv_cache.init_cache(params, config, cond, 1)
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), state)
  denoise, commit = jax.jit(kv_cache.denoise), jax.jit(kv_cache.commit)
  chunks = [_chunk(clean, i % 4, c) for i in range(4)]
  later_cond = dit_fixtures.chunk_cond(cond, 1, config)
  t = jnp.full((1,), NOISY_T)
  compiled_before = (denoise._cache_size(), commit._cache_size())  # jit caches are shared with other tests
  compiled_after_warmup = None
  for i in range(num_chunks):
    frames = kv_cache.rope_frames(state)
    current = int(frames.current_start)
    if rope_mode == "cache":
      assert 0 <= current and current + c <= (s + w + 1) * c
      if i >= s + w:
        assert current == (s + w) * c
      filled = int(state.window_filled)
      assert all(0 <= int(start) and int(start) + c <= current for start in frames.window_starts[:filled])
    else:
      assert current == i * c
    chunk_cond = dit_fixtures.chunk_cond(cond, 0, config) if i == 0 else later_cond
    denoise(params, state, chunks[i % 4], t, chunk_cond).block_until_ready()
    state = commit(params, state, chunks[i % 4], chunk_cond)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == shapes
    if i == 2:
      compiled_after_warmup = (denoise._cache_size(), commit._cache_size())
  assert (denoise._cache_size(), commit._cache_size()) == compiled_after_warmup
  # at most two programs each: chunk 0 has fewer track frames than the later chunks
  assert all(after - before <= 2 for after, before in zip(compiled_after_warmup, compiled_before))
  assert int(state.committed) == num_chunks
  assert int(state.window_filled) == w


def test_denoise_leaves_cache_unchanged_and_commit_rolls_the_ring():
  """(c) denoise never touches the cache (bitwise); commit fills the sink first, then the window slots, then
  overwrites the oldest window slot while the sink stays."""
  config = dit_fixtures.small_config(sink_chunks=1, window_chunks=3)  # the layout of the parity test above
  _, _, params, clean, cond = dit_fixtures.small_setup()
  c = config.stream.chunk_frames
  denoise, commit = jax.jit(kv_cache.denoise), jax.jit(kv_cache.commit)
  later = dit_fixtures.chunk_cond(cond, 1, config)
  state = kv_cache.init_cache(params, config, cond, 1)
  state = commit(params, state, _chunk(clean, 0, c), dit_fixtures.chunk_cond(cond, 0, config))
  state = commit(params, state, _chunk(clean, 1, c), later)
  before = jax.tree.map(np.array, state)
  out1 = denoise(params, state, _chunk(clean, 2, c), jnp.full((1,), NOISY_T), later)
  out2 = denoise(params, state, _chunk(clean, 2, c), jnp.full((1,), NOISY_T), later)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, state), before)
  np.testing.assert_array_equal(out1, out2)

  # sink filled, one window slot filled (ring slot 0); the next write goes to slot 1
  assert (int(state.committed), int(state.ring_head), int(state.window_filled)) == (2, 1, 1)
  assert np.abs(before.sink_k).max() > 0 and np.abs(before.window_k[:, :, 0]).max() > 0
  np.testing.assert_array_equal(before.window_k[:, :, 1:], 0.0)
  rolled = state
  for i in (2, 3, 1):  # fills slots 1 and 2, then overwrites the oldest, slot 0
    rolled = commit(params, rolled, _chunk(clean, i, c), later)
  assert (int(rolled.ring_head), int(rolled.window_filled)) == (1, 3)
  np.testing.assert_array_equal(rolled.sink_k, before.sink_k)  # the sink is forever
  assert not np.array_equal(rolled.window_k[:, :, 0], before.window_k[:, :, 0])
  # the ring now holds chunks (2, 3, 1) oldest first, starting at slot 1
  np.testing.assert_array_equal(kv_cache._stream_context(rolled).window_order, [1, 2, 0])


def _rollout_setup():
  config = dit_fixtures.small_config(sink_chunks=1, window_chunks=1)
  _, _, params, clean, cond = dit_fixtures.small_setup()
  c = config.stream.chunk_frames
  later = dit_fixtures.chunk_cond(cond, 1, config)
  chunks = jnp.stack([_chunk(clean, i, c) for i in range(1, 4)])
  state0 = jax.jit(kv_cache.commit)(params, kv_cache.init_cache(params, config, cond, 1), _chunk(clean, 0, c),
                                    dit_fixtures.chunk_cond(cond, 0, config))
  return params, state0, chunks, later


def _scan_rollout(params, state0, chunks, cond):
  """The DMD-style self-rollout: lax.scan over chunks carrying the (stop-gradient) cache."""
  t = jnp.full((chunks.shape[1],), NOISY_T)

  def step(state, x):
    state = jax.lax.stop_gradient(state)
    return kv_cache.commit(params, state, x, cond), kv_cache.denoise(params, state, x, t, cond)

  return jax.lax.scan(step, state0, chunks)[1]


def test_rollout_inside_lax_scan_matches_python_loop():
  """denoise / commit are scan-friendly: a lax.scan rollout over chunks gives the sampler loop's outputs."""
  params, state0, chunks, later = _rollout_setup()
  scanned = jax.jit(_scan_rollout)(params, state0, chunks, later)
  denoise, commit = jax.jit(kv_cache.denoise), jax.jit(kv_cache.commit)
  state, loop = state0, []
  for x in chunks:
    loop.append(denoise(params, state, x, jnp.full((1,), NOISY_T), later))
    state = commit(params, state, x, later)
  np.testing.assert_allclose(scanned, jnp.stack(loop), atol=1e-5)


def test_denoise_is_differentiable():
  params, state0, chunks, later = _rollout_setup()
  loss = lambda p: jnp.mean(kv_cache.denoise(p, state0, chunks[0], jnp.full((1,), NOISY_T), later) ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  chex.assert_tree_all_finite(grads)
  assert float(jnp.abs(grads["blocks"]["self_attn"]["q"]["kernel"]).max()) > 0.0


@pytest.mark.slow
def test_scan_rollout_is_differentiable():
  params, state0, chunks, later = _rollout_setup()
  grads = jax.jit(jax.grad(lambda p: jnp.mean(_scan_rollout(p, state0, chunks, later)[-1] ** 2)))(params)
  chex.assert_tree_all_finite(grads)
  assert float(jnp.abs(grads["blocks"]["ffn"]["fc1"]["kernel"]).max()) > 0.0


def test_bad_chunk_and_config_raise():
  config = dit_fixtures.small_config()
  _, _, params, clean, cond = dit_fixtures.small_setup()
  state = kv_cache.init_cache(params, config, cond, 1)
  with pytest.raises(ValueError, match="streamed chunk"):
    kv_cache.denoise(params, state, clean[:, :2], jnp.zeros((1,)), cond)
  with pytest.raises(ValueError, match="batch"):
    kv_cache.init_cache(params, config, cond, 2)
  config.stream.rope_mode = "relative"
  with pytest.raises(ValueError, match="rope_mode"):
    kv_cache.StreamSpec.from_config(config)
