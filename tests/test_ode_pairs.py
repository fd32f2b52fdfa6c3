"""ODE pairs: where the states are recorded, that they are the teacher's guided Euler path, shards, resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msjax import config_utils
from msjax.data import pipeline
from msjax.diffusion import flow
from msjax.models import dit
from msjax.train import ode_pairs
from msjax.train import teacher
import distill_fixtures

pytestmark = pytest.mark.filterwarnings("ignore::msjax.models.text.TextTruncationWarning")


def test_recorded_states_sit_on_the_student_times():
  student = np.asarray(flow.consistency_timesteps(3, 6.0))
  exact = np.asarray(flow.euler_timesteps(6, 6.0))
  indices = ode_pairs.record_indices(exact, student)
  np.testing.assert_array_equal(indices, [0, 2, 4])  # N a multiple of K: the grid holds every student time
  np.testing.assert_allclose(exact[indices], student, atol=1e-6)
  coarse = np.asarray(flow.euler_timesteps(4, 6.0))
  nearest = ode_pairs.record_indices(coarse, student)
  for index, t in zip(nearest, student):
    assert np.abs(coarse[index] - t) == np.min(np.abs(coarse - t))
  assert not np.allclose(coarse[nearest], student, atol=1e-3)
  with pytest.raises(config_utils.ConfigError, match="euler_steps=2 is too coarse"):
    ode_pairs.record_indices(np.asarray(flow.euler_timesteps(2, 6.0)), student)


def test_trajectory_is_one_euler_path():
  """The kept states and the end equal one uninterrupted Euler integration over the same grid."""
  weights = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
  velocity_fn = lambda z, t: jnp.tanh(z @ jnp.eye(3) * 0.7 + t[:, None, None] * weights[None, :1])
  noise = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 3))
  times = flow.euler_timesteps(6, 3.0)
  states, clean = ode_pairs.teacher_trajectory(velocity_fn, noise, times, (0, 2, 5))
  z, expected = noise, {0: noise}
  for j in range(6):
    z = z + (times[j + 1] - times[j]) * velocity_fn(z, jnp.full((2,), times[j]))
    expected[j + 1] = z
  np.testing.assert_allclose(states, jnp.stack([expected[0], expected[2], expected[5]], axis=1), atol=1e-5)
  np.testing.assert_allclose(clean, expected[6], atol=1e-5)
  np.testing.assert_allclose(clean, flow.euler_sample(velocity_fn, noise, times), atol=1e-5)


def _shard_arrays(path):
  with np.load(path) as members:
    return {name: members[name] for name in members.files}


def test_pairs_round_trip_resume_and_refuse_other_settings(tmp_path):
  config = distill_fixtures.micro_config(tmp_path)
  model = distill_fixtures.saved_teacher(config)
  layout = ode_pairs.generate(config, config.ode_pairs.dir, model)
  source = ode_pairs.PairSource(config.ode_pairs.dir)
  geo = config_utils.geometry(config)
  latent = (geo.latent_frames, geo.latent_height, geo.latent_width, geo.latent_channels)
  assert len(source) == 3 and layout.num_shards == 2  # the last shard holds one clip
  clip = source[2]
  assert clip["states"].shape == (config.stream.num_steps,) + latent and clip["clean"].shape == latent
  assert clip[pipeline.TRACK_POINTS].shape == (geo.num_frames, config.tracks.max_tracks, 2)
  assert clip[pipeline.TRACK_EMBEDDINGS].shape == (config.tracks.max_tracks, config.tracks.embed_dim)
  np.testing.assert_allclose(clip["timesteps"], layout.timesteps)
  assert clip["timesteps"][0] == 1.0 and str(clip["prompt"])

  # The stored end is the guided teacher's Euler sample from the stored starting noise and conditioning.
  spec = ode_pairs.ConditioningSpec.from_config(config)
  batch = pipeline.make_device_inputs(config, model.codec)(
      {name: jnp.asarray(value)[None] for name, value in clip.items() if name != "prompt"})
  context, _ = model.text_encoder.encode(model.text_params, [str(clip["prompt"])])
  guide = config.guidance.copy_and_resolve_references()
  guide.num_steps = config.ode_pairs.euler_steps
  expected = teacher.sample(dit.WanDiT(model.spec), model.dit_params, batch["states"][:, 0],
                            ode_pairs.conditioning(batch, context, spec),
                            model.text_encoder.null_context(model.text_params)[0], guide, config.flow.shift,
                            jax.random.PRNGKey(0))
  np.testing.assert_allclose(clip["clean"], expected[0], atol=2e-4)
  assert not np.allclose(clip["states"][1], clip["states"][0], atol=1e-3)

  # Resume: a finished shard is left alone, a missing one is made again, identically.
  first, second = ode_pairs.shard_path(config.ode_pairs.dir, 0), ode_pairs.shard_path(config.ode_pairs.dir, 1)
  first_mtime, second_arrays = os.stat(first).st_mtime_ns, _shard_arrays(second)
  os.remove(second)
  with pytest.raises(ode_pairs.PairsError, match="1 of 2 shards missing"):
    ode_pairs.PairSource(config.ode_pairs.dir)
  ode_pairs.generate(config, config.ode_pairs.dir, model)
  assert os.stat(first).st_mtime_ns == first_mtime
  remade = _shard_arrays(second)
  assert sorted(remade) == sorted(second_arrays)
  for name, value in second_arrays.items():
    np.testing.assert_array_equal(remade[name], value)

  config.ode_pairs.euler_steps = 6
  with pytest.raises(ode_pairs.PairsError, match="euler_steps: folder 4, config 6"):
    ode_pairs.generate(config, config.ode_pairs.dir, model)

  # A folder of the older format (dense track grids, no field list) is refused with what to do.
  layout_path = os.path.join(config.ode_pairs.dir, ode_pairs.LAYOUT_FILE)
  with open(layout_path) as f:
    old = json.load(f)
  del old["fields"]
  with open(layout_path, "w") as f:
    json.dump(old, f)
  with pytest.raises(ode_pairs.PairsError, match=r"layout \(no fields \(made by an older msjax\)\); delete the folder"):
    ode_pairs.PairSource(config.ode_pairs.dir)


def test_missing_teacher_and_missing_pairs_say_what_to_run(tmp_path):
  config = distill_fixtures.micro_config(tmp_path)
  with pytest.raises(ValueError, match="train one first"):
    ode_pairs.load_teacher(config)
  with pytest.raises(ode_pairs.PairsError, match="python -m msjax.train.ode_pairs"):
    ode_pairs.PairSource(str(tmp_path / "nothing"))
