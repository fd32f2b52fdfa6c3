"""Stream a motion-controlled video: `python sample.py --tracks examples/drag_one.npy`.

The student generates chunk after chunk (msjax.stream.sampler), following the tracks, from a first frame (default:
the built-in sprite scene) and a prompt. Frames are written when the stream ends: an .mp4, a .gif, or a folder
of PNGs (anything without one of those suffixes), always under a temporary name first, so an error never
leaves a partial file. Prints frames, wall time, FPS, first-frame latency and the time per chunk.

  python sample.py --tracks examples/drag_one.npy --out out/drag.mp4 --overlay --eval
  python sample.py --tracks my_tracks.npz --image photo.png --prompt "a cat" --num_frames 200 --loop_tracks
  python sample.py --tracks examples/circle.npy --random_weights        # no checkpoint needed (plumbing, speed)

Bad inputs (a missing or malformed tracks file, an unreadable image, a checkpoint of another preset, ...) end
with one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from msjax import io_utils
from msjax.codecs import CODEC_NAMES

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sample.py"),
    "Sampler config (file[:preset]); override fields with --config.FIELD=VALUE.")
_TRACKS = flags.DEFINE_string("tracks", None, "Tracks file: .npy (T,N,2)/(T,N,3)/(1,T,N,2) or .npz (tracks, "
                              "visibility), pixel (x, y) in the model's frame.")
_IMAGE = flags.DEFINE_string("image", None, "First frame (png/jpg), resized and center-cropped to the model size. "
                             "Default: the built-in sprite scene.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt (default: the built-in scene's description, else '').")
_PROMPT_EMBEDS = flags.DEFINE_string("prompt_embeds", None, ".npy [L, text_dim] text embeddings made elsewhere "
                                     "(e.g. umT5), used instead of --prompt.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Student: exported model folder or distillation workdir "
                                  "(default: config.checkpoint, the shipped tiny student).")
_RANDOM_WEIGHTS = flags.DEFINE_bool("random_weights", False, "Stream with random weights (no checkpoint).")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", None, "Frames to make (default: as many as the tracks have).")
_LOOP_TRACKS = flags.DEFINE_bool("loop_tracks", False, "Loop the tracks when the stream is longer than them "
                                 "(default: hold their last position).")
_STEPS = flags.DEFINE_integer("steps", None, "Denoising steps per chunk (default: config.stream.num_steps).")
_SINK = flags.DEFINE_integer("sink", None, "Sink chunks kept forever (default: config.stream.sink_chunks).")
_WINDOW = flags.DEFINE_integer("window", None, "Rolling window chunks (default: config.stream.window_chunks).")
_SEED = flags.DEFINE_integer("seed", None, "Seed of noise and track IDs (default: config.seed).")
_OUT = flags.DEFINE_string("out", None, "Output .mp4, .gif or PNG folder (default: config.out).")
_DECODER = flags.DEFINE_enum("decoder", None, list(CODEC_NAMES), "Codec that encodes the first frame and "
                             "decodes chunks (default: config.decoder, the preset's).")
_DECODER_CHECKPOINT = flags.DEFINE_string("decoder_checkpoint", None, "Converted VAE / TAEHV params folder.")
_OVERLAY = flags.DEFINE_bool("overlay", False, "Draw the moving tracks' visible points over the video.")
_EVAL = flags.DEFINE_bool("eval", False, "EPE of the video against the tracks (built-in scene only: its sprite "
                          "colours are known).")

PNG_SUFFIX = ".png"
EXIT_BAD_INPUT = io_utils.EXIT_BAD_INPUT


class InputError(ValueError):
  """A user input that cannot be used; the message names it, what was expected and what was found."""


_fail = io_utils.exit_bad_input


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
  """Warnings (e.g. tracks leaving the frame) as one plain line each."""
  del category, filename, lineno, file, line
  print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# Inputs.


def _load_image(path: str, height: int, width: int):
  """uint8 [height, width, 3]: the image scaled to cover the frame, then center-cropped."""
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from msjax import inference  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise InputError(f"{path}: image file not found")
  try:
    image = np.asarray(iio.imread(path))
  except Exception as e:  # imageio raises many types for files it cannot decode
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise InputError(f"{path}: cannot read as an image ({reason})") from e
  if image.ndim == 2:
    image = np.stack([image] * 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4) or min(image.shape[:2]) < 1:
    raise InputError(f"{path}: expected an RGB or RGBA image [H, W, 3|4], found shape {image.shape}")
  if image.dtype != np.uint8:
    raise InputError(f"{path}: expected an 8-bit image, found dtype {image.dtype}")
  image = image[..., :3]
  fitted = inference.fit_image(image, height, width)
  if fitted is not image:
    print(f"image: {path} is {image.shape[1]}x{image.shape[0]}; scaled to cover the model's {width}x{height} and "
          "centre-cropped")
  return fitted


def _output_path(out: str) -> str:
  """The output path, checked before any work: a known video suffix, or a folder that is new or empty."""
  if not out:
    out = os.path.join("out", "sample.mp4" if io_utils.mp4_available() else "sample.gif")
  suffix = os.path.splitext(out)[1].lower()
  if suffix == ".mp4" and not io_utils.mp4_available():
    raise InputError(f"{out}: writing mp4 needs the imageio-ffmpeg package; write a .gif or a PNG folder")
  if suffix not in io_utils.VIDEO_SUFFIXES:
    if suffix:
      raise InputError(f"{out}: expected a .mp4 or .gif file or a PNG folder (no suffix), found suffix {suffix!r}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
      raise InputError(f"{out}: the PNG folder exists and is not empty; remove it or choose another --out")
  elif os.path.isdir(out):
    raise InputError(f"{out}: is a folder, expected a {suffix} file path")
  return out


def _write_png_folder(out: str, frames) -> None:
  """Frames as out/00000.png ...: written in a temporary folder beside `out`, then renamed to it."""
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
  try:
    digits = len(str(len(frames) - 1))
    for index, frame in enumerate(frames):
      iio.imwrite(os.path.join(staging, f"{index:0{digits}d}{PNG_SUFFIX}"), frame)
    if os.path.isdir(out):
      os.rmdir(out)  # checked empty before streaming
    os.replace(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _write_output(out: str, frames, fps: float) -> None:
  if os.path.splitext(out)[1].lower() in io_utils.VIDEO_SUFFIXES:
    io_utils.write_video(out, frames, fps)
  else:
    _write_png_folder(out, frames)


# ----------------------------------------------------------------------------------------------------------
# The model.


def _stream_config(config):
  """The config with the command line's stream settings applied (they do not change the model's shapes)."""
  config = copy.deepcopy(config)
  for flag, key in ((_STEPS, "num_steps"), (_SINK, "sink_chunks"), (_WINDOW, "window_chunks")):
    if flag.value is not None:
      config.stream[key] = flag.value
  if _SEED.value is not None:
    config.seed = _SEED.value
  return config


# ----------------------------------------------------------------------------------------------------------
# Main.


def _summary(chunks, started: float, first_at: float, frames: int) -> str:
  wall = time.perf_counter() - started
  later = [chunk.seconds for chunk in chunks[1:]] or [chunks[0].seconds]
  spread = statistics.stdev(later) if len(later) > 1 else 0.0
  ms = io_utils.MS_PER_SECOND
  return (f"frames: {frames} in {len(chunks)} chunks, wall {wall:.2f} s, {frames / wall:.1f} FPS, first frame "
          f"after {first_at - started:.3f} s, chunk {statistics.mean(later) * ms:.1f} ± {spread * ms:.1f} ms "
          f"(first chunk {chunks[0].seconds * ms:.1f} ms)")


@dataclasses.dataclass(frozen=True)
class Inputs:
  """The user's inputs, read and checked before any model work."""
  tracks: Any  # msjax.data.tracks.Tracks
  first_frame: Any  # uint8 [H, W, 3]
  scene: Any  # the built-in sprites clip (frame 0 only), or None for --image
  prompt: Any  # str, or a precomputed [text_len, text_dim] embedding
  num_frames: int
  out: str


