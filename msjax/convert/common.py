"""Shared machinery for turning PyTorch checkpoints into msjax parameter pytrees.

A converter is data: a table of `Rule`s (a regex on the PyTorch key -> our '/'-joined parameter path, plus a small
layout transform) checked against the parameter shapes of the Flax module, taken from
`jax.eval_shape(module.init, ...)` so nothing is allocated. The engine runs in two phases, so a wrong checkpoint is
rejected before a single tensor is read and every problem is reported at once:

  source = open_checkpoint(path)                             # keys and shapes only
  plan = plan_conversion(source, rules, expected_shapes)     # raises ConversionError listing all problems
  params = materialize(plan, source, initial={...})          # reads each tensor once into preallocated arrays

Rule conventions:
  * `pattern` must match the whole key (`re.fullmatch`).
  * A named group `layer` marks a per-layer tensor: the target has a leading layer axis (scanned blocks) and the
    tensor fills slot `int(layer)`. Every slot must be filled exactly once.
  * Other named groups fill `{name}` placeholders in `target`, so one row covers q/k/v/o alike.
  * `target=None` drops a key we know and do not need (listed in the summary, never silently).
  * `grow_axis`: the model may be wider than the checkpoint along this axis of the transformed tensor (new input
    channels); the checkpoint fills the leading entries and the rest stay zero.
  * `transform` is a plain numpy function of the tensor. Its effect on shapes is found by running it on a zero-stride
    broadcast view, so transforms must be view-like (transpose, squeeze, reshape) to plan without allocating.

Parameters with no PyTorch counterpart (msjax-only heads) are named by path prefix in `initialised=` and taken from
the module's own init in `materialize`.

Loaders give a `TensorSource` (a name for error messages, every key's shape, a reader): `open_checkpoint` reads
`.safetensors` files (or a folder of shards) through the safetensors numpy API, bf16 included, and `.pth`/`.pt`/`.bin`
through `torch.load(weights_only=True)` with torch imported only then; `from_state_dict` wraps an in-memory mapping.
`save_params` / `load_params` write and read the params pytree as an orbax checkpoint.

A converter CLI (registered in `__main__.CONVERTERS` as `fn(argv) -> exit code`) adds `add_io_arguments` to its
parser, calls `check_output_dir` before any work, and ends with `save_and_report`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

from flax import traverse_util
import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from safetensors import SafetensorError, safe_open

PathLike = str | os.PathLike
Transform = Callable[[np.ndarray], np.ndarray]
PATH_SEP = "/"
MAX_LISTED = 8  # problems listed per category before "... and N more"
SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Wrapper keys that training scripts put around a state dict; unwrapped automatically, outermost first.
STATE_DICT_WRAPPERS = ("state_dict", "model", "module")
# safetensors dtypes the numpy API cannot return; read from the raw buffer instead.
_RAW_SAFETENSORS_DTYPES = {"BF16": ml_dtypes.bfloat16}


class ConversionError(ValueError):
  """A checkpoint that does not fit the model; the message names the file and every problem found."""

  def __init__(self, source: str, problems: Mapping[str, Sequence[str]] | str, hint: str = ""):
    self.source = source
    if isinstance(problems, str):
      self.problems = {"error": [problems]}
      lines = [f"{source}: {problems}"]
    else:
      self.problems = {category: list(items) for category, items in problems.items() if items}
      lines = [f"cannot convert {source}:"]
      for category, items in self.problems.items():
        lines.append(f"  {len(items)} {category}:")
        lines.extend(f"    {item}" for item in items[:MAX_LISTED])
        if len(items) > MAX_LISTED:
          lines.append(f"    ... and {len(items) - MAX_LISTED} more")
    if hint:
      lines.append(f"  hint: {hint}")
    super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------
# Tensor sources.


@dataclasses.dataclass(frozen=True)
class TensorSource:
  """A checkpoint seen as keys with shapes; tensors are read one at a time, on demand."""
  name: str  # file path (or a description) used in every error message
  shapes: Mapping[str, tuple[int, ...]]
  read: Callable[[str], np.ndarray]

  def keys(self) -> list[str]:
    return list(self.shapes)


def from_state_dict(state: Mapping[str, Any], name: str = "<in-memory state dict>") -> TensorSource:
  """Wraps a mapping of key -> torch tensor, numpy/jax array, or shape-only value (e.g. jax.ShapeDtypeStruct)."""
  shapes = {key: tuple(int(n) for n in value.shape) for key, value in state.items()}

  def read(key: str) -> np.ndarray:
    value = state[key]
    if _is_torch_tensor(value):
      return _torch_to_numpy(value)
    if isinstance(value, jax.ShapeDtypeStruct):
      raise ConversionError(name, f"key {key!r} holds only a shape, no data")
    return np.asarray(value)

  return TensorSource(name=name, shapes=shapes, read=read)


def strip_common_prefix(source: TensorSource, prefixes: Iterable[str]) -> TensorSource:
  """Drops the first of `prefixes` that every key starts with (wrappers such as 'model.diffusion_model.')."""
  keys = source.keys()
  for prefix in prefixes:
    if keys and all(k.startswith(prefix) for k in keys):
      shapes = {k[len(prefix):]: s for k, s in source.shapes.items()}
      return TensorSource(name=source.name, shapes=shapes, read=lambda key: source.read(prefix + key))
  return source


def as_source(src: PathLike | TensorSource | Mapping[str, Any], entry: str | None = None,
              prefixes: Iterable[str] = ()) -> TensorSource:
  """A path, an in-memory state dict or a TensorSource -> a TensorSource with a wrapper prefix removed."""
  if isinstance(src, TensorSource):
    source = src
  elif isinstance(src, Mapping):
    source = from_state_dict(src)
  else:
    source = open_checkpoint(src, entry=entry)
  return strip_common_prefix(source, prefixes)


def open_checkpoint(path: PathLike, entry: str | None = None) -> TensorSource:
  """Opens a `.safetensors` file, a folder of `.safetensors` shards, or a torch pickle (`.pth`, `.pt`, `.bin`).

  `entry` selects a nested state dict inside a torch checkpoint by dotted path (e.g. 'generator_ema').
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise ConversionError(str(path), "no such file or folder")
  if entry and path.suffix not in TORCH_SUFFIXES:
    raise ConversionError(str(path),
                          f"--entry {entry!r} applies only to torch checkpoints ({', '.join(TORCH_SUFFIXES)})")
  if path.is_dir():
    shards = sorted(path.glob(f"*{SAFETENSORS_SUFFIX}"))
    if not shards:
      raise ConversionError(str(path), f"folder holds no *{SAFETENSORS_SUFFIX} files")
    return _merge_sources(str(path), [_open_safetensors(p) for p in shards])
  if path.suffix == SAFETENSORS_SUFFIX:
    return _open_safetensors(path)
  if path.suffix in TORCH_SUFFIXES:
    return _open_torch(path, entry)
  raise ConversionError(
      str(path), f"unknown checkpoint type {path.suffix!r}; expected {SAFETENSORS_SUFFIX}, "
      f"{', '.join(TORCH_SUFFIXES)} or a folder of {SAFETENSORS_SUFFIX} shards")


