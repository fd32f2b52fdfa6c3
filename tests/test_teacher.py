"""Teacher stage: the objective (with a stand-in model), text handling, and `python train.py` end to end."""

import glob
import json
import os
import re
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import teacher as teacher_config
from configs import teacher_ids as teacher_ids_config
from msjax import config_utils
from msjax import inference
from msjax.bench import stream as stream_bench
from msjax.convert import common as convert_common
from msjax.data import sprites as sprites_lib
from msjax.diffusion import flow
from msjax.eval import generators
from msjax.eval import sprites_eval
from msjax.models import dit
from msjax.models import text as text_lib
from msjax.models import track_head
from msjax.models.track_head import Conditioning
from msjax.train import loop
from msjax.train import teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, F, H, W, C = 4, 3, 8, 8, 8
PIXEL_FRAMES, TRACK_DIM, TEXT_LEN, TEXT_DIM = 9, 4, 3, 5
TRAIN_TIMEOUT_S = 420
SHIPPED_ID_TEACHER = os.path.join(REPO, "checkpoints", "tiny_teacher_ids")


class StandInModel(nn.Module):
  """Per-frame and per-cell: reads every conditioning the DiT reads, so dropout and masking are visible."""

  @nn.compact
  def __call__(self, latents, t, cond: Conditioning):
    text = cond.context.mean(axis=(1, 2))[:, None, None, None, None]
    motion = cond.track_grid.mean(axis=(1, 4))[:, None, :, :, None]
    first = cond.first_latent[:, None]
    return nn.Dense(C)(latents) * (1.0 + t[:, None, None, None, None]) + text + motion + 0.1 * first


