"""The one training loop every stage runs: checkpoints, exact resume, logging and eval hooks.

A stage hands over a jitted `train_step(state, batch) -> (state, metrics)`, a grain iterator and a function
that turns a host batch into device arrays; the loop owns everything else:
  - an orbax `CheckpointManager` under `<workdir>/checkpoints`: each step directory holds the TrainState,
    the grain iterator state (grain's own orbax handler) and the config as JSON; writes are atomic (orbax
    commits a temporary directory by rename) and the newest `keep_checkpoints` are kept;
  - resume: if a checkpoint exists the state is restored with the current shardings (so a checkpoint written
    on 8 devices restores on 1) and the iterator continues where it stopped, so a killed run finishes with the
    same parameters as an uninterrupted one;
  - metrics every `log_every` steps to stdout, a tqdm bar and TensorBoard event files under `<workdir>/tb`;
  - `eval_hook(step, state)` every `eval_every` steps and at the end (the stage writes videos; returned
    scalars are logged).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from msjax.train.state import Batch, Metrics, TrainState

StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
EvalHook = Callable[[int, TrainState], Mapping[str, float] | None]

CHECKPOINT_SUBDIR = "checkpoints"
TENSORBOARD_SUBDIR = "tb"
# Config sections whose change makes a checkpoint unusable (parameter shapes or the meaning of inputs depend on them).
SHAPE_SECTIONS = ("model", "codec", "video", "tracks")
# Keys added to those sections after checkpoints had been written, with the value that reproduces how such an
# older checkpoint was trained: a side (checkpoint or config) without the key compares as holding that value.
ADDED_KEYS = {"tracks": {"splat": "nearest"}, "model": {"track_input_scale": 1.0}}
# Keys of those sections that choose how the same parameters are computed with (compute dtype, kernels, layer
# loop), not what they are: a run may resume under other values, e.g. with the layers unrolled.
EXECUTION_KEYS = {"model": ("dtype", "attention", "remat", "scan_layers")}


class CheckpointMismatchError(ValueError):
  """A checkpoint in the workdir was written for a different model than the one configured."""


def make_checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """Checkpoints under `<workdir>/checkpoints`, newest `keep` kept, half-written ones cleaned up on open."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR)), options=options,
                               item_names=("state", "data", "config"))


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: TrainState, data_iterator: Any,
                    config: ml_collections.ConfigDict) -> None:
  """Queues an atomic checkpoint of state + iterator position + config at `step`."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      config=ocp.args.JsonSave(_config_json(config))), force=True)


def _config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def check_config_compatible(saved: Mapping[str, Any], config: ml_collections.ConfigDict, where: str) -> None:
  """Fails with the differing keys when the checkpoint's model-shaping config differs from `config`."""
  current = _config_json(config)
  differences = []
  for section in SHAPE_SECTIONS:
    added = ADDED_KEYS.get(section, {})
    old, new = {**added, **saved.get(section, {})}, {**added, **current.get(section, {})}
    for key in sorted((set(old) | set(new)) - set(EXECUTION_KEYS.get(section, ()))):
      if old.get(key) != new.get(key):
        differences.append(f"{section}.{key}: checkpoint {old.get(key)!r}, config {new.get(key)!r}")
  if differences:
    raise CheckpointMismatchError(
        f"checkpoint {where} was written for a different model; use a new workdir or the same config. "
        "Differences: " + "; ".join(differences))


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, abstract_state: TrainState, data_iterator: Any,
                       config: ml_collections.ConfigDict) -> TrainState:
  """Restores `step` into the shapes and current shardings of `abstract_state` (orbax reshards as needed);
  `data_iterator` is moved to its saved position."""
  where = os.path.join(str(manager.directory), str(step))
  saved_config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  check_config_compatible(saved_config, config, where)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iterator)))
  return restored["state"]


class MetricWriter:
  """Scalars to stdout and TensorBoard; only process 0 writes."""

  def __init__(self, workdir: str):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(os.path.join(workdir, TENSORBOARD_SUBDIR))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(name, value, step)
    self._writer.flush()
    text = " ".join(f"{name}={value:.5g}" for name, value in sorted(scalars.items()))
    tqdm.tqdm.write(f"step {step}: {text}")

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def _to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {name: float(np.asarray(value)) for name, value in jax.device_get(dict(metrics)).items()}


def _due(step: int, every: int, total_steps: int) -> bool:
  """Every `every` steps and at the last step; `every` <= 0 means only at the last step."""
  return step == total_steps or (every > 0 and step % every == 0)


def train_loop(config: ml_collections.ConfigDict, workdir: str, init_state: Callable[[], TrainState],
               abstract_state: TrainState, train_step: StepFn, data_iterator: Any,
               prepare_batch: Callable[[Any], Batch], eval_hook: EvalHook | None = None) -> TrainState:
  """Runs `config.train.steps` optimizer steps, continuing from the newest checkpoint in `workdir` if any.

  `abstract_state` holds the state's shapes and shardings (`sharding.abstract_sharded`); `init_state()`
  builds a fresh, sharded state and is only called when there is nothing to resume. `train_step` is jitted
  by the stage; `data_iterator` is a grain iterator; `prepare_batch(host_batch)` returns its device batch.
  """
  train = config.train
  total_steps = int(train.steps)
  os.makedirs(workdir, exist_ok=True)
  manager = make_checkpoint_manager(workdir, int(train.keep_checkpoints))
  writer = MetricWriter(workdir)
  progress = None
  try:
    latest = manager.latest_step()
    if latest is None:
      state = init_state()
    else:
      state = restore_checkpoint(manager, latest, abstract_state, data_iterator, config)
      tqdm.tqdm.write(f"resumed from {manager.directory} at step {int(jax.device_get(state.step))}")
    step = int(jax.device_get(state.step))
    progress = tqdm.tqdm(total=total_steps, initial=step, disable=jax.process_index() != 0, dynamic_ncols=True)
    last_log_time, last_log_step = time.perf_counter(), step
    while step < total_steps:
      state, metrics = train_step(state, prepare_batch(next(data_iterator)))
      step += 1
      progress.update(1)
      if _due(step, train.log_every, total_steps):
        scalars = _to_floats(metrics)
        now = time.perf_counter()
        scalars["steps_per_second"] = (step - last_log_step) / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, step
        progress.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4g}")
        writer.write(step, scalars)
      if _due(step, train.checkpoint_every, total_steps):
        save_checkpoint(manager, step, state, data_iterator, config)
      if eval_hook is not None and _due(step, train.eval_every, total_steps):
        eval_scalars = eval_hook(step, state)
        if eval_scalars:
          writer.write(step, {f"eval/{name}": float(value) for name, value in eval_scalars.items()})
  finally:
    if progress is not None:
      progress.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return state
