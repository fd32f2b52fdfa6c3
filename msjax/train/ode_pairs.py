"""Teacher ODE pairs for causal adaptation (paper section 4.1): noise -> clean trajectories of the guided teacher.

  python -m msjax.train.ode_pairs --config configs/distill.py[:preset] [--out DIR]

Per clip (first frame, prompt and tracks from the training data) the frozen teacher integrates the flow ODE from
fresh noise with Euler over `ode_pairs.euler_steps` shifted steps (`flow.euler_timesteps`) and the joint
text-motion guidance of `config.guidance`. Stored per clip:
  states       float32 [K, F, h, w, C]  z on the Euler path at the student's K timesteps
                                        (`flow.consistency_timesteps`); states[0] is the starting noise (t = 1)
  timesteps    float32 [K]              the times of `states` (the Euler grid times actually used)
  clean        float32 [F, h, w, C]     the end of the path (t = 0): the regression target
  first_latent float32 [h, w, C], the pipeline's compact track fields (`pipeline.TRACK_FIELDS`: points,
               visibility, ID embeddings; rasterised on the device when read) and prompt str: the conditioning
Timestep choice: each student time t_k = shift(1 - k/K) is matched to the nearest time of the Euler grid
shift(1 - j/N). The grid holds every t_k exactly when N is a multiple of K (j = kN/K, the default), so then no
interpolation happens; otherwise the nearest grid time is used and stored, so the student regresses at the
time the state really has.

Layout of the output folder: `pairs.json` (what the pairs were made with) and `shard_<i>.npz` files of
`shard_size` clips each, written atomically as the teacher finishes them. A rerun continues: it checks that
`pairs.json` describes the same settings and skips every finished shard (the data order and the noise of shard
i depend only on the seed and i, so a resumed set equals an uninterrupted one).

Cost at the tiny preset (2-core CPU shared with other jobs, load ~5): one shard of 8 clips (24 Euler steps x 3
guided passes) took 167 s wall / 91 s CPU including start-up and compilation; the default 256 pairs (32 shards)
should take ~20-30 min on an idle machine.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
from typing import Any, Sequence

from absl import app
from absl import flags
import chex
import grain
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import tqdm

from msjax import config_utils
from msjax import inference
from msjax import io_utils
from msjax.data import pipeline
from msjax.diffusion import flow
from msjax.models import dit
from msjax.models.track_head import Conditioning
from msjax.stream import rollout
from msjax.train import teacher

LAYOUT_FILE = "pairs.json"
SHARD_PATTERN = "shard_{:05d}.npz"
# Per-clip arrays of a shard are stored as `<field>/<clip index in the shard>`, so one clip reads alone.
ARRAY_FIELDS = ("states", "timesteps", "clean", "first_latent") + pipeline.TRACK_FIELDS
PROMPT_FIELD = "prompt"
FIELDS = ARRAY_FIELDS + (PROMPT_FIELD,)


class PairsError(ValueError):
  """An ODE-pair folder that cannot be used as asked; the message names the folder and the problem."""


@dataclasses.dataclass(frozen=True)
class ConditioningSpec:
  """Which conditionings the DiT reads (hashable, for jit-static use; duck-types teacher.conditioning)."""
  image_condition: str
  use_tracks: bool

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> ConditioningSpec:
    return cls(image_condition=config.model.image_condition, use_tracks=config.model.track_channels > 0)


@dataclasses.dataclass(frozen=True)
class Guidance:
  """Teacher guidance as `teacher.guided_velocity_fn` reads it (hashable, unlike a ConfigDict section)."""
  mode: str
  text_scale: float
  motion_scale: float


def conditioning(batch: dict[str, Any], context: jax.Array, spec: ConditioningSpec) -> Conditioning:
  """The DiT conditioning of a batch holding `first_latent` and `track_grid` (dropped where the model has none)."""
  return teacher.conditioning(batch, context, spec)


@dataclasses.dataclass(frozen=True)
class PairLayout:
  """What a pair folder holds and how it was made (`pairs.json`); a resumed run must match it exactly."""
  preset: str
  num_pairs: int
  shard_size: int
  seed: int
  shift: float
  euler_steps: int
  guidance: tuple[str, float, float]  # mode, w_t, w_m
  euler_indices: tuple[int, ...]  # where on the Euler grid each stored state sits
  timesteps: tuple[float, ...]  # their times
  teacher_checkpoint: str
  fields: tuple[str, ...]  # what each clip stores (folders of an older format are refused, not misread)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> PairLayout:
    pairs = config.ode_pairs
    if pairs.num_pairs < 1 or pairs.shard_size < 1:
      raise config_utils.ConfigError(f"ode_pairs.num_pairs and ode_pairs.shard_size must be positive, got "
                                     f"{pairs.num_pairs} and {pairs.shard_size}")
    shift = float(config.flow.shift)
    euler_times = np.asarray(flow.euler_timesteps(pairs.euler_steps, shift))
    indices = record_indices(euler_times, np.asarray(rollout.student_timesteps(config)))
    return cls(preset=config.preset, num_pairs=int(pairs.num_pairs), shard_size=int(pairs.shard_size),
               seed=int(pairs.seed), shift=shift, euler_steps=int(pairs.euler_steps),
               guidance=(config.guidance.mode, float(config.guidance.text_scale),
                         float(config.guidance.motion_scale)),
               euler_indices=tuple(int(i) for i in indices),
               timesteps=tuple(float(euler_times[i]) for i in indices),
               teacher_checkpoint=os.path.abspath(config.teacher_checkpoint), fields=FIELDS)

  @property
  def num_shards(self) -> int:
    return -(-self.num_pairs // self.shard_size)

  def shard_clips(self, shard: int) -> int:
    """Clips in shard `shard` (the last one may be short)."""
    return min(self.shard_size, self.num_pairs - shard * self.shard_size)

  def to_json(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_json(cls, values: dict[str, Any]) -> PairLayout:
    missing = sorted({field.name for field in dataclasses.fields(cls)} - set(values))
    if missing:
      raise ValueError(f"no {', '.join(missing)} (made by an older msjax)")
    tuples = {name: tuple(values[name]) for name in ("guidance", "euler_indices", "timesteps", "fields")}
    return cls(**dict(values, **tuples))


def record_indices(euler_times: np.ndarray, student_times: np.ndarray) -> np.ndarray:
  """For each student time, the index of the nearest time on the descending Euler grid (see module docstring)."""
  chex.assert_rank([euler_times, student_times], 1)
  indices = np.argmin(np.abs(euler_times[:, None] - student_times[None, :]), axis=0)
  if np.any(np.diff(indices) <= 0):
    raise config_utils.ConfigError(
        f"ode_pairs.euler_steps={len(euler_times) - 1} is too coarse for the student's times "
        f"{np.round(student_times, 4).tolist()}: two of them fall on the same Euler step; use a multiple of "
        f"stream.num_steps")
  return indices


def teacher_trajectory(velocity_fn: flow.VelocityFn, noise: jax.Array, euler_times: jax.Array,
                       indices: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """Euler from `noise` along `euler_times`, keeping z at the grid `indices`: (states [B, K, ...], clean [B, ...]).

  Integrates segment by segment between the kept indices, so it is exactly `flow.euler_sample` over the grid.
  """
  states, z, start = [], noise, 0
  for index in indices:
    if index > start:
      z = flow.euler_sample(velocity_fn, z, euler_times[start:index + 1])
    states.append(z)
    start = index
  clean = flow.euler_sample(velocity_fn, z, euler_times[start:])
  return jnp.stack(states, axis=1), clean


@functools.lru_cache(maxsize=None)
def _shard_sampler(model_spec: dit.DiTSpec, layout: PairLayout, image_condition: str):
  """The jitted teacher trajectory of one shard (cached, so a resumed run in the same process compiles once)."""
  network = dit.WanDiT(model_spec)
  euler_times = flow.euler_timesteps(layout.euler_steps, layout.shift)

  def sample(dit_params: Any, noise: jax.Array, cond: Conditioning,
             null_context: jax.Array) -> tuple[jax.Array, jax.Array]:
    velocity_fn = teacher.guided_velocity_fn(network, dit_params, cond, null_context, Guidance(*layout.guidance))
    states, clean = teacher_trajectory(velocity_fn, noise, euler_times, layout.euler_indices)
    return states, teacher.pin_first_frame(clean, cond, image_condition)

  return jax.jit(sample)


def shard_path(directory: str, shard: int) -> str:
  return os.path.join(directory, SHARD_PATTERN.format(shard))


def write_shard(path: str, clips: dict[str, np.ndarray]) -> None:
  """Writes a shard atomically: every field [n, ...] split into per-clip members `<field>/<j>`."""
  count = len(clips[PROMPT_FIELD])
  members = {f"{field}/{j}": np.asarray(clips[field][j]) for field in FIELDS for j in range(count)}
  buffer = io.BytesIO()
  np.savez(buffer, **members)
  io_utils.atomic_write_bytes(path, buffer.getvalue())


def read_layout(directory: str) -> PairLayout | None:
  path = os.path.join(directory, LAYOUT_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return PairLayout.from_json(json.load(f))
  except (OSError, ValueError, TypeError) as e:
    raise PairsError(f"{path}: not a readable ODE-pair layout ({e}); delete the folder to start over") from e


def _prepare_folder(directory: str, layout: PairLayout) -> None:
  """Writes `pairs.json`, or checks that the one already there describes the same pairs."""
  existing = read_layout(directory)
  if existing is None:
    io_utils.atomic_write_bytes(os.path.join(directory, LAYOUT_FILE),
                                json.dumps(layout.to_json(), indent=1, sort_keys=True).encode())
    return
  if existing != layout:
    old, new = existing.to_json(), layout.to_json()
    differences = [f"{name}: folder {old[name]!r}, config {new[name]!r}" for name in sorted(old)
                   if old[name] != new[name]]
    raise PairsError(f"{directory} holds ODE pairs made with other settings ({'; '.join(differences)}); use "
                     "another output folder, or delete this one to start over")


def load_teacher(config: ml_collections.ConfigDict) -> inference.Model:
  """The frozen teacher named by `config.teacher_checkpoint` (a training workdir or an exported model)."""
  path = config.teacher_checkpoint
  if not os.path.exists(path):
    raise inference.ModelError(f"{path}: no teacher checkpoint there; train one first (python train.py --config "
                               f"configs/teacher.py:{config.preset}) or set config.teacher_checkpoint")
  return inference.load_model(path, config)


def generate(config: ml_collections.ConfigDict, directory: str,
             teacher_model: inference.Model | None = None) -> PairLayout:
  """Samples the missing shards of `directory` (all of them on the first run); returns the layout."""
  layout = PairLayout.from_config(config)
  os.makedirs(directory, exist_ok=True)
  _prepare_folder(directory, layout)
  missing = [s for s in range(layout.num_shards) if not os.path.isfile(shard_path(directory, s))]
  if not missing:
    return layout
  model = teacher_model or load_teacher(config)
  geo = config_utils.geometry(config)
  spec = ConditioningSpec.from_config(config)
  sample = _shard_sampler(model.spec, layout, spec.image_condition)
  null_context = model.text_encoder.null_context(model.text_params)[0]
  iterator = pipeline.make_train_pipeline(config, data_source=teacher.make_data_source(config, "train"),
                                          codec=model.codec, seed=layout.seed, batch_size=layout.shard_size)
  model_inputs = pipeline.make_device_inputs(config, model.codec, keep=("first_latent", "track_grid"))
  latent_shape = (layout.shard_size, geo.latent_frames, geo.latent_height, geo.latent_width, geo.latent_channels)
  progress = tqdm.tqdm(total=layout.num_shards, initial=layout.num_shards - len(missing), unit="shard",
                       desc=f"ODE pairs -> {directory}", dynamic_ncols=True)
  with progress:
    for shard in range(layout.num_shards):
      host_batch = next(iterator)  # read even for finished shards: shard i always gets the same clips
      if shard not in missing:
        continue
      context, _ = model.text_encoder.encode(model.text_params, host_batch[PROMPT_FIELD])
      noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(layout.seed), shard), latent_shape)
      inputs = model_inputs({name: host_batch[name] for name in pipeline.HOST_FIELDS})
      states, clean = sample(model.dit_params, noise, conditioning(inputs, context, spec), null_context)
      count = layout.shard_clips(shard)
      timesteps = np.broadcast_to(np.asarray(layout.timesteps, np.float32), (count, len(layout.timesteps)))
      clips = {"states": np.asarray(states[:count]), "timesteps": timesteps, "clean": np.asarray(clean[:count]),
               "first_latent": np.asarray(inputs["first_latent"][:count]),
               PROMPT_FIELD: host_batch[PROMPT_FIELD][:count],
               **{name: host_batch[name][:count] for name in pipeline.TRACK_FIELDS}}
      write_shard(shard_path(directory, shard), clips)
      progress.update(1)
  return layout


# ---- reading ----------------------------------------------------------------------------------------------


class PairSource:
  """The finished pair set of a folder as a random-access data source (grain): item i is one clip's fields."""

  def __init__(self, directory: str):
    self.directory = directory
    layout = read_layout(directory)
    if layout is None:
      raise PairsError(f"{directory}: no ODE pairs there ({LAYOUT_FILE} missing); make them first with "
                       "`python -m msjax.train.ode_pairs --config configs/distill.py`")
    missing = [s for s in range(layout.num_shards) if not os.path.isfile(shard_path(directory, s))]
    if missing:
      raise PairsError(f"{directory}: the pair set is unfinished ({len(missing)} of {layout.num_shards} shards "
                       "missing); rerun `python -m msjax.train.ode_pairs` with the same config to finish it")
    self.layout = layout

  def __len__(self) -> int:
    return self.layout.num_pairs

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"pair {index} out of range [0, {len(self)})")
    shard, clip = divmod(index, self.layout.shard_size)
    path = shard_path(self.directory, shard)
    try:
      with np.load(path, allow_pickle=False) as members:
        return {field: members[f"{field}/{clip}"] for field in FIELDS}
    except (OSError, KeyError, ValueError) as e:
      raise PairsError(f"{path}: cannot read clip {clip} ({e}); delete the file and rerun ode_pairs") from e

  def __repr__(self) -> str:
    return f"PairSource({self.directory!r}, {len(self)} pairs)"


