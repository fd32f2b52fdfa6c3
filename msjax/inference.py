"""What every sampler needs besides the DiT itself: a loaded model and the conditioning made from user inputs.

A sampler (the teacher's full-clip sampler, the streaming student) is given a first frame, a prompt and tracks;
this module turns them into the DiT's inputs exactly as the data pipeline does for training (same codec, same
track rasteriser and sinusoidal IDs, same text encoder), so there is one definition of "the conditioning".

Models on disk come in two forms, both read by `load_model`:
  * an exported model folder (`export_model`): `params/` (orbax: {'dit': ..., 'text': ...}), `config.json`
    (the full config it was trained with) and `model.json` (stage, training step, where it came from);
  * a training workdir (`runs/teacher_tiny`): the newest checkpoint's EMA parameters.
Either is checked against the configured preset before any array is used, so a checkpoint of another preset
is refused with the differing config keys named.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from msjax import codecs
from msjax import config_utils
from msjax.data import pipeline
from msjax.data import tracks as tracks_lib
from msjax.models import dit
from msjax.models import text as text_lib
from msjax.models.track_head import Conditioning

Params = Any

PARAMS_SUBDIR = "params"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.json"
DIT_PARAMS = "dit"
TEXT_PARAMS = "text"
CODECS_WITHOUT_WEIGHTS = ("pack",)
UINT8_MAX = 255.0


class ModelError(ValueError):
  """A checkpoint that cannot be used with the configured model; the message names the path and the problem."""


@dataclasses.dataclass(frozen=True)
class Model:
  """A DiT with the text encoder and codec it was trained with, ready to sample from."""
  config: ml_collections.ConfigDict
  dit_params: Params
  text_encoder: text_lib.TextEncoder
  text_params: Params
  codec: codecs.Codec
  codec_params: Params
  stage: str  # teacher | student | random

  @property
  def spec(self) -> dit.DiTSpec:
    return dit.DiTSpec.from_config(self.config)


# ---- loading and exporting --------------------------------------------------------------------------------


def codec_params(config: ml_collections.ConfigDict, codec_checkpoint: str, random_codec: bool,
                  codec: codecs.Codec) -> Params:
  """The codec's weights: none for `pack`, converted ones from `codec_checkpoint`, or random when asked."""
  if config.codec.name in CODECS_WITHOUT_WEIGHTS:
    return None
  if codec_checkpoint:
    from msjax.convert import common  # pylint: disable=g-import-not-at-top
    try:
      return common.load_params(codec_checkpoint)
    except (OSError, ValueError) as e:
      raise ModelError(f"{codec_checkpoint}: cannot read the {config.codec.name!r} codec weights ({e})") from e
  if random_codec:
    return codec.init_params(config.seed if "seed" in config else 0)
  raise ModelError(f"codec {config.codec.name!r} needs weights: convert them with `python -m msjax.convert "
                   f"{'wan_vae' if config.codec.name == 'wan' else config.codec.name} --src CKPT --out DIR` and pass "
                   "that folder, or ask for random weights (benchmarks only)")


def _text_params(config: ml_collections.ConfigDict, encoder: text_lib.TextEncoder, params: Params,
                 where: str) -> Params:
  if encoder.trainable:
    if TEXT_PARAMS not in params:
      raise ModelError(f"{where}: the config's text encoder {config.text.encoder!r} is trained with the model, "
                       "but the checkpoint holds no 'text' params")
    return params[TEXT_PARAMS]
  return encoder.init_params()


def _check_compatible(saved_config: dict[str, Any], config: ml_collections.ConfigDict, where: str) -> None:
  from msjax.train import loop  # pylint: disable=g-import-not-at-top
  try:
    loop.check_config_compatible(saved_config, config, where)
  except loop.CheckpointMismatchError as e:
    saved_preset = saved_config.get("preset", "?")
    raise ModelError(f"{where} holds a {saved_preset!r} model that does not fit the configured "
                     f"{config.preset!r} preset: {e}") from e


def _restore(directory: str) -> Params:
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.abspath(directory))


def _read_training_workdir(path: str) -> tuple[Params, dict[str, Any], dict[str, Any]]:
  """EMA params, config and a description of the newest checkpoint of a training workdir."""
  from msjax.train import loop  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(os.path.join(path, loop.CHECKPOINT_SUBDIR))
  manager = ocp.CheckpointManager(directory, item_names=("state", "data", "config"))
  try:
    step = manager.latest_step()
    if step is None:
      raise ModelError(f"{path}: a training workdir without any finished checkpoint under {directory}")
    saved_config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  finally:
    manager.close()
  if "ema_params" not in state:
    raise ModelError(f"{directory}/{step}: the checkpoint holds no EMA parameters (keys: {', '.join(state)})")
  info = {"stage": saved_config.get("stage", "teacher"), "step": int(step), "source": os.path.abspath(path)}
  return state["ema_params"], saved_config, info


