"""Causal adaptation (paper section 4.1, CausVid's ODE regression): stage 'causal_init'.

The student starts as a copy of the teacher's EMA weights and learns to map the teacher's ODE states
(`msjax.train.ode_pairs`) to the teacher's clean result under block-causal attention:
  * per sample and per chunk, one of the K stored states is picked at random (chunks of one clip sit at
    different noise levels, as in CausVid / Self Forcing's ODE initialisation); t is per latent frame;
  * the attention mask is block-causal with S sink and W window chunks drawn per batch from
    `causal_init.sink_range` / `window_range` (the paper's "diverse masks"), so one initialisation serves any
    streaming cache layout; chunks have `stream.chunk_frames` latent frames;
  * the loss is the MSE of the predicted x0 = z_t - t v against the teacher's clean latent. Regressing x0 rather
    than v is Self Forcing's choice: it is what the few-step sampler outputs, and it equals t^2 times the
    velocity error, so the nearly clean inputs that carry little information weigh little.
Known gap, closed by the DMD stage: earlier chunks are seen noisy here (at streaming time they are clean in the
cache), and the masked forward places keys at absolute RoPE positions (the cache's 'cache' mode re-positions
evicted windows).

Parameters: {'dit': student, 'text': the teacher's text encoder (only when it is a trained 'learned' one)}. The
text encoder is frozen in every student stage: prompts are encoded on the host with the teacher's weights, and
the optimizer leaves 'text' unchanged (kept so an exported student carries the encoder it was trained with).

Also here, shared with the DMD stage: the per-stage config resolution, the frozen-text optimizer, the batch
preparer, and `stream_clip`, the student's streamed generation of a whole clip (`msjax.stream.rollout`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import chex
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from msjax import config_utils
from msjax import inference
from msjax.data import pipeline
from msjax.diffusion import flow
from msjax.models import attention
from msjax.models import dit
from msjax.models import kv_cache
from msjax.models.track_head import Conditioning
from msjax.stream import rollout
from msjax.train import loop
from msjax.train import ode_pairs
from msjax.train import sharding
from msjax.train import state as state_lib
from msjax.train import teacher

DIT_PARAMS = teacher.DIT_PARAMS
TEXT_PARAMS = teacher.TEXT_PARAMS
STAGE = "causal_init"
_TRAIN, _FROZEN = "train", "frozen"


# ---- shared by the student stages -------------------------------------------------------------------------


def stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """An unlocked copy of `config` with `config.<stage>.train` / `.workdir` (and `.optim` if any) at the top level,
  where the shared loop and checkpoints read them (configs/distill.py keeps one set per stage)."""
  if stage not in config:
    raise config_utils.ConfigError(f"the config has no {stage!r} section; use configs/distill.py")
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.stage = stage
  section = resolved[stage]
  resolved.train = section.train
  resolved.workdir = section.workdir
  if "optim" in section:
    resolved.optim = section.optim
  geo = config_utils.geometry(resolved)
  if geo.latent_frames % geo.chunk_frames:
    raise config_utils.ConfigError(f"{geo.latent_frames} latent frames do not split into chunks of "
                                   f"stream.chunk_frames={geo.chunk_frames}; the student streams whole chunks")
  return resolved


def student_params(dit_params: Any, teacher_model: inference.Model) -> dict[str, Any]:
  """The student stages' parameter tree: the DiT plus the teacher's text encoder when that one is trainable."""
  params = {DIT_PARAMS: dit_params}
  if teacher_model.text_encoder.trainable:
    params[TEXT_PARAMS] = teacher_model.text_params
  return params


def student_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """`state.make_optimizer` on 'dit'; 'text' is frozen (zero updates, no optimizer moments)."""
  labels = lambda params: {name: _FROZEN if name == TEXT_PARAMS else _TRAIN for name in params}
  return optax.multi_transform({_TRAIN: state_lib.make_optimizer(optim, total_steps),
                                _FROZEN: optax.set_to_zero()}, labels)


CONTEXT = "context"  # the batch field of the encoded prompts


class StudentPreparer(teacher.DevicePreparer):
  """The student stages' batches: the model inputs named in `keys` (made on the device from the compact host
  fields, or passed through, e.g. the pairs' states), plus `context`, the prompts encoded by the teacher's
  frozen text encoder (so the student, the teacher and the critic all read the same text)."""

  def __init__(self, mesh: jax.sharding.Mesh, teacher_model: inference.Model, keys: Sequence[str]):
    self.keys = tuple(keys)
    super().__init__(mesh, teacher_model.config, teacher_model.codec, self.keys + (CONTEXT,))
    self.teacher_model = teacher_model

  def host_arrays(self, host_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    wanted = set(self.keys) | set(pipeline.HOST_FIELDS)
    arrays = {name: np.asarray(value) for name, value in host_batch.items() if name in wanted}
    context, _ = self.teacher_model.text_encoder.encode(self.teacher_model.text_params, host_batch["prompt"])
    arrays[CONTEXT] = np.asarray(context)
    return arrays


def stream_clip(dit_params: Any, config: ml_collections.ConfigDict, cond: Conditioning, noises: jax.Array,
                rng: jax.Array, exit_steps: jax.Array | None = None) -> jax.Array:
  """The student streams a whole clip from an empty cache: x0 [B, F, h, w, C], chunk by chunk (rollout.rollout).

  `cond` holds the clip's context, first-frame latent and track grid; `noises` [B, F, h, w, C] each chunk's
  starting noise; the cache layout (sink, window, rope_mode) and the K timesteps come from `config.stream` and
  `config.flow.shift`. `exit_steps` [chunks] is DMD's random exit step (None: all K steps, as the sampler).
  """
  chex.assert_rank(noises, 5)
  cache = kv_cache.init_cache(dit_params, config, cond, noises.shape[0])
  _, x0 = rollout.rollout(dit_params, cache, noises, cond, rollout.student_timesteps(config), rng,
                          exit_steps=exit_steps)
  return x0


# ---- the objective ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CausalInitObjective:
  """Static knobs of the loss (hashable; also a `ode_pairs.ConditioningSpec` for `teacher.conditioning`)."""
  chunk_frames: int
  tokens_per_chunk: int
  sink_range: tuple[int, int]
  window_range: tuple[int, int]
  image_condition: str
  use_tracks: bool

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> CausalInitObjective:
    geo = config_utils.geometry(config)
    sink_range, window_range = check_mask_ranges(config.causal_init.sink_range, config.causal_init.window_range,
                                                 "causal_init")
    spec = ode_pairs.ConditioningSpec.from_config(config)
    return cls(chunk_frames=geo.chunk_frames, tokens_per_chunk=geo.tokens_per_chunk, sink_range=sink_range,
               window_range=window_range, image_condition=spec.image_condition, use_tracks=spec.use_tracks)


def check_mask_ranges(sink_range: Sequence[int], window_range: Sequence[int],
                      section: str) -> tuple[tuple[int, int], tuple[int, int]]:
  """Inclusive (min, max) ranges of sink / window chunks; every pair drawn must be streamable (S + W >= 1)."""
  ranges = tuple(tuple(int(v) for v in r) for r in (sink_range, window_range))
  for name, (low, high) in zip(("sink_range", "window_range"), ranges):
    if not 0 <= low <= high:
      raise config_utils.ConfigError(f"{section}.{name} must be (min, max) with 0 <= min <= max, got {(low, high)}")
  if ranges[0][0] + ranges[1][0] < 1:
    raise config_utils.ConfigError(f"{section}: sink_range {ranges[0]} and window_range {ranges[1]} can draw a mask "
                                   "with no context at all (S = W = 0); raise one of the minimums to 1")
  return ranges


def draw_sink_window(rng: jax.Array, sink_range: tuple[int, int],
                     window_range: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """Sink and window chunk counts, each uniform over its inclusive range (int32 scalars, traced)."""
  sink_key, window_key = jax.random.split(rng)
  sink = jax.random.randint(sink_key, (), sink_range[0], sink_range[1] + 1)
  window = jax.random.randint(window_key, (), window_range[0], window_range[1] + 1)
  return sink, window


def sink_window_mask(num_chunks: int, tokens_per_chunk: int, sink: jax.Array | int,
                     window: jax.Array | int) -> jax.Array:
  """The token mask [N, N] of a streamed (S, W) cache over a clip (what kv_cache attends, as one mask)."""
  return attention.expand_chunk_mask(attention.block_causal_chunk_mask(num_chunks, sink, window), tokens_per_chunk)


def noisy_inputs(states: jax.Array, timesteps: jax.Array, chunk_frames: int,
                 rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Picks one stored state per sample and chunk: (z_t [B, F, h, w, C], t [B, F], picked index [B, chunks])."""
  chex.assert_rank([states, timesteps], [6, 2])
  batch, num_states, frames = states.shape[:3]
  chunk_index = jax.random.randint(rng, (batch, frames // chunk_frames), 0, num_states)
  frame_index = jnp.repeat(chunk_index, chunk_frames, axis=1)  # [B, F]
  z_t = jnp.take_along_axis(states, frame_index[:, None, :, None, None, None], axis=1)[:, 0]
  t = jnp.take_along_axis(timesteps, frame_index, axis=1)
  return z_t, t, chunk_index


def regression_loss(model: dit.WanDiT, dit_params: Any, z_t: jax.Array, t: jax.Array, batch: dict[str, jax.Array],
                    mask: jax.Array, objective: CausalInitObjective) -> jax.Array:
  """Weighted MSE of the student's x0 (masked forward) against the teacher's clean result."""
  clean = batch["clean"]
  chex.assert_equal_shape([z_t, clean])
  cond = ode_pairs.conditioning(batch, batch[CONTEXT], objective)
  v = model.apply({"params": dit_params}, z_t, t, cond, mask=mask)
  per_frame = jnp.mean(jnp.square(flow.x0_from_velocity(z_t, t, v) - clean), axis=(2, 3, 4))  # [B, F]
  weights = teacher.frame_weights(clean.shape[1], objective)
  return jnp.sum(per_frame * weights) / (clean.shape[0] * jnp.sum(weights))


def causal_init_loss(params: Any, batch: dict[str, jax.Array], rng: jax.Array, *, model: dit.WanDiT,
                     objective: CausalInitObjective) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ODE regression under a randomly drawn (S, W) block-causal mask (see the module docstring)."""
  pick_rng, mask_rng = jax.random.split(rng)
  z_t, t, _ = noisy_inputs(batch["states"], batch["timesteps"], objective.chunk_frames, pick_rng)
  sink, window = draw_sink_window(mask_rng, objective.sink_range, objective.window_range)
  mask = sink_window_mask(z_t.shape[1] // objective.chunk_frames, objective.tokens_per_chunk, sink, window)
  loss = regression_loss(model, params[DIT_PARAMS], z_t, t, batch, mask, objective)
  return loss, {"sink_chunks": sink.astype(jnp.float32), "window_chunks": window.astype(jnp.float32),
                "timestep_mean": jnp.mean(t)}


# ---- evaluation ---------------------------------------------------------------------------------------------


class CausalInitEval:
  """Eval hook: validation losses on held-out pairs and a streamed sample, all from the EMA params.

  val_loss_k<k>: the training regression with every chunk at stored state k, under the streaming mask
    (stream.sink_chunks / window_chunks);
  val_stream_loss: the same first-step regression through the real streaming path: each chunk predicts x0 from
    the pair's noise against the cache of the chunks streamed before it (their clean x0s, the cache's RoPE), so
    it shows the noisy-context and RoPE gap of the masked training. Frames pinned to the given first frame are
    left out;
  the GIF: teacher's clean result | the student's full K-step stream from the same noise (its re-noising draws
  fresh noise, so it is another sample of the same conditioning, not a copy of the teacher's).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, model: dit.WanDiT,
               objective: CausalInitObjective, validation_batch: dict[str, jax.Array]):
    self.config = config
    self.workdir = workdir
    self.batch = validation_batch
    self.num_samples = min(int(config.eval.num_samples), validation_batch["clean"].shape[0])
    num_chunks = validation_batch["clean"].shape[1] // objective.chunk_frames
    mask = sink_window_mask(num_chunks, objective.tokens_per_chunk, config.stream.sink_chunks,
                            config.stream.window_chunks)
    pinned = 1 if objective.image_condition != "none" else 0  # the stream pins latent frame 0 to the image
    rng = jax.random.PRNGKey(config.seed)

    def stream(params, batch, exit_steps):
      cond = ode_pairs.conditioning(batch, batch[CONTEXT], objective)
      return stream_clip(params[DIT_PARAMS], config, cond, batch["states"][:, 0], rng, exit_steps)

    def losses(params, batch):
      values = {}
      for k in range(batch["states"].shape[1]):
        t = jnp.broadcast_to(batch["timesteps"][:, k:k + 1], batch["clean"].shape[:2])
        values[f"val_loss_k{k}"] = regression_loss(model, params[DIT_PARAMS], batch["states"][:, k], t, batch,
                                                   mask, objective)
      values["val_loss"] = jnp.mean(jnp.stack(list(values.values())))
      first_step = stream(params, batch, jnp.zeros((num_chunks,), jnp.int32))
      values["val_stream_loss"] = jnp.mean(jnp.square(first_step - batch["clean"])[:, pinned:])
      return values

    self._losses = jax.jit(losses)
    self._sample = jax.jit(lambda params, batch: stream(params, batch, None))

  def __call__(self, step: int, state: state_lib.TrainState) -> dict[str, float]:
    scalars = {k: float(v) for k, v in jax.device_get(self._losses(state.ema_params, self.batch)).items()}
    if self.num_samples and jax.process_index() == 0:
      part = {name: value[:self.num_samples] for name, value in self.batch.items()}
      latents = np.asarray(jax.device_get(self._sample(state.ema_params, part)))
      teacher.write_sample(self.config, self.workdir, step, part["clean"], latents)
    return scalars


# ---- the stage ----------------------------------------------------------------------------------------------

PAIR_KEYS = ("states", "timesteps", "clean", "first_latent", "track_grid")  # made from the stored pair fields


def split_pairs(source: ode_pairs.PairSource, num_validation: int) -> tuple[grain.MapDataset, grain.MapDataset]:
  """(training pairs, the last `num_validation` pairs held out)."""
  if not 0 <= num_validation < len(source):
    raise ode_pairs.PairsError(f"{source.directory}: cannot hold out {num_validation} of {len(source)} pairs")
  dataset = grain.MapDataset.source(source)
  return dataset[:len(source) - num_validation], dataset[len(source) - num_validation:]


class CausalInitStage(NamedTuple):
  """What `train` and `msjax.bench.train_step` both run (the fields of `teacher.TeacherStage` they read), plus the
  held-out pairs the eval hook scores."""
  model: dit.WanDiT
  objective: CausalInitObjective
  abstract_state: state_lib.TrainState
  fresh_state: Callable[[], state_lib.TrainState]
  train_step: Callable[[state_lib.TrainState, dict[str, jax.Array]], tuple[state_lib.TrainState, Any]]
  preparer: StudentPreparer
  make_iterator: Callable[[], Any]
  validation_pairs: grain.MapDataset


def build_stage(config: ml_collections.ConfigDict) -> CausalInitStage:
  """The pairs, the student (the teacher's weights), its sharded state and the jitted step; `config` as resolved
  by `stage_config(config, STAGE)`."""
  mesh = sharding.make_mesh(config.mesh)
  teacher.check_batch_config(config, mesh)
  source = ode_pairs.PairSource(config.ode_pairs.dir)
  ode_pairs.check_layout_matches(source.layout, config, config.ode_pairs.dir)
  train_pairs, validation_pairs = split_pairs(source, int(config.causal_init.num_validation))
  teacher_model = ode_pairs.load_teacher(config)
  objective = CausalInitObjective.from_config(config)
  model = dit.WanDiT(teacher_model.spec)
  total_steps = int(config.train.steps)
  tx = student_optimizer(config.optim, total_steps)
  params = student_params(teacher_model.dit_params, teacher_model)
  rng = jax.random.PRNGKey(config.seed)
  create = lambda p, key: state_lib.create_train_state(p, tx, key)
  min_shard = int(config.mesh.get("fsdp_min_size", sharding.DEFAULT_FSDP_MIN_SIZE))
  abstract = sharding.abstract_sharded(lambda key: create(params, key), mesh, rng, min_shard)
  step = state_lib.make_train_step(functools.partial(causal_init_loss, model=model, objective=objective), tx,
                                   config.optim.ema_decay, config.train.grad_accum,
                                   state_lib.learning_rate_schedule(config.optim, total_steps))
  make_iterator = functools.partial(ode_pairs.make_pair_pipeline, train_pairs, seed=config.seed,
                                    batch_size=config.train.batch_size // jax.process_count())
  return CausalInitStage(model=model, objective=objective, abstract_state=abstract,
                         fresh_state=lambda: sharding.init_sharded(create, abstract, params, rng),
                         train_step=sharding.jit_train_step(step, mesh, sharding.shardings_of(abstract)),
                         preparer=StudentPreparer(mesh, teacher_model, PAIR_KEYS), make_iterator=make_iterator,
                         validation_pairs=validation_pairs)


def train(config: ml_collections.ConfigDict, workdir: str | None = None) -> state_lib.TrainState:
  """Runs causal adaptation for `causal_init.train.steps` steps in `workdir` (default causal_init.workdir)."""
  config = stage_config(config, STAGE)
  workdir = workdir or config.workdir
  stage = build_stage(config)
  eval_hook = None
  if config.train.eval_every > 0 and len(stage.validation_pairs):
    held_out = stage.validation_pairs
    validation = next(iter(held_out.batch(min(int(config.eval.batch_size), len(held_out)))))
    eval_hook = CausalInitEval(config, workdir, stage.model, stage.objective, stage.preparer.unsharded(validation))
  return loop.train_loop(config, workdir, stage.fresh_state, stage.abstract_state, stage.train_step,
                         stage.make_iterator(), stage.preparer, eval_hook)
