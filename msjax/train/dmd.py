"""Self Forcing + DMD (paper sections 4.2-4.3): stage 'dmd', and `student_sample`, the student's clip sampler.

One training step (what the shared loop counts) is one generator update followed by `dmd.critic_steps` critic
updates, each on its own slice of the step's batch (a fresh set of conditionings) and its own self-rollout:
  * self-rollout: the generator streams the clip chunk by chunk with exactly the inference cache
    (`causal_init.stream_clip` -> `rollout.rollout`: sink + rolling window from `config.stream`, RoPE by
    `stream.rope_mode`, K steps from pure noise per chunk). One exit step per chunk, uniform in [0, K), carries
    gradient; earlier steps and the cache carried between chunks are stop-gradient (gradient truncation);
  * the clip x0 is re-noised at t = shift(u), u ~ U[0, 1), clamped to [dmd.timestep_min, dmd.timestep_max];
  * real score: the frozen teacher with joint text-motion guidance (dmd.text_scale, dmd.motion_scale);
    fake score: the critic (initialised from the teacher), unguided; both as x0 predictions;
  * generator loss (DMD2 / Self Forcing): g = (fake_x0 - real_x0) / mean|x0 - real_x0| (mean per sample), then
    0.5 * mean((x0 - stop_gradient(x0 - g))^2), whose gradient with respect to x0 is g / (number of elements);
  * critic loss: flow matching, MSE(v_critic(z_t), eps - x0), on stop-gradient rollouts of the updated generator.
Both networks use AdamW with their own settings (dmd.generator_optim / dmd.critic_optim); the generator keeps an
EMA (what `load_model` and the exported student use).

The state (`DMDState`) is one pytree: the generator's TrainState fields plus the critic's params and optimizer
state, so the shared loop checkpoints and resumes it as it does any stage. The frozen teacher is an argument of
the step, not part of the state (it is re-read from `teacher_checkpoint`).
Limitation inherited from `rollout.rollout`: the whole carried cache is stop-gradient, including the text
cross-attention K/V computed once per stream, so the generator's cross-attention key/value projections and text
embedding get no DMD gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, NamedTuple

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from msjax import config_utils
from msjax import inference
from msjax.data import pipeline
from msjax.diffusion import flow
from msjax.models import dit
from msjax.models import kv_cache
from msjax.models.track_head import Conditioning
from msjax.stream import rollout
from msjax.train import causal_init
from msjax.train import loop
from msjax.train import ode_pairs
from msjax.train import sharding
from msjax.train import state as state_lib
from msjax.train import teacher

DIT_PARAMS = causal_init.DIT_PARAMS
STAGE = "dmd"
CONDITION_KEYS = ("first_latent", "track_grid")
# Streams of a step's key: the generator update and the critic updates.
_GENERATOR_STREAM, _CRITIC_STREAM = 0, 1


@flax.struct.dataclass
class DMDState(state_lib.TrainState):
  """TrainState of the generator (params / opt_state / ema_params hold the student) plus the critic."""
  critic_params: Any
  critic_opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class DMDObjective:
  """Static knobs of both losses (hashable; also a `ode_pairs.ConditioningSpec` for the conditioning)."""
  shift: float
  timestep_min: float
  timestep_max: float
  num_steps: int  # K, denoising steps per chunk
  chunk_frames: int
  latent_shape: tuple[int, int, int, int]  # (F, h, w, C) of a clip
  guidance: ode_pairs.Guidance  # of the real score
  image_condition: str
  use_tracks: bool

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> DMDObjective:
    d, geo = config.dmd, config_utils.geometry(config)
    if not 0.0 <= d.timestep_min < d.timestep_max <= 1.0:
      raise config_utils.ConfigError(f"dmd.timestep_min / timestep_max must satisfy 0 <= min < max <= 1, got "
                                     f"{d.timestep_min} and {d.timestep_max}")
    if d.critic_steps < 1:
      raise config_utils.ConfigError(f"dmd.critic_steps must be >= 1, got {d.critic_steps}")
    spec = ode_pairs.ConditioningSpec.from_config(config)
    return cls(shift=float(config.flow.shift), timestep_min=float(d.timestep_min),
               timestep_max=float(d.timestep_max), num_steps=int(config.stream.num_steps),
               chunk_frames=geo.chunk_frames,
               latent_shape=(geo.latent_frames, geo.latent_height, geo.latent_width, geo.latent_channels),
               guidance=ode_pairs.Guidance(d.guidance_mode, float(d.text_scale), float(d.motion_scale)),
               image_condition=spec.image_condition, use_tracks=spec.use_tracks)

  @property
  def num_chunks(self) -> int:
    return self.latent_shape[0] // self.chunk_frames


# ---- the DMD gradient ---------------------------------------------------------------------------------------


def dmd_gradient(x0: jax.Array, real_x0: jax.Array, fake_x0: jax.Array) -> jax.Array:
  """(fake_x0 - real_x0) / mean|x0 - real_x0| per sample: DMD's score difference with its scale normalised away."""
  chex.assert_equal_shape([x0, real_x0, fake_x0])
  axes = tuple(range(1, x0.ndim))
  normalizer = jnp.mean(jnp.abs(x0 - real_x0), axis=axes, keepdims=True)
  return jnp.nan_to_num((fake_x0 - real_x0) / normalizer)


