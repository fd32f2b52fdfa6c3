"""How sharp can a sampler end? One-step x0 estimates of the teacher from the TRUE noisy clip, at fixed t.

  python -m msjax.eval.x0_probe --config configs/teacher.py --checkpoint DIR [--num_clips 20] [--out probe.json]

For held-out sprites clips, the true latents are noised to each t in `--timesteps` and the model (unguided, tracks
as given) predicts x0 once. PSNR is reported over frames 1+ (frame 0 is given), on the whole frame and split into
background and sprite pixels (by the true video), next to a reference that uses no network: the best scalar
rescaling of the noisy input, c(t) z_t with c = (1 - t) m / ((1 - t)^2 m + t^2), m the clips' mean squared latent.
Every sampler's last step is one such estimate from a noisy clip it made itself, so these numbers bound what
more steps or another sampler can reach; where the model falls below the reference at small t it blurs a clip that
is already nearly clean, which more steps cannot fix.

`--recycle_gap 0.25` also scores each t from the model's own x0 one 4-step sampler step earlier, re-noised: the
kind of input the sampler's later steps get, so its gap to the true-clip row is what starting from its own
estimates costs.

Also the ceiling the head's shape sets (`--ceiling_clips`, 0 to skip): the DiT's head maps each token's model.dim
features linearly to its patch of latent values, so every x0 it can draw lies, token by token, in one
model.dim-dimensional affine subspace of patch space. The best such subspace for the data is the clips' principal
components (fitted on training-seed clips); the held-out clips projected onto it score what no training of this
architecture can beat.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from absl import app, flags, logging
import chex
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from msjax import inference
from msjax import io_utils
from msjax.data import pipeline
from msjax.data import sprites as sprites_lib
from msjax.diffusion import flow
from msjax.eval import metrics
from msjax.eval import sprites_eval
from msjax.models import dit

REGIONS = ("all", "background", "sprites")
DEFAULT_TIMESTEPS = (0.95, 0.857, 0.667, 0.5, 0.25, 0.1)  # the first three: the 4-step sampler's times at shift 6


def scalar_skip(t: float, second_moment: float) -> float:
  """The c minimising E|c z_t - x0|^2 for z_t = (1 - t) x0 + t noise, when E[x0^2] = `second_moment`."""
  return (1.0 - t) * second_moment / ((1.0 - t) ** 2 * second_moment + t**2)


class SquaredErrors:
  """Sums of squared uint8 errors and pixel counts per region, so PSNR comes from the pooled MSE."""

  def __init__(self):
    self.sums = dict.fromkeys(REGIONS, 0.0)
    self.counts = dict.fromkeys(REGIONS, 0)

  def add(self, video: np.ndarray, clip: sprites_lib.Clip) -> None:
    chex.assert_equal_shape([video, clip.video])
    later = slice(1, None)  # frame 0 is given to the model
    error = np.mean((video[later].astype(np.float64) - clip.video[later].astype(np.float64)) ** 2, axis=-1)
    background = metrics.true_regions(clip.video[later], clip.background[later], clip.colors)[:, 0]
    for region, mask in (("all", np.ones_like(background)), ("background", background), ("sprites", ~background)):
      self.sums[region] += float(error[mask].sum())
      self.counts[region] += int(mask.sum())

  def psnr(self) -> dict[str, float]:
    """dB per region; NaN for a region no pixel fell in, inf for one reproduced exactly."""
    out = {}
    for region in REGIONS:
      if not self.counts[region]:
        out[region] = float("nan")
      elif self.sums[region] == 0.0:
        out[region] = float("inf")
      else:
        out[region] = float(10.0 * np.log10(metrics.UINT8_LEVELS**2 * self.counts[region] / self.sums[region]))
    return out


def motion_truth(world: sprites_lib.SpritesConfig, clip: sprites_lib.Clip) -> sprites_eval.ClipTruth:
  """What `MotionScores.add` scores against, computed once per clip with the eval's detection settings."""
  return sprites_eval.clip_truth(clip, 0, tolerance=metrics.default_tolerance(),
                                 min_pixels=sprites_eval.min_detection_pixels(world))


