"""Device mesh, FSDP parameter sharding and batch sharding: one code path from 1 CPU to many accelerators.

The mesh has two axes: `data` (pure data parallelism: parameters replicated) and `fsdp` (data parallelism with
parameters, optimizer moments and EMA sharded). The batch is split over both axes; each parameter is split
along its largest axis that the fsdp size divides, unless it is too small to be worth it. XLA inserts the
all-gathers and reduce-scatters; the step function itself is written for one device.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch axis is split over every device
DEFAULT_FSDP_MIN_SIZE = 2**16  # elements; smaller arrays are replicated (a gather costs more than it saves)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """Resolves `config.mesh` (`data`, `fsdp`; at most one of them -1 = all remaining devices)."""
  sizes = [int(mesh_config.data), int(mesh_config.fsdp)]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh needs positive sizes with at most one -1, got data={sizes[0]}, fsdp={sizes[1]}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if num_devices % known:
    raise ValueError(f"config.mesh data={sizes[0]} x fsdp={sizes[1]} does not divide the {num_devices} devices")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if sizes[0] * sizes[1] != num_devices:
    raise ValueError(f"config.mesh data={sizes[0]} x fsdp={sizes[1]} uses {sizes[0] * sizes[1]} devices, "
                     f"but {num_devices} are available; use -1 for one axis to fill")
  return sizes[0], sizes[1]


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> PartitionSpec:
  """Shards the largest axis that `fsdp_size` divides (first such on ties); replicates small arrays."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return PartitionSpec()
  candidates = [axis for axis, size in enumerate(shape) if size % fsdp_size == 0]
  if not candidates:
    return PartitionSpec()
  axis = max(candidates, key=lambda a: (shape[a], -a))
  spec = [None] * len(shape)
  spec[axis] = "fsdp"
  return PartitionSpec(*spec)


def tree_shardings(mesh: Mesh, tree: Any, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
  """FSDP shardings for every array leaf of `tree` (arrays or ShapeDtypeStructs): params, optimizer
  moments and EMA all follow their shapes, so a whole TrainState gets consistent shardings."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, min_size)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all devices, other axes whole."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def shard_batch(mesh: Mesh, batch: Any) -> Any:
  """Host arrays (this process's share of the global batch) -> global arrays sharded over the batch axis."""
  sharding = batch_sharding(mesh)
  per_process = mesh.size // jax.process_count()

  def put(x: Any) -> jax.Array:
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % per_process:
      raise ValueError(f"batch array of shape {x.shape} must have a leading batch axis divisible by the "
                       f"{per_process} local devices; set train.batch_size to a multiple of it")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, batch)


def abstract_sharded(init_fn: Callable[[jax.Array], Any], mesh: Mesh, rng: jax.Array,
                     min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
  """ShapeDtypeStructs of `init_fn(rng)` carrying their FSDP shardings; allocates nothing.

  Enough to jit the step and to restore a checkpoint, so a resumed run never materialises a fresh state.
  """
  shapes = jax.eval_shape(init_fn, rng)
  shardings = tree_shardings(mesh, shapes, min_size)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def shardings_of(abstract: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, abstract)


def init_sharded(init_fn: Callable[..., Any], abstract: Any, *args: Any) -> Any:
  """Runs `init_fn(*args)` under jit so every leaf is born with the sharding in `abstract` (never
  materialised whole on one device)."""
  return jax.jit(init_fn, out_shardings=shardings_of(abstract))(*args)


def jit_train_step(train_step: Callable[..., tuple[Any, Any]], mesh: Mesh, state_shardings: Any,
                   num_constants: int = 0) -> Callable[..., tuple[Any, Any]]:
  """jit with explicit shardings: state in and out as `state_shardings`, batch split over devices, metrics
  and `num_constants` trailing arguments (e.g. the null text context) replicated; the old state's buffers
  are donated to the new one."""
  in_shardings = (state_shardings, batch_sharding(mesh)) + (replicated(mesh),) * num_constants
  return jax.jit(train_step, in_shardings=in_shardings, out_shardings=(state_shardings, replicated(mesh)),
                 donate_argnums=(0,))
