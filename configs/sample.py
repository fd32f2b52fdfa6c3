"""Streaming sampler defaults: `python sample.py --tracks tracks.npy [--config configs/sample.py:preset]`.

Command-line flags of sample.py override the stream settings here (--steps, --sink, --window, --seed, ...).
"""

from __future__ import annotations

import os

import ml_collections

from configs import models
from configs import teacher


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = models.get_preset(preset or "tiny")
  # The shipped student (an exported model folder; a distillation workdir works too), found from any directory.
  c.checkpoint = os.path.join(REPO_ROOT, "checkpoints", f"{c.preset}_student")
  c.decoder = c.codec.name  # pack | wan | taehv: the codec that encodes the first frame and decodes chunks
  c.decoder_checkpoint = ""  # converted VAE / TAEHV params (python -m msjax.convert wan_vae|taehv ...)
  c.seed = 0  # track IDs and noise
  c.out = ""  # "" = out/sample.mp4 (out/sample.gif without imageio-ffmpeg)
  # The student's timesteps are shift(1 - k/K) (msjax.diffusion.flow.consistency_timesteps): the shift the
  # teacher and its distillation were trained with.
  c.flow = ml_collections.ConfigDict()
  c.flow.shift = teacher.get_config(c.preset).flow.shift
  return c