def _batch(seed=0, latent_scale=1.0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  latents = latent_scale * jax.random.normal(keys[0], (B, F, H, W, C))
  return {"latents": latents, "first_latent": latents[:, 0],
          "track_grid": jax.random.normal(keys[1], (B, PIXEL_FRAMES, H, W, TRACK_DIM)),
          "context": jax.random.normal(keys[2], (B, TEXT_LEN, TEXT_DIM))}


NULL_CONTEXT = jnp.full((1, TEXT_LEN, TEXT_DIM), 0.5)
FROZEN_TEXT = text_lib.PrecomputedTextEncoder(TEXT_LEN, TEXT_DIM)


def _objective(**overrides):
  values = dict(shift=3.0, text_dropout=0.0, motion_dropout=0.0, image_condition="concat", use_tracks=True)
  values.update(overrides)
  return teacher.TeacherObjective(**values)


def _loss(params, batch, objective, model=StandInModel(), seed=1):
  loss, _ = teacher.teacher_loss({teacher.DIT_PARAMS: params}, batch, jax.random.PRNGKey(seed), model=model,
                                 text_encoder=FROZEN_TEXT, objective=objective, null_context=NULL_CONTEXT)
  return float(loss)


def _params():
  batch = _batch()
  cond = teacher.conditioning(batch, batch["context"], _objective())
  return StandInModel().init(jax.random.PRNGKey(0), batch["latents"], jnp.zeros((B,)), cond)["params"]


def _loss_draws(rng, z0, objective):
  """The timesteps and noise `teacher.teacher_loss` draws from `rng` (its first two of three splits)."""
  t_rng, noise_rng, _ = jax.random.split(rng, 3)
  return flow.sample_training_timesteps(t_rng, (B,), objective.shift), jax.random.normal(noise_rng, z0.shape)


class ZeroModel(nn.Module):

  @nn.compact
  def __call__(self, latents, t, cond):
    del t, cond
    return jnp.zeros_like(latents) * self.param("unused", nn.initializers.zeros, ())


def test_loss_target_is_noise_minus_data():
  # A model that predicts 0 pays E|eps - z0|^2 = 1 + scale^2 for z0 of that scale, whatever t is.
  for scale in (0.0, 2.0):
    loss = _loss({"unused": jnp.zeros(())}, _batch(latent_scale=scale), _objective(), model=ZeroModel())
    assert loss == pytest.approx(1.0 + scale**2, rel=0.05)


def test_loss_min_t_caps_the_weight_of_low_t_samples():
  # ZeroModel pays |eps - 0|^2 ~ 1 per sample for zero latents; the floor scales sample b by min(1, t_b/floor)^2.
  batch, params, seed = _batch(latent_scale=0.0), {"unused": jnp.zeros(())}, 3
  plain = _loss(params, batch, _objective(), model=ZeroModel(), seed=seed)
  assert _loss(params, batch, _objective(loss_min_t=1e-9), model=ZeroModel(), seed=seed) == pytest.approx(plain)
  t = np.asarray(_loss_draws(jax.random.PRNGKey(seed), batch["latents"], _objective())[0])
  floor = float(np.sort(t)[B // 2])  # half the samples sit below it
  expected = plain * float(np.mean(np.minimum(1.0, t / floor) ** 2))
  assert expected < 0.85 * plain  # so the check below tells weighted from unweighted
  assert _loss(params, batch, _objective(loss_min_t=floor), model=ZeroModel(), seed=seed) == pytest.approx(
      expected, rel=0.1)


def test_recycled_samples_are_noised_from_the_models_own_x0_without_gradient():
  # recycle_prob = 1: the loss and its gradient equal a plain loss on inputs built by hand (outside the
  # gradient) from the model's x0 at the earlier time, re-noised to t, with the target leading back to z0.
  params, batch, seed = _params(), _batch(), 5
  objective = _objective(recycle_prob=1.0, recycle_gap=0.25, recycle_min_t=0.0)
  model = StandInModel()
  rng = jax.random.PRNGKey(seed)
  z0 = batch["latents"]
  t, noise = _loss_draws(rng, z0, objective)
  prev_noise_rng, _ = jax.random.split(jax.random.fold_in(rng, 1))
  t_prev = flow.earlier_timestep(t, objective.shift, 0.25)
  assert bool(jnp.all(t_prev > t))
  z_prev = flow.add_noise(z0, jax.random.normal(prev_noise_rng, z0.shape), t_prev)
  cond = teacher.conditioning(batch, batch["context"], objective)
  x0_prev = flow.x0_from_velocity(z_prev, t_prev, model.apply({"params": params}, z_prev, t_prev, cond))
  z_in = flow.add_noise(x0_prev, noise, t)
  target = flow.velocity_from_x0(z_in, t, z0)

  def by_hand(p):
    v = model.apply({"params": p}, z_in, t, cond)
    return jnp.mean(jnp.square(v - target))

  def recycled(p):
    loss, _ = teacher.teacher_loss({teacher.DIT_PARAMS: p}, batch, rng, model=model, text_encoder=FROZEN_TEXT,
                                   objective=objective, null_context=NULL_CONTEXT)
    return loss

  np.testing.assert_allclose(recycled(params), by_hand(params), rtol=1e-5)
  chex.assert_trees_all_close(jax.grad(recycled)(params), jax.grad(by_hand)(params), rtol=1e-4, atol=1e-6)
  assert abs(float(recycled(params)) - _loss(params, batch, _objective(), seed=seed)) > 1e-3
  # recycle_prob = 0 is the plain objective, draw for draw.
  assert _loss(params, batch, _objective(recycle_prob=0.0), seed=seed) == _loss(params, batch, _objective(),
                                                                                 seed=seed)


def test_motion_weights_mark_what_changes_between_latent_frames_and_not_slow_drift():
  # One element jumps by 1.0 between frames 1 and 2; the whole clip drifts by 0.05 a frame (a background effect).
  z0 = 0.05 * jnp.arange(4.0)[None, :, None, None, None] * jnp.ones((1, 4, 2, 2, 3))
  z0 = z0.at[0, 2:, 1, 0, 2].add(1.0)
  weights = np.asarray(teacher.motion_weights(z0, motion_weight=9.0, threshold=0.2))
  chex.assert_shape(weights, z0.shape)
  expected = np.ones(z0.shape, np.float32)
  expected[0, 1:3, 1, 0, 2] = 10.0  # the frames on both sides of the change; frames 0 and 3 did not change there
  np.testing.assert_array_equal(weights, expected)


def test_motion_weighted_loss_is_each_frames_weighted_mean_and_zero_weight_is_the_plain_loss():
  params, batch, seed = _params(), _batch(), 2
  objective = _objective(motion_weight=4.0, motion_threshold=1.0)
  model = StandInModel()
  z0 = batch["latents"]
  t, noise = _loss_draws(jax.random.PRNGKey(seed), z0, objective)
  cond = teacher.conditioning(batch, batch["context"], objective)
  error = np.square(np.asarray(model.apply({"params": params}, flow.add_noise(z0, noise, t), t, cond)
                               - flow.velocity_target(z0, noise)))
  changed = np.abs(np.diff(np.asarray(z0), axis=1)) > 1.0
  moved = np.zeros(z0.shape, bool)
  moved[:, 1:] |= changed
  moved[:, :-1] |= changed
  assert 0.05 < moved.mean() < 0.95  # random latents: some elements weigh 5, others 1
  weights = 1.0 + 4.0 * moved
  per_frame = (weights * error).sum(axis=(2, 3, 4)) / weights.sum(axis=(2, 3, 4))
  assert _loss(params, batch, objective, seed=seed) == pytest.approx(float(per_frame.mean()), rel=1e-5)
  plain = _loss(params, batch, _objective(), seed=seed)
  assert abs(plain - float(per_frame.mean())) > 1e-3 * plain
  assert _loss(params, batch, _objective(motion_weight=0.0), seed=seed) == plain


def test_dropout_replaces_text_and_tracks_with_the_null_conditions():
  params, batch = _params(), _batch()
  base = _loss(params, batch, _objective())
  no_text_batch = dict(batch, context=jnp.broadcast_to(NULL_CONTEXT, batch["context"].shape))
  no_motion_batch = dict(batch, track_grid=jnp.zeros_like(batch["track_grid"]))
  assert _loss(params, batch, _objective(text_dropout=1.0)) == pytest.approx(
      _loss(params, no_text_batch, _objective()), rel=1e-6)
  assert _loss(params, batch, _objective(motion_dropout=1.0)) == pytest.approx(
      _loss(params, no_motion_batch, _objective()), rel=1e-6)
  assert abs(_loss(params, no_text_batch, _objective()) - base) > 1e-4
  assert abs(_loss(params, no_motion_batch, _objective()) - base) > 1e-4


def test_replace_mode_leaves_frame_zero_out_of_the_loss():
  params, batch = _params(), _batch()
  changed = dict(batch, latents=batch["latents"].at[:, 0].add(3.0))
  replace = _objective(image_condition="replace")
  assert _loss(params, changed, replace) == pytest.approx(_loss(params, batch, replace), rel=1e-6)
  assert abs(_loss(params, changed, _objective()) - _loss(params, batch, _objective())) > 1e-2


def test_trainable_text_encoder_gives_the_empty_prompt_as_null():
  encoder = text_lib.LearnedTextEncoder(4, TEXT_DIM, width=16, num_layers=1, num_heads=2)
  params = {teacher.TEXT_PARAMS: encoder.init_params(jax.random.PRNGKey(0))}
  inputs = encoder.prepare(["a red circle", "a blue square"])
  batch = {"text_ids": inputs.ids, "text_mask": inputs.mask}
  context, null = teacher.text_contexts(params, batch, encoder, None)
  np.testing.assert_allclose(context, encoder.encode(params[teacher.TEXT_PARAMS], ["a red circle",
                                                                                   "a blue square"])[0], atol=1e-6)
  np.testing.assert_allclose(null, encoder.null_context(params[teacher.TEXT_PARAMS])[0], atol=1e-6)
  assert float(jnp.abs(context - null).max()) > 1e-3


def test_converted_checkpoint_with_wrong_shapes_is_refused(tmp_path):
  expected = {"patch_embedding": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros((3,))}}
  convert_common.save_params({"patch_embedding": {"kernel": np.zeros((2, 4), np.float32)},
                              "extra": {"w": np.zeros((1,), np.float32)}}, tmp_path / "ckpt")
  with pytest.raises(ValueError, match=r"patch_embedding/kernel: expected \[2, 3\], found \[2, 4\]") as error:
    teacher.load_dit_checkpoint(str(tmp_path / "ckpt"), expected)
  assert "patch_embedding/bias: expected [3], found nothing" in str(error.value)
  assert "extra/w: not a parameter" in str(error.value)
  good = {"patch_embedding": {"kernel": np.ones((2, 3), np.float32), "bias": np.ones((3,), np.float32)}}
  convert_common.save_params(good, tmp_path / "good")
  loaded = teacher.load_dit_checkpoint(str(tmp_path / "good"), expected)
  np.testing.assert_array_equal(loaded["patch_embedding"]["kernel"], good["patch_embedding"]["kernel"])


def test_a_nearest_checkpoint_loads_into_a_nearest_offset_model(tmp_path, capsys):
  """The zero-initialised offset input is the one parameter a source may lack; it stays at zero, said aloud."""
  offset_in = {"kernel": np.zeros((8, 4), np.float32)}
  expected = {"track_head": {"fc1": {"kernel": np.zeros((4, 4), np.float32)}, track_head.OFFSET_INPUT: offset_in}}
  saved = {"track_head": {"fc1": {"kernel": np.full((4, 4), 2.0, np.float32)}}}
  convert_common.save_params(saved, tmp_path / "nearest")
  loaded = teacher.load_dit_checkpoint(str(tmp_path / "nearest"), expected)
  np.testing.assert_array_equal(loaded["track_head"]["fc1"]["kernel"], saved["track_head"]["fc1"]["kernel"])
  np.testing.assert_array_equal(loaded["track_head"][track_head.OFFSET_INPUT]["kernel"], offset_in["kernel"])
  assert f"track_head/{track_head.OFFSET_INPUT}/kernel; starting it at zero" in capsys.readouterr().out
  nonzero = {"track_head": dict(expected["track_head"], **{track_head.OFFSET_INPUT: {"kernel": np.ones((8, 4))}})}
  with pytest.raises(ValueError, match=rf"{track_head.OFFSET_INPUT}/kernel: expected \[8, 4\], found nothing"):
    teacher.load_dit_checkpoint(str(tmp_path / "nearest"), nonzero)


def test_a_checkpoint_grows_into_a_deeper_model_that_computes_the_same(tmp_path):
  """config.init_grow_layers: the source's blocks spaced evenly among identity blocks, so a 1-layer run starts
  a 3-layer model with its outputs unchanged; the new blocks keep their fresh params save the zeroed outputs."""
  shallow_config, deep_config = _micro_teacher_config(), _micro_teacher_config()
  assert shallow_config.model.num_layers == 1
  deep_config.model.num_layers = 3
  shallow, deep = (dit.WanDiT(dit.DiTSpec.from_config(c)) for c in (shallow_config, deep_config))
  shallow_params = inference.init_dit_params(shallow_config, jax.random.PRNGKey(0))
  fresh = inference.init_dit_params(deep_config, jax.random.PRNGKey(1))
  convert_common.save_params(jax.device_get(shallow_params), tmp_path / "shallow")
  with pytest.raises(ValueError, match=r"blocks/.*expected \[3, "):
    teacher.load_dit_checkpoint(str(tmp_path / "shallow"), fresh)
  grown = teacher.load_dit_checkpoint(str(tmp_path / "shallow"), fresh, grow_layers=True)
  chex.assert_trees_all_equal_shapes(grown, fresh)
  blocks, fresh_blocks = grown["blocks"], fresh["blocks"]
  query, fresh_query = blocks["self_attn"]["q"]["kernel"], fresh_blocks["self_attn"]["q"]["kernel"]
  np.testing.assert_array_equal(query[0], shallow_params["blocks"]["self_attn"]["q"]["kernel"][0])
  np.testing.assert_array_equal(query[1:], fresh_query[1:])
  for branch, output in (("self_attn", "o"), ("cross_attn", "o"), ("ffn", "fc2")):
    assert not np.any(blocks[branch][output]["kernel"][1:]) and not np.any(blocks[branch][output]["bias"][1:])
    assert np.any(blocks[branch][output]["kernel"][0])
  # Random inputs: the grown model gives the shallow one's output.
  keys = iter(jax.random.split(jax.random.PRNGKey(2), 8))
  inputs = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), dit.example_inputs(shallow_config, 2))
  inputs = (inputs[0], jnp.array([0.3, 0.9]), inputs[2])
  expected = shallow.apply({"params": shallow_params}, *inputs)
  assert float(jnp.abs(expected).mean()) > 1e-2
  np.testing.assert_allclose(deep.apply({"params": grown}, *inputs), expected, atol=1e-5)
  deep_config.model.num_layers = 2
  uneven = inference.init_dit_params(deep_config, jax.random.PRNGKey(1))
  convert_common.save_params(jax.device_get(grown), tmp_path / "deep")
  with pytest.raises(ValueError, match=r"num_layers \(2\) to be a multiple of the source's 3 layers"):
    teacher.load_dit_checkpoint(str(tmp_path / "deep"), uneven, grow_layers=True)