def is_exported_model(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE))


def is_training_workdir(path: str) -> bool:
  from msjax.train import loop  # pylint: disable=g-import-not-at-top
  return os.path.isdir(os.path.join(path, loop.CHECKPOINT_SUBDIR))


def read_checkpoint(path: str) -> tuple[Params, dict[str, Any], dict[str, Any]]:
  """(params {'dit', maybe 'text'}, the config it was trained with, {'stage', 'step', 'source'}) from `path`."""
  if not os.path.isdir(path):
    raise ModelError(f"{path}: no such checkpoint folder (expected an exported model or a training workdir)")
  if is_exported_model(path):
    try:
      with open(os.path.join(path, CONFIG_FILE)) as f:
        saved_config = json.load(f)
      with open(os.path.join(path, MODEL_FILE)) as f:
        info = json.load(f)
      params = _restore(os.path.join(path, PARAMS_SUBDIR))
    except (OSError, ValueError) as e:
      raise ModelError(f"{path}: an exported model folder that cannot be read ({e})") from e
    return params, saved_config, info
  if is_training_workdir(path):
    return _read_training_workdir(path)
  raise ModelError(f"{path}: neither an exported model ({CONFIG_FILE} + {PARAMS_SUBDIR}/) nor a training workdir "
                   "(checkpoints/)")


def load_model(path: str, config: ml_collections.ConfigDict, *, codec_checkpoint: str = "",
               random_codec: bool = False) -> Model:
  """The model stored at `path`, checked against `config` (whose preset must match the checkpoint's)."""
  params, saved_config, info = read_checkpoint(path)
  _check_compatible(saved_config, config, path)
  if DIT_PARAMS not in params:
    raise ModelError(f"{path}: no 'dit' params in the checkpoint (found {', '.join(params)})")
  expected = jax.eval_shape(lambda: init_dit_params(config, jax.random.PRNGKey(0)))
  found = jax.tree_util.tree_map(np.shape, params[DIT_PARAMS])
  wanted = jax.tree_util.tree_map(lambda x: x.shape, expected)
  if found != wanted:
    raise ModelError(f"{path}: the DiT params do not have the shapes config.model gives (same preset "
                     f"{config.preset!r}, different model?)")
  encoder = text_lib.make_text_encoder(config)
  codec = codecs.make_codec(config)
  return Model(config=config, dit_params=jax.tree_util.tree_map(jnp.asarray, params[DIT_PARAMS]),
               text_encoder=encoder, text_params=_text_params(config, encoder, params, path), codec=codec,
               codec_params=codec_params(config, codec_checkpoint, random_codec, codec),
               stage=str(info.get("stage", "teacher")))


def init_dit_params(config: ml_collections.ConfigDict, rng: jax.Array) -> Params:
  """Fresh DiT params for `config` (the shapes every checkpoint of this preset must have)."""
  model = dit.WanDiT(dit.DiTSpec.from_config(config))
  return model.init(rng, *dit.example_inputs(config, 1))["params"]


def random_model(config: ml_collections.ConfigDict, seed: int = 0) -> Model:
  """Random DiT (and text encoder / codec) weights: for benchmarks and plumbing, before a checkpoint exists."""
  dit_rng, text_rng = jax.random.split(jax.random.PRNGKey(seed))
  encoder = text_lib.make_text_encoder(config)
  codec = codecs.make_codec(config)
  text_params = encoder.init_params(text_rng) if encoder.trainable else encoder.init_params()
  return Model(config=config, dit_params=jax.jit(lambda key: init_dit_params(config, key))(dit_rng),
               text_encoder=encoder, text_params=text_params, codec=codec,
               codec_params=codec_params(config, "", True, codec), stage="random")


def save_model(out: str, params: Params, config: dict[str, Any] | ml_collections.ConfigDict,
               info: dict[str, Any]) -> str:
  """Writes an exported model folder: params (float32 numpy), the config and `info` (stage, step, source).

  The folder is assembled under a temporary name next to `out` and renamed, so `out` is complete or absent.
  """
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".export_", dir=parent)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(staging, PARAMS_SUBDIR), jax.tree_util.tree_map(np.asarray, params))
      checkpointer.wait_until_finished()
    for name, content in ((CONFIG_FILE, config), (MODEL_FILE, info)):
      with open(os.path.join(staging, name), "w") as f:
        json.dump(content, f, indent=1, sort_keys=True)
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return out


def export_model(source: str, out: str, *, stage: str | None = None) -> str:
  """The model at `source` (training workdir or exported folder) as an exported folder at `out`: EMA params and
  config only, no optimizer state."""
  params, saved_config, info = read_checkpoint(source)
  if stage:
    info["stage"] = stage
  return save_model(out, params, saved_config, info)