def _read_inputs(config) -> Inputs:
  """Reads and checks every input (tracks, image, prompt, output path); raises on the first bad one."""
  from msjax.data import sprites  # pylint: disable=g-import-not-at-top
  from msjax.data import tracks as tracks_lib  # pylint: disable=g-import-not-at-top
  from msjax.models import text as text_lib  # pylint: disable=g-import-not-at-top
  height, width = config.video.height, config.video.width
  if not _TRACKS.value:
    raise InputError("--tracks is required (e.g. --tracks examples/drag_one.npy)")
  tracks = tracks_lib.load_tracks(_TRACKS.value, height=height, width=width)
  print(f"tracks: {_TRACKS.value}: {tracks.num_frames} frames x {tracks.num_tracks} points "
        f"({int(tracks.visible.sum())} visible point-frames)")
  if _PROMPT.value is not None and _PROMPT_EMBEDS.value:
    raise InputError("give --prompt or --prompt_embeds, not both")
  scene = None
  if _IMAGE.value:
    first_frame = _load_image(_IMAGE.value, height, width)
  else:  # only frame 0 of the built-in scene is needed (with its colours and description)
    scene = sprites.example_scene(dataclasses.replace(sprites.SpritesConfig.from_config(config), num_frames=1))
    first_frame = scene.video[0]
  if _EVAL.value and scene is None:
    raise InputError("--eval measures the built-in scene (its sprite colours are known); drop --image")
  if _PROMPT_EMBEDS.value:
    prompt, _ = text_lib.load_text_embedding(_PROMPT_EMBEDS.value, config.model.text_len, config.model.text_dim)
  elif _PROMPT.value is not None:
    prompt = _PROMPT.value
  elif config.text.encoder == "precomputed":  # no text encoder to run the scene's description through
    print("prompt: none given; the preset takes precomputed embeddings (--prompt_embeds), so the null one is used")
    prompt = ""
  else:
    prompt = scene.prompt if scene is not None else ""
  num_frames = tracks.num_frames if _NUM_FRAMES.value is None else _NUM_FRAMES.value
  if num_frames < 1:
    raise InputError(f"--num_frames must be >= 1, got {num_frames}")
  return Inputs(tracks=tracks, first_frame=first_frame, scene=scene, prompt=prompt, num_frames=num_frames,
                out=_output_path(_OUT.value or config.out))


