"""Joint text-motion guidance (paper section 3.4, Eq. 2), plain text CFG, and the null conditions both need.

Null conditions, decided here and used by both training dropout and sampling so they cannot drift apart:
  null text   = the text encoder's embedding of the empty prompt "" ([L, D], broadcast over the batch).
                Not zeros: a pretrained encoder's empty prompt is what Wan-style models are trained against.
  null motion = an all-zero track grid, which is also what "no track here" means in Eq. 1 and what
                mid-chunk masking writes, so "let go of the mouse" and "no motion condition" agree.

A conditioning is any pytree with batch-leading leaves whose text embedding and track grid are reachable by
name: a `flax.struct.dataclass` (replaced with `.replace`) or a mapping. The field names default to the
DiT's `track_head.Conditioning` (`TEXT_FIELD`, `MOTION_FIELD`). A track grid of None already is the null
motion (the DiT then feeds its head an all-zero grid) and is left as None.

Guided passes are batched: the conditionings of the 3 (joint) or 2 (cfg) passes are concatenated along the
batch axis and the model is called once, so one compiled program serves every guided step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp

TEXT_FIELD = "context"  # msjax.models.track_head.Conditioning
MOTION_FIELD = "track_grid"
GUIDANCE_MODES = ("joint", "cfg", "none")

Conditioning = Any
ApplyFn = Callable[[jax.Array, jax.Array, Conditioning], jax.Array]


def _get_field(cond: Conditioning, name: str) -> jax.Array:
  if isinstance(cond, Mapping):
    return cond[name]
  return getattr(cond, name)


def _replace_field(cond: Conditioning, name: str, value: jax.Array) -> Conditioning:
  if isinstance(cond, Mapping):
    return {**cond, name: value}
  return cond.replace(**{name: value})


def _broadcast_null_text(null_text: jax.Array, text: jax.Array) -> jax.Array:
  """[L, D] or [1, L, D] empty-prompt embedding -> the [B, L, D] shape of `text`."""
  null_text = jnp.asarray(null_text, text.dtype)
  if null_text.shape[-2:] != text.shape[-2:] or null_text.ndim not in (2, 3):
    raise ValueError(f"null text embedding has shape {null_text.shape}; expected [L, D] or [1, L, D] "
                     f"matching the text embedding {text.shape}")
  return jnp.broadcast_to(null_text.reshape(text.shape[-2:]), text.shape)


def without_text(cond: Conditioning, null_text: jax.Array, text_field: str = TEXT_FIELD) -> Conditioning:
  """The same conditioning with every sample's text replaced by the empty prompt."""
  text = _get_field(cond, text_field)
  return _replace_field(cond, text_field, _broadcast_null_text(null_text, text))


def without_motion(cond: Conditioning, motion_field: str = MOTION_FIELD) -> Conditioning:
  """The same conditioning with every sample's track grid zeroed."""
  motion = _get_field(cond, motion_field)
  return cond if motion is None else _replace_field(cond, motion_field, jnp.zeros_like(motion))


def drop_conditions(rng: jax.Array, cond: Conditioning, null_text: jax.Array, text_prob: float,
                    motion_prob: float, text_field: str = TEXT_FIELD,
                    motion_field: str = MOTION_FIELD) -> Conditioning:
  """Training-time dropout: per sample, independently, text -> null text and tracks -> null motion.

  Independent drops also yield fully unconditional samples (probability text_prob * motion_prob).
  """
  text = _get_field(cond, text_field)
  batch = text.shape[0]
  text_key, motion_key = jax.random.split(rng)

  def per_sample(mask: jax.Array, like: jax.Array) -> jax.Array:
    return mask.reshape((batch,) + (1,) * (like.ndim - 1))

  drop_text = jax.random.bernoulli(text_key, text_prob, (batch,))
  text = jnp.where(per_sample(drop_text, text), _broadcast_null_text(null_text, text), text)
  cond = _replace_field(cond, text_field, text)
  motion = _get_field(cond, motion_field)
  if motion is None:
    return cond
  chex.assert_axis_dimension(motion, 0, batch)
  drop_motion = jax.random.bernoulli(motion_key, motion_prob, (batch,))
  motion = jnp.where(per_sample(drop_motion, motion), jnp.zeros_like(motion), motion)
  return _replace_field(cond, motion_field, motion)