def dmd_loss(x0: jax.Array, real_x0: jax.Array, fake_x0: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(loss, g): 0.5 * mean((x0 - sg(x0 - g))^2), so d loss / d x0 = g / x0.size; the scores are constants."""
  grad = jax.lax.stop_gradient(dmd_gradient(x0, jax.lax.stop_gradient(real_x0), jax.lax.stop_gradient(fake_x0)))
  target = jax.lax.stop_gradient(x0 - grad)
  return 0.5 * jnp.mean(jnp.square(x0 - target)), grad


# ---- the two losses -----------------------------------------------------------------------------------------


def self_rollout(dit_params: Any, config: ml_collections.ConfigDict, cond: Conditioning, rng: jax.Array,
                 objective: DMDObjective) -> tuple[jax.Array, jax.Array]:
  """The generator's clip from pure noise with one random exit step per chunk: (x0 [B, F, h, w, C], exit steps)."""
  noise_rng, exit_rng, step_rng = jax.random.split(rng, 3)
  batch = cond.context.shape[0]
  noises = jax.random.normal(noise_rng, (batch,) + objective.latent_shape, jnp.float32)
  exit_steps = jax.random.randint(exit_rng, (objective.num_chunks,), 0, objective.num_steps)
  return causal_init.stream_clip(dit_params, config, cond, noises, step_rng, exit_steps), exit_steps


def renoise(x0: jax.Array, rng: jax.Array, objective: DMDObjective) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(z_t, t [B], noise) at DMD's clamped shifted times, one t per clip (all its frames)."""
  t_rng, noise_rng = jax.random.split(rng)
  t = flow.sample_training_timesteps(t_rng, (x0.shape[0],), objective.shift, objective.timestep_min,
                                     objective.timestep_max)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  return flow.add_noise(x0, noise, t), t, noise


def score_x0(model: dit.WanDiT, teacher_params: Any, critic_params: Any, z_t: jax.Array, t: jax.Array,
             cond: Conditioning, null_context: jax.Array,
             objective: DMDObjective) -> tuple[jax.Array, jax.Array]:
  """(real x0: guided teacher, fake x0: critic) at (z_t, t); both stop-gradient."""
  real_v = teacher.guided_velocity_fn(model, teacher_params, cond, null_context, objective.guidance)(z_t, t)
  fake_v = model.apply({"params": critic_params[DIT_PARAMS]}, z_t, t, cond)
  real_x0, fake_x0 = flow.x0_from_velocity(z_t, t, real_v), flow.x0_from_velocity(z_t, t, fake_v)
  return jax.lax.stop_gradient(real_x0), jax.lax.stop_gradient(fake_x0)


def generator_loss(params: Any, batch: dict[str, jax.Array], rng: jax.Array, *, critic_params: Any,
                   teacher_params: Any, null_context: jax.Array, model: dit.WanDiT,
                   config: ml_collections.ConfigDict, objective: DMDObjective) -> tuple[jax.Array, dict]:
  """DMD loss of the generator's self-rollout (see the module docstring)."""
  rollout_rng, noise_rng = jax.random.split(rng)
  cond = ode_pairs.conditioning(batch, batch["context"], objective)
  x0, exit_steps = self_rollout(params[DIT_PARAMS], config, cond, rollout_rng, objective)
  z_t, t, _ = renoise(jax.lax.stop_gradient(x0), noise_rng, objective)
  real_x0, fake_x0 = score_x0(model, teacher_params, critic_params, z_t, t, cond, null_context, objective)
  loss, grad = dmd_loss(x0, real_x0, fake_x0)
  return loss, {"dmd_gradient_abs": jnp.mean(jnp.abs(grad)), "real_fake_gap": jnp.mean(jnp.abs(fake_x0 - real_x0)),
                "timestep_mean": jnp.mean(t), "exit_step_mean": jnp.mean(exit_steps.astype(jnp.float32))}


def flow_loss(model: dit.WanDiT, critic_params: Any, x0: jax.Array, rng: jax.Array, cond: Conditioning,
              objective: DMDObjective) -> jax.Array:
  """The critic's flow-matching MSE on samples x0, re-noised like the generator's."""
  z_t, t, noise = renoise(x0, rng, objective)
  v = model.apply({"params": critic_params[DIT_PARAMS]}, z_t, t, cond)
  per_frame = jnp.mean(jnp.square(v - flow.velocity_target(x0, noise)), axis=(2, 3, 4))
  weights = teacher.frame_weights(x0.shape[1], objective)
  return jnp.sum(per_frame * weights) / (x0.shape[0] * jnp.sum(weights))


def critic_loss(critic_params: Any, batch: dict[str, jax.Array], rng: jax.Array, *, generator_params: Any,
                model: dit.WanDiT, config: ml_collections.ConfigDict,
                objective: DMDObjective) -> tuple[jax.Array, dict]:
  """Flow matching of the critic on a fresh stop-gradient rollout of the generator."""
  rollout_rng, noise_rng = jax.random.split(rng)
  cond = ode_pairs.conditioning(batch, batch["context"], objective)
  x0, _ = self_rollout(jax.lax.stop_gradient(generator_params[DIT_PARAMS]), config, cond, rollout_rng, objective)
  return flow_loss(model, critic_params, jax.lax.stop_gradient(x0), noise_rng, cond, objective), {}


# ---- the step -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Optimizers:
  """The two optimizers and what the generator update needs besides its transform."""
  generator: optax.GradientTransformation
  critic: optax.GradientTransformation
  generator_schedule: optax.Schedule
  ema_decay: float
  grad_accum: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Optimizers:
    steps = int(config.train.steps)
    d = config.dmd
    return cls(generator=causal_init.student_optimizer(d.generator_optim, steps),
               critic=state_lib.make_optimizer(d.critic_optim, steps * int(d.critic_steps)),
               generator_schedule=state_lib.learning_rate_schedule(d.generator_optim, steps),
               ema_decay=float(d.generator_optim.ema_decay), grad_accum=int(config.train.grad_accum))


def create_state(params: Any, critic_params: Any, optimizers: Optimizers, rng: jax.Array) -> DMDState:
  """A fresh DMD state: step 0, generator EMA = generator, both optimizers initialised."""
  base = state_lib.create_train_state(params, optimizers.generator, rng)
  return DMDState(step=base.step, params=base.params, opt_state=base.opt_state, ema_params=base.ema_params,
                  rng=base.rng, critic_params=critic_params, critic_opt_state=optimizers.critic.init(critic_params))


def make_dmd_step(model: dit.WanDiT, config: ml_collections.ConfigDict, objective: DMDObjective,
                  optimizers: Optimizers, critic_steps: int):
  """`step(state, batch, teacher_params, null_context) -> (state, metrics)`; batch holds 1 + critic_steps
  groups of conditionings (interleaved, see `state.split_micro_batches`): group 0 for the generator."""

  def step(state: DMDState, batch: dict[str, jax.Array], teacher_params: Any,
           null_context: jax.Array) -> tuple[DMDState, dict[str, jax.Array]]:
    groups = state_lib.split_micro_batches(batch, 1 + critic_steps)
    key = jax.random.fold_in(state.rng, state.step)
    generator_key, critic_key = (jax.random.fold_in(key, s) for s in (_GENERATOR_STREAM, _CRITIC_STREAM))

    generator_fn = functools.partial(generator_loss, critic_params=state.critic_params,
                                     teacher_params=teacher_params, null_context=null_context, model=model,
                                     config=config, objective=objective)
    loss, metrics, grads = state_lib.accumulate_gradients(generator_fn, state.params,
                                                          jax.tree.map(lambda x: x[0], groups), generator_key,
                                                          optimizers.grad_accum)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   learning_rate=jnp.asarray(optimizers.generator_schedule(state.step), jnp.float32))
    state = state_lib.apply_gradients(state, grads, optimizers.generator, optimizers.ema_decay)

    critic_fn = functools.partial(critic_loss, generator_params=state.params, model=model, config=config,
                                  objective=objective)

    def critic_update(carry, xs):
      critic_params, opt_state = carry
      index, critic_batch = xs
      critic_value, _, critic_grads = state_lib.accumulate_gradients(
          critic_fn, critic_params, critic_batch, jax.random.fold_in(critic_key, index), optimizers.grad_accum)
      updates, opt_state = optimizers.critic.update(critic_grads, opt_state, critic_params)
      return (optax.apply_updates(critic_params, updates), opt_state), (critic_value,
                                                                         optax.global_norm(critic_grads))

    (critic_params, critic_opt_state), (critic_values, critic_norms) = jax.lax.scan(
        critic_update, (state.critic_params, state.critic_opt_state),
        (jnp.arange(critic_steps), jax.tree.map(lambda x: x[1:], groups)))
    metrics.update(critic_loss=jnp.mean(critic_values), critic_grad_norm=jnp.mean(critic_norms))
    return state.replace(critic_params=critic_params, critic_opt_state=critic_opt_state), metrics

  return step


