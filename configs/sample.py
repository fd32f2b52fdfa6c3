"""Streaming sampler defaults: `python sample.py --tracks tracks.npy [--config configs/sample.py:preset]`."""

from __future__ import annotations

import ml_collections

from configs import models


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = models.get_preset(preset or "tiny")
  c.checkpoint = f"checkpoints/{c.preset}_student"
  c.decoder = c.codec.name
  c.seed = 0
  return c