def _merge_sources(name: str, sources: Sequence[TensorSource]) -> TensorSource:
  owner: dict[str, TensorSource] = {}
  duplicates = []
  for source in sources:
    for key in source.shapes:
      if key in owner:
        duplicates.append(f"{key} (in {owner[key].name} and {source.name})")
      owner[key] = source
  if duplicates:
    raise ConversionError(name, {"keys found in more than one shard": duplicates},
                          hint="keep one variant of each shard in the folder")
  shapes = {key: src.shapes[key] for key, src in owner.items()}
  return TensorSource(name=name, shapes=shapes, read=lambda key: owner[key].read(key))


def _safetensors_header(path: pathlib.Path) -> tuple[dict[str, Any], int]:
  """The JSON header of a safetensors file and the byte offset where tensor data starts."""
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
  return header, 8 + header_len


def _open_safetensors(path: pathlib.Path) -> TensorSource:
  try:
    with safe_open(str(path), framework="np") as f:
      shapes, dtypes = {}, {}
      for key in f.keys():
        tensor_slice = f.get_slice(key)
        shapes[key] = tuple(tensor_slice.get_shape())
        dtypes[key] = tensor_slice.get_dtype()
  except (SafetensorError, OSError) as e:
    raise ConversionError(str(path), f"not a readable safetensors file ({e})") from e

  raw = {}  # key -> (numpy dtype, absolute byte offset), only for dtypes numpy's safetensors API rejects
  if any(d in _RAW_SAFETENSORS_DTYPES for d in dtypes.values()):
    header, data_start = _safetensors_header(path)
    for key, dtype in dtypes.items():
      if dtype in _RAW_SAFETENSORS_DTYPES:
        raw[key] = (_RAW_SAFETENSORS_DTYPES[dtype], data_start + header[key]["data_offsets"][0])

  def read(key: str) -> np.ndarray:
    if key in raw:
      dtype, offset = raw[key]
      count = int(np.prod(shapes[key], dtype=np.int64))
      return np.fromfile(path, dtype=dtype, count=count, offset=offset).reshape(shapes[key])
    with safe_open(str(path), framework="np") as f:
      try:
        return f.get_tensor(key)
      except TypeError as e:  # a dtype numpy has no name for (e.g. float8)
        raise ConversionError(str(path), f"{key}: dtype {dtypes[key]} is not supported ({e})") from e

  return TensorSource(name=str(path), shapes=shapes, read=read)


