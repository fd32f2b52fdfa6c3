"""The streaming KV cache and the two pure functions every causal caller uses: `denoise` and `commit`.

A stream denoises one chunk of `chunk_frames` latent frames at a time against a fixed-shape cache:
  * sink:   the first S committed chunks, forever; keys stored AFTER RoPE at positions [s*c, (s+1)*c);
  * window: the W most recent later chunks as a ring of W slots; keys stored BEFORE RoPE and rotated on every
            read at their current cache position (rope_mode 'cache', MotionStream), or stored after RoPE at
            their absolute position (rope_mode 'absolute', Self Forcing's growing positions, for ablations);
  * the text (and CLIP image) cross-attention K/V of the stream, computed once by `init_cache`;
  * int32 counters: chunks committed, ring head (next slot to overwrite = oldest), filled window slots.
Counters are traced values, so after the first chunks one compiled program serves every later chunk.

  state = init_cache(params, config, cond, batch)
  for each chunk:   x0 = ...denoise(params, state, x_t, t, cond)... (a few steps, never changes the cache)
                    state = commit(params, state, x0, cond)           (t = 0 pass that writes the chunk's K/V)

`params` is the inner parameter tree (`variables['params']`). `cond` holds the chunk's own conditioning: its
track grid (1 + 4(c-1) pixel frames for the first chunk, 4c afterwards) and the first-frame latent (used only
by the chunk containing latent frame 0); text and image tokens are read from the cache.
Gradients: nothing here stops gradients. The DMD self-rollout should `jax.lax.stop_gradient` the state it
carries between chunks (cached K/V are constants there); that is the caller's decision, not the cache's.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections

from msjax import config_utils
from msjax.models import dit
from msjax.models import rope
from msjax.models import track_head

Params = dit.Params


@dataclasses.dataclass(frozen=True)
class StreamSpec:
  """Static layout of a stream's cache."""
  chunk_frames: int  # latent frames per chunk
  sink_chunks: int
  window_chunks: int
  rope_mode: str
  latent_height: int
  latent_width: int
  text_len: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> StreamSpec:
    geo = config_utils.geometry(config)
    s = config.stream
    pt = config.model.patch_size[0]
    if s.chunk_frames % pt:
      raise config_utils.ConfigError(f"stream.chunk_frames {s.chunk_frames} not divisible by temporal patch {pt}")
    if s.sink_chunks < 0 or s.window_chunks < 0 or s.sink_chunks + s.window_chunks == 0:
      raise config_utils.ConfigError(
          f"stream needs sink_chunks, window_chunks >= 0 and not both 0; got {s.sink_chunks}, {s.window_chunks}")
    if s.rope_mode not in ("cache", "absolute"):
      raise config_utils.ConfigError(f"stream.rope_mode must be 'cache' or 'absolute', got {s.rope_mode!r}")
    return cls(chunk_frames=s.chunk_frames, sink_chunks=s.sink_chunks, window_chunks=s.window_chunks,
               rope_mode=s.rope_mode, latent_height=geo.latent_height, latent_width=geo.latent_width,
               text_len=config.model.text_len)


