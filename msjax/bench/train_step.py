"""Time the teacher's training step: `python -m msjax.bench.train_step --config configs/teacher.py [--config.k=v]`.

Builds what `train.py` builds for the config (`teacher.build_stage`: model, optimizer, sharded state, jitted
step) with a fresh state, and times the step (forward, backward, AdamW, EMA) on batches from the training
pipeline, blocking on each result. Prints the compile time; the step's mean ± std, min and max over --steps;
clips per second; the host batch and device preparation times (outside the step); and the achieved GFLOP/s
against the model's matmul FLOPs, 3 x one forward (`msjax.bench.stream.dit_flops`; the backward counted as two
forwards). Nothing is written unless --json. The loss is printed too, so a broken step is not timed as a fast one.
"""

from __future__ import annotations

import json
import time
from typing import Any

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from msjax import config_utils
from msjax import io_utils
from msjax.bench import stream as stream_bench
from msjax.train import teacher

_CONFIG = config_flags.DEFINE_config_file("config", "configs/teacher.py", "Teacher config (file[:preset]).",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps, after one compiling step")
_JSON = flags.DEFINE_string("json", "", "also write the result here (atomically)")

GIGA = 1e9


def step_flops(config) -> float:
  """Matmul FLOPs of one training step: the batch's full-clip forwards, x3 for the backward."""
  frames = config_utils.geometry(config).latent_frames
  return 3.0 * config.train.batch_size * stream_bench.dit_flops(config, frames, frames)


def run(config, steps: int) -> dict[str, Any]:
  """Compiles the step, then times `steps` more; returns the figures `main` prints."""
  if steps < 1:
    raise ValueError(f"--steps must be at least 1, got {steps}")
  stage = teacher.build_stage(config)
  iterator = teacher.train_iterator(config, stage.codec)
  state = stage.fresh_state()
  start = time.perf_counter()
  state, metrics = stage.train_step(state, stage.preparer(next(iterator)))
  jax.block_until_ready(state)
  compile_seconds = time.perf_counter() - start
  host, prepare, step, losses = [], [], [], []
  for _ in range(steps):
    start = time.perf_counter()
    host_batch = next(iterator)
    fetched = time.perf_counter()
    batch = jax.block_until_ready(stage.preparer(host_batch))
    prepared = time.perf_counter()
    state, metrics = stage.train_step(state, batch)
    jax.block_until_ready(state)
    done = time.perf_counter()
    host.append(fetched - start)
    prepare.append(prepared - fetched)
    step.append(done - prepared)
    losses.append(float(metrics["loss"]))
  step_seconds = np.asarray(step)
  flops = step_flops(config)
  ms = io_utils.MS_PER_SECOND
  return {
      "device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "devices": jax.device_count(),
      "preset": config.preset, "batch_size": int(config.train.batch_size),
      "num_frames": int(config.video.num_frames), "dtype": config.model.dtype,
      "attention": config.model.attention, "steps": steps, "compile_s": compile_seconds,
      "step_ms_mean": float(step_seconds.mean() * ms),
      "step_ms_std": float(step_seconds.std() * ms),
      "step_ms_min": float(step_seconds.min() * ms),
      "step_ms_max": float(step_seconds.max() * ms),
      "clips_per_s": float(config.train.batch_size / step_seconds.mean()),
      "host_batch_ms": float(np.mean(host) * ms), "prepare_ms": float(np.mean(prepare) * ms),
      "gflop_per_step": flops / GIGA, "achieved_gflop_s": float(flops / step_seconds.mean() / GIGA),
      "loss_first": losses[0], "loss_last": losses[-1],
  }


def format_result(r: dict[str, Any]) -> str:
  return "\n".join([
      f"{r['preset']} teacher step, batch {r['batch_size']} x {r['num_frames']} frames, {r['dtype']}, "
      f"{r['attention']} attention, on {r['devices']} x {r['device']} ({r['platform']}), {r['steps']} steps",
      f"  compile        {r['compile_s']:.1f} s (with the first step)",
      f"  step           {r['step_ms_mean']:.0f} ± {r['step_ms_std']:.0f} ms "
      f"(min {r['step_ms_min']:.0f}, max {r['step_ms_max']:.0f})",
      f"  clips/s        {r['clips_per_s']:.2f}",
      f"  outside step   host batch {r['host_batch_ms']:.0f} ms, device preparation {r['prepare_ms']:.0f} ms",
      f"  compute        {r['gflop_per_step']:.0f} GFLOP per step (matmuls, backward = 2 forwards), "
      f"{r['achieved_gflop_s']:.1f} GFLOP/s",
      f"  loss           {r['loss_first']:.4f} -> {r['loss_last']:.4f}",
  ])


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  if config.stage != "teacher":
    io_utils.exit_bad_input(f"--config: this benchmark times the teacher's step; the config's stage is "
                            f"{config.stage!r}")
  try:
    result = run(config, _STEPS.value)
  except ValueError as e:
    io_utils.exit_bad_input(str(e))
  print(format_result(result))
  if _JSON.value:
    io_utils.atomic_write_bytes(_JSON.value, (json.dumps(result, indent=1) + "\n").encode())


if __name__ == "__main__":
  app.run(main, flags_parser=io_utils.parse_flags)
