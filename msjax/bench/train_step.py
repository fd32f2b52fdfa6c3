"""Time a stage's training step: `python -m msjax.bench.train_step --config configs/teacher.py [--config.k=v]`.

Any stage `train.py` runs: `configs/teacher.py`, or `configs/distill.py` with `--config.stage=causal_init` (reads
`ode_pairs.dir`) or `dmd` (reads `teacher_checkpoint` and `dmd.init_checkpoint`). Builds what `train.py` builds for
the config (the stage module's `build_stage`: model, optimizer, sharded state, jitted step) with a fresh state,
and times the step on batches from the training pipeline, blocking on each result. Prints the compile time; the
step's mean ± std, min and max over --steps; clips per second (a DMD step reads 1 + dmd.critic_steps batches of
conditionings, each streamed by the generator); the host batch and device preparation times (outside the step);
and, for the teacher and causal adaptation, the achieved GFLOP/s against the model's matmul FLOPs: 3 x one
full-clip forward per clip (`msjax.bench.stream.dit_flops`; the backward counted as two forwards). DMD's FLOPs
depend on each chunk's random exit step and are not counted. Nothing is written unless --json. The loss is
printed too, so a broken step is not timed as a fast one.
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
from msjax.train import causal_init
from msjax.train import dmd
from msjax.train import teacher

_CONFIG = config_flags.DEFINE_config_file("config", "configs/teacher.py", "Stage config (file[:preset]).",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps, after one compiling step")
_JSON = flags.DEFINE_string("json", "", "also write the result here (atomically)")

GIGA = 1e9


STAGES = ("teacher", causal_init.STAGE, dmd.STAGE)


def build(config) -> tuple[Any, Any]:
  """(the config as the stage reads it, the stage `train.py` would run for `config.stage`)."""
  if config.stage == "teacher":
    return config, teacher.build_stage(config)
  if config.stage == causal_init.STAGE:
    resolved = causal_init.stage_config(config, causal_init.STAGE)
    return resolved, causal_init.build_stage(resolved)
  if config.stage == dmd.STAGE:
    resolved = dmd.stage_config(config)
    return resolved, dmd.build_stage(resolved)
  raise config_utils.ConfigError(f"config.stage must be one of {', '.join(STAGES)}, got {config.stage!r}")


def step_flops(config) -> float | None:
  """Matmul FLOPs of one training step: the batch's full-clip forwards, x3 for the backward (None for DMD)."""
  if config.stage == dmd.STAGE:
    return None
  frames = config_utils.geometry(config).latent_frames
  return 3.0 * config.train.batch_size * stream_bench.dit_flops(config, frames, frames)


def run(config, steps: int) -> dict[str, Any]:
  """Compiles the step, then times `steps` more; returns the figures `main` prints."""
  if steps < 1:
    raise ValueError(f"--steps must be at least 1, got {steps}")
  config, stage = build(config)
  iterator = stage.make_iterator()
  state = stage.fresh_state()
  start = time.perf_counter()
  first_batch = next(iterator)
  clips_per_step = len(first_batch["prompt"])
  state, metrics = stage.train_step(state, stage.preparer(first_batch))
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
      "stage": config.stage,
      "device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "devices": jax.device_count(),
      "preset": config.preset, "batch_size": int(config.train.batch_size), "clips_per_step": clips_per_step,
      "num_frames": int(config.video.num_frames), "dtype": config.model.dtype,
      "attention": config.model.attention, "scan_layers": bool(config.model.scan_layers), "steps": steps,
      "compile_s": compile_seconds,
      "step_ms_mean": float(step_seconds.mean() * ms),
      "step_ms_std": float(step_seconds.std() * ms),
      "step_ms_min": float(step_seconds.min() * ms),
      "step_ms_max": float(step_seconds.max() * ms),
      "clips_per_s": float(clips_per_step / step_seconds.mean()),
      "host_batch_ms": float(np.mean(host) * ms), "prepare_ms": float(np.mean(prepare) * ms),
      "gflop_per_step": None if flops is None else flops / GIGA,
      "achieved_gflop_s": None if flops is None else float(flops / step_seconds.mean() / GIGA),
      "loss_first": losses[0], "loss_last": losses[-1],
  }


def format_result(r: dict[str, Any]) -> str:
  if r["gflop_per_step"] is None:
    compute = "not counted (each chunk's rollout stops at a random exit step)"
  else:
    compute = (f"{r['gflop_per_step']:.0f} GFLOP per step (matmuls, backward = 2 forwards), "
               f"{r['achieved_gflop_s']:.1f} GFLOP/s")
  return "\n".join([
      f"{r['preset']} {r['stage']} step, batch {r['batch_size']} x {r['num_frames']} frames, {r['dtype']}, "
      f"{r['attention']} attention, layers {'scanned' if r['scan_layers'] else 'unrolled'}, on {r['devices']} x "
      f"{r['device']} ({r['platform']}), {r['steps']} steps",
      f"  compile        {r['compile_s']:.1f} s (with the first step)",
      f"  step           {r['step_ms_mean']:.0f} ± {r['step_ms_std']:.0f} ms "
      f"(min {r['step_ms_min']:.0f}, max {r['step_ms_max']:.0f})",
      f"  clips/s        {r['clips_per_s']:.2f} ({r['clips_per_step']} per step)",
      f"  outside step   host batch {r['host_batch_ms']:.0f} ms, device preparation {r['prepare_ms']:.0f} ms",
      f"  compute        {compute}",
      f"  loss           {r['loss_first']:.4f} -> {r['loss_last']:.4f}",
  ])


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  try:
    result = run(config, _STEPS.value)
  except (ValueError, FileNotFoundError) as e:  # config, checkpoint and pairs errors are ValueErrors
    io_utils.exit_bad_input(str(e))
  print(format_result(result))
  if _JSON.value:
    io_utils.atomic_write_bytes(_JSON.value, (json.dumps(result, indent=1) + "\n").encode())


if __name__ == "__main__":
  app.run(main, flags_parser=io_utils.parse_flags)