# ---- conditioning from user inputs ------------------------------------------------------------------------


def encode_prompt(model: Model, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
  """(context [B, text_len, text_dim], null context [1, text_len, text_dim]) for guidance and the cache."""
  context, _ = model.text_encoder.encode(model.text_params, list(prompts))
  null, _ = model.text_encoder.null_context(model.text_params)
  return context, null


def track_grid(tracks: tracks_lib.Tracks, config: ml_collections.ConfigDict, *, seed: int,
               shuffle_later_ids: bool = False) -> np.ndarray:
  """[T, h, w, grid channels] rasterised tracks with random distinct IDs drawn from `seed` (as in training).

  `shuffle_later_ids`: the ablation of `tracks_lib.shuffle_later_ids`, one random order per call.
  """
  geo = config_utils.geometry(config)
  rng = np.random.default_rng(seed)
  ids = tracks_lib.random_track_ids(rng, tracks.num_tracks, config.tracks.max_id)
  embeddings = tracks_lib.track_embeddings(ids, config.tracks.embed_dim)
  points, visible = tracks.points, tracks.visible
  if shuffle_later_ids:
    points, visible = tracks_lib.shuffle_later_ids(points, visible, rng.permutation(tracks.num_tracks))
  grid = tracks_lib.rasterize(points, visible, embeddings, height=geo.height, width=geo.width,
                              stride=config.codec.spatial_stride, splat=config.tracks.splat)
  chex.assert_shape(grid, (tracks.num_frames, geo.latent_height, geo.latent_width,
                           config_utils.track_grid_channels(config)))
  return grid


def fit_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [height, width, 3]: `image` scaled to cover the model's frame, then centre-cropped (so nothing is
  stretched); sample.py --image and the demo's uploads both go through it."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  found_height, found_width = image.shape[:2]
  if (found_height, found_width) == (height, width):
    return image
  scale = max(height / found_height, width / found_width)
  size = (max(width, round(found_width * scale)), max(height, round(found_height * scale)))
  resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
  top, left = (size[1] - height) // 2, (size[0] - width) // 2
  fitted = resized[top:top + height, left:left + width]
  chex.assert_shape(fitted, (height, width, 3))
  return fitted


def first_latent(model: Model, frame: np.ndarray, encode: Callable[[Any, jax.Array], jax.Array] | None = None
                 ) -> jax.Array:
  """uint8 [H, W, 3] first frame -> its clean latent [h, w, C] (latent frame 0 holds frame 0 alone).

  `encode` replaces `model.codec.encode`, e.g. with a jitted copy (the streaming sampler keeps one so that the
  first-frame latency holds no eager dispatch)."""
  geo = config_utils.geometry(model.config)
  chex.assert_shape(frame, (geo.height, geo.width, 3))
  video = jnp.asarray(pipeline.video_to_unit_range(np.asarray(frame, np.uint8)))[None, None]
  latents = (encode or model.codec.encode)(model.codec_params, video)
  chex.assert_shape(latents, (1, 1, geo.latent_height, geo.latent_width, geo.latent_channels))
  return latents[0, 0]


def conditioning(model: Model, context: jax.Array, first: jax.Array | None,
                 grid: jax.Array | None) -> Conditioning:
  """Batch-1 DiT conditioning: the image condition is dropped for T2V models, tracks for track-less ones."""
  image = None if model.config.model.image_condition == "none" or first is None else first[None]
  tracks = None if model.config.model.track_channels == 0 or grid is None else jnp.asarray(grid)[None]
  return Conditioning(context=context, first_latent=image, track_grid=tracks)


def to_uint8(video: jax.Array | np.ndarray) -> jax.Array:
  """Codec pixels in [-1, 1] -> uint8 [0, 255]; jittable, so frames can leave the device 4x smaller."""
  return jnp.clip(jnp.round((jnp.asarray(video, jnp.float32) + 1.0) * (UINT8_MAX / 2)), 0, UINT8_MAX).astype(jnp.uint8)


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m msjax.inference export SOURCE OUT [--stage S]`: a training workdir -> a shippable model folder."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m msjax.inference", description=main.__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  export = commands.add_parser("export", help="EMA params + config of SOURCE -> an exported model folder OUT")
  export.add_argument("source", help="training workdir (newest checkpoint) or exported model folder")
  export.add_argument("out", help="folder to write (replaced if it exists)")
  export.add_argument("--stage", default=None, help="stage recorded in model.json (default: the source's)")
  args = parser.parse_args(argv)
  try:
    out = export_model(args.source, args.out, stage=args.stage)
  except ModelError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