def combine_cfg(v_cond: jax.Array, v_uncond: jax.Array, scale: float | jax.Array) -> jax.Array:
  """Classifier-free guidance: v_uncond + w (v_cond - v_uncond); w = 1 is the conditional model."""
  chex.assert_equal_shape([v_cond, v_uncond])
  return v_uncond + scale * (v_cond - v_uncond)


def combine_joint(v_full: jax.Array, v_no_text: jax.Array, v_no_motion: jax.Array, text_scale: float | jax.Array,
                  motion_scale: float | jax.Array) -> jax.Array:
  """Eq. 2: v_base + w_t (v(c_t,c_m) - v(0,c_m)) + w_m (v(c_t,c_m) - v(c_t,0)).

  v_base = a v(0,c_m) + (1 - a) v(c_t,0), a = w_t / (w_t + w_m). With w_m = 0 this is text CFG at w_t.
  """
  chex.assert_equal_shape([v_full, v_no_text, v_no_motion])
  _check_scales(text_scale, motion_scale)
  alpha = text_scale / (text_scale + motion_scale)
  v_base = alpha * v_no_text + (1.0 - alpha) * v_no_motion
  return v_base + text_scale * (v_full - v_no_text) + motion_scale * (v_full - v_no_motion)


def _check_scales(text_scale: Any, motion_scale: Any) -> None:
  """Catches the 0/0 of alpha early when the scales are known at trace time."""
  if isinstance(text_scale, (int, float)) and isinstance(motion_scale, (int, float)):
    if text_scale < 0 or motion_scale < 0 or text_scale + motion_scale <= 0:
      raise ValueError(f"joint guidance needs w_t, w_m >= 0 with w_t + w_m > 0; got w_t={text_scale}, "
                       f"w_m={motion_scale} (use mode='none' for an unguided model)")


def _concat_batch(*trees: Any) -> Any:
  return jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=0), *trees)


def _tile_batch(x: jax.Array, copies: int) -> jax.Array:
  return jnp.concatenate([x] * copies, axis=0)


def guided_velocity(apply_fn: ApplyFn, x: jax.Array, t: jax.Array, cond: Conditioning, null_text: jax.Array,
                    mode: str = "joint", text_scale: float | jax.Array = 3.0,
                    motion_scale: float | jax.Array = 1.5, text_field: str = TEXT_FIELD,
                    motion_field: str = MOTION_FIELD) -> jax.Array:
  """The guided velocity at (x, t) under `mode`, with all passes in one batched `apply_fn(x, t, cond)` call.

  joint: Eq. 2 from v(c_t,c_m), v(0,c_m), v(c_t,0) (3 passes).
  cfg:   text CFG with the tracks kept in both passes: v(0,c_m) + w_t (v(c_t,c_m) - v(0,c_m)) (2 passes).
  none:  v(c_t,c_m) (1 pass); `null_text` is unused.
  """
  if mode not in GUIDANCE_MODES:
    raise ValueError(f"guidance mode must be one of {GUIDANCE_MODES}, got {mode!r}")
  batch = x.shape[0]
  if mode == "none":
    v = apply_fn(x, t, cond)
    chex.assert_equal_shape([x, v])
    return v
  no_text = without_text(cond, null_text, text_field)
  if mode == "cfg":
    v = apply_fn(_tile_batch(x, 2), _tile_batch(t, 2), _concat_batch(cond, no_text))
    chex.assert_shape(v, (2 * batch,) + x.shape[1:])
    v_full, v_no_text = jnp.split(v, 2, axis=0)
    return combine_cfg(v_full, v_no_text, text_scale)
  _check_scales(text_scale, motion_scale)
  no_motion = without_motion(cond, motion_field)
  v = apply_fn(_tile_batch(x, 3), _tile_batch(t, 3), _concat_batch(cond, no_text, no_motion))
  chex.assert_shape(v, (3 * batch,) + x.shape[1:])
  v_full, v_no_text, v_no_motion = jnp.split(v, 3, axis=0)
  return combine_joint(v_full, v_no_text, v_no_motion, text_scale, motion_scale)