def rollout_config(config: ml_collections.ConfigDict, sink_chunks: int,
                   window_chunks: int) -> ml_collections.ConfigDict:
  """`config` with another streaming cache layout (the rollout's cache shapes are static)."""
  changed = ml_collections.ConfigDict(config.to_dict())
  changed.stream.sink_chunks, changed.stream.window_chunks = int(sink_chunks), int(window_chunks)
  return changed


def host_sink_window(seed: int, step: int, sink_range: tuple[int, int],
                     window_range: tuple[int, int]) -> tuple[int, int]:
  """The cache layout of step `step` when drawn per step: a function of (seed, step), so resuming redraws it."""
  rng = np.random.default_rng((seed, step))
  return (int(rng.integers(sink_range[0], sink_range[1] + 1)),
          int(rng.integers(window_range[0], window_range[1] + 1)))


# ---- sampling and evaluation --------------------------------------------------------------------------------

_SAMPLERS: dict[Any, Any] = {}


def _jitted_stream_clip(config: ml_collections.ConfigDict):
  """One jitted `stream_clip` per (model, cache layout, timesteps): everything it reads from `config`."""
  key = (dit.DiTSpec.from_config(config), kv_cache.StreamSpec.from_config(config),
         tuple(np.asarray(rollout.student_timesteps(config)).tolist()))
  if key not in _SAMPLERS:
    _SAMPLERS[key] = jax.jit(functools.partial(causal_init.stream_clip, config=config))
  return _SAMPLERS[key]


