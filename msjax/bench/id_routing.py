"""Can the tiny teacher route content by track ID? A short training run on a world where only IDs can tell.

Each clip is a mosaic of random-colour tiles, one tile per token (8x8 px in the tiny preset). After frame 0 the
tiles are shuffled among themselves and the 16x16 grid tracks move with their tiles, so every latent cell still
holds one point and the track grid says nothing except through its IDs where each tile went. `--tiles identity`
leaves the tiles in place: the positive control, solvable by position alone. The run is the teacher's own loss,
train step and eval hook (`msjax.train.teacher`) on these clips; what it prints at each eval is the validation
loss at t = 0.95 (where the noisy clip no longer shows the colours) as given, with the IDs shuffled after frame 0,
and with the IDs relabelled in every frame. A model that follows IDs scores the shuffle far worse than the
relabelling; one that does not scores all three alike, near the loss of predicting each tile's mean colour.

  JAX_PLATFORMS=cpu python -m msjax.bench.id_routing --track_input_scale 32 --steps 500
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np

from configs import teacher as teacher_config
from msjax import codecs
from msjax import config_utils
from msjax.convert import common as convert_common
from msjax.data import pipeline
from msjax.data import tracks as tracks_lib
from msjax.models import dit
from msjax.models import text as text_lib
from msjax.train import sharding
from msjax.train import state as state_lib
from msjax.train import teacher

TILE_MODES = ("shuffled", "identity")
EVAL_T = 0.95


def probe_config(track_input_scale: float, batch_size: int, learning_rate: float, seed: int,
                 preset: str = "tiny") -> ml_collections.ConfigDict:
  """The teacher's config on the shortest clip with one latent frame after frame 0, every track kept."""
  config = teacher_config.get_config(preset)
  config.video.num_frames = 1 + config.codec.temporal_stride
  config.model.track_input_scale = track_input_scale
  config.tracks.min_tracks = config.tracks.max_tracks = config.tracks.grid ** 2
  config.tracks.mask_prob = 0.0
  config.dropout.text = config.dropout.motion = 0.0
  config.optim.schedule = "constant"
  config.optim.learning_rate = learning_rate
  config.train.batch_size = batch_size
  config.eval.timesteps = (EVAL_T,)
  config.eval.id_draws = 1
  config.eval.num_samples = 0
  config.seed = seed
  return config