def check_layout_matches(layout: PairLayout, config: ml_collections.ConfigDict, directory: str) -> None:
  """The pairs must be of this preset and at the student's timesteps (a changed shift or K needs new pairs)."""
  if layout.fields != FIELDS:
    raise PairsError(f"{directory}: the pairs store {list(layout.fields)}, this version of msjax reads "
                     f"{list(FIELDS)}; make new pairs")
  student_times = np.asarray(rollout.student_timesteps(config))
  if layout.preset != config.preset or len(layout.timesteps) != len(student_times) or not np.allclose(
      layout.timesteps, student_times, atol=1.0 / layout.euler_steps):
    raise PairsError(f"{directory}: pairs of preset {layout.preset!r} at times {list(layout.timesteps)}, but the "
                     f"config is {config.preset!r} with student times {np.round(student_times, 4).tolist()} "
                     "(stream.num_steps, flow.shift); make new pairs for this config")


def make_pair_pipeline(dataset: grain.MapDataset, *, seed: int, batch_size: int) -> grain.DatasetIterator:
  """Shuffled, repeated batches of pairs with exact resume (a MapDataset is index based, like the data pipeline)."""
  if len(dataset) < batch_size:
    raise PairsError(f"{len(dataset)} training pairs cannot fill a batch of {batch_size}; make more pairs "
                     "(ode_pairs.num_pairs) or lower the batch size")
  batched = dataset.seed(seed).shuffle().repeat().batch(batch_size, drop_remainder=True)
  return iter(batched.to_iter_dataset(pipeline.DEFAULT_READ_OPTIONS))


# ---- command line -------------------------------------------------------------------------------------------


def _cli() -> None:
  """`python -m msjax.train.ode_pairs`: flags are defined here, not at import, so train.py can import this module."""
  config_flag = config_flags.DEFINE_config_file("config", None, "Distillation config (configs/distill.py[:preset]).",
                                                lock_config=True)
  out_flag = flags.DEFINE_string("out", None, "Output folder (default: config.ode_pairs.dir).")

  def main(argv: list[str]) -> None:
    del argv
    config = config_flag.value
    if config is None:
      raise app.UsageError("--config is required, e.g. --config configs/distill.py")
    directory = out_flag.value or config.ode_pairs.dir
    layout = generate(config, directory)
    print(f"{layout.num_pairs} ODE pairs at t = {np.round(layout.timesteps, 4).tolist()} in {directory}")

  app.run(main, flags_parser=io_utils.parse_flags)


if __name__ == "__main__":
  _cli()