def student_sample(model: inference.Model, first_latent: jax.Array | None, cond: Conditioning,
                   rng: jax.Array) -> jax.Array:
  """The student's clip: latents [B, F, h, w, C] streamed chunk by chunk from an empty cache (c3s1w1 etc. from
  `model.config.stream`), with the user's first-frame latent [B, h, w, C] pinned as latent frame 0.

  `cond` holds the context [B, L, D] and the clip's track grid [B, 1 + s(F-1), h, w, d] (F from it; without
  tracks F is the preset's). Each chunk's noise and steps come from `rng` exactly as in the streaming sampler
  (`rollout.chunk_noise` / `chunk_keys`), so the same key gives the sampler's chunks.
  """
  config = model.config
  geo = config_utils.geometry(config)
  chex.assert_rank(cond.context, 3)
  batch = cond.context.shape[0]
  frames = geo.latent_frames
  if cond.track_grid is not None:
    frames = config_utils.latent_frames(cond.track_grid.shape[1], config.codec.temporal_stride)
  if frames % geo.chunk_frames:
    raise ValueError(f"a clip of {frames} latent frames (from the track grid, or the preset without one) is not "
                     f"whole chunks of stream.chunk_frames={geo.chunk_frames}")
  chunk_shape = (batch, geo.chunk_frames, geo.latent_height, geo.latent_width, geo.latent_channels)
  noises = jnp.concatenate([rollout.chunk_noise(rng, i, chunk_shape) for i in range(frames // geo.chunk_frames)],
                           axis=1)
  if config.model.image_condition == "none":
    first_latent = None
  return _jitted_stream_clip(config)(model.dit_params, cond=cond.replace(first_latent=first_latent),
                                     noises=noises, rng=rng)


class DMDEval:
  """Eval hook: DMD metrics on a fixed validation batch and a streamed sample GIF, from the generator's EMA.

  The EMA student streams the validation clips from fixed noise (the same rollout as training, all K steps);
  val_real_fake_gap_t<t>: mean |fake x0 - real x0| on them re-noised at fixed t (what DMD drives down);
  val_critic_loss: the critic's flow loss there. The GIF shows data clip | student sample.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, model: dit.WanDiT, objective: DMDObjective,
               teacher_model: inference.Model, null_context: jax.Array, validation_batch: dict[str, jax.Array]):
    self.config = config
    self.workdir = workdir
    self.teacher_params = teacher_model.dit_params
    self.null_context = null_context
    self.batch = validation_batch
    self.num_samples = min(int(config.eval.num_samples), validation_batch["latents"].shape[0])
    eval_times = tuple(float(t) for t in config.eval.timesteps)

    def metrics(ema_params, critic_params, teacher_params, batch, null):
      rng = jax.random.PRNGKey(config.seed)
      cond = ode_pairs.conditioning(batch, batch["context"], objective)
      noises = jax.random.normal(rng, batch["latents"].shape)
      x0 = causal_init.stream_clip(ema_params[DIT_PARAMS], config, cond, noises, rng)
      values = {}
      noise = jax.random.normal(jax.random.fold_in(rng, 1), x0.shape)
      for t_value in eval_times:
        t = jnp.full((x0.shape[0],), t_value, jnp.float32)
        real_x0, fake_x0 = score_x0(model, teacher_params, critic_params, flow.add_noise(x0, noise, t), t, cond,
                                    null, objective)
        values[f"val_real_fake_gap_t{t_value:g}"] = jnp.mean(jnp.abs(fake_x0 - real_x0))
      values["val_critic_loss"] = flow_loss(model, critic_params, x0, jax.random.fold_in(rng, 2), cond, objective)
      return values, x0

    self._metrics = jax.jit(metrics)

  def __call__(self, step: int, state: DMDState) -> dict[str, float]:
    values, x0 = self._metrics(state.ema_params, state.critic_params, self.teacher_params, self.batch,
                               self.null_context)
    scalars = {name: float(value) for name, value in jax.device_get(values).items()}
    if self.num_samples and jax.process_index() == 0:
      samples = np.asarray(jax.device_get(x0[:self.num_samples]))
      teacher.write_sample(self.config, self.workdir, step, self.batch["latents"][:self.num_samples], samples)
    return scalars


# ---- the stage ----------------------------------------------------------------------------------------------


def stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`causal_init.stage_config` for 'dmd' (train / workdir lifted; the two optimizers stay in `dmd`)."""
  return causal_init.stage_config(config, STAGE)


def load_generator_init(config: ml_collections.ConfigDict) -> inference.Model:
  """The causal student DMD starts from (`dmd.init_checkpoint`: causal_init's workdir or an exported model)."""
  path = config.dmd.init_checkpoint
  if not os.path.exists(path):
    raise inference.ModelError(f"{path}: no causal student there; run causal adaptation first (python train.py "
                               f"--config configs/distill.py:{config.preset}) or set config.dmd.init_checkpoint")
  return inference.load_model(path, config)


class DMDStage(NamedTuple):
  """What `train` and `msjax.bench.train_step` both run (the fields of `teacher.TeacherStage` they read), plus
  what the eval hook scores with: the frozen teacher and its null text context."""
  model: dit.WanDiT
  objective: DMDObjective
  teacher_model: inference.Model
  null_context: jax.Array
  abstract_state: DMDState
  fresh_state: Callable[[], DMDState]
  train_step: Callable[[DMDState, dict[str, jax.Array]], tuple[DMDState, Any]]
  preparer: causal_init.StudentPreparer
  make_iterator: Callable[[], Any]


def build_stage(config: ml_collections.ConfigDict) -> DMDStage:
  """The frozen teacher, the generator (from `dmd.init_checkpoint`) and critic (from the teacher), their sharded
  state and the jitted step (one per cache layout when drawn per step); `config` as resolved by `stage_config`."""
  mesh = sharding.make_mesh(config.mesh)
  teacher.check_batch_config(config, mesh)
  critic_steps = int(config.dmd.critic_steps)
  objective = DMDObjective.from_config(config)
  teacher_model = ode_pairs.load_teacher(config)
  generator_init = load_generator_init(config)
  model = dit.WanDiT(teacher_model.spec)
  optimizers = Optimizers.from_config(config)
  params = causal_init.student_params(generator_init.dit_params, teacher_model)
  critic_params = {DIT_PARAMS: teacher_model.dit_params}
  rng = jax.random.PRNGKey(config.seed)
  create = lambda p, c, key: create_state(p, c, optimizers, key)
  min_shard = int(config.mesh.get("fsdp_min_size", sharding.DEFAULT_FSDP_MIN_SIZE))
  abstract = sharding.abstract_sharded(lambda key: create(params, critic_params, key), mesh, rng, min_shard)
  replicated = sharding.replicated(mesh)
  teacher_params = jax.device_put(teacher_model.dit_params, replicated)
  null_context = jax.device_put(teacher_model.text_encoder.null_context(teacher_model.text_params)[0], replicated)

  def jitted_step(sink_chunks: int, window_chunks: int):
    step = make_dmd_step(model, rollout_config(config, sink_chunks, window_chunks), objective, optimizers,
                         critic_steps)
    return sharding.jit_train_step(step, mesh, sharding.shardings_of(abstract), num_constants=2)

  if config.dmd.random_sink_window:
    ranges = causal_init.check_mask_ranges(config.dmd.sink_range, config.dmd.window_range, "dmd")
    steps = {}

    def train_step(state, batch):
      layout = host_sink_window(config.seed, int(jax.device_get(state.step)), *ranges)
      if layout not in steps:
        steps[layout] = jitted_step(*layout)
      return steps[layout](state, batch, teacher_params, null_context)
  else:
    fixed = jitted_step(config.stream.sink_chunks, config.stream.window_chunks)
    train_step = lambda state, batch: fixed(state, batch, teacher_params, null_context)

  # Each step reads 1 + critic_steps groups of conditionings (see `make_dmd_step`).
  local_batch = config.train.batch_size * (1 + critic_steps) // jax.process_count()
  make_iterator = functools.partial(
      pipeline.make_train_pipeline, config, data_source=teacher.make_data_source(config, "train"),
      codec=teacher_model.codec, seed=config.seed, batch_size=local_batch, worker_count=config.data.worker_count)
  return DMDStage(model=model, objective=objective, teacher_model=teacher_model, null_context=null_context,
                  abstract_state=abstract,
                  fresh_state=lambda: sharding.init_sharded(create, abstract, params, critic_params, rng),
                  train_step=train_step, preparer=causal_init.StudentPreparer(mesh, teacher_model, CONDITION_KEYS),
                  make_iterator=make_iterator)


def train(config: ml_collections.ConfigDict, workdir: str | None = None) -> DMDState:
  """Runs Self Forcing + DMD for `dmd.train.steps` steps in `workdir` (default dmd.workdir), resuming."""
  config = stage_config(config)
  workdir = workdir or config.workdir
  stage = build_stage(config)
  eval_hook = None
  if config.train.eval_every > 0:
    codec = stage.teacher_model.codec
    validation = teacher.make_data_source(config, "validation", fallback_split="train")
    validation_batch = next(pipeline.make_train_pipeline(
        config, data_source=validation, codec=codec, seed=config.seed,
        batch_size=min(int(config.eval.batch_size), len(validation))))
    eval_preparer = causal_init.StudentPreparer(stage.preparer.mesh, stage.teacher_model, ("latents",) + CONDITION_KEYS)
    eval_hook = DMDEval(config, workdir, stage.model, stage.objective, stage.teacher_model, stage.null_context,
                        eval_preparer.unsharded(validation_batch))
  return loop.train_loop(config, workdir, stage.fresh_state, stage.abstract_state, stage.train_step,
                         stage.make_iterator(), stage.preparer, eval_hook)