def _open_torch(path: pathlib.Path, entry: str | None) -> TensorSource:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConversionError(str(path), "reading torch checkpoints needs PyTorch (pip install torch), "
                          f"or convert the file to {SAFETENSORS_SUFFIX} first") from e
  try:
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError) for bad files
    raise ConversionError(str(path), f"torch.load(weights_only=True) failed: {e}") from e
  state = _unwrap_state_dict(obj, str(path), entry)
  return from_state_dict(state, name=str(path))


def _unwrap_state_dict(obj: Any, name: str, entry: str | None) -> dict[str, Any]:
  """Finds the flat key -> tensor mapping inside a training checkpoint."""
  for part in entry.split(".") if entry else ():
    if not isinstance(obj, Mapping) or part not in obj:
      found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
      raise ConversionError(name, f"entry {entry!r}: no {part!r} here; found {found}")
    obj = obj[part]
  while isinstance(obj, Mapping):
    wrapper = next((w for w in STATE_DICT_WRAPPERS if isinstance(obj.get(w), Mapping)), None)
    if wrapper is None:
      break
    obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ConversionError(name, f"expected a state dict (a mapping of tensors), found {type(obj).__name__}")
  state = {str(k): v for k, v in obj.items() if _is_torch_tensor(v)}
  if not state:
    raise ConversionError(name, f"no tensors at the top level; found keys {sorted(map(str, obj))[:MAX_LISTED]}",
                          hint="name the nested state dict with --entry")
  return state


def _is_torch_tensor(value: Any) -> bool:
  return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _torch_to_numpy(tensor: Any) -> np.ndarray:
  """torch -> numpy without a detour through float32; bf16 becomes ml_dtypes.bfloat16 bit for bit."""
  import torch  # pylint: disable=import-outside-toplevel

  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


# ----------------------------------------------------------------------------------------------------------------
# Rules and layout transforms.


def identity(x: np.ndarray) -> np.ndarray:
  return x


def linear_kernel(weight: np.ndarray) -> np.ndarray:
  """torch.nn.Linear weight [out, in] -> Dense kernel [in, out]."""
  if weight.ndim != 2:
    raise ValueError(f"a Linear weight is 2-D, got {weight.ndim}-D")
  return weight.T


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """torch ConvNd weight [out, in, *window] -> flax nn.Conv kernel [*window, in, out]."""
  if weight.ndim < 3:
    raise ValueError(f"a conv weight is at least 3-D, got {weight.ndim}-D")
  return np.transpose(weight, (*range(2, weight.ndim), 1, 0))