MICRO_OVERRIDES = {
    "video.height": 32, "video.width": 32, "video.num_frames": 9, "tracks.grid": 8, "tracks.min_tracks": 8,
    "tracks.max_tracks": 16, "model.dim": 32, "model.num_layers": 1, "model.num_heads": 2, "model.ffn_dim": 64,
    "model.text_len": 4, "data.num_train": 4,
    "data.num_validation": 2, "train.batch_size": 2, "train.log_every": 1, "eval.batch_size": 2,
}


def _micro_teacher_config() -> ml_collections.ConfigDict:
  """configs/teacher.py with MICRO_OVERRIDES applied, as train.py applies them from the command line."""
  config = teacher_config.get_config("tiny")
  for key, value in MICRO_OVERRIDES.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def _train_py(tmp_path, overrides, preset="tiny", config_file="teacher.py", workdir="run"):
  args = [sys.executable, os.path.join(REPO, "train.py"), f"--config={REPO}/configs/{config_file}:{preset}",
          f"--config.workdir={tmp_path / workdir}", f"--config.data.data_dir={tmp_path / 'data'}"]
  args += [f"--config.{key}={value}" for key, value in overrides.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout + result.stderr


def test_train_py_runs_the_teacher_end_to_end(tmp_path):
  output = _train_py(tmp_path, dict(MICRO_OVERRIDES, **{"train.steps": 2, "train.eval_every": 2,
                                                         "eval.num_samples": 0}))
  assert re.search(r"step 2: .*loss=", output)
  # The eval hook also scores the validation clips with their track IDs shuffled after frame 0.
  given = re.search(r"eval/val_loss=([0-9.eE+-]+)", output)
  shuffled = re.search(r"eval/val_loss_shuffled_ids=([0-9.eE+-]+)", output)
  assert given and shuffled, output[-3000:]
  for name in ("val_loss", "val_loss_shuffled_ids", "val_loss_relabelled_ids"):  # the mean, and each fixed t
    for suffix in ("", "_t0.25", "_t0.95"):
      assert re.search(rf"eval/{name}{suffix}=[0-9]", output), (name, suffix, output[-3000:])
  assert os.path.isdir(tmp_path / "run" / loop.CHECKPOINT_SUBDIR / "2")
  assert glob.glob(str(tmp_path / "run" / loop.TENSORBOARD_SUBDIR / "events.out.tfevents.*"))
  # Another run's init_checkpoint can name this workdir or its export: both give its EMA DiT params.
  workdir, exported = str(tmp_path / "run"), str(tmp_path / "exported")
  inference.export_model(workdir, exported)
  ema_dit = inference.read_checkpoint(workdir)[0][teacher.DIT_PARAMS]
  blank = jax.tree.map(np.zeros_like, ema_dit)
  for source in (workdir, exported):
    loaded = teacher.load_dit_checkpoint(source, blank)
    assert jax.tree.structure(loaded) == jax.tree.structure(ema_dit)
    jax.tree.map(np.testing.assert_array_equal, loaded, ema_dit)
  assert any(float(np.abs(leaf).max()) > 0 for leaf in jax.tree.leaves(ema_dit))
  wider = dict(blank, patch_embedding=dict(blank["patch_embedding"], bias=np.zeros((1000,), np.float32)))
  with pytest.raises(ValueError, match=r"patch_embedding/bias: expected \[1000\]"):
    teacher.load_dit_checkpoint(workdir, wider)
  # The ID-following recipe starts from a nearest model (here this run, standing in for the tile run) and goes
  # on with sub-cell offsets, its scaled track input and mixed clips rendered as they are read.
  recipe = _train_py(tmp_path, dict(MICRO_OVERRIDES, **{"train.steps": 1, "train.eval_every": 1,
                                                        "init_checkpoint": workdir}),
                     config_file="teacher_ids.py", workdir="recipe")
  assert f"{track_head.OFFSET_INPUT}/kernel; starting it at zero" in recipe
  assert re.search(r"step 1: .*loss=", recipe) and re.search(r"eval/val_loss_shuffled_ids_t0.95=[0-9]", recipe)
  assert not re.search(r"eval/val_loss_t0.25=", recipe)  # the recipe watches t = 0.95 alone
  recipe_config = inference.read_checkpoint(str(tmp_path / "recipe"))[1]
  assert recipe_config["tracks"]["splat"] == "nearest_offset" and recipe_config["model"]["track_input_scale"] == 32


def test_train_step_benchmark_times_the_stages_step(tmp_path):
  """`python -m msjax.bench.train_step` builds the stage train.py builds and reports what it timed."""
  args = [sys.executable, "-m", "msjax.bench.train_step", f"--config={REPO}/configs/teacher.py", "--steps=2",
          f"--json={tmp_path / 'step.json'}", "--config.data.dataset=sprites_rendered"]
  args += [f"--config.{key}={value}" for key, value in MICRO_OVERRIDES.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "teacher step, batch 2 x 9 frames" in result.stdout and "GFLOP/s" in result.stdout
  report = json.loads((tmp_path / "step.json").read_text())
  assert report["steps"] == 2 and report["batch_size"] == 2
  assert report["scan_layers"] is False and "layers unrolled" in result.stdout  # the tiny teacher's setting
  assert 0 < report["step_ms_min"] <= report["step_ms_mean"] <= report["step_ms_max"]
  assert report["clips_per_s"] == pytest.approx(2 / (report["step_ms_mean"] / 1000))
  assert np.isfinite(report["loss_first"]) and np.isfinite(report["loss_last"])
  # 3 x batch x one full-clip forward: 3 latent frames of 16 / 2 = 8 x 8 cells, patch 2 x 2 -> 48 tokens
  forward = stream_bench.dit_flops(_micro_teacher_config(), 3, 3)
  assert report["gflop_per_step"] == pytest.approx(3 * 2 * forward / 1e9)
  linear_only = 2 * 48 * (6 * 32 * 32 + 2 * 32 * 64)  # one layer's linear layers over 48 tokens
  assert forward > linear_only + 4 * 48 * 48 * 32
  wrong_stage = subprocess.run(args[:3] + [f"--config={REPO}/configs/distill.py"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
  assert wrong_stage.returncode == 2 and wrong_stage.stderr.strip().startswith("error:")
  assert "Traceback" not in wrong_stage.stderr


def test_the_id_recipe_config_is_for_the_tiny_preset_only():
  recipe = teacher_ids_config.get_config()
  assert recipe.data.sprite_motion == "mixed" and recipe.optim.schedule == "constant"
  with pytest.raises(config_utils.ConfigError, match="recipe for the tiny preset, got 'wan2_1_1_3b'"):
    teacher_ids_config.get_config("wan2_1_1_3b")


def test_unknown_stage_and_missing_config_fail_cleanly(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  missing = subprocess.run([sys.executable, os.path.join(REPO, "train.py")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
  assert missing.returncode == 2 and "--config is required" in missing.stderr
  bad = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"--config={REPO}/configs/teacher.py",
                        "--config.stage=pretrain"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
  assert bad.returncode == 2 and "config.stage must be one of" in bad.stderr
  # Config mistakes absl and ml_collections would report with a traceback: one line, exit 2.
  cases = {(f"--config={REPO}/configs/teacher.py:bogus",): "unknown model preset 'bogus'",
           (f"--config={REPO}/configs/teacher_ids.py:wan2_1_1_3b",): "recipe for the tiny preset",
           (f"--config={tmp_path}/missing.py",): "cannot load the config file",
           (f"--config={REPO}/configs/teacher.py", "--config.model.dimm=1"): 'Did you mean "dim"',
           (f"--config={REPO}/configs/teacher.py", "--config.model.dim=wide"): "--config.model.dim=wide",
           ("--no_such_flag=1",): "Unknown command line flag 'no_such_flag'"}
  for args, expected in cases.items():
    run = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and expected in run.stderr, (args, run.stderr[-2000:])
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, (args, run.stderr)


def test_an_unusable_init_checkpoint_is_one_error_line(tmp_path):
  """A folder orbax did not write, and params of another model size: exit 2, the path named, no traceback."""
  (tmp_path / "not_params").mkdir()
  convert_common.save_params({"patch_embedding": {"kernel": np.zeros((2, 4), np.float32)}}, tmp_path / "other_size")
  expected = {"not_params": "not a params checkpoint", "other_size": "do not fit config.model"}
  for name, message in expected.items():
    args = [sys.executable, os.path.join(REPO, "train.py"), f"--config={REPO}/configs/teacher.py",
            f"--config.workdir={tmp_path / 'run'}", f"--config.init_checkpoint={tmp_path / name}",
            "--config.data.dataset=sprites_rendered", "--config.train.steps=1", "--config.train.eval_every=0"]
    args += [f"--config.{key}={value}" for key, value in MICRO_OVERRIDES.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(errors) == 1, run.stderr[-3000:]
    assert str(tmp_path / name) in errors[0] and message in errors[0], errors
    assert "Traceback" not in run.stderr
    assert not os.path.exists(tmp_path / "run" / loop.CHECKPOINT_SUBDIR / "1")


@pytest.mark.slow
def test_tiny_teacher_learns_writes_samples_and_resumes(tmp_path):
  overrides = {"data.num_train": 16, "data.num_validation": 4, "train.steps": 30, "train.eval_every": 15,
               "train.checkpoint_every": 15, "train.log_every": 5, "optim.warmup_steps": 5,
               "optim.learning_rate": 1e-3, "guidance.num_steps": 4}
  output = _train_py(tmp_path, overrides)
  val = [float(v) for v in re.findall(r"eval/val_loss=([0-9.eE+-]+)", output)]
  assert len(val) == 2 and val[1] < val[0], output[-3000:]
  gifs = sorted(glob.glob(str(tmp_path / "run" / teacher.SAMPLES_SUBDIR / "*.gif")))
  assert [os.path.basename(g) for g in gifs] == ["step_0000015.gif", "step_0000030.gif"]
  output = _train_py(tmp_path, dict(overrides, **{"train.steps": 32}))
  assert "at step 30" in output and re.search(r"step 32: .*loss=", output)



def test_sampler_name_defaults_to_euler_for_configs_without_the_key():
  assert teacher.sampler_name(ml_collections.ConfigDict({"num_steps": 4})) == teacher.EULER
  assert teacher.sampler_name(ml_collections.ConfigDict({"sampler": "renoise"})) == teacher.RENOISE
  with pytest.raises(ValueError, match="guidance.sampler must be one of euler, renoise, got 'ddim'"):
    teacher.sampler_name(ml_collections.ConfigDict({"sampler": "ddim"}))


def test_replace_mode_puts_the_given_image_back_as_frame_zero():
  clean = jnp.ones((2, 3, 4, 4, 5))
  cond = teacher.Conditioning(first_latent=jnp.full((2, 4, 4, 5), 7.0))
  pinned = teacher.pin_first_frame(clean, cond, "replace")
  np.testing.assert_array_equal(pinned[:, 0], cond.first_latent)
  np.testing.assert_array_equal(pinned[:, 1:], clean[:, 1:])
  np.testing.assert_array_equal(teacher.pin_first_frame(clean, cond, "concat"), clean)


def test_shipped_id_teacher_follows_the_track_ids():
  """checkpoints/tiny_teacher_ids (configs/teacher_ids.py) puts sprites where their tracks go and loses them when
  the IDs after frame 0 are shuffled, so the track path it was trained through still reads IDs the same way."""
  config = teacher_ids_config.get_config()
  config.data.sprite_motion = sprites_lib.MOTION_SMOOTH
  config.guidance.update(mode="none", sampler=teacher.RENOISE, num_steps=4)
  seeds = sprites_eval.eval_seeds(8)
  epe = {}
  for condition in (sprites_eval.TRACKS_GIVEN, sprites_eval.TRACKS_SHUFFLED_IDS):
    context = sprites_eval.GeneratorContext(config=config, checkpoint=SHIPPED_ID_TEACHER, seeds=tuple(seeds),
                                            world=sprites_eval.world_config(config), track_condition=condition)
    result = sprites_eval.evaluate(sprites_eval.make_generator(generators.TEACHER, context), seeds=seeds,
                                   config=config, baselines=False)
    epe[condition] = result["results"][sprites_eval.GENERATOR]["aggregate"]["epe"]["mean"]
  assert epe[sprites_eval.TRACKS_GIVEN] < 3.0, epe
  assert epe[sprites_eval.TRACKS_SHUFFLED_IDS] > epe[sprites_eval.TRACKS_GIVEN] + 2.0, epe
