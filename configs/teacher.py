"""Bidirectional motion-conditioned teacher (paper section 3): `python train.py --config configs/teacher.py[:preset]`."""

from __future__ import annotations

import ml_collections

from configs import models


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = models.get_preset(preset or "tiny")
  c.stage = "teacher"
  c.seed = 0
  c.workdir = f"runs/teacher_{c.preset}"
  if c.preset == "tiny":
    # Its 4 layers unrolled: a step at batch 8 takes 2.4 s on the 2-core CPU against 2.8 s scanned (the scan
    # stacks and slices every layer's activations). The student stages keep the preset's scan: DMD's rollouts
    # ran slower unrolled (13.1 s a step against 10.3 s).
    c.model.scan_layers = False
  # DiT params to start from: converted Wan weights (python -m msjax.convert wan ...), a tile run that taught the
  # toy teacher to read track IDs (python -m msjax.bench.id_routing --save_params; docs/teacher_ids.md), or
  # another run's EMA params (its workdir or exported folder), to go on under a new schedule. "" = random init.
  c.init_checkpoint = ""
  # Start a deeper model from a shallower init_checkpoint: its blocks spaced evenly, identity blocks between
  # (msjax.train.teacher.grow_blocks); num_layers must be a multiple of the source's.
  c.init_grow_layers = False

  c.data = ml_collections.ConfigDict()
  # sprites: a tfds dataset prepared once under data_dir; sprites_rendered: the same clips rendered as they are
  # read (nothing prepared, any num_train up to 1e6; for long runs); video_folder: your clips (data_dir caches).
  c.data.dataset = "sprites"
  c.data.data_dir = "data/tfds"
  c.data.video_folder = ""  # folder of name.mp4 + name.npz (+ name.txt) clips for dataset=video_folder
  # tfds (without TensorFlow) must hold a split in its 1 GB write buffer: ~95 KB per 64x64x45 clip -> <= ~10k.
  c.data.num_train = 8000
  c.data.num_validation = 128
  c.data.worker_count = 0
  # smooth: the sprites world. jump: sprites jump to a random place every latent frame, so only track IDs tell
  # them apart (a diagnostic for ID following; msjax.data.sprites). mixed: smooth or jump per clip, even odds
  # (keeps ID reading rewarded while training for the smooth world). Also read by msjax.eval.
  c.data.sprite_motion = "smooth"
  # jump clips whose sprites also move within each latent frame (msjax.data.sprites; docs/teacher_ids.md)
  c.data.jump_drift = False

  c.flow = ml_collections.ConfigDict()
  c.flow.shift = 6.0  # timestep shift k (paper: 6.0)
  # x0 prediction turns the velocity loss into x0 error / t^2, so a rare low-t sample outweighs a batch (loss
  # spikes, clipped steps). > 0 weights each sample by min(1, t / loss_min_t)^2, capping that factor at
  # 1 / loss_min_t^2. Velocity-predicting presets keep Wan's plain loss.
  c.flow.loss_min_t = 0.25 if c.model.prediction == "x0" else 0.0
  # The share of samples whose noisy input is re-noised from the model's own x0 (no gradient) at the time
  # recycle_gap earlier on the unshifted grid, as the few-step renoise sampler feeds it (0.25 = its 4-step
  # spacing); they learn to correct their own earlier steps (msjax.train.teacher.recycled_inputs). One more
  # forward pass per step; 0 = the paper's plain objective.
  c.flow.recycle_prob = 0.0
  c.flow.recycle_gap = 0.25
  # > 0 weights the loss 1 + motion_weight where the clip changes by more than motion_threshold (latent units)
  # between neighbouring latent frames: moving sprites, a few percent of a toy clip, weigh more
  # (msjax.train.teacher.motion_weights). 0 = the paper's plain MSE.
  c.flow.motion_weight = 0.0
  c.flow.motion_threshold = 0.2

  c.dropout = ml_collections.ConfigDict()
  c.dropout.text = 0.1  # so v(null text, tracks) exists for joint guidance
  c.dropout.motion = 0.1  # so v(text, null tracks) exists

  c.guidance = ml_collections.ConfigDict()
  c.guidance.text_scale = 3.0  # w_t
  c.guidance.motion_scale = 1.5  # w_m
  c.guidance.mode = "joint"  # joint | cfg | none
  c.guidance.num_steps = 50
  # euler: the flow ODE (paper). renoise: x0 then fresh noise each step (the student's sampler); with few steps
  # it scores the undertrained tiny teacher better (README), but distillation's ODE pairs always use Euler.
  c.guidance.sampler = "euler"

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 5e-4 if c.preset == "tiny" else 1e-5
  c.optim.warmup_steps = 100
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.999
  c.optim.schedule = "cosine" if c.preset == "tiny" else "constant"  # after linear warmup: constant | cosine | wsd
  # wsd only: the linear cooldown to 0 over the last cooldown_steps before train.steps (cosine decays to 0 there).
  c.optim.cooldown_steps = 0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1200 if c.preset == "tiny" else 4800  # tiny: ~64 min on a 2-core CPU
  c.train.batch_size = 8 if c.preset == "tiny" else 128
  c.train.grad_accum = 1
  c.train.log_every = 50
  c.train.eval_every = 400
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 3

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.fsdp_min_size = 2**16  # arrays with fewer elements are replicated rather than fsdp-sharded

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 4  # fixed validation clips for the validation loss
  # Validation loss is reported at these fixed t (and their mean). At 0.95 the noisy clip hides the sprites'
  # colours, so that is where following track IDs shows first (val_loss_shuffled_ids_t0.95 clearly above
  # val_loss_relabelled_ids_t0.95).
  c.eval.timesteps = (0.25, 0.5, 0.75, 0.95)
  # Random draws averaged in val_loss_shuffled_ids and its control val_loss_relabelled_ids. On 32 clips a
  # difference under ~0.3% is noise: measure ID following with eval.batch_size >= 32 and a few draws. 0: off.
  c.eval.id_draws = 1
  c.eval.num_samples = 1  # guided samples written to <workdir>/samples per eval (0: none)
  return c