def squeeze_leading(x: np.ndarray) -> np.ndarray:
  """Drops a leading singleton axis (PyTorch keeps [1, n, D] tables for broadcasting)."""
  return np.squeeze(x, axis=0)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One row of a key map; see the module docstring for the conventions."""
  pattern: str
  target: str | None
  transform: Transform = identity
  grow_axis: int | None = None


def linear_rules(src: str, dst: str) -> tuple[Rule, Rule]:
  """A torch Linear at regex `src` -> a Dense at `dst` (weight transposed to kernel, bias as is)."""
  return Rule(src + r"\.weight", dst + "/kernel", linear_kernel), Rule(src + r"\.bias", dst + "/bias")


def conv_rules(src: str, dst: str, grow_in_channels: bool = False, spatial_dims: int = 3) -> tuple[Rule, Rule]:
  """A torch ConvNd -> an nn.Conv; `grow_in_channels` lets the model have more input channels (zero-filled)."""
  grow_axis = spatial_dims if grow_in_channels else None
  return (Rule(src + r"\.weight", dst + "/kernel", conv_kernel, grow_axis=grow_axis),
          Rule(src + r"\.bias", dst + "/bias"))


def norm_rules(src: str, dst: str, bias: bool = True) -> tuple[Rule, ...]:
  """A torch LayerNorm/RMSNorm weight (and bias) -> flax `scale` (and `bias`)."""
  rules = (Rule(src + r"\.weight", dst + "/scale"),)
  return rules + (Rule(src + r"\.bias", dst + "/bias"),) if bias else rules


def choose_rules(source: TensorSource, tables: Mapping[str, Sequence[Rule]], what: str) -> str:
  """Names the table (e.g. 'official' / 'diffusers') whose rules match the most keys of `source`."""
  scores = {}
  for name, rules in tables.items():
    compiled = [re.compile(rule.pattern) for rule in rules]
    scores[name] = sum(any(p.fullmatch(key) for p in compiled) for key in source.shapes)
  ranked = sorted(scores, key=scores.get, reverse=True)
  if scores[ranked[0]] == 0 or (len(ranked) > 1 and scores[ranked[0]] == scores[ranked[1]]):
    counts = ", ".join(f"{name} {scores[name]}" for name in ranked)
    raise ConversionError(source.name, f"cannot tell which {what} key names these are (keys matched: {counts} of "
                          f"{len(source.shapes)}); first keys: {source.keys()[:MAX_LISTED]}",
                          hint="name the scheme explicitly (--names)")
  return ranked[0]


# ----------------------------------------------------------------------------------------------------------------
# Planning: keys and shapes only.


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where one checkpoint tensor goes."""
  key: str
  target: str
  layer: int | None
  transform: Transform
  shape: tuple[int, ...]  # after the transform


