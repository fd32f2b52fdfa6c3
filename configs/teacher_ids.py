"""The tiny teacher that follows points by their track IDs (docs/teacher_ids.md), in one run.

  python -m msjax.bench.id_routing --track_input_scale 32 --steps 500 --save_params runs/tiles_x32   # ~12 min
  python train.py --config configs/teacher_ids.py          # resumes from its newest checkpoint when relaunched

Its step 8,500 ships as checkpoints/tiny_teacher_ids (README "Following track IDs").

`configs/teacher.py` plus what the CPU experiments found the toy teacher needs to read IDs: the track grid scaled
32x as the track head reads it (at scale 1 the IDs drown in the noisy latent), the tile run above as the start
(the sprite worlds alone do not start ID reading), smooth or jump clips with even odds (so reading IDs keeps
paying), and sub-cell offsets in the track grid. It trains at a constant learning rate on clips rendered as they
are read, so it can go on across sessions; end a copy with `--config.optim.schedule=wsd`.

Score it on the issue's protocol (smooth clips) with the same config and `--config.data.sprite_motion=smooth`:
this config's `mixed` would otherwise make half the held-out clips jump clips.
"""

from __future__ import annotations

import ml_collections

from configs import teacher
from msjax import config_utils


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = teacher.get_config(preset or "tiny")
  if c.preset != "tiny":
    # The scale and the tile start answer the tiny patch embedding's crowding; Wan's 1,536-wide one reads IDs.
    raise config_utils.ConfigError(f"configs/teacher_ids.py is a recipe for the tiny preset, got {c.preset!r}; "
                                   "use configs/teacher.py for the others")
  c.workdir = "runs/teacher_ids_tiny"
  c.init_checkpoint = "runs/tiles_x32"
  c.model.track_input_scale = 32.0
  c.tracks.splat = "nearest_offset"
  c.data.sprite_motion = "mixed"
  c.data.dataset = "sprites_rendered"
  c.data.num_train = 1_000_000
  c.optim.schedule = "constant"
  c.optim.learning_rate = 3e-4
  c.train.steps = 40_000
  c.train.eval_every = 600
  c.train.checkpoint_every = 100
  # The eval hook's ID gap needs many clips and draws to rise above noise; t = 0.95 is where it shows.
  c.eval.batch_size = 32
  c.eval.id_draws = 4
  c.eval.timesteps = (0.95,)
  c.eval.num_samples = 0
  return c
