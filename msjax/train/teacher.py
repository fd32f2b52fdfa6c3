"""Teacher stage (paper section 3): the bidirectional motion-conditioned DiT trained by rectified flow.

Objective per clip: t = shift(u), u ~ U[0, 1) (config.flow.shift); z_t = (1 - t) z0 + t eps; regress
v = eps - z0 with an unweighted MSE (the paper's weighting w_t is not specified). Text and tracks are dropped
per sample (config.dropout) to the null conditions of `msjax.diffusion.guidance`, so the joint guidance's
v(0, c_m) and v(c_t, 0) are trained; mid-chunk track masking comes from the data pipeline. With
`model.image_condition == 'replace'` (Wan 2.2) latent frame 0 is the clean image, so it is left out of the loss.

Parameter tree of the stage (what checkpoints hold under `state.params` / `state.ema_params`):
  {'dit': WanDiT params, 'text': learned text-encoder params}; 'text' only when the encoder is trainable
  (`learned`). Frozen encoders (`minilm`, `precomputed`) run on the host side of the batch and their output
  arrives in the batch as `context`.

`train(config)` builds the model, data, sharded state and jitted step (`build_stage`) and hands them to the
shared loop.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, NamedTuple

import chex
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow_datasets as tfds

from msjax import codecs
from msjax import config_utils
from msjax import inference
from msjax import io_utils
from msjax.data import pipeline
from msjax.diffusion import flow
from msjax.diffusion import guidance
from msjax.models import dit
from msjax.models import text as text_lib
from msjax.models import track_head as track_head_lib
from msjax.models.track_head import Conditioning
from msjax.train import loop
from msjax.train import sharding
from msjax.train import state as state_lib

DIT_PARAMS = "dit"
TEXT_PARAMS = "text"
SAMPLES_SUBDIR = "samples"
# Eval metric prefixes: the validation loss with track IDs shuffled after frame 0 (breaks ID following) and with
# IDs swapped between tracks in every frame (keeps it: the control); each is the mean over eval.id_draws draws.
SHUFFLED_IDS_LOSS = "val_loss_shuffled_ids"
RELABELLED_IDS_LOSS = "val_loss_relabelled_ids"
# Codecs whose decoder needs no weights, so the eval hook can turn samples into GIFs on its own.
WEIGHTLESS_CODECS = ("pack",)
EULER = "euler"
RENOISE = "renoise"
SAMPLERS = (EULER, RENOISE)  # config.guidance.sampler: see `sample`


@dataclasses.dataclass(frozen=True)
class TeacherObjective:
  """The static knobs of the loss, read once from the config (hashable, no ConfigDict inside jit)."""
  shift: float
  text_dropout: float
  motion_dropout: float
  image_condition: str
  use_tracks: bool
  loss_min_t: float = 0.0
  recycle_prob: float = 0.0
  recycle_gap: float = 0.25
  recycle_min_t: float = 0.05
  motion_weight: float = 0.0
  motion_threshold: float = 0.2

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> TeacherObjective:
    return cls(shift=float(config.flow.shift), text_dropout=float(config.dropout.text),
               motion_dropout=float(config.dropout.motion), image_condition=config.model.image_condition,
               use_tracks=config.model.track_channels > 0,
               loss_min_t=float(config.flow.get("loss_min_t", 0.0)),
               recycle_prob=float(config.flow.get("recycle_prob", 0.0)),
               recycle_gap=float(config.flow.get("recycle_gap", 0.25)),
               recycle_min_t=float(config.model.get("x0_min_t", 0.05)),
               motion_weight=float(config.flow.get("motion_weight", 0.0)),
               motion_threshold=float(config.flow.get("motion_threshold", 0.2)))


# ---- data -------------------------------------------------------------------------------------------------


def make_data_source(config: ml_collections.ConfigDict, split: str, fallback_split: str | None = None) -> Any:
  """The random-access source of stored clips for `split` (or `fallback_split` when the dataset has no such
  split, e.g. a video folder without a validation/ subfolder), preparing the tfds dataset on first use."""
  data = config.data
  geo = config_utils.geometry(config)
  if data.dataset == "sprites_rendered":
    from msjax.data import tfds_sprites  # pylint: disable=g-import-not-at-top
    return tfds_sprites.rendered_split(config, split, n_train=data.num_train, n_val=data.num_validation)
  if data.dataset == "sprites":
    from msjax.data import tfds_sprites  # pylint: disable=g-import-not-at-top
    builder_config = tfds_sprites.SpritesBuilderConfig.from_config(config, n_train=data.num_train,
                                                                   n_val=data.num_validation)
    builder = tfds_sprites.Sprites(data_dir=data.data_dir, config=builder_config)
    download_config = None
  elif data.dataset == "video_folder":
    from msjax.data import tfds_videos  # pylint: disable=g-import-not-at-top
    if not data.video_folder:
      raise ValueError("config.data.dataset is 'video_folder' but config.data.video_folder is empty; set it to a "
                       "folder of name.mp4 + name.npz clips")
    builder_config = tfds_videos.VideoFolderConfig(
        name=f"{geo.height}x{geo.width}x{geo.num_frames}", height=geo.height, width=geo.width,
        num_frames=geo.num_frames, temporal_stride=config.codec.temporal_stride)
    builder = tfds_videos.VideoFolder(data_dir=data.data_dir, config=builder_config)
    download_config = tfds.download.DownloadConfig(manual_dir=data.video_folder)
  else:
    raise ValueError(f"config.data.dataset must be 'sprites', 'sprites_rendered' or 'video_folder', got "
                     f"{data.dataset!r}")
  if not builder.is_prepared():
    print(f"preparing dataset {builder.name}/{builder_config.name} under {data.data_dir} (first use)", flush=True)
    builder.download_and_prepare(download_config=download_config)
  sources = builder.as_data_source()
  if split not in sources and fallback_split in sources:
    print(f"dataset {builder.name}/{builder_config.name} has no {split!r} split; using {fallback_split!r}")
    split = fallback_split
  if split not in sources:
    raise ValueError(f"dataset {builder.name}/{builder_config.name} has no {split!r} split (found "
                     f"{', '.join(sources)})")
  return sources[split]


class DevicePreparer:
  """Host batch -> device batch, for every stage: `host_arrays` (per stage) picks and encodes on the host, then
  the compact fields travel and the model inputs are made on the device (`pipeline.device_inputs`), born with
  the batch sharding of the mesh. `keep` names the inputs the stage reads (None: all)."""

  def __init__(self, mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict, codec: codecs.Codec,
               keep: tuple[str, ...] | None = None):
    self.mesh = mesh
    self._sharded = pipeline.make_device_inputs(config, codec, keep, out_shardings=sharding.batch_sharding(mesh))
    self._unsharded = pipeline.make_device_inputs(config, codec, keep)

  def host_arrays(self, host_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def unsharded(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The model inputs on the default device (small eval batches need not divide across the mesh)."""
    return self._unsharded(self.host_arrays(host_batch))

  def __call__(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return self._sharded(sharding.shard_batch(self.mesh, self.host_arrays(host_batch)))


class BatchPreparer(DevicePreparer):
  """The teacher's batches: the pipeline's compact fields plus the text (token ids for a trainable encoder,
  the encoded context for a frozen one)."""

  def __init__(self, mesh: jax.sharding.Mesh, text_encoder: text_lib.TextEncoder, frozen_text_params: Any,
               config: ml_collections.ConfigDict, codec: codecs.Codec):
    super().__init__(mesh, config, codec)
    self.text_encoder = text_encoder
    self.frozen_text_params = frozen_text_params

  def host_arrays(self, host_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    arrays = {name: host_batch[name] for name in pipeline.HOST_FIELDS}
    if self.text_encoder.trainable:
      inputs = self.text_encoder.prepare(host_batch["prompt"])
      arrays["text_ids"], arrays["text_mask"] = inputs.ids, inputs.mask
    else:
      context, _ = self.text_encoder.encode(self.frozen_text_params, host_batch["prompt"])
      arrays["context"] = np.asarray(context)
    return arrays


# ---- model and objective ----------------------------------------------------------------------------------


def text_contexts(params: Any, batch: dict[str, jax.Array], text_encoder: text_lib.TextEncoder,
                  null_context: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(context [B, L, D], null context [1, L, D]) for the batch: from the trainable encoder or the batch."""
  if not text_encoder.trainable:
    return batch["context"], null_context
  inputs = text_lib.TextInputs(mask=batch["text_mask"], ids=batch["text_ids"])
  context, _ = text_encoder.apply(params[TEXT_PARAMS], inputs)
  null, _ = text_encoder.apply(params[TEXT_PARAMS], text_encoder.prepare([""]))
  return context, null


def conditioning(batch: dict[str, jax.Array], context: jax.Array, objective: TeacherObjective) -> Conditioning:
  first_latent = None if objective.image_condition == "none" else batch["first_latent"]
  track_grid = batch["track_grid"] if objective.use_tracks else None
  return Conditioning(context=context, first_latent=first_latent, track_grid=track_grid)


def frame_weights(num_frames: int, objective: TeacherObjective) -> jax.Array:
  """Per-latent-frame loss weights: frame 0 is not predicted when it is the clean image ('replace')."""
  weights = jnp.ones((num_frames,), jnp.float32)
  return weights.at[0].set(0.0) if objective.image_condition == "replace" else weights


def motion_weights(z0: jax.Array, motion_weight: float, threshold: float) -> jax.Array:
  """Per-element loss weights [B, F, h, w, C]: 1 + motion_weight where the clip changes by more than
  `threshold` (latent units) from the latent frame before or to the one after, 1 elsewhere.

  Moving sprites cover a few percent of a toy clip, so misplacing one by a pixel or two costs the plain MSE
  little; this raises their share of the loss. The threshold sits above slow whole-frame changes (the sprite
  world's background effects change a `pack` latent by < 0.1 between latent frames, a sprite edge by ~1).
  """
  chex.assert_rank(z0, 5)
  step = jnp.abs(jnp.diff(z0, axis=1)) > threshold  # [B, F-1, ...]: changed between frames f and f+1
  no_step = jnp.zeros_like(step[:, :1])
  moved = jnp.concatenate([no_step, step], axis=1) | jnp.concatenate([step, no_step], axis=1)
  return 1.0 + motion_weight * moved.astype(jnp.float32)


def teacher_loss(params: Any, batch: dict[str, jax.Array], rng: jax.Array, *, model: dit.WanDiT,
                 text_encoder: text_lib.TextEncoder, objective: TeacherObjective,
                 null_context: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Flow-matching MSE with shifted timesteps and per-sample text / motion dropout (weighted towards moving
  content when `objective.motion_weight` > 0: `motion_weights`)."""
  z0 = batch["latents"].astype(jnp.float32)
  chex.assert_rank(z0, 5)
  batch_size, num_frames = z0.shape[:2]
  t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
  t = flow.sample_training_timesteps(t_rng, (batch_size,), objective.shift)
  noise = jax.random.normal(noise_rng, z0.shape, jnp.float32)
  z_t = flow.add_noise(z0, noise, t)
  context, null = text_contexts(params, batch, text_encoder, null_context)
  cond = guidance.drop_conditions(drop_rng, conditioning(batch, context, objective), null,
                                  objective.text_dropout, objective.motion_dropout)
  target = flow.velocity_target(z0, noise)
  if objective.recycle_prob > 0:
    z_t, target = recycled_inputs(params, z0, z_t, target, noise, t, cond, jax.random.fold_in(rng, 1),
                                  model=model, objective=objective)
  v = model.apply({"params": params[DIT_PARAMS]}, z_t, t, cond)
  chex.assert_equal_shape([v, z0])
  if objective.motion_weight > 0:
    # Each frame's weighted mean, so a frame's share of the loss stays what it is in the plain MSE.
    weights = motion_weights(z0, objective.motion_weight, objective.motion_threshold)
    per_frame = jnp.sum(weights * jnp.square(v - target), axis=(2, 3, 4)) / jnp.sum(weights, axis=(2, 3, 4))
  else:
    per_frame = jnp.mean(jnp.square(v - target), axis=(2, 3, 4))  # [B, F]
  if objective.loss_min_t > 0:
    per_frame = per_frame * jnp.square(jnp.minimum(1.0, t / objective.loss_min_t))[:, None]
  weights = frame_weights(num_frames, objective)
  loss = jnp.sum(per_frame * weights) / (batch_size * jnp.sum(weights))
  return loss, {"timestep_mean": jnp.mean(t)}


def recycled_inputs(params: Any, z0: jax.Array, z_t: jax.Array, target: jax.Array, noise: jax.Array, t: jax.Array,
                    cond: Conditioning, rng: jax.Array, *, model: dit.WanDiT,
                    objective: TeacherObjective) -> tuple[jax.Array, jax.Array]:
  """(z_t, velocity target) with a `recycle_prob` share of the samples noised from the model's own x0 instead
  of the true clip `z0` (`z_t`, `target`: the true clip noised with `noise` at t, and its velocity target).

  The few-step `renoise` sampler never shows the model a clean clip noised: each step re-noises the x0 it
  predicted one step earlier, so the last steps copy the earlier steps' misplaced sprites. Here a sample's x0
  is first predicted (no gradient) from the true clip noised at the earlier time `flow.earlier_timestep(t,
  shift, recycle_gap)`, then re-noised to t with the sample's own noise, as the sampler does
  (`flow.recycled_input`); its target is the velocity that leads that input back to the true clip. Samples
  with t below `recycle_min_t` (where the x0 head divides by a floored t) keep the plain input.
  """
  prev_noise_rng, pick_rng = jax.random.split(rng)

  def velocity_fn(z, tt):
    return model.apply({"params": params[DIT_PARAMS]}, z, tt, cond)

  prev_noise = jax.random.normal(prev_noise_rng, z0.shape, jnp.float32)
  z_recycled = jax.lax.stop_gradient(
      flow.recycled_input(velocity_fn, z0, prev_noise, noise, t, objective.shift, objective.recycle_gap))
  use = jax.random.bernoulli(pick_rng, objective.recycle_prob, t.shape) & (t >= objective.recycle_min_t)
  pick = use[:, None, None, None, None]
  z_t = jnp.where(pick, z_recycled, z_t)
  target = jnp.where(pick, flow.velocity_from_x0(z_recycled, jnp.maximum(t, objective.recycle_min_t), z0), target)
  return z_t, target


def init_params(config: ml_collections.ConfigDict, model: dit.WanDiT, text_encoder: text_lib.TextEncoder,
                rng: jax.Array) -> dict[str, Any]:
  """Fresh stage params: {'dit': ...} plus {'text': ...} for a trainable text encoder."""
  dit_rng, text_rng = jax.random.split(rng)
  params = {DIT_PARAMS: model.init(dit_rng, *dit.example_inputs(config, 1))["params"]}
  if text_encoder.trainable:
    params[TEXT_PARAMS] = text_encoder.init_params(text_rng)
  return params


# The branch outputs that, zeroed, make a DiT block the identity (x + gate * 0), whatever its other params.
BLOCK_OUTPUTS = ("self_attn/o/", "cross_attn/o/", "ffn/fc2/")


def grow_blocks(loaded: dict[str, np.ndarray], wanted: dict[str, Any], source: str) -> dict[str, np.ndarray]:
  """Deepens a model: block i of the source becomes block i * g of the grown one (g = new / old depth) and the
  blocks between start as identities (their fresh params, with the branch outputs in `BLOCK_OUTPUTS` zeroed),
  so the grown model computes what the source did and its new layers learn from there. Flat "a/b" names in,
  flat names out; params outside `blocks/` pass through."""
  old_depth = {np.shape(value)[0] for name, value in loaded.items() if name.startswith("blocks/")}
  new_depth = {np.shape(value)[0] for name, value in wanted.items() if name.startswith("blocks/")}
  if len(old_depth) != 1 or len(new_depth) != 1:
    raise inference.ModelError(f"{source}: init_grow_layers needs stacked blocks/ params (one depth) in the source "
                               f"and the model; found depths {sorted(old_depth)} and {sorted(new_depth)}")
  (old,), (new,) = old_depth, new_depth
  if new % old:
    raise inference.ModelError(f"{source}: init_grow_layers needs config.model.num_layers ({new}) to be a multiple "
                               f"of the source's {old} layers")
  every = new // old
  grown = dict(loaded)
  for name, fresh in wanted.items():
    if not name.startswith("blocks/") or name not in loaded:
      continue
    layers = np.array(fresh, dtype=np.asarray(loaded[name]).dtype)
    if name.startswith(tuple(f"blocks/{output}" for output in BLOCK_OUTPUTS)):
      layers[:] = 0
    layers[::every] = loaded[name]
    grown[name] = layers
  return grown


def load_dit_checkpoint(path: str, expected: Any, grow_layers: bool = False) -> Any:
  """DiT params checked leaf by leaf against `expected`, from converted weights (`python -m msjax.convert wan
  ...`), a tile run's `--save_params`, or the EMA params of any run (training workdir or exported model), so a
  run can continue from another under a new schedule.

  `expected` is the fresh init. The one parameter the source may lack is the zero-initialised offset input of
  config.tracks.splat = "nearest_offset" (`track_head.OFFSET_INPUT`): a nearest model's params then go on as a
  nearest_offset model that computes exactly what they did, and learns to read the offsets from there.
  `grow_layers` (config.init_grow_layers) lets a shallower source start a deeper model (`grow_blocks`).
  """
  from msjax.convert import common  # pylint: disable=g-import-not-at-top
  is_run = inference.is_exported_model(path) or inference.is_training_workdir(path)
  found = inference.read_checkpoint(path)[0][DIT_PARAMS] if is_run else common.load_params(path)
  loaded = traverse_util.flatten_dict(dict(found), sep="/")
  wanted = traverse_util.flatten_dict(dict(expected), sep="/")
  kept_at_zero = [name for name in wanted if name not in loaded and f"/{track_head_lib.OFFSET_INPUT}/" in f"/{name}"
                  and not np.any(np.asarray(wanted[name]))]
  if kept_at_zero:
    print(f"{path}: has no {', '.join(kept_at_zero)}; starting it at zero (tracks.splat nearest_offset)")
  loaded.update({name: wanted[name] for name in kept_at_zero})
  if grow_layers:
    loaded = grow_blocks(loaded, wanted, path)
  problems = [f"{name}: expected {list(wanted[name].shape)}, found "
              f"{list(np.shape(loaded[name])) if name in loaded else 'nothing'}"
              for name in sorted(wanted) if name not in loaded or np.shape(loaded[name]) != wanted[name].shape]
  problems += [f"{name}: not a parameter of this model" for name in sorted(set(loaded) - set(wanted))]
  if problems:
    raise inference.ModelError(f"{path}: its DiT params do not fit config.model (another preset or model size?); "
                               f"{len(problems)} problems: " + "; ".join(problems[:5]))
  return traverse_util.unflatten_dict({name: np.asarray(loaded[name], wanted[name].dtype) for name in wanted},
                                      sep="/")


def make_train_step(model: dit.WanDiT, text_encoder: text_lib.TextEncoder, objective: TeacherObjective,
                    tx: optax.GradientTransformation, ema_decay: float, grad_accum: int,
                    lr_schedule: optax.Schedule) -> Callable[..., Any]:
  """`step(state, batch, null_context)`; null_context is the frozen encoder's empty prompt (None if trained)."""

  def step(state: state_lib.TrainState, batch: dict[str, jax.Array], null_context: jax.Array | None):
    loss_fn = functools.partial(teacher_loss, model=model, text_encoder=text_encoder, objective=objective,
                                null_context=null_context)
    return state_lib.make_train_step(loss_fn, tx, ema_decay, grad_accum, lr_schedule)(state, batch)

  return step


# ---- sampling and evaluation ------------------------------------------------------------------------------


def guided_velocity_fn(model: dit.WanDiT, dit_params: Any, cond: Conditioning, null_context: jax.Array,
                       guidance_config: ml_collections.ConfigDict) -> flow.VelocityFn:
  """The teacher's guided velocity `v(z, t)` (mode and scales from `guidance_config`), for any flow sampler."""

  def apply_fn(x, t, c):
    return model.apply({"params": dit_params}, x, t, c)

  def velocity_fn(z, t):
    return guidance.guided_velocity(apply_fn, z, t, cond, null_context, guidance_config.mode,
                                    guidance_config.text_scale, guidance_config.motion_scale)

  return velocity_fn


def pin_first_frame(clean: jax.Array, cond: Conditioning, image_condition: str) -> jax.Array:
  """With 'replace' conditioning (Wan 2.2) latent frame 0 is the given image, never denoised: put it back."""
  if image_condition != "replace":
    return clean
  return clean.at[:, 0].set(cond.first_latent)


def sampler_name(guidance_config: ml_collections.ConfigDict) -> str:
  """`guidance_config.sampler` (configs without the key, e.g. older exports, use Euler), checked."""
  name = guidance_config.get("sampler", EULER)
  if name not in SAMPLERS:
    raise ValueError(f"guidance.sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
  return name


def sample(model: dit.WanDiT, dit_params: Any, noise: jax.Array, cond: Conditioning, null_context: jax.Array,
           guidance_config: ml_collections.ConfigDict, shift: float, rng: jax.Array) -> jax.Array:
  """Teacher sampling with guided velocities over `guidance_config.num_steps` shifted steps.

  'euler' integrates the flow ODE (the paper's sampler; ODE pairs follow the same path). 'renoise' predicts x0
  and re-noises it with fresh noise (from `rng`) at each step, the student's few-step sampler
  (`flow.consistency_sample`): an error one step makes is not carried along the path to the end.
  """
  velocity_fn = guided_velocity_fn(model, dit_params, cond, null_context, guidance_config)
  if sampler_name(guidance_config) == RENOISE:
    clean = flow.consistency_sample(velocity_fn, noise, flow.consistency_timesteps(guidance_config.num_steps, shift),
                                    rng)
  else:
    clean = flow.euler_sample(velocity_fn, noise, flow.euler_timesteps(guidance_config.num_steps, shift))
  return pin_first_frame(clean, cond, model.spec.image_condition)


class TeacherEval:
  """The stage's eval hook: validation loss at fixed timesteps (EMA params), and one guided sample.

  Validation loss uses a fixed batch, fixed noise and no dropout, so its curve is comparable across steps.
  `val_loss_shuffled_ids` (and `_t<t>`) is the same loss with the track IDs after frame 0 shuffled among each
  clip's points (`pipeline.shuffle_later_ids`), `val_loss_relabelled_ids` with IDs swapped between tracks in
  every frame (`pipeline.relabel_ids`); each is averaged over `eval.id_draws` random draws. Any change of ID values
  moves the loss a little (on 32 clips, about 0.1-0.3%); only a model that follows points by their IDs, which is
  how it can tell which first-frame content a track carries, scores the shuffle clearly worse than the relabelling.
  That shows first at high t, where the noisy clip no longer shows a sprite's colour.
  The sample is written as `<workdir>/samples/step_<N>.gif` (ground truth | sample, side by side) when the
  codec decodes without weights; otherwise its latents go to `.npy`. Other metrics (EPE, PSNR) belong to
  msjax.eval and can be added by wrapping this hook.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, model: dit.WanDiT,
               text_encoder: text_lib.TextEncoder, frozen_text_params: Any, preparer: BatchPreparer,
               validation_batch: dict[str, np.ndarray]):
    self.config = config
    self.workdir = workdir
    self.objective = TeacherObjective.from_config(config)
    self.model = model
    self.text_encoder = text_encoder
    self.frozen_text_params = frozen_text_params
    self.batch = preparer.unsharded(validation_batch)
    self.id_variants = {}  # metric prefix -> prepared batches, one per draw
    if self.objective.use_tracks and config.eval.id_draws > 0:  # 0 turns the ID metrics off
      rng = np.random.default_rng(config.seed)
      draws = range(int(config.eval.id_draws))
      self.id_variants = {
          prefix: [preparer.unsharded(change(validation_batch, rng)) for _ in draws]
          for prefix, change in ((SHUFFLED_IDS_LOSS, pipeline.shuffle_later_ids),
                                 (RELABELLED_IDS_LOSS, pipeline.relabel_ids))}
    sampler_name(config.guidance)  # a bad name fails here, not at the first eval
    self.eval_timesteps = tuple(config.eval.timesteps)
    self.num_samples = min(int(config.eval.num_samples), self.batch["latents"].shape[0])
    self._loss = jax.jit(self._validation_loss)
    self._sample = jax.jit(self._guided_sample)
    self.null_context = (None if text_encoder.trainable
                         else text_encoder.null_context(frozen_text_params)[0])

  def _validation_loss(self, params: Any, batch: dict[str, jax.Array],
                       null_context: jax.Array | None) -> dict[str, jax.Array]:
    z0 = batch["latents"]
    noise = jax.random.normal(jax.random.PRNGKey(self.config.seed), z0.shape)
    context, _ = text_contexts(params, batch, self.text_encoder, null_context)
    cond = conditioning(batch, context, self.objective)
    weights = frame_weights(z0.shape[1], self.objective)
    losses = {}
    for t_value in self.eval_timesteps:
      t = jnp.full((z0.shape[0],), t_value, jnp.float32)
      v = self.model.apply({"params": params[DIT_PARAMS]}, flow.add_noise(z0, noise, t), t, cond)
      per_frame = jnp.mean(jnp.square(v - flow.velocity_target(z0, noise)), axis=(2, 3, 4))
      losses[f"val_loss_t{t_value:g}"] = jnp.sum(per_frame * weights) / (z0.shape[0] * jnp.sum(weights))
    losses["val_loss"] = jnp.mean(jnp.stack(list(losses.values())))
    return losses

  def _guided_sample(self, params: Any, part: dict[str, jax.Array], null_context: jax.Array | None) -> jax.Array:
    context, null = text_contexts(params, part, self.text_encoder, null_context)
    noise = jax.random.normal(jax.random.PRNGKey(self.config.seed + 1), part["latents"].shape)
    return sample(self.model, params[DIT_PARAMS], noise, conditioning(part, context, self.objective), null,
                  self.config.guidance, self.objective.shift, jax.random.PRNGKey(self.config.seed + 2))

  def __call__(self, step: int, state: state_lib.TrainState) -> dict[str, float]:
    params = state.ema_params
    losses = self._loss(params, self.batch, self.null_context)
    for prefix, batches in self.id_variants.items():
      draws = [self._loss(params, batch, self.null_context) for batch in batches]
      losses.update({name.replace("val_loss", prefix, 1): jnp.mean(jnp.stack([d[name] for d in draws]))
                     for name in draws[0]})
    scalars = {name: float(value) for name, value in jax.device_get(losses).items()}
    if self.num_samples and jax.process_index() == 0:
      part = {name: value[:self.num_samples] for name, value in self.batch.items()}
      latents = np.asarray(jax.device_get(self._sample(params, part, self.null_context)))
      self._write_sample(step, latents)
    return scalars

  def _write_sample(self, step: int, latents: np.ndarray) -> None:
    write_sample(self.config, self.workdir, step, self.batch["latents"][:self.num_samples], latents)


def write_sample(config: ml_collections.ConfigDict, workdir: str, step: int, reference: np.ndarray,
                 latents: np.ndarray) -> None:
  """`<workdir>/samples/step_<N>.gif`: reference | sample side by side, clips stacked vertically, when the codec
  decodes without weights; otherwise the sample latents as `.npy`."""
  directory = os.path.join(workdir, SAMPLES_SUBDIR)
  os.makedirs(directory, exist_ok=True)
  if config.codec.name not in WEIGHTLESS_CODECS:
    io_utils.save_npy(os.path.join(directory, f"step_{step:07d}.npy"), latents)
    return
  codec = codecs.make_codec(config)
  truth = np.asarray(codec.decode(None, jnp.asarray(reference)))
  generated = np.asarray(codec.decode(None, jnp.asarray(latents)))
  side_by_side = np.concatenate([truth, generated], axis=3)  # [N, T, H, 2W, 3]
  frames = np.concatenate(list(side_by_side), axis=1)  # samples stacked vertically
  io_utils.write_video(os.path.join(directory, f"step_{step:07d}.gif"), np.asarray(inference.to_uint8(frames)),
                       config.video.fps)


# ---- the stage ----------------------------------------------------------------------------------------------


def check_batch_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  train = config.train
  if train.batch_size % (train.grad_accum * mesh.size):
    raise ValueError(f"config.train.batch_size={train.batch_size} must be a multiple of grad_accum "
                     f"({train.grad_accum}) x devices ({mesh.size}) so every micro-batch splits evenly")


class TeacherStage(NamedTuple):
  """What `train` and the training-step benchmark (`msjax.bench.train_step`) both run: the sharded state's
  shapes and a maker for a fresh one, the jitted step (null text context bound), the batch preparer and a
  maker for the training batches' iterator. The student stages build the same fields (`causal_init.build_stage`,
  `dmd.build_stage`)."""
  model: dit.WanDiT
  text_encoder: text_lib.TextEncoder
  frozen_text_params: Any
  codec: codecs.Codec
  abstract_state: state_lib.TrainState
  fresh_state: Callable[[], state_lib.TrainState]
  train_step: Callable[[state_lib.TrainState, dict[str, jax.Array]], tuple[state_lib.TrainState, Any]]
  preparer: BatchPreparer
  make_iterator: Callable[[], Any]


def build_stage(config: ml_collections.ConfigDict) -> TeacherStage:
  """Model, optimizer, sharded state (fresh or from `config.init_checkpoint`) and the jitted step."""
  mesh = sharding.make_mesh(config.mesh)
  check_batch_config(config, mesh)
  objective = TeacherObjective.from_config(config)
  model = dit.WanDiT(dit.DiTSpec.from_config(config))
  text_encoder = text_lib.make_text_encoder(config)
  frozen_text_params = None if text_encoder.trainable else text_encoder.init_params()
  total_steps = int(config.train.steps)
  lr_schedule = state_lib.learning_rate_schedule(config.optim, total_steps)
  tx = state_lib.make_optimizer(config.optim, total_steps)
  min_shard = int(config.mesh.get("fsdp_min_size", sharding.DEFAULT_FSDP_MIN_SIZE))
  rng = jax.random.PRNGKey(config.seed)

  def init_state(key: jax.Array) -> state_lib.TrainState:
    params_key, state_key = jax.random.split(key)
    return state_lib.create_train_state(init_params(config, model, text_encoder, params_key), tx, state_key)

  abstract = sharding.abstract_sharded(init_state, mesh, rng, min_shard)

  def fresh_state() -> state_lib.TrainState:
    state = sharding.init_sharded(init_state, abstract, rng)
    if not config.get("init_checkpoint", ""):
      return state
    params = dict(state.params, **{DIT_PARAMS: load_dit_checkpoint(
        config.init_checkpoint, state.params[DIT_PARAMS], grow_layers=config.get("init_grow_layers", False))})
    return sharding.init_sharded(lambda p, key: state_lib.create_train_state(p, tx, key), abstract, params,
                                 state.rng)

  step = make_train_step(model, text_encoder, objective, tx, config.optim.ema_decay, config.train.grad_accum,
                         lr_schedule)
  jitted = sharding.jit_train_step(step, mesh, sharding.shardings_of(abstract), num_constants=1)
  null_context = None
  if not text_encoder.trainable:
    null_context = jax.device_put(text_encoder.null_context(frozen_text_params)[0], sharding.replicated(mesh))
  codec = codecs.make_codec(config)
  return TeacherStage(model=model, text_encoder=text_encoder, frozen_text_params=frozen_text_params,
                      codec=codec, abstract_state=abstract, fresh_state=fresh_state,
                      train_step=lambda s, b: jitted(s, b, null_context),
                      preparer=BatchPreparer(mesh, text_encoder, frozen_text_params, config, codec),
                      make_iterator=functools.partial(train_iterator, config, codec))


def train_iterator(config: ml_collections.ConfigDict, codec: codecs.Codec) -> Any:
  """The grain iterator over this host's share of the training batches."""
  return pipeline.make_train_pipeline(config, data_source=make_data_source(config, "train"), codec=codec,
                                      seed=config.seed, batch_size=config.train.batch_size // jax.process_count(),
                                      worker_count=config.data.worker_count)


def train(config: ml_collections.ConfigDict, workdir: str | None = None) -> state_lib.TrainState:
  """Trains the teacher for `config.train.steps` steps in `workdir` (default `config.workdir`), resuming."""
  workdir = workdir or config.workdir
  stage = build_stage(config)
  eval_hook = None
  if config.train.eval_every > 0:
    validation = make_data_source(config, "validation", fallback_split="train")
    validation_batch = next(pipeline.make_train_pipeline(
        config, data_source=validation, codec=stage.codec, seed=config.seed,
        batch_size=min(int(config.eval.batch_size), len(validation))))
    eval_hook = TeacherEval(config, workdir, stage.model, stage.text_encoder, stage.frozen_text_params,
                            stage.preparer, validation_batch)
  return loop.train_loop(config, workdir, stage.fresh_state, stage.abstract_state, stage.train_step,
                         stage.make_iterator(), stage.preparer, eval_hook)
