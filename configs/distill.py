"""Causal student (paper section 4): ODE-pair causal adaptation, then Self Forcing + DMD.

`python train.py --config configs/distill.py[:preset] --config.stage=causal_init|dmd`
"""

from __future__ import annotations

import ml_collections

from configs import teacher


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = teacher.get_config(preset)
  c.stage = "dmd"  # causal_init | dmd
  c.workdir = f"runs/distill_{c.preset}"
  c.teacher_checkpoint = f"runs/teacher_{c.preset}"

  c.causal_init = ml_collections.ConfigDict()
  c.causal_init.num_ode_pairs = 4000
  c.causal_init.steps = 2000
  c.causal_init.learning_rate = 2e-6 if c.preset != "tiny" else 1e-4
  c.causal_init.random_sink_window = True  # the "diverse masks" of causal adaptation

  c.dmd = ml_collections.ConfigDict()
  c.dmd.steps = 400
  c.dmd.generator_lr = 2e-6 if c.preset != "tiny" else 2e-5
  c.dmd.critic_lr = 4e-7 if c.preset != "tiny" else 4e-6
  c.dmd.critic_updates = 5  # critic steps per generator step
  c.dmd.batch_size = 64 if c.preset != "tiny" else 4
  c.dmd.timestep_min = 0.02
  c.dmd.timestep_max = 0.98
  c.dmd.random_sink_window = False
  return c
