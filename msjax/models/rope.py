"""Wan's 3-axis rotary position embedding, and the rule that assigns temporal positions inside the KV cache.

Each head vector of width `head_dim` is read as `head_dim / 2` interleaved (real, imag) pairs. The pairs are
split between the frame, row and column axes like Wan (22 / 21 / 21 for head_dim 128), and every axis has its
own frequency denominator (44 / 42 / 42). Row and column angles depend only on the static token grid, so they
are computed on the host in float64; the frame angles depend on a (possibly traced) start position and are
computed in-graph, which lets one compiled program serve every streamed chunk.
"""

from __future__ import annotations

import dataclasses

import chex
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class AxisSplit:
  """How many rotation pairs each axis gets (frame, row, column)."""
  frame_pairs: int
  row_pairs: int
  col_pairs: int


def axis_split(head_dim: int) -> AxisSplit:
  """Wan's split: rows and columns get a third of the pairs each (rounded down), frames get the rest."""
  if head_dim % 2 or head_dim < 6:
    raise ValueError(f"3-axis RoPE needs an even head_dim >= 6, got {head_dim}")
  pairs = head_dim // 2
  spatial = pairs // 3
  return AxisSplit(frame_pairs=pairs - 2 * spatial, row_pairs=spatial, col_pairs=spatial)


def axis_frequencies(num_pairs: int, theta: float) -> np.ndarray:
  """theta^(-2j / (2 * num_pairs)) for j < num_pairs: one axis with its own denominator, in float64."""
  return theta ** (-np.arange(num_pairs, dtype=np.float64) / num_pairs)


@struct.dataclass
class RopeTable:
  """cos / sin of the rotation angles, [tokens, head_dim / 2] float32, pairs ordered (frame | row | col)."""
  cos: jax.Array
  sin: jax.Array


def rope_table(frames: int, height: int, width: int, frame_start: jax.Array | int, head_dim: int,
               theta: float) -> RopeTable:
  """Angles for a token grid of `frames x height x width` (frame-major order) whose first frame sits at
  temporal position `frame_start` (an int or a traced int32 scalar); rows and columns start at 0."""
  split = axis_split(head_dim)
  row_angles = np.arange(height, dtype=np.float64)[:, None] * axis_frequencies(split.row_pairs, theta)
  col_angles = np.arange(width, dtype=np.float64)[:, None] * axis_frequencies(split.col_pairs, theta)
  row_angles = np.broadcast_to(row_angles[:, None, :], (height, width, split.row_pairs))
  col_angles = np.broadcast_to(col_angles[None, :, :], (height, width, split.col_pairs))
  spatial = np.concatenate([row_angles, col_angles], axis=-1).reshape(height * width, -1)
  spatial_cos = np.cos(spatial).astype(np.float32)
  spatial_sin = np.sin(spatial).astype(np.float32)

  frame_freqs = jnp.asarray(axis_frequencies(split.frame_pairs, theta), jnp.float32)
  positions = jnp.asarray(frame_start, jnp.int32) + jnp.arange(frames, dtype=jnp.int32)
  frame_angles = positions.astype(jnp.float32)[:, None] * frame_freqs  # [frames, frame_pairs]

  def tile(frame_part: jax.Array, spatial_part: np.ndarray) -> jax.Array:
    frame_part = jnp.broadcast_to(frame_part[:, None, :], (frames, height * width, split.frame_pairs))
    spatial_part = jnp.broadcast_to(jnp.asarray(spatial_part)[None], (frames,) + spatial_part.shape)
    return jnp.concatenate([frame_part, spatial_part], axis=-1).reshape(frames * height * width, -1)

  return RopeTable(cos=tile(jnp.cos(frame_angles), spatial_cos), sin=tile(jnp.sin(frame_angles), spatial_sin))


def concat_tables(tables: list[RopeTable]) -> RopeTable:
  """Tables of consecutive token segments, joined along the token axis."""
  return RopeTable(cos=jnp.concatenate([t.cos for t in tables], axis=0),
                   sin=jnp.concatenate([t.sin for t in tables], axis=0))


def apply_rope(x: jax.Array, table: RopeTable) -> jax.Array:
  """Rotates interleaved pairs (2k, 2k+1) of `x` [B, N, heads, head_dim] by the table's angles, in float32."""
  chex.assert_rank(x, 4)
  batch, tokens, heads, head_dim = x.shape
  chex.assert_shape([table.cos, table.sin], (tokens, head_dim // 2))
  pairs = x.astype(jnp.float32).reshape(batch, tokens, heads, head_dim // 2, 2)
  real, imag = pairs[..., 0], pairs[..., 1]
  cos, sin = table.cos[:, None, :], table.sin[:, None, :]
  rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
  return rotated.reshape(batch, tokens, heads, head_dim)


@struct.dataclass
class CacheFrames:
  """Temporal positions (in grid frames) used by one streamed pass over the cache.

  current_start: where the chunk being denoised / committed starts.
  window_starts: [window_chunks] start of each window slot in AGE order (oldest first); only meaningful for
    filled slots and only used when window keys are stored before RoPE.
  """
  current_start: jax.Array
  window_starts: jax.Array


def cache_frames(committed: jax.Array, window_filled: jax.Array, sink_chunks: int, window_chunks: int,
                 chunk_grid_frames: int, rope_mode: str) -> CacheFrames:
  """The position rule of the streaming cache.

  'cache' (MotionStream): sink chunks at [0, S*c), filled window slots right after them in age order, and the
  current chunk right after those; positions equal absolute ones while the cache fills and never exceed
  (S + W + 1) * c afterwards. 'absolute' (Self Forcing): the current chunk sits at committed * c, and cached
  keys keep the absolute positions they were written with, so positions grow with the stream.
  """
  committed = jnp.asarray(committed, jnp.int32)
  window_filled = jnp.asarray(window_filled, jnp.int32)
  sink_filled = jnp.minimum(committed, sink_chunks)
  window_starts = (sink_filled + jnp.arange(window_chunks, dtype=jnp.int32)) * chunk_grid_frames
  if rope_mode == "cache":
    current = (sink_filled + window_filled) * chunk_grid_frames
  elif rope_mode == "absolute":
    current = committed * chunk_grid_frames
  else:
    raise ValueError(f"stream.rope_mode must be 'cache' or 'absolute', got {rope_mode!r}")
  return CacheFrames(current_start=current, window_starts=window_starts)