@struct.dataclass
class CacheState:
  """Fixed-shape cache of one batch of streams (all streams advance together).

  sink_k / sink_v:       [L, B, S, Nc, H, hd] compute dtype, keys post-RoPE.
  window_k / window_v:   [L, B, W, Nc, H, hd], keys pre-RoPE ('cache') or post-RoPE ('absolute').
  text_k / text_v:       [L, B, text_len, H, hd]; image_k / image_v [L, B, image_tokens, H, hd] or None.
  committed, ring_head, window_filled: int32 scalars.
  """
  sink_k: jax.Array
  sink_v: jax.Array
  window_k: jax.Array
  window_v: jax.Array
  text_k: jax.Array
  text_v: jax.Array
  image_k: jax.Array | None
  image_v: jax.Array | None
  committed: jax.Array
  ring_head: jax.Array
  window_filled: jax.Array
  model: dit.DiTSpec = struct.field(pytree_node=False)
  stream: StreamSpec = struct.field(pytree_node=False)

  @property
  def grid(self) -> tuple[int, int, int]:
    """Token grid of one chunk: (grid frames, grid rows, grid columns)."""
    pt, ph, pw = self.model.patch_size
    return (self.stream.chunk_frames // pt, self.stream.latent_height // ph, self.stream.latent_width // pw)

  @property
  def tokens_per_chunk(self) -> int:
    frames, rows, cols = self.grid
    return frames * rows * cols


@functools.partial(jax.jit, static_argnums=0)
def _cross_kv(model_spec: dit.DiTSpec, params: Params, cond: track_head.Conditioning) -> dit.CrossKV:
  return dit.WanDiT(model_spec).apply({"params": params}, cond, method=dit.WanDiT.cross_kv)


def init_cache(params: Params, config: ml_collections.ConfigDict, cond: track_head.Conditioning,
               batch: int) -> CacheState:
  """An empty cache for `batch` streams, with the cross-attention K/V of `cond` computed once."""
  model_spec = dit.DiTSpec.from_config(config)
  stream_spec = StreamSpec.from_config(config)
  cross = _cross_kv(model_spec, params, cond)
  if cross.text_k.shape[1] != batch:
    raise ValueError(f"conditioning has batch {cross.text_k.shape[1]}, but a cache for batch {batch} was asked for")
  pt, ph, pw = model_spec.patch_size
  tokens = (stream_spec.chunk_frames // pt) * (stream_spec.latent_height // ph) * (stream_spec.latent_width // pw)
  heads = (model_spec.num_heads, model_spec.head_dim)
  dtype = model_spec.compute_dtype

  def slots(count: int) -> jax.Array:
    return jnp.zeros((model_spec.num_layers, batch, count, tokens) + heads, dtype)

  zero = jnp.zeros((), jnp.int32)
  return CacheState(
      sink_k=slots(stream_spec.sink_chunks), sink_v=slots(stream_spec.sink_chunks),
      window_k=slots(stream_spec.window_chunks), window_v=slots(stream_spec.window_chunks),
      text_k=cross.text_k, text_v=cross.text_v, image_k=cross.image_k, image_v=cross.image_v,
      committed=zero, ring_head=zero, window_filled=zero, model=model_spec, stream=stream_spec)


def rope_frames(state: CacheState) -> rope.CacheFrames:
  """Temporal RoPE positions (grid frames) the next pass over `state` uses."""
  s = state.stream
  return rope.cache_frames(state.committed, state.window_filled, s.sink_chunks, s.window_chunks, state.grid[0],
                           s.rope_mode)


def _stream_context(state: CacheState) -> dit.StreamContext:
  """Reads the counters into what the DiT's streamed pass needs (window order, RoPE tables, valid keys)."""
  s, m = state.stream, state.model
  frames = rope_frames(state)
  window_order = (state.ring_head - state.window_filled + jnp.arange(s.window_chunks, dtype=jnp.int32))
  window_order = window_order % max(s.window_chunks, 1)
  window_rope = None
  if s.rope_mode == "cache":
    tables = [rope.rope_table(*state.grid, frames.window_starts[age], m.head_dim, m.rope_theta)
              for age in range(s.window_chunks)]
    window_rope = rope.concat_tables(tables) if tables else rope.RopeTable(
        cos=jnp.zeros((0, m.head_dim // 2), jnp.float32), sin=jnp.zeros((0, m.head_dim // 2), jnp.float32))
  filled_chunks = 1 + jnp.minimum(state.committed, s.sink_chunks) + state.window_filled
  return dit.StreamContext(
      sink_k=state.sink_k, sink_v=state.sink_v, window_k=state.window_k, window_v=state.window_v,
      window_order=window_order, window_rope=window_rope, valid_keys=filled_chunks * state.tokens_per_chunk,
      text_k=state.text_k, text_v=state.text_v, image_k=state.image_k, image_v=state.image_v,
      rope_frame=frames.current_start, latent_frame=state.committed * s.chunk_frames)


def _stream_pass(params: Params, state: CacheState, latents: jax.Array, t: jax.Array,
                 cond: track_head.Conditioning, collect_kv: bool):
  s = state.stream
  chex.assert_rank(latents, 5)
  expected = (s.chunk_frames, s.latent_height, s.latent_width, state.model.latent_channels)
  if latents.shape[1:] != expected:
    raise ValueError(f"a streamed chunk must be [B, {', '.join(map(str, expected))}], got {latents.shape}")
  return dit.WanDiT(state.model).apply({"params": params}, latents, t, cond, _stream_context(state), collect_kv,
                                       method=dit.WanDiT.stream)


def denoise(params: Params, state: CacheState, x_t: jax.Array, t: jax.Array,
            cond: track_head.Conditioning) -> jax.Array:
  """The model output for chunk `x_t` [B, c, h, w, C] at flow time t ([B] or [B, c]); the cache is unchanged."""
  prediction, _ = _stream_pass(params, state, x_t, t, cond, collect_kv=False)
  return prediction


def _write_slot(buffer: jax.Array, update: jax.Array, slot: jax.Array, enabled: jax.Array) -> jax.Array:
  """Writes update [L, B, Nc, H, hd] into slot `slot` of buffer [L, B, slots, Nc, H, hd] if `enabled`."""
  old = jax.lax.dynamic_index_in_dim(buffer, slot, axis=2, keepdims=False)
  new = jnp.where(enabled, update.astype(buffer.dtype), old)
  return jax.lax.dynamic_update_index_in_dim(buffer, new, slot, axis=2)


def commit(params: Params, state: CacheState, x0: jax.Array, cond: track_head.Conditioning) -> CacheState:
  """Runs the clean chunk x0 at t = 0 against the cache and writes its K/V: into the next sink slot while the
  sink fills, otherwise over the oldest window slot."""
  s = state.stream
  t = jnp.zeros(x0.shape[:2], jnp.float32)
  _, chunk = _stream_pass(params, state, x0, t, cond, collect_kv=True)
  to_sink = state.committed < s.sink_chunks
  updates = {}
  if s.sink_chunks:
    slot = jnp.minimum(state.committed, s.sink_chunks - 1)
    updates.update(sink_k=_write_slot(state.sink_k, chunk.key_rope, slot, to_sink),
                   sink_v=_write_slot(state.sink_v, chunk.value, slot, to_sink))
  if s.window_chunks:
    to_window = jnp.logical_not(to_sink)
    window_key = chunk.key if s.rope_mode == "cache" else chunk.key_rope
    updates.update(
        window_k=_write_slot(state.window_k, window_key, state.ring_head, to_window),
        window_v=_write_slot(state.window_v, chunk.value, state.ring_head, to_window),
        ring_head=jnp.where(to_window, (state.ring_head + 1) % s.window_chunks, state.ring_head),
        window_filled=jnp.where(to_window, jnp.minimum(state.window_filled + 1, s.window_chunks),
                                state.window_filled))
  return state.replace(committed=state.committed + 1, **updates)