class MotionScores:
  """Where the x0 estimates put the sprites: the eval's EPE and motion lead by place in the latent frame, per clip
  (`sprites_eval.score_clip`), averaged over clips."""

  def __init__(self, world: sprites_lib.SpritesConfig):
    self.tolerance = metrics.default_tolerance()
    self.min_pixels = sprites_eval.min_detection_pixels(world)
    self.temporal_stride = world.temporal_stride
    self.epe, self.lead = [], []

  def add(self, video: np.ndarray, truth: sprites_eval.ClipTruth) -> None:
    """Scores one clip's video against its `motion_truth`."""
    record, _ = sprites_eval.score_clip(video, truth, tolerance=self.tolerance, min_pixels=self.min_pixels,
                                        temporal_stride=self.temporal_stride)
    self.epe.append(record["epe"])
    self.lead.append([record["lead_by_place"][str(place)] for place in range(1, self.temporal_stride + 1)])

  def summary(self) -> dict[str, float | list[float]]:
    """{"epe": px, "lead_by_place": [px per place]}: means over the clips where each was measured."""
    return {"epe": float(metrics.nanmean(np.array(self.epe, np.float64), 0)),
            "lead_by_place": metrics.nanmean(np.array(self.lead, np.float64), 0).tolist()}


def clip_latents(model: inference.Model, clip: sprites_lib.Clip) -> jax.Array:
  """The clip's true latents [1, F, h, w, C] through the model's codec."""
  return model.codec.encode(model.codec_params, jnp.asarray(pipeline.video_to_unit_range(clip.video))[None])


def decoded_pixels(model: inference.Model, latents: jax.Array) -> np.ndarray:
  """Latents [1, F, h, w, C] -> the uint8 video [T, H, W, 3] they decode to."""
  return np.asarray(inference.to_uint8(model.codec.decode(model.codec_params, latents)[0]))


def probe(model: inference.Model, clips: Sequence[sprites_lib.Clip], timesteps: Sequence[float],
          seed: int = 0, recycle_gap: float = 0.0) -> dict[str, dict[str, dict[str, Any]]]:
  """{f"{t:g}": {"model": {region: dB}, "scalar_skip": {region: dB}, "motion": `MotionScores.summary` of the
  model's estimates}}; the same noise for both at each t.

  With `recycle_gap` > 0 also "recycled" and "recycled_motion": the estimate at t from the model's own x0 at the
  earlier time `flow.earlier_timestep(t, shift, recycle_gap)` (itself from the true clip), re-noised to t with
  the same noise, which is what the few-step sampler feeds its later steps (0.25: the 4-step sampler). Its gap to
  "model" is what the sampler loses by starting each step from its own estimate.
  """
  network = dit.WanDiT(model.spec)
  config = model.config

  def velocity_fn(params, cond):
    return lambda z, t_vec: network.apply({"params": params}, z, t_vec, cond)

  def x0_from(params, z_t, t_vec, cond):
    return flow.x0_from_velocity(z_t, t_vec, velocity_fn(params, cond)(z_t, t_vec))

  @jax.jit
  def x0_estimate(params, z0, noise, t, cond):
    t_vec = jnp.full((z0.shape[0],), t, jnp.float32)
    z_t = flow.add_noise(z0, noise, t_vec)
    return x0_from(params, z_t, t_vec, cond), z_t

  @jax.jit
  def recycled_estimate(params, z0, prev_noise, noise, t, cond):
    t_vec = jnp.full((z0.shape[0],), t, jnp.float32)
    shift = float(config.flow.shift)  # the sampler's
    z_t = flow.recycled_input(velocity_fn(params, cond), z0, prev_noise, noise, t_vec, shift, recycle_gap)
    return x0_from(params, z_t, t_vec, cond)

  latents = [clip_latents(model, c) for c in clips]
  second_moment = float(np.mean([jnp.mean(jnp.square(z)) for z in latents]))
  kinds = ("model", "scalar_skip") + (("recycled",) if recycle_gap > 0 else ())
  errors = {t: {kind: SquaredErrors() for kind in kinds} for t in timesteps}
  world = sprites_eval.world_config(config, clips[0].video.shape[0])
  motion = {t: {kind: MotionScores(world) for kind in kinds if kind != "scalar_skip"} for t in timesteps}

  for index, (clip, z0) in enumerate(zip(clips, latents)):
    context, _ = inference.encode_prompt(model, [clip.prompt])
    grid = inference.track_grid(sprites_eval.clip_tracks(clip), config, seed=seed + index)
    cond = inference.conditioning(model, context, inference.first_latent(model, clip.video[0]), grid)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
    truth = motion_truth(world, clip)
    for t in timesteps:
      noise = jax.random.normal(jax.random.fold_in(key, round(t * 1e6)), z0.shape, jnp.float32)
      x0, z_t = x0_estimate(model.dit_params, z0, noise, t, cond)
      estimates = {"model": x0}
      if recycle_gap > 0:
        prev_noise = jax.random.normal(jax.random.fold_in(key, round(t * 1e6) + 1), z0.shape, jnp.float32)
        estimates["recycled"] = recycled_estimate(model.dit_params, z0, prev_noise, noise, t, cond)
      for kind, estimate in estimates.items():
        video = decoded_pixels(model, estimate)
        errors[t][kind].add(video, clip)
        motion[t][kind].add(video, truth)
      errors[t]["scalar_skip"].add(decoded_pixels(model, scalar_skip(t, second_moment) * z_t), clip)
  result = {}
  for t, by_name in errors.items():
    row = {name: e.psnr() for name, e in by_name.items()}
    row["motion"] = motion[t]["model"].summary()
    if recycle_gap > 0:
      row["recycled_motion"] = motion[t]["recycled"].summary()
    result[f"{t:g}"] = row
  return result


