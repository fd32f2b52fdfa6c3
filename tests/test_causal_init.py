"""Causal adaptation: diverse masks (ranges, parity with the streamed cache), state picking, the loss learns,
the text encoder stays frozen, and the per-stage config."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import distill
from msjax import config_utils
from msjax import inference
from msjax.models import dit
from msjax.models import kv_cache
from msjax.train import causal_init
from msjax.train import ode_pairs
from msjax.train import state as state_lib
import dit_fixtures
import distill_fixtures

pytestmark = pytest.mark.filterwarnings("ignore::msjax.models.text.TextTruncationWarning")
NOISY_T = 0.6


def test_sink_window_draws_cover_their_ranges_and_bad_ranges_are_refused():
  draw = jax.jit(jax.vmap(lambda key: causal_init.draw_sink_window(key, (0, 2), (1, 3))))
  sinks, windows = draw(jax.random.split(jax.random.PRNGKey(0), 300))
  assert set(np.asarray(sinks).tolist()) == {0, 1, 2} and set(np.asarray(windows).tolist()) == {1, 2, 3}
  with pytest.raises(config_utils.ConfigError, match="S = W = 0"):
    causal_init.check_mask_ranges((0, 1), (0, 2), "causal_init")
  with pytest.raises(config_utils.ConfigError, match="window_range must be"):
    causal_init.check_mask_ranges((1, 1), (3, 2), "causal_init")


def test_masked_forward_equals_the_streamed_cache_for_a_drawn_sink_window(tmp_path):
  """The mask of a drawn (S, W) is what the cache attends: chunk by chunk streaming (earlier chunks committed
  clean, the last one noisy) equals one masked forward over the clip. 'absolute' RoPE keeps positions
  comparable while the ring evicts (the 'cache' mode's re-positioning is the DMD stage's business)."""
  sink, window = (int(v) for v in causal_init.draw_sink_window(jax.random.PRNGKey(3), (0, 1), (1, 1)))
  config = distill_fixtures.micro_config(tmp_path, **{"video.num_frames": 13, "stream.sink_chunks": sink,
                                                      "stream.window_chunks": window,
                                                      "stream.rope_mode": "absolute"})
  params = distill_fixtures.random_model(config, seed=0).dit_params
  model = dit.WanDiT(dit.DiTSpec.from_config(config))
  clean, cond = dit_fixtures.random_inputs(config, jax.random.PRNGKey(1))
  geo = config_utils.geometry(config)
  c, num_chunks = geo.chunk_frames, geo.latent_frames // geo.chunk_frames
  assert sink + window < num_chunks - 1  # the last chunk really misses some of its past
  noisy = jax.random.normal(jax.random.PRNGKey(4), clean[:, -c:].shape)
  state = kv_cache.init_cache(params, config, cond, 1)
  commit = jax.jit(kv_cache.commit)
  for i in range(num_chunks - 1):
    state = commit(params, state, clean[:, i * c:(i + 1) * c], dit_fixtures.chunk_cond(cond, i, config))
  streamed = jax.jit(kv_cache.denoise)(params, state, noisy, jnp.full((1,), NOISY_T),
                                       dit_fixtures.chunk_cond(cond, num_chunks - 1, config))
  x = clean.at[:, -c:].set(noisy)
  t = jnp.zeros(clean.shape[:2]).at[:, -c:].set(NOISY_T)
  apply = jax.jit(lambda mask: model.apply({"params": params}, x, t, cond, mask=mask))
  masked = apply(causal_init.sink_window_mask(num_chunks, geo.tokens_per_chunk, sink, window))
  np.testing.assert_allclose(streamed, masked[:, -c:], atol=1e-5, rtol=1e-5)
  causal = apply(causal_init.sink_window_mask(num_chunks, geo.tokens_per_chunk, 0, num_chunks))
  assert np.abs(np.asarray(causal[:, -c:] - masked[:, -c:])).max() > 1e-4  # the mask matters


def test_noisy_inputs_take_one_stored_state_per_chunk():
  batch, states_k, frames, chunk = 3, 4, 6, 2
  shape = (batch, states_k, frames, 2, 2, 1)
  # state k of frame f is the constant 100 k + f: the picked k and frame are readable from the result
  states = (100.0 * jnp.arange(states_k)[None, :, None] + jnp.arange(frames)[None, None, :])
  states = jnp.broadcast_to(states[..., None, None, None], shape)
  timesteps = jnp.broadcast_to(jnp.asarray([1.0, 0.9, 0.7, 0.4]), (batch, states_k))
  z_t, t, picked = causal_init.noisy_inputs(states, timesteps, chunk, jax.random.PRNGKey(0))
  picked_per_frame = np.repeat(np.asarray(picked), chunk, axis=1)
  np.testing.assert_array_equal(np.asarray(z_t[:, :, 0, 0, 0]), 100 * picked_per_frame + np.arange(frames))
  np.testing.assert_allclose(t, np.asarray(timesteps)[0][picked_per_frame])
  assert len(np.unique(np.asarray(picked))) > 1  # chunks sit at different noise levels


def _pair_batch(config, key, batch):
  """A batch shaped like stored ODE pairs whose clean clips are learnable in a few steps."""
  geo = config_utils.geometry(config)
  latent = (batch, geo.latent_frames, geo.latent_height, geo.latent_width, geo.latent_channels)
  grid = (batch, geo.num_frames, geo.latent_height, geo.latent_width, config.tracks.embed_dim)
  context = (batch, config.model.text_len, config.model.text_dim)
  times = jnp.linspace(1.0, 0.5, config.stream.num_steps)

  @jax.jit
  def draw(key):
    keys = jax.random.split(key, 5)
    # one colour per channel everywhere plus a little noise
    clean = jax.random.normal(keys[0], latent[-1:]) + 0.1 * jax.random.normal(keys[4], latent)
    noise = jax.random.normal(keys[1], latent)
    states = jnp.stack([(1 - t) * clean + t * noise for t in times], axis=1)
    return {"states": states, "timesteps": jnp.broadcast_to(times, (batch, times.shape[0])), "clean": clean,
            "first_latent": clean[:, 0], "track_grid": jax.random.normal(keys[2], grid),
            "context": jax.random.normal(keys[3], context)}

  return draw(key)


def test_student_learns_the_pairs_and_the_text_encoder_stays_frozen(tmp_path):
  config = distill_fixtures.micro_config(tmp_path)
  teacher_model = distill_fixtures.random_model(config, seed=0)
  config = causal_init.stage_config(config, causal_init.STAGE)
  config.optim.learning_rate, config.optim.warmup_steps = 3e-3, 0
  network = dit.WanDiT(teacher_model.spec)
  objective = causal_init.CausalInitObjective.from_config(config)
  loss_fn = functools.partial(causal_init.causal_init_loss, model=network, objective=objective)
  tx = causal_init.student_optimizer(config.optim, 20)
  state = state_lib.create_train_state(causal_init.student_params(teacher_model.dit_params, teacher_model), tx,
                                       jax.random.PRNGKey(1))
  step = jax.jit(state_lib.make_train_step(loss_fn, tx, ema_decay=0.5))
  batch = _pair_batch(config, jax.random.PRNGKey(2), batch=2)
  evaluate = jax.jit(lambda params: loss_fn(params, batch, jax.random.PRNGKey(7))[0])
  before = float(evaluate(state.params))
  text_before = jax.tree.map(np.asarray, state.params[causal_init.TEXT_PARAMS])
  for _ in range(8):
    state, metrics = step(state, batch)
  after = float(evaluate(state.params))
  assert after < 0.8 * before, (before, after)
  assert 0 <= float(metrics["sink_chunks"]) <= 1 and 1 <= float(metrics["window_chunks"]) <= 2
  jax.tree.map(np.testing.assert_array_equal, state.params[causal_init.TEXT_PARAMS], text_before)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params[causal_init.DIT_PARAMS],
                       teacher_model.dit_params)
  assert max(jax.tree.leaves(moved)) > 1e-4


def test_stage_config_lifts_the_stage_sections_and_checks_chunks():
  config = distill.get_config("tiny")
  for stage in distill.STAGES:
    resolved = causal_init.stage_config(config, stage)
    assert resolved.stage == stage and resolved.workdir == config[stage].workdir
    assert resolved.train.steps == config[stage].train.steps
  assert causal_init.stage_config(config, "causal_init").optim.learning_rate == config.causal_init.optim.learning_rate
  assert "train" not in config and "optim" not in config  # only the resolved copies have them
  config.stream.chunk_frames = 5
  with pytest.raises(config_utils.ConfigError, match="chunk_frames=5"):
    causal_init.stage_config(config, "causal_init")
  with pytest.raises(config_utils.ConfigError, match="no 'teacher' section"):
    causal_init.stage_config(config, "teacher")


@pytest.mark.slow
def test_train_py_runs_causal_init_and_it_resumes(tmp_path):
  """`python train.py --config configs/distill.py` runs the stage from the config (causal_init by default);
  2 steps then 2 more from its checkpoint give the parameters of 4 straight steps."""
  config = distill_fixtures.micro_config(tmp_path, small_text=False)
  distill_fixtures.saved_teacher(config)
  ode_pairs.generate(config, config.ode_pairs.dir, None)

  def run(workdir, steps):
    return distill_fixtures.run_train_py(config, tmp_path, [
        f"--config.causal_init.workdir={workdir}", f"--config.causal_init.train.steps={steps}",
        "--config.causal_init.train.checkpoint_every=2", "--config.causal_init.train.eval_every=0"])

  output = run(tmp_path / "straight", 4)
  assert re.search(r"step 4: .*loss=", output)
  run(tmp_path / "resumed", 2)
  assert "at step 2" in run(tmp_path / "resumed", 4)
  straight = inference.read_checkpoint(str(tmp_path / "straight"))[0]
  resumed = inference.read_checkpoint(str(tmp_path / "resumed"))[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), straight, resumed)