def _evaluate(video, tracks, scene, config) -> str:
  """--eval's line: how far the built-in scene's sprites are from where their tracks lead."""
  from msjax.data import sprites  # pylint: disable=g-import-not-at-top
  from msjax.eval import sprites_eval  # pylint: disable=g-import-not-at-top
  from msjax.stream import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  min_pixels = sprites_eval.min_detection_pixels(sprites.SpritesConfig.from_config(config))
  epe = sampler_lib.track_following_epe(video, tracks, scene.colors, min_pixels=min_pixels)
  return (f"eval: track EPE {epe['mean']:.2f} px over {epe['frames']} sprite-frames (sprite missed in "
          f"{epe['missed_fraction']:.0%})")


def run(config) -> None:
  """Checks every input, streams, reports and writes; raises InputError & co. on bad inputs."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from msjax.data import tracks as tracks_lib  # pylint: disable=g-import-not-at-top
  from msjax.stream import sampler as sampler_lib  # pylint: disable=g-import-not-at-top

  config = _stream_config(config)
  inputs = _read_inputs(config)
  checkpoint = _CHECKPOINT.value or config.checkpoint
  if not (_RANDOM_WEIGHTS.value or os.path.exists(checkpoint)):
    raise InputError(f"{checkpoint}: no such checkpoint (the tiny student ships in checkpoints/tiny_student); pass "
                     "--checkpoint DIR (an exported model or a training workdir), or --random_weights")
  model = sampler_lib.load_stream_model(
      config, checkpoint=None if _RANDOM_WEIGHTS.value else checkpoint, decoder=_DECODER.value or config.decoder,
      decoder_checkpoint=_DECODER_CHECKPOINT.value or config.decoder_checkpoint)
  stream = sampler_lib.StreamSampler(model)
  print(f"model: {model.stage}, preset {config.preset}, c{config.stream.chunk_frames}s{config.stream.sink_chunks}"
        f"w{config.stream.window_chunks}, {config.stream.num_steps} steps, decoder {type(model.codec).__name__}; "
        f"compiled in {stream.warmup():.1f} s (not counted below)")

  started = time.perf_counter()
  chunks, first_at = [], None
  for chunk in sampler_lib.stream_chunks(model, inputs.first_frame, inputs.prompt, inputs.tracks, inputs.num_frames,
                                         loop_tracks=_LOOP_TRACKS.value, seed=config.seed, sampler=stream):
    first_at = first_at or time.perf_counter()
    chunks.append(chunk)
  video = np.concatenate([chunk.frames for chunk in chunks])
  followed = tracks_lib.Tracks(points=np.concatenate([chunk.tracks.points for chunk in chunks]),
                               visible=np.concatenate([chunk.tracks.visible for chunk in chunks]))
  print(_summary(chunks, started, first_at, len(video)))
  if _EVAL.value:
    print(_evaluate(video, followed, inputs.scene, config))
  if _OVERLAY.value:
    from msjax.eval import report  # pylint: disable=g-import-not-at-top
    video = report._draw_tracks(video, followed, scale=1)  # pylint: disable=protected-access
  _write_output(inputs.out, video, config.video.fps)
  print(f"wrote {inputs.out}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {' '.join(argv[1:])!r} (flags look like --tracks FILE)")
  warnings.showwarning = _show_warning
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep library INFO logs (orbax restores) off the terminal
  from msjax import config_utils  # pylint: disable=g-import-not-at-top
  from msjax import inference  # pylint: disable=g-import-not-at-top
  from msjax.data import tracks as tracks_lib  # pylint: disable=g-import-not-at-top
  from msjax.models import text as text_lib  # pylint: disable=g-import-not-at-top
  from msjax.stream import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  try:
    run(_CONFIG.value)
  except (InputError, tracks_lib.TracksError, inference.ModelError, text_lib.TextEncoderError,
          config_utils.ConfigError, sampler_lib.DecoderError) as e:
    _fail(str(e))
  except OSError as e:  # e.g. an output folder that cannot be written
    _fail(f"{e.filename or ''}: {e.strerror or e}")


if __name__ == "__main__":
  app.run(main, flags_parser=io_utils.parse_flags)