def tile_clip(rng: np.random.Generator, config: ml_collections.ConfigDict, tiles: str) -> dict[str, np.ndarray]:
  """One host example in the pipeline's fields: video, all grid tracks with fresh IDs, an empty prompt."""
  geo = config_utils.geometry(config)
  tile = config.codec.spatial_stride * config.model.patch_size[1]  # pixels per token side
  rows, cols = geo.height // tile, geo.width // tile
  colours = rng.integers(0, 256, (rows * cols, 3), dtype=np.uint8)
  destination = rng.permutation(rows * cols) if tiles == "shuffled" else np.arange(rows * cols)
  moved = np.empty_like(colours)
  moved[destination] = colours

  def mosaic(tile_colours: np.ndarray) -> np.ndarray:
    return tile_colours.reshape(rows, cols, 3).repeat(tile, axis=0).repeat(tile, axis=1)

  video = np.stack([mosaic(colours)] + [mosaic(moved)] * (geo.num_frames - 1))
  start = tracks_lib.grid_points(geo.height, geo.width, config.tracks.grid)
  source = (start[:, 1] // tile).astype(int) * cols + (start[:, 0] // tile).astype(int)
  target = destination[source]
  offset = start - np.stack([source % cols, source // cols], axis=-1) * tile
  later = np.stack([target % cols, target // cols], axis=-1) * tile + offset
  points = np.stack([start] + [later] * (geo.num_frames - 1)).astype(np.float32)
  ids = tracks_lib.random_track_ids(rng, len(start), config.tracks.max_id)
  return {pipeline.VIDEO: video, pipeline.TRACK_POINTS: points,
          pipeline.TRACK_VISIBLE: np.ones(points.shape[:2], bool),
          pipeline.TRACK_EMBEDDINGS: tracks_lib.track_embeddings(ids, config.tracks.embed_dim),
          "prompt": np.array("")}


def tile_batch(rng: np.random.Generator, config: ml_collections.ConfigDict, tiles: str,
               size: int) -> dict[str, np.ndarray]:
  clips = [tile_clip(rng, config, tiles) for _ in range(size)]
  return {name: np.stack([clip[name] for clip in clips]) for name in clips[0]}


def run(config: ml_collections.ConfigDict, tiles: str, steps: int, eval_every: int, eval_clips: int,
        save_params: str = "") -> list[dict[str, float]]:
  """Trains from scratch for `steps` and returns the eval rows (step, seconds, the three t = 0.95 losses).

  `save_params`: a folder to write the trained DiT params to, in the form `config.init_checkpoint` reads, so a
  teacher run can start from a model that already routes by ID.
  """
  if tiles not in TILE_MODES:
    raise ValueError(f"tiles must be one of {TILE_MODES}, got {tiles!r}")
  if save_params and pathlib.Path(save_params).exists():
    raise FileExistsError(f"{save_params} already exists; give save_params a new folder")
  mesh = sharding.make_mesh(config.mesh)
  model = dit.WanDiT(dit.DiTSpec.from_config(config))
  text_encoder = text_lib.make_text_encoder(config)
  frozen_text_params = None if text_encoder.trainable else text_encoder.init_params()
  null_context = None if text_encoder.trainable else text_encoder.null_context(frozen_text_params)[0]
  tx = state_lib.make_optimizer(config.optim, steps)
  params_key, state_key = jax.random.split(jax.random.PRNGKey(config.seed))
  state = state_lib.create_train_state(teacher.init_params(config, model, text_encoder, params_key), tx, state_key)
  step_fn = jax.jit(teacher.make_train_step(model, text_encoder, teacher.TeacherObjective.from_config(config), tx,
                                            config.optim.ema_decay, config.train.grad_accum,
                                            state_lib.learning_rate_schedule(config.optim, steps)))
  preparer = teacher.BatchPreparer(mesh, text_encoder, frozen_text_params, config, codecs.make_codec(config))
  rng = np.random.default_rng(config.seed)
  validation = tile_batch(np.random.default_rng(config.seed + 1), config, tiles, eval_clips)
  with tempfile.TemporaryDirectory() as workdir:
    evaluate = teacher.TeacherEval(config, workdir, model, text_encoder, frozen_text_params, preparer, validation)
    rows, start = [], time.time()
    for step in range(steps + 1):
      if step % eval_every == 0 or step == steps:
        losses = evaluate(step, state)
        row = {"step": step, "seconds": time.time() - start, "given": losses[f"val_loss_t{EVAL_T:g}"],
               "shuffled_ids": losses[f"{teacher.SHUFFLED_IDS_LOSS}_t{EVAL_T:g}"],
               "relabelled_ids": losses[f"{teacher.RELABELLED_IDS_LOSS}_t{EVAL_T:g}"]}
        rows.append(row)
        print(f"step {step:5d} ({row['seconds']:5.0f} s)  val loss at t = {EVAL_T}: given {row['given']:.4f}  "
              f"IDs shuffled after frame 0 {row['shuffled_ids']:.4f}  IDs relabelled {row['relabelled_ids']:.4f}",
              flush=True)
      if step == steps:
        break
      state, _ = step_fn(state, preparer(tile_batch(rng, config, tiles, config.train.batch_size)), null_context)
  if save_params:
    print(f"wrote {convert_common.save_params(jax.device_get(state.params[teacher.DIT_PARAMS]), save_params)}")
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--track_input_scale", type=float, default=1.0, help="config.model.track_input_scale")
  parser.add_argument("--tiles", choices=TILE_MODES, default="shuffled")
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--learning_rate", type=float, default=5e-4)
  parser.add_argument("--eval_every", type=int, default=250)
  parser.add_argument("--eval_clips", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--save_params", default="",
                      help="write the trained DiT params here (for --config.init_checkpoint of a teacher run)")
  args = parser.parse_args(argv)
  config = probe_config(args.track_input_scale, args.batch_size, args.learning_rate, args.seed)
  print(f"tiles {args.tiles}, track_input_scale {args.track_input_scale:g}, {config.video.num_frames} frames, "
        f"batch {args.batch_size}, lr {args.learning_rate:g}", flush=True)
  run(config, args.tiles, args.steps, args.eval_every, args.eval_clips, args.save_params)
  return 0


if __name__ == "__main__":
  sys.exit(main())
