"""Causal student (paper section 4): ODE pairs -> causal adaptation -> Self Forcing + DMD.

The three steps, in order (each reads what the previous one wrote):
  1. python -m msjax.train.ode_pairs --config configs/distill.py[:preset]      teacher ODE pairs -> ode_pairs.dir
  2. python train.py --config configs/distill.py[:preset]                      stage 'causal_init' (the default)
  3. python train.py --config configs/distill.py[:preset] --config.stage=dmd   Self Forcing + DMD
Step 1 resumes (finished shards are kept); steps 2 and 3 resume from their workdir's newest checkpoint.

Each stage keeps its own `workdir`, `train` and optimizer settings in its section (`causal_init`, `dmd`), so
switching `stage` alone switches every default; the stage copies its `train` section to the top level, where the
shared training loop reads it. Override with e.g. `--config.causal_init.train.steps=100`.

Tiny preset budget on a 2-core CPU, from steps measured while the CPU was shared (load ~5; an idle machine is
about 2x faster): ODE pairs 167 s per shard of 8 clips incl. compilation -> 32 shards; causal_init 5.3 s per
step at batch 4 (~3-4 s at batch 8 idle) -> 800 steps; DMD 35 s per step (1 generator + 5 critic updates at batch
2) -> 120 steps. Each of the three is sized to finish within about an hour on an idle machine.
"""

from __future__ import annotations

import ml_collections

from configs import teacher

STAGES = ("causal_init", "dmd")
# Teacher sections the student stages do not read: they get their own per-stage copies below.
TEACHER_ONLY_SECTIONS = ("train", "optim", "workdir", "init_checkpoint", "init_grow_layers", "dropout")


def _train_section(steps: int, batch_size: int, eval_every: int, checkpoint_every: int,
                   log_every: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(steps=steps, batch_size=batch_size, grad_accum=1, log_every=log_every,
                                        eval_every=eval_every, checkpoint_every=checkpoint_every,
                                        keep_checkpoints=3))


def _optim_section(learning_rate: float, b1: float, grad_clip: float, ema_decay: float,
                   warmup_steps: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(learning_rate=learning_rate, warmup_steps=warmup_steps, b1=b1, b2=0.999,
                                        weight_decay=0.01, grad_clip=grad_clip, ema_decay=ema_decay,
                                        schedule="constant", cooldown_steps=0))


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = teacher.get_config(preset or "tiny")
  tiny = c.preset == "tiny"
  for name in TEACHER_ONLY_SECTIONS:
    del c[name]
  c.stage = "causal_init"  # causal_init | dmd
  c.teacher_checkpoint = f"runs/teacher_{c.preset}"  # training workdir or exported model (its EMA params)

  # 1. Teacher ODE pairs (msjax.train.ode_pairs). Sampled with the joint guidance of `c.guidance` (mode, w_t, w_m)
  # by Euler over `euler_steps` shifted steps; the states at the student's timesteps are stored, exactly on the
  # Euler grid when euler_steps is a multiple of stream.num_steps.
  c.ode_pairs = ml_collections.ConfigDict()
  c.ode_pairs.dir = f"data/ode_pairs_{c.preset}"
  c.ode_pairs.num_pairs = 256 if tiny else 4000
  c.ode_pairs.shard_size = 8 if tiny else 16  # clips sampled together and written as one shard file
  c.ode_pairs.euler_steps = 24 if tiny else 48
  c.ode_pairs.seed = 1  # data order and noise (the teacher used config.seed)

  # 2. Causal adaptation: regress the teacher's clean result from the stored states under block-causal masks with
  # sink / window chunk counts drawn per batch from these inclusive ranges ("diverse masks"). Every drawn pair
  # must be streamable: sink + window >= 1.
  c.causal_init = ml_collections.ConfigDict()
  c.causal_init.workdir = f"runs/causal_init_{c.preset}"
  c.causal_init.sink_range = (0, 2) if tiny else (0, 3)
  c.causal_init.window_range = (1, 3) if tiny else (1, 6)
  c.causal_init.num_validation = 8  # the last pairs of the set are held out for the validation loss
  c.causal_init.train = _train_section(steps=800 if tiny else 2000, batch_size=8 if tiny else 128,
                                       eval_every=200 if tiny else 500, checkpoint_every=200 if tiny else 250,
                                       log_every=25)
  c.causal_init.optim = _optim_section(learning_rate=1e-4 if tiny else 2e-6, b1=0.9, grad_clip=1.0,
                                       ema_decay=0.99, warmup_steps=50)

  # 3. Self Forcing + DMD. The generator (student) starts from `init_checkpoint` (causal_init's output), the critic
  # from the teacher. One training step = one generator update + `critic_steps` critic updates, each on a fresh
  # batch of `train.batch_size` conditionings and a fresh self-rollout.
  c.dmd = ml_collections.ConfigDict()
  c.dmd.workdir = f"runs/dmd_{c.preset}"
  c.dmd.init_checkpoint = f"runs/causal_init_{c.preset}"
  c.dmd.critic_steps = 5
  c.dmd.timestep_min = 0.02  # the re-noising t = shift(u), u ~ U[0, 1), clamped to [min, max] (Self Forcing)
  c.dmd.timestep_max = 0.98
  c.dmd.guidance_mode = "joint"  # the real score: the frozen teacher with joint text-motion guidance
  c.dmd.text_scale = 3.0  # w_t
  c.dmd.motion_scale = 1.5  # w_m
  # Rollout cache: stream.sink_chunks / stream.window_chunks (c3s1w1), or drawn per step from these ranges.
  c.dmd.random_sink_window = False
  c.dmd.sink_range = (1, 2)
  c.dmd.window_range = (1, 2)
  c.dmd.train = _train_section(steps=120 if tiny else 400, batch_size=2 if tiny else 64,
                               eval_every=40 if tiny else 100, checkpoint_every=20 if tiny else 50,
                               log_every=5 if tiny else 10)
  # Self Forcing: AdamW with beta1 = 0, clip 10, generator EMA 0.99.
  c.dmd.generator_optim = _optim_section(learning_rate=2e-5 if tiny else 2e-6, b1=0.0, grad_clip=10.0,
                                         ema_decay=0.99, warmup_steps=0)
  c.dmd.critic_optim = _optim_section(learning_rate=4e-6 if tiny else 4e-7, b1=0.0, grad_clip=10.0,
                                      ema_decay=0.0, warmup_steps=0)
  return c
