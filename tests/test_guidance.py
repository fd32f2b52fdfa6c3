"""Joint text-motion guidance against a direct evaluation of Eq. 2, its special cases, and the null conditions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msjax.diffusion import guidance
from msjax.models.track_head import Conditioning

B, F, H, W, C = 2, 3, 4, 4, 2
TEXT_LEN, TEXT_DIM, TRACK_DIM = 5, 6, 3


def _cond(seed: int) -> Conditioning:
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return Conditioning(context=jax.random.normal(k1, (B, TEXT_LEN, TEXT_DIM)),
                      track_grid=jax.random.normal(k2, (B, F, H, W, TRACK_DIM)))


NULL_TEXT = jnp.full((TEXT_LEN, TEXT_DIM), 0.25)


def toy_velocity(x, t, cond):
  """A nonlinear velocity that depends on text and tracks differently per sample."""
  text_term = jnp.tanh(cond.context.mean(axis=(1, 2)))[:, None, None, None, None]
  motion_term = jnp.sin(cond.track_grid.sum(axis=-1, keepdims=True))
  return x * (1.0 + t[:, None, None, None, None]) + text_term * motion_term + 0.3 * text_term ** 2


def _inputs():
  x = jax.random.normal(jax.random.PRNGKey(9), (B, F, H, W, C))
  return x, jnp.array([0.2, 0.7]), _cond(1)


def _direct_passes(x, t, cond):
  null_text = jnp.broadcast_to(NULL_TEXT, cond.context.shape)
  v_full = toy_velocity(x, t, cond)
  v_no_text = toy_velocity(x, t, cond.replace(context=null_text))
  v_no_motion = toy_velocity(x, t, cond.replace(track_grid=jnp.zeros_like(cond.track_grid)))
  return v_full, v_no_text, v_no_motion


def test_joint_matches_eq2_with_one_batched_call():
  x, t, cond = _inputs()
  calls = []

  def apply_fn(xx, tt, cc):
    calls.append(xx.shape[0])
    return toy_velocity(xx, tt, cc)

  w_t, w_m = 3.0, 1.5
  out = guidance.guided_velocity(apply_fn, x, t, cond, NULL_TEXT, "joint", w_t, w_m)
  assert calls == [3 * B]
  v_full, v_no_text, v_no_motion = _direct_passes(x, t, cond)
  alpha = w_t / (w_t + w_m)
  expected = (alpha * v_no_text + (1 - alpha) * v_no_motion + w_t * (v_full - v_no_text)
              + w_m * (v_full - v_no_motion))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # The three passes really differ, so the check above is not vacuous.
  assert float(jnp.abs(v_full - v_no_text).max()) > 1e-2
  assert float(jnp.abs(v_full - v_no_motion).max()) > 1e-2


def test_joint_reduces_to_cfg_and_identity():
  x, t, cond = _inputs()
  v_full, v_no_text, _ = _direct_passes(x, t, cond)
  joint_no_motion = guidance.guided_velocity(toy_velocity, x, t, cond, NULL_TEXT, "joint", 2.5, 0.0)
  cfg = guidance.guided_velocity(toy_velocity, x, t, cond, NULL_TEXT, "cfg", 2.5)
  np.testing.assert_allclose(cfg, v_no_text + 2.5 * (v_full - v_no_text), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(joint_no_motion, cfg, rtol=1e-5, atol=1e-5)
  # Scale 1 CFG and unguided are the conditional model.
  np.testing.assert_allclose(guidance.guided_velocity(toy_velocity, x, t, cond, NULL_TEXT, "joint", 1.0, 0.0),
                             v_full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(guidance.guided_velocity(toy_velocity, x, t, cond, NULL_TEXT, "none"), v_full)
  # A model that ignores its conditions is left unchanged by any guidance.
  blind = lambda xx, tt, cc: xx * tt[:, None, None, None, None]
  np.testing.assert_allclose(guidance.guided_velocity(blind, x, t, cond, NULL_TEXT, "joint", 3.0, 1.5),
                             blind(x, t, cond), rtol=1e-5, atol=1e-6)


def test_joint_is_jittable_with_traced_scales():
  x, t, cond = _inputs()
  fn = jax.jit(lambda w_t, w_m: guidance.guided_velocity(toy_velocity, x, t, cond, NULL_TEXT, "joint", w_t, w_m))
  np.testing.assert_allclose(fn(3.0, 1.5), guidance.guided_velocity(toy_velocity, x, t, cond, NULL_TEXT),
                             rtol=1e-5, atol=1e-5)


def test_bad_modes_and_scales_are_rejected():
  x, t, cond = _inputs()
  with pytest.raises(ValueError, match="guidance mode"):
    guidance.guided_velocity(toy_velocity, x, t, cond, NULL_TEXT, "both")
  with pytest.raises(ValueError, match="w_t"):
    guidance.guided_velocity(toy_velocity, x, t, cond, NULL_TEXT, "joint", 0.0, 0.0)
  with pytest.raises(ValueError, match="null text"):
    guidance.without_text(cond, jnp.zeros((TEXT_LEN + 1, TEXT_DIM)))


def test_null_conditions_on_dataclass_and_mapping():
  cond = _cond(2)
  no_text = guidance.without_text(cond, NULL_TEXT[None])
  np.testing.assert_array_equal(no_text.context, jnp.broadcast_to(NULL_TEXT, cond.context.shape))
  np.testing.assert_array_equal(no_text.track_grid, cond.track_grid)
  as_dict = {"context": cond.context, "track_grid": cond.track_grid, "first_latent": jnp.ones((B, H, W, C))}
  no_motion = guidance.without_motion(as_dict)
  assert not np.any(np.asarray(no_motion["track_grid"]))
  np.testing.assert_array_equal(no_motion["first_latent"], as_dict["first_latent"])


def test_dropout_is_per_sample_independent_and_at_the_given_rate():
  batch = 4000
  cond = Conditioning(context=jnp.ones((batch, TEXT_LEN, TEXT_DIM)),
                      track_grid=jnp.ones((batch, F, H, W, TRACK_DIM)))
  dropped = guidance.drop_conditions(jax.random.PRNGKey(0), cond, NULL_TEXT, text_prob=0.1, motion_prob=0.3)
  chex.assert_trees_all_equal_shapes(dropped, cond)
  text_dropped = np.asarray(jnp.all(dropped.context == NULL_TEXT, axis=(1, 2)))
  text_kept = np.asarray(jnp.all(dropped.context == 1.0, axis=(1, 2)))
  motion_dropped = np.asarray(jnp.all(dropped.track_grid == 0.0, axis=(1, 2, 3, 4)))
  motion_kept = np.asarray(jnp.all(dropped.track_grid == 1.0, axis=(1, 2, 3, 4)))
  assert np.all(text_dropped ^ text_kept) and np.all(motion_dropped ^ motion_kept)
  assert text_dropped.mean() == pytest.approx(0.1, abs=0.02)
  assert motion_dropped.mean() == pytest.approx(0.3, abs=0.03)
  assert (text_dropped & motion_dropped).mean() == pytest.approx(0.03, abs=0.012)
  none_dropped = guidance.drop_conditions(jax.random.PRNGKey(0), cond, NULL_TEXT, 0.0, 0.0)
  chex.assert_trees_all_equal(none_dropped, cond)


def test_absent_track_grid_is_already_the_null_motion():
  x, t, cond = _inputs()
  no_grid = cond.replace(track_grid=None)
  assert guidance.without_motion(no_grid).track_grid is None
  dropped = guidance.drop_conditions(jax.random.PRNGKey(0), no_grid, NULL_TEXT, 0.5, 0.5)
  assert dropped.track_grid is None

  def blind_to_motion(xx, tt, cc):
    assert cc.track_grid is None
    return toy_velocity(xx, tt, cc.replace(track_grid=jnp.zeros((xx.shape[0], F, H, W, TRACK_DIM))))

  zero_grid = cond.replace(track_grid=jnp.zeros_like(cond.track_grid))
  np.testing.assert_allclose(guidance.guided_velocity(blind_to_motion, x, t, no_grid, NULL_TEXT),
                             guidance.guided_velocity(toy_velocity, x, t, zero_grid, NULL_TEXT), rtol=1e-6)
