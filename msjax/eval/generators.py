"""Model generators for `python -m msjax.eval`: each turns (first frame, prompt, tracks) into a video.

  teacher   the bidirectional teacher over the whole clip: `config.guidance.sampler` (euler | renoise) over
            `config.guidance.num_steps` shifted steps with `config.guidance.mode` guidance (joint | cfg | none),
            text and motion scales from the config; the tracks as given, with shuffled IDs, none, or held
            still within latent frames (the context's `track_condition`: ablations that show what the model
            reads from them).
  student   the causal student through the streaming sampler itself (`config.stream`: chunk, sink, window,
            steps, RoPE mode), chunk by chunk; the report gets each chunk's latency too.

The checkpoint (`--checkpoint`: an exported model or a training workdir) must hold a model of the configured
preset. Track IDs and the initial noise are drawn per clip from `config.seed`, so a report is reproducible.
"""

from __future__ import annotations

import zlib

import jax
import ml_collections
import numpy as np

from msjax import config_utils
from msjax import inference
from msjax.data import tracks as tracks_lib
from msjax.eval import sprites_eval
from msjax.models import dit
from msjax.train import teacher as teacher_lib

TEACHER = "teacher"
STUDENT = "student"
DEFAULT_GUIDANCE = dict(mode="joint", text_scale=3.0, motion_scale=1.5, num_steps=50, sampler="euler")


def _load(context: sprites_eval.GeneratorContext, name: str, expected: str) -> inference.Model:
  """The generator's model from --checkpoint, with load problems reported as generator errors."""
  if not context.checkpoint:
    raise sprites_eval.GeneratorError(f"the {name} generator needs --checkpoint ({expected})")
  try:
    return inference.load_model(context.checkpoint, context.config)
  except inference.ModelError as e:
    raise sprites_eval.GeneratorError(str(e)) from e


def _clip_seed(seed: int, first_frame: np.ndarray) -> int:
  """A per-clip seed (track IDs, noise) from the config seed and the clip's first frame: reproducible reports."""
  return (seed + zlib.crc32(np.ascontiguousarray(first_frame).tobytes())) % 2**31


def guidance_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config's guidance section, or the paper's defaults when the config (e.g. a sampler's) has none."""
  if "guidance" in config:
    return config.guidance
  return ml_collections.ConfigDict(DEFAULT_GUIDANCE)


def teacher_generator(context: sprites_eval.GeneratorContext) -> sprites_eval.GenerateFn:
  """Full-clip teacher sampling with guidance; compiled once, then one call per clip."""
  config = context.config
  model = _load(context, TEACHER, "a training workdir such as runs/teacher_tiny, or an exported model folder")
  guide = guidance_config(config)
  if "flow" not in config:
    raise sprites_eval.GeneratorError("the teacher generator samples with the teacher's flow shift: pass "
                                      "--config configs/teacher.py[:preset]")
  shift = float(config.flow.shift)
  try:
    sampler = teacher_lib.sampler_name(guide)
  except ValueError as e:
    raise sprites_eval.GeneratorError(str(e)) from e
  network = dit.WanDiT(model.spec)
  geo = config_utils.geometry(config)
  seed = int(config.get("seed", 0))
  print(f"teacher: {model.stage} from {context.checkpoint}, guidance {guide.mode} (text {guide.text_scale}, "
        f"motion {guide.motion_scale}), {guide.num_steps} {sampler} steps, shift {shift}, "
        f"tracks {context.track_condition}")

  @jax.jit
  def sample_latents(params, noise, cond, null, rng):
    return teacher_lib.sample(network, params, noise, cond, null, guide, shift, rng)

  def generate(first_frame: np.ndarray, prompt: str, tracks: tracks_lib.Tracks, num_frames: int) -> np.ndarray:
    if tracks.num_frames != num_frames:
      raise sprites_eval.GeneratorError(f"teacher: tracks have {tracks.num_frames} frames, asked for {num_frames}")
    latent_frames = config_utils.latent_frames(num_frames, config.codec.temporal_stride)
    clip_seed = _clip_seed(seed, first_frame)
    context_emb, null = inference.encode_prompt(model, [prompt])
    shuffled = context.track_condition == sprites_eval.TRACKS_SHUFFLED_IDS
    if context.track_condition == sprites_eval.TRACKS_LATENT_MEANS:
      tracks = tracks_lib.Tracks(
          points=tracks_lib.latent_frame_means(tracks.points, config.codec.temporal_stride), visible=tracks.visible)
    grid = None if context.track_condition == sprites_eval.TRACKS_NONE else inference.track_grid(
        tracks, config, seed=clip_seed, shuffle_later_ids=shuffled)
    cond = inference.conditioning(model, context_emb, inference.first_latent(model, first_frame), grid)
    key = jax.random.PRNGKey(clip_seed)
    noise = jax.random.normal(key, (1, latent_frames, geo.latent_height, geo.latent_width, geo.latent_channels))
    latents = sample_latents(model.dit_params, noise, cond, null, jax.random.fold_in(key, 1))
    video = model.codec.decode(model.codec_params, latents)
    return np.asarray(inference.to_uint8(video[0]))

  return generate


def student_generator(context: sprites_eval.GeneratorContext) -> sprites_eval.GenerateFn:
  """Streams each clip with one compiled `StreamSampler` (warmed up first, so latencies exclude compiling)."""
  from msjax.stream import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  if context.track_condition != sprites_eval.TRACKS_GIVEN:
    raise sprites_eval.GeneratorError(f"the student generator streams the tracks as given; track condition "
                                      f"{context.track_condition!r} is for the teacher")
  config = context.config
  model = _load(context, STUDENT, "an exported student or a distillation workdir")
  sampler = sampler_lib.StreamSampler(model)
  s = config.stream
  print(f"student: {model.stage} from {context.checkpoint}, c{s.chunk_frames}s{s.sink_chunks}w{s.window_chunks}, "
        f"{s.num_steps} steps, RoPE {s.rope_mode}; compiled in {sampler.warmup():.1f} s")
  seed = int(config.get("seed", 0))

  def generate(first_frame: np.ndarray, prompt: str, tracks: tracks_lib.Tracks, num_frames: int) -> dict:
    clip_seed = _clip_seed(seed, first_frame)
    chunks = list(sampler_lib.stream_chunks(model, first_frame, prompt, tracks, num_frames, seed=clip_seed,
                                            sampler=sampler))
    return {"video": np.concatenate([chunk.frames for chunk in chunks]),
            "chunk_seconds": [chunk.seconds for chunk in chunks]}

  return generate


sprites_eval.register_generator(TEACHER, teacher_generator)
sprites_eval.register_generator(STUDENT, student_generator)
