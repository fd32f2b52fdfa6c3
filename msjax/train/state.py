"""Training state, optimizer and the generic update step shared by every stage (teacher, causal_init, DMD).

A stage supplies only `loss_fn(params, batch, rng) -> (loss, metrics)`; this module turns it into a pure
`train_step(state, batch) -> (state, metrics)` with gradient accumulation, global-norm clipping, AdamW with
warmup and an on-device EMA. The step draws its randomness as fold_in(state.rng, state.step), so a resumed
run sees exactly the keys an uninterrupted run would.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from msjax import config_utils

Params = Any
Batch = Any
Metrics = dict[str, jax.Array]
LossFn = Callable[[Params, Batch, jax.Array], tuple[jax.Array, Metrics]]
TrainStep = Callable[["TrainState", Batch], tuple["TrainState", Metrics]]

SCHEDULES = ("constant", "cosine", "wsd")
DECAYED_LEAVES = ("kernel", "embedding")  # flax names of Dense/Conv weights and Embed tables


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint needs to continue a run bit for bit (the optimizer itself is static)."""
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Params
  opt_state: optax.OptState
  ema_params: Params
  rng: jax.Array  # raw uint32[2] base key; per-step keys are fold_in(rng, step)


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `optim.learning_rate`, then one of:

  constant; cosine decay to 0 at `total_steps`; or wsd (warmup-stable-decay): constant, then a linear cooldown
  to 0 over the last `optim.cooldown_steps` steps before `total_steps`. The schedule is a function of the step
  alone, so a run trained at constant rate can be relaunched with a later `train.steps` and wsd to cool it down
  from its checkpoint (the optimizer state does not change shape).
  """
  schedule = optim.get("schedule", "constant")
  if schedule not in SCHEDULES:
    raise config_utils.ConfigError(f"optim.schedule must be one of {SCHEDULES}, got {schedule!r}")
  warmup = max(int(optim.warmup_steps), 0)
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, optim.learning_rate, warmup, max(total_steps, warmup + 1))
  parts = [optax.linear_schedule(0.0, optim.learning_rate, max(warmup, 1)),
           optax.constant_schedule(optim.learning_rate)]
  boundaries = [warmup]
  if schedule == "wsd":
    cooldown = int(optim.get("cooldown_steps", 0))
    cooldown_start = total_steps - cooldown
    if cooldown < 1 or cooldown_start < warmup:
      raise config_utils.ConfigError(
          f"optim.schedule='wsd' needs 1 <= optim.cooldown_steps <= train.steps - optim.warmup_steps "
          f"= {total_steps - warmup}, got cooldown_steps={cooldown}")
    parts.append(optax.linear_schedule(optim.learning_rate, 0.0, cooldown))
    boundaries.append(cooldown_start)
  return optax.join_schedules(parts, boundaries)


def _decay_mask(params: Params) -> Params:
  """Weight decay on weight matrices only (leaves named in DECAYED_LEAVES). Biases, norm scales and modulation
  tables are left alone. The choice goes by name, not rank: scanned layers stack a per-layer bias into [L, D]."""
  def is_weight(path: tuple[Any, ...], _) -> bool:
    return getattr(path[-1], "key", None) in DECAYED_LEAVES
  return jax.tree_util.tree_map_with_path(is_weight, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW on `learning_rate_schedule` (config keys: see configs/teacher.py)."""
  return optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adamw(learning_rate_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2,
                  weight_decay=optim.weight_decay, mask=_decay_mask))


def create_train_state(params: Params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """A fresh state: step 0, EMA initialised to the parameters."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params), rng=rng)


def apply_gradients(state: TrainState, grads: Params, tx: optax.GradientTransformation,
                    ema_decay: float) -> TrainState:
  """One optimizer update plus the EMA update ema <- d * ema + (1 - d) * params.

  d = min(ema_decay, (1 + step) / (10 + step)): early on the EMA follows the parameters closely, so a short run
  (the toy teacher's 1,200 steps) does not end with an average still dominated by its random initialisation.
  """
  chex.assert_trees_all_equal_shapes(state.params, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step.astype(jnp.float32)
  decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - decay)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)


def split_micro_batches(batch: Batch, num_micro_batches: int) -> Batch:
  """[B, ...] leaves -> [k, B/k, ...]; micro-batch i holds samples i, i+k, ... so a batch sharded over
  devices in contiguous blocks stays on its devices (no resharding)."""

  def split(x: jax.Array) -> jax.Array:
    if x.shape[0] % num_micro_batches:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={num_micro_batches}")
    x = x.reshape((x.shape[0] // num_micro_batches, num_micro_batches) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: LossFn, params: Params, batch: Batch, rng: jax.Array,
                         num_micro_batches: int) -> tuple[jax.Array, Metrics, Params]:
  """Mean loss, metrics and gradients over `num_micro_batches` equal micro-batches, one at a time.

  For a loss that is a per-sample mean this equals the big-batch gradient (up to float rounding) while
  only one micro-batch of activations is alive. Micro-batch i uses the key fold_in(rng, i).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro_batches == 1:
    (loss, metrics), grads = grad_fn(params, batch, jax.random.fold_in(rng, 0))
    return loss, metrics, grads

  micro_batches = split_micro_batches(batch, num_micro_batches)

  def body(totals, xs):
    index, micro_batch = xs
    out = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, totals, out), None

  first = jax.tree.map(lambda x: x[0], micro_batches)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first, rng))
  totals, _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro_batches), micro_batches))
  (loss, metrics), grads = jax.tree.map(lambda x: x / num_micro_batches, totals)
  return loss, metrics, grads


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, ema_decay: float, grad_accum: int = 1,
                    lr_schedule: optax.Schedule | None = None) -> TrainStep:
  """The pure step every stage jits: accumulate gradients, update, EMA; metrics gain grad_norm and lr."""
  if grad_accum < 1:
    raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(state.rng, state.step)
    loss, metrics, grads = accumulate_gradients(loss_fn, state.params, batch, rng, grad_accum)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
    if lr_schedule is not None:
      metrics["learning_rate"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
    return apply_gradients(state, grads, tx, ema_decay), metrics

  return train_step