@dataclasses.dataclass(frozen=True)
class ZeroFill:
  """Entries of a parameter that the checkpoint does not cover and that start at zero."""
  target: str
  axis: int  # axis of the (per-layer) parameter
  loaded: int  # leading entries taken from the checkpoint
  total: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """A checked mapping from a checkpoint onto a parameter tree; `materialize` carries it out."""
  source: str
  expected: Mapping[str, jax.ShapeDtypeStruct]  # flat '/'-joined path -> shape and dtype
  placements: tuple[Placement, ...]
  dropped: tuple[str, ...]
  zero_filled: tuple[ZeroFill, ...]
  initialised: tuple[str, ...]  # paths taken from the module's own init

  def summary(self) -> str:
    """Human-readable account of what came from where (printed by the CLI)."""
    def count(paths: Iterable[str]) -> int:
      return sum(int(np.prod(self.expected[p].shape)) for p in paths)

    targets = sorted({p.target for p in self.placements})
    zeroed = sum(count([z.target]) * (z.total - z.loaded) // z.total for z in self.zero_filled)
    lines = [f"{len(self.placements)} tensors from {self.source} -> {len(targets)} parameters, "
             f"{count(targets) - zeroed:,} values loaded"]
    for z in self.zero_filled:
      lines.append(f"  zero-initialised: {z.target} axis {z.axis} entries [{z.loaded}, {z.total}) "
                   f"(checkpoint has {z.loaded} of {z.total})")
    if self.initialised:
      lines.append(f"  from the model's init: {_group_by_prefix(self.initialised)} "
                   f"({count(self.initialised):,} values)")
    if self.dropped:
      lines.append(f"  dropped (no msjax counterpart): {', '.join(self.dropped)}")
    return "\n".join(lines)


def flatten_shapes(tree: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
  """A nested params pytree (arrays or ShapeDtypeStructs) -> flat '/'-joined path -> ShapeDtypeStruct."""
  flat = traverse_util.flatten_dict(dict(tree), sep=PATH_SEP)
  return {path: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype) for path, leaf in flat.items()}


class _Problems:
  """Problems by category. The same problem in several layers collapses into one line with a layer range."""

  def __init__(self):
    # category -> generic text (layer written as N) -> [(layer, text naming the actual key)]
    self._items: dict[str, dict[str, list[tuple[int | None, str]]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))

  def add(self, category: str, text: str, layer: int | None = None, actual: str | None = None) -> None:
    self._items[category][text].append((layer, text if actual is None else actual))

  def __bool__(self) -> bool:
    return bool(self._items)

  def as_dict(self) -> dict[str, list[str]]:
    out = {}
    for category, texts in self._items.items():
      out[category] = []
      for text, entries in texts.items():
        layers = sorted(layer for layer, _ in entries if layer is not None)
        if len(entries) == 1 and entries[0][1] != text:
          out[category].append(entries[0][1])  # a single key: name it as it is
        else:
          out[category].append(f"{text} (layers {_ranges(layers)})" if layers else text)
    return out


def plan_conversion(source: TensorSource, rules: Sequence[Rule], expected: Mapping[str, Any], *,
                    initialised: Sequence[str] = (), hint: str = "") -> Plan:
  """Matches every key to a rule and checks shapes against `expected` (a nested tree of shapes).

  Raises one ConversionError listing unknown keys, keys for parameters the model lacks, shape mismatches, duplicates
  and missing parameters. `initialised` lists path prefixes the checkpoint never provides (msjax-only modules).
  """
  expected = flatten_shapes(expected)
  compiled = [(re.compile(rule.pattern), rule) for rule in rules]
  problems = _Problems()
  placements, dropped = [], []
  filled: dict[str, set[int | None]] = collections.defaultdict(set)  # slots taken by a valid tensor
  reported: dict[str, set[int | None]] = collections.defaultdict(set)  # slots whose tensor had a problem
  zero_filled: dict[str, ZeroFill] = {}

  for key, source_shape in source.shapes.items():
    match = next(((m, r) for m, r in ((p.fullmatch(key), r) for p, r in compiled) if m), None)
    if match is None:
      problems.add("unknown keys (no rule matches)", key)
      continue
    m, rule = match
    if rule.target is None:
      dropped.append(key)
      continue
    groups = m.groupdict()
    layer = int(groups.pop("layer")) if "layer" in groups else None
    target = rule.target.format(**groups)
    # Per-layer keys are also named with N for the layer, so the same problem in every layer reads as one line.
    generic_key = key if layer is None else key[:m.start("layer")] + "N" + key[m.end("layer"):]

    def report(category: str, detail: str = "") -> None:
      problems.add(category, f"{generic_key} -> {target}{detail}", layer, actual=f"{key} -> {target}{detail}")

    if target not in expected:
      report("keys for parameters this model does not have")
      continue
    reported[target].add(layer)
    try:
      shape = tuple(rule.transform(np.broadcast_to(np.zeros((), np.float32), source_shape)).shape)
    except (ValueError, IndexError) as e:
      report("shape mismatches", f": cannot transform shape {list(source_shape)} ({e})")
      continue
    want = expected[target].shape
    if layer is not None:
      if not want or layer >= want[0]:
        report("shape mismatches", f": the model has {want[0] if want else 0} layers")
        continue
      want = want[1:]
    if not _fits(shape, want, rule.grow_axis):
      found = f"{list(source_shape)}" + (f" (as {list(shape)})" if shape != tuple(source_shape) else "")
      report("shape mismatches", f": checkpoint {found}, model expects {list(want)}")
      continue
    if layer in filled[target]:
      report("duplicate keys")
      continue
    filled[target].add(layer)
    if rule.grow_axis is not None and shape[rule.grow_axis] < want[rule.grow_axis]:
      fill = ZeroFill(target, rule.grow_axis, shape[rule.grow_axis], want[rule.grow_axis])
      if zero_filled.setdefault(target, fill) != fill:
        report("shape mismatches", f": layers disagree on the size of axis {rule.grow_axis}")
    placements.append(Placement(key, target, layer, rule.transform, shape))

  init_paths = []
  for path, spec in expected.items():
    if any(path == pre or path.startswith(pre + PATH_SEP) for pre in initialised):
      init_paths.append(path)
    elif any(layer is not None for layer in reported[path]):
      for layer in sorted(set(range(spec.shape[0])) - reported[path]):
        problems.add("missing parameters", path, layer)
    elif not reported[path]:
      problems.add("missing parameters", path)
  if problems:
    raise ConversionError(source.name, problems.as_dict(), hint=hint)
  return Plan(source=source.name, expected=expected, placements=tuple(placements), dropped=tuple(dropped),
              zero_filled=tuple(zero_filled.values()), initialised=tuple(init_paths))


def _fits(shape: tuple[int, ...], want: tuple[int, ...], grow_axis: int | None) -> bool:
  if len(shape) != len(want):
    return False
  return all(s == w or (axis == grow_axis and s < w) for axis, (s, w) in enumerate(zip(shape, want)))


def _ranges(values: Sequence[int]) -> str:
  """[0, 1, 2, 5] -> '0-2, 5'."""
  spans, start = [], values[0]
  for prev, cur in zip(values, [*values[1:], None]):
    if cur != prev + 1:
      spans.append(f"{start}-{prev}" if prev != start else f"{prev}")
      start = cur
  return ", ".join(spans)


def _group_by_prefix(paths: Sequence[str]) -> str:
  return ", ".join(sorted({p.split(PATH_SEP)[0] for p in paths}))


# ----------------------------------------------------------------------------------------------------------------
# Materialising.


def materialize(plan: Plan, source: TensorSource, initial: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Reads every planned tensor once and returns the nested params pytree (numpy arrays, expected dtypes).

  `initial` supplies the `plan.initialised` paths (a nested tree or a flat '/'-joined mapping, e.g. from the
  module's init); uncovered entries of zero-filled parameters stay zero.
  """
  flat_initial = traverse_util.flatten_dict(dict(initial), sep=PATH_SEP) if initial else {}
  flat_initial = {k: v for k, v in flat_initial.items() if k in set(plan.initialised)}
  absent = [p for p in plan.initialised if p not in flat_initial]
  wrong = [f"{p}: {list(np.shape(v))} vs {list(plan.expected[p].shape)}" for p, v in flat_initial.items()
           if tuple(np.shape(v)) != plan.expected[p].shape]
  if absent or wrong:
    raise ConversionError(plan.source, {"initial values missing": absent, "initial values of the wrong shape": wrong})

  out = {p: np.asarray(v, dtype=plan.expected[p].dtype) for p, v in flat_initial.items()}
  for placement in plan.placements:
    spec = plan.expected[placement.target]
    if placement.target not in out:
      out[placement.target] = np.zeros(spec.shape, spec.dtype)
    tensor = np.asarray(placement.transform(source.read(placement.key)))
    if tuple(tensor.shape) != placement.shape:
      raise ConversionError(plan.source, f"{placement.key}: read shape {list(tensor.shape)}, header said "
                            f"{list(placement.shape)}")
    dst = out[placement.target] if placement.layer is None else out[placement.target][placement.layer]
    dst[tuple(slice(0, n) for n in tensor.shape)] = tensor.astype(spec.dtype)
  return traverse_util.unflatten_dict(out, sep=PATH_SEP)


# ----------------------------------------------------------------------------------------------------------------
# Writing and reading converted params (orbax).


def check_output_dir(directory: PathLike, overwrite: bool) -> pathlib.Path:
  """Fails early (before any conversion work) if `directory` exists and may not be replaced."""
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and not overwrite:
    raise FileExistsError(f"{directory} already exists; choose a new --out or pass --overwrite")
  return directory


def save_params(params: Mapping[str, Any], directory: PathLike, *, overwrite: bool = False) -> pathlib.Path:
  """Writes `params` as an orbax checkpoint at `directory` (orbax writes a temporary folder and renames it).

  An existing `directory` is kept unless `overwrite`; everything that can fail in a conversion happens before this.
  """
  directory = check_output_dir(directory, overwrite)
  directory.parent.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, params, force=overwrite)
    checkpointer.wait_until_finished()
  return directory


def load_params(directory: PathLike) -> dict[str, Any]:
  """Reads a params pytree written by `save_params` (numpy arrays)."""
  directory = pathlib.Path(directory).absolute()
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory}: no converted checkpoint here (expected a folder written by save_params)")
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      return checkpointer.restore(directory)
    except (FileNotFoundError, ValueError) as e:  # a folder, but not one orbax wrote
      raise FileNotFoundError(f"{directory}: not a params checkpoint (expected a folder written by save_params, "
                              f"a training workdir or an exported model): {e}") from e


def save_and_report(params: Mapping[str, Any], plan: Plan, args: argparse.Namespace, title: str) -> int:
  """The end of every converter CLI: write `params` to `args.out`, print what came from where; exit code 0."""
  out = save_params(params, args.out, overwrite=args.overwrite)
  print(f"{title}: {plan.summary()}\nwrote {out}")
  return 0


def add_io_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags every converter CLI shares, so they read the same for the DiT, the VAE and TAEHV."""
  parser.add_argument("--src", required=True, help="checkpoint: .safetensors (file or folder of shards), .pth/.pt/.bin")
  parser.add_argument("--out", required=True, help="output folder for the orbax checkpoint of the params")
  parser.add_argument("--entry", default=None, help="dotted key of the state dict inside a torch checkpoint")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
