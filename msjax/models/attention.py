"""Attention kernels and masks.

`config.model.attention` picks the kernel: 'cudnn' is `jax.nn.dot_product_attention`'s cuDNN kernel (GPU, bf16);
'xla' is `softmax_attention` below, plain XLA ops with the softmax normalisation moved after the value product.
That form is ours rather than `jax.nn.dot_product_attention(implementation=None)` because on the 2-core CPU the
library's XLA path spent over a third of a tiny-teacher training step in attention: its softmax backward fused
into a batched matmul that ran at ~15 GFLOP/s, and its probabilities were stacked for the backward pass. With the
deferred normalisation a tiny-teacher step (batch 8, 45 frames) takes 2.8-3.2 s instead of 3.9 s (README,
Benchmarks); forward- and reverse-mode autodiff both still work, since it is ordinary jnp.

Three shapes of self-attention exist in msjax:
  * bidirectional (the teacher and critic): no mask at all;
  * block-causal over a whole clip (causal adaptation): chunk i sees the sink chunks [0, S), the window
    [max(S, i - W), i) and itself (full attention inside a chunk), built as a boolean mask;
  * streamed (sampler and DMD self-rollout): the current chunk's queries against keys laid out as
    [current | sink slots | window slots, oldest first]. Valid keys always form a prefix of that layout
    (the window only fills once the sink is full), so unfilled slots are masked with `key_value_seq_lengths`,
    which every implementation, cuDNN included, supports natively.
The cache path never stops gradients: whether cached keys carry gradient is the caller's decision.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = {"xla": None, "cudnn": "cudnn"}


def implementation_for(name: str) -> str | None:
  """Maps `config.model.attention` to the `implementation` argument of `jax.nn.dot_product_attention`."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention must be one of {sorted(IMPLEMENTATIONS)}, got {name!r}")
  return IMPLEMENTATIONS[name]


def attend(query: jax.Array, key: jax.Array, value: jax.Array, *, implementation: str | None,
           mask: jax.Array | None = None, valid_keys: jax.Array | None = None,
           key_mask: jax.Array | None = None) -> jax.Array:
  """Softmax attention, [B, Nq, heads, head_dim] against [B, Nk, heads, head_dim].

  mask: optional boolean [Nq, Nk] (True = may attend), shared by the batch and the heads.
  valid_keys: optional int32 scalar; only the first `valid_keys` keys are attended.
  key_mask: optional boolean [B, Nk], the keys each batch row may attend (padded text tokens); not with `mask`.
  """
  chex.assert_rank([query, key, value], 4)
  chex.assert_equal_shape([key, value])
  chex.assert_type([key, value], query.dtype)
  batch = query.shape[0]
  if mask is not None:
    chex.assert_shape(mask, (query.shape[1], key.shape[1]))
    mask = mask[None, None]
  if key_mask is not None:
    if mask is not None:
      raise ValueError("attend takes a shared [Nq, Nk] mask or a per-row [B, Nk] key_mask, not both")
    chex.assert_shape(key_mask, (batch, key.shape[1]))
    mask = key_mask[:, None, None, :]
  if implementation is None:
    allowed = mask
    if valid_keys is not None:
      in_prefix = (jnp.arange(key.shape[1]) < valid_keys)[None, None, None, :]
      allowed = in_prefix if allowed is None else allowed & in_prefix
    return softmax_attention(query, key, value, allowed)
  lengths = None
  if valid_keys is not None:
    lengths = jnp.broadcast_to(jnp.asarray(valid_keys, jnp.int32), (batch,))
  return jax.nn.dot_product_attention(query, key, value, mask=mask, key_value_seq_lengths=lengths,
                                      implementation=implementation)


def softmax_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      allowed: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v in float32, normalised after the value product.

  exp(logits - row max) are the unnormalised weights; their row sums divide the [.., head_dim] output instead
  of the [.., Nk] weights, so no normalised probability array exists to be stored or differentiated. The row
  max only shifts the logits (the softmax does not depend on it), so its gradient is stopped.
  allowed: optional boolean, broadcastable to [B, heads, Nq, Nk] (True = may attend). A row with no allowed key
  averages all values uniformly, as `jax.nn.dot_product_attention` does.
  """
  scale = 1.0 / np.sqrt(query.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) * scale
  if allowed is not None:
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  weights = jnp.exp(logits - peak)
  row_sums = jnp.sum(weights, axis=-1).transpose(0, 2, 1)[..., None]  # [B, Nq, heads, 1]
  out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value, preferred_element_type=jnp.float32)
  return (out / row_sums).astype(query.dtype)


def block_causal_chunk_mask(num_chunks: int, sink_chunks: jax.Array | int,
                            window_chunks: jax.Array | int) -> jax.Array:
  """[num_chunks, num_chunks] boolean: chunk i sees [0, S) and [max(S, i - W), i) and itself, never the future.

  `sink_chunks` and `window_chunks` may be traced, so one compiled step can train on randomly drawn ("diverse")
  masks. A window of num_chunks or more is plain block-causal attention.
  """
  query = jnp.arange(num_chunks)[:, None]
  key = jnp.arange(num_chunks)[None, :]
  in_sink = key < sink_chunks
  in_window = key >= query - window_chunks
  return (key <= query) & (in_sink | in_window)


def bidirectional_chunk_mask(num_chunks: int) -> jax.Array:
  """Every chunk sees every chunk (the teacher's attention, as an explicit mask for tests and mixing)."""
  return jnp.ones((num_chunks, num_chunks), dtype=bool)


def expand_chunk_mask(chunk_mask: jax.Array, tokens_per_chunk: int) -> jax.Array:
  """Chunk-level mask -> token-level [N, N] mask (tokens are chunk-major, as in the DiT's sequence)."""
  chex.assert_rank(chunk_mask, 2)
  expanded = jnp.repeat(chunk_mask, tokens_per_chunk, axis=0)
  return jnp.repeat(expanded, tokens_per_chunk, axis=1)


def cached_self_attention(query: jax.Array, current_key: jax.Array, current_value: jax.Array,
                          sink_key: jax.Array, sink_value: jax.Array, window_key: jax.Array,
                          window_value: jax.Array, valid_keys: jax.Array, *,
                          implementation: str | None) -> jax.Array:
  """The streamed chunk's attention: keys [current | sink | window (oldest first)], all RoPE'd already.

  Shapes: query / current_* [B, Nc, heads, head_dim]; sink_* [B, S * Nc, ...]; window_* [B, W * Nc, ...].
  valid_keys: int32 scalar, Nc * (1 + filled sink chunks + filled window chunks).
  """
  chex.assert_equal_shape([query, current_key, current_value])
  chex.assert_equal_shape([sink_key, sink_value])
  chex.assert_equal_shape([window_key, window_value])
  keys = jnp.concatenate([current_key, sink_key, window_key], axis=1)
  values = jnp.concatenate([current_value, sink_value, window_value], axis=1)
  return attend(query, keys, values, implementation=implementation, valid_keys=valid_keys)