def patch_tokens(latents: np.ndarray, patch_size: Sequence[int]) -> np.ndarray:
  """[B, F, h, w, C] -> [B * tokens, pt*ph*pw*C]: the values the head writes for each token (C fastest)."""
  b, f, h, w, c = latents.shape
  pt, ph, pw = patch_size
  blocks = latents.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return blocks.reshape(-1, pt * ph * pw * c)


def from_patch_tokens(tokens: np.ndarray, shape: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
  """The inverse of `patch_tokens` for latents of `shape` [B, F, h, w, C]."""
  b, f, h, w, c = shape
  pt, ph, pw = patch_size
  blocks = tokens.reshape(b, f // pt, h // ph, w // pw, pt, ph, pw, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return blocks.reshape(b, f, h, w, c)


def fit_token_subspace(tokens: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """(mean [d], basis [rank, d]): the `rank`-dimensional affine subspace nearest the tokens in squared error."""
  if not 0 < rank <= tokens.shape[1]:
    raise ValueError(f"a subspace of rank {rank} in {tokens.shape[1]}-dimensional patch space")
  data = tokens.astype(np.float64)
  mean = data.mean(axis=0)
  centred = data - mean
  _, vectors = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
  return mean, vectors[:, ::-1][:, :rank].T


def head_ceiling(model: inference.Model, fit_clips: Sequence[sprites_lib.Clip],
                 clips: Sequence[sprites_lib.Clip]) -> tuple[dict[str, float], dict[str, Any]]:
  """PSNR per region of `clips` with every token projected onto the best model.dim-dimensional affine subspace
  of patch space for `fit_clips`: the sharpest x0 the head's shape allows (module docstring). Also the
  projected clips' `MotionScores.summary`: whether the head's shape alone holds sprites still or off track."""
  patch_size = model.spec.patch_size
  encode = lambda clip: np.asarray(clip_latents(model, clip))
  mean, basis = fit_token_subspace(np.concatenate([patch_tokens(encode(c), patch_size) for c in fit_clips]),
                                   int(model.config.model.dim))
  errors = SquaredErrors()
  world = sprites_eval.world_config(model.config, clips[0].video.shape[0])
  motion = MotionScores(world)
  for clip in clips:
    z0 = encode(clip)
    tokens = patch_tokens(z0, patch_size) - mean
    projected = from_patch_tokens((tokens @ basis.T) @ basis + mean, z0.shape, patch_size)
    video = decoded_pixels(model, jnp.asarray(projected, jnp.float32))
    errors.add(video, clip)
    motion.add(video, motion_truth(world, clip))
  return errors.psnr(), motion.summary()


def format_lead(lead_by_place: Sequence[float]) -> str:
  return " / ".join(f"{value:+.2f}" for value in lead_by_place)


def format_table(result: dict[str, dict[str, dict[str, Any]]]) -> str:
  lines = ["t        model: all / background / sprites dB    scalar rescaling of z_t: all / background / sprites dB"
           "    model: EPE px, lead along the motion by place in the latent frame px"]
  for t, rows in result.items():
    m, s, motion = rows["model"], rows["scalar_skip"], rows["motion"]
    lines.append(f"{t:<8s} {m['all']:6.2f} / {m['background']:6.2f} / {m['sprites']:6.2f}"
                 f"                     {s['all']:6.2f} / {s['background']:6.2f} / {s['sprites']:6.2f}"
                 f"                                   {motion['epe']:5.2f}, {format_lead(motion['lead_by_place'])}")
  recycled = [(t, rows) for t, rows in result.items() if "recycled" in rows]
  if recycled:
    lines.append("t        from the model's own x0 one step earlier (--recycle_gap): all / background / sprites dB, "
                 "EPE px, lead by place px")
    for t, rows in recycled:
      r, motion = rows["recycled"], rows["recycled_motion"]
      lines.append(f"{t:<8s} {r['all']:6.2f} / {r['background']:6.2f} / {r['sprites']:6.2f}    {motion['epe']:5.2f}, "
                   f"{format_lead(motion['lead_by_place'])}")
  return "\n".join(lines)


_CONFIG = config_flags.DEFINE_config_file("config", "configs/teacher.py", "Config holding the model preset.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Teacher workdir or exported model folder.")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 20, "Held-out clips.")
_SEED_START = flags.DEFINE_integer("seed_start", sprites_eval.EVAL_SEED_START, "First held-out seed.")
_TIMESTEPS = flags.DEFINE_list("timesteps", [f"{t:g}" for t in DEFAULT_TIMESTEPS], "Noise levels t in (0, 1].")
_OUT = flags.DEFINE_string("out", None, "Optional JSON file for the table.")
_RECYCLE_GAP = flags.DEFINE_float("recycle_gap", 0.0, "Also score each t from the model's own x0 this far earlier "
                                  "on the unshifted grid, re-noised (0.25: the 4-step sampler's spacing; 0: off).")
_CEILING_CLIPS = flags.DEFINE_integer("ceiling_clips", 200, "Training-seed clips the head ceiling's subspace is "
                                      "fitted on (0: no ceiling).")


_fail = io_utils.exit_bad_input


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; all options are --flags")
  logging.set_verbosity(logging.WARNING)
  config: ml_collections.ConfigDict = _CONFIG.value
  if not _CHECKPOINT.value:
    _fail("--checkpoint is required (a teacher workdir such as runs/teacher_tiny, or an exported model folder)")
  try:
    timesteps = [float(t) for t in _TIMESTEPS.value]
  except ValueError:
    _fail(f"--timesteps must be numbers in (0, 1], got {','.join(_TIMESTEPS.value)}")
  if not all(0.0 < t <= 1.0 for t in timesteps):
    _fail(f"--timesteps must lie in (0, 1], got {','.join(_TIMESTEPS.value)}")
  if not 0.0 <= _RECYCLE_GAP.value <= 1.0:
    _fail(f"--recycle_gap must lie in [0, 1], got {_RECYCLE_GAP.value}")
  try:
    model = inference.load_model(_CHECKPOINT.value, config)
    seeds = sprites_eval.eval_seeds(_NUM_CLIPS.value, _SEED_START.value)
  except (inference.ModelError, ValueError) as e:
    _fail(str(e))
  clips = sprites_eval.render_clips(seeds, sprites_eval.world_config(config))
  result = probe(model, clips, timesteps, seed=int(config.get("seed", 0)), recycle_gap=_RECYCLE_GAP.value)
  print(f"one-step x0 from the true noisy clip: {_CHECKPOINT.value}, {len(clips)} clips, frames 1-"
        f"{clips[0].video.shape[0] - 1}, PSNR pooled over the clips")
  print(format_table(result))
  if _CEILING_CLIPS.value > 0:
    fit_clips = sprites_eval.render_clips(range(_CEILING_CLIPS.value), sprites_eval.world_config(config))
    ceiling, ceiling_motion = head_ceiling(model, fit_clips, clips)
    result["head_ceiling"] = {"rank": int(config.model.dim), "fit_clips": len(fit_clips), "psnr": ceiling,
                              "motion": ceiling_motion}
    print(f"head ceiling (each token in the best {config.model.dim}-dim affine subspace of patch space, fitted on "
          f"{len(fit_clips)} training clips): {ceiling['all']:.2f} / {ceiling['background']:.2f} / "
          f"{ceiling['sprites']:.2f} dB, EPE {ceiling_motion['epe']:.2f} px, lead by place "
          f"{format_lead(ceiling_motion['lead_by_place'])}")
  if _OUT.value:
    io_utils.atomic_write_bytes(_OUT.value, json.dumps(result, indent=2).encode())
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=io_utils.parse_flags)
