"""Writing files so that nobody ever sees half of one: every output of msjax goes through here.

A file is written to a temporary name in its own directory and renamed over the target (atomic on POSIX), so
a crash, a full disk or Ctrl-C leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import tempfile
from typing import BinaryIO, Callable, NoReturn

import chex
import imageio.v3 as iio
import numpy as np

MS_PER_SECOND = 1000.0
VIDEO_SUFFIXES = (".gif", ".mp4")
EXIT_BAD_INPUT = 2  # the exit status of every command line tool refusing an input


def error_line(message: str) -> str:
  """`message` as the one `error: ...` line the command line tools print for a bad input."""
  return "error: " + " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def exit_bad_input(message: str) -> NoReturn:
  """Prints `error_line(message)` to stderr and exits with `EXIT_BAD_INPUT`: no traceback for a user's mistake."""
  print(error_line(message), file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


CONFIG_FILE_ERROR = "Error whilst parsing config file"  # how ml_collections wraps an exception in get_config


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for `app.run(main, flags_parser=parse_flags)`, with a bad flag as one error line.

  A config file whose `get_config` raises (an unknown preset, a recipe refusing one) reaches absl as a flag
  error holding the whole traceback; only its last line, the exception's message, is the user's business.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if CONFIG_FILE_ERROR in message:
      raised = [line for line in message.splitlines() if line.strip()][-1]
      name, _, text = raised.partition(": ")  # "package.module.SomeError: what went wrong"
      flag = message.split(f": {CONFIG_FILE_ERROR}")[0]
      message = f"{flag}: {text if text and ' ' not in name else raised}"
    exit_bad_input(message)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config lacks
    inner: object = e
    while isinstance(inner, BaseException) and inner.args:  # AttributeError(KeyError("'key'\nDid you mean..."))
      inner = inner.args[0]
    exit_bad_input(f"a --config.* override names a key the config does not have: {inner}")
  if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
    try:  # a config file that cannot be read only says so when first used
      flags.FLAGS["config"].value.get("stage")
    except OSError as e:
      exit_bad_input(f"--config: cannot load the config file ({str(e).splitlines()[-1].strip()})")
  return remaining


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, make_dirs: bool = False) -> None:
  """Calls `write(f)` on a temporary file next to `path`, then renames it to `path`.

  Without `make_dirs`, a missing directory is an error (FileNotFoundError naming it) rather than created.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  if make_dirs:
    os.makedirs(directory, exist_ok=True)
  elif not os.path.isdir(directory):
    raise FileNotFoundError(f"{path}: cannot write, directory {directory} does not exist")
  handle, temp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(handle, "wb") as f:
      write(f)
    os.chmod(temp_path, 0o644)
    os.replace(temp_path, path)
  except BaseException:
    if os.path.exists(temp_path):
      os.unlink(temp_path)
    raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """`data` to `path` atomically, creating the directory if needed."""
  atomic_write(path, lambda f: f.write(data), make_dirs=True)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
  """`np.save` to `path` atomically, creating the directory if needed."""
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(array), allow_pickle=False)
  atomic_write_bytes(path, buffer.getvalue())


def mp4_available() -> bool:
  return importlib.util.find_spec("imageio_ffmpeg") is not None


def encode_video(frames: np.ndarray, suffix: str, fps: float) -> bytes:
  """uint8 [T, H, W, 3] -> the bytes of a GIF (Pillow) or an H.264 mp4 (imageio-ffmpeg)."""
  chex.assert_rank(frames, 4)
  if frames.dtype != np.uint8:
    raise TypeError(f"video frames must be uint8, got {frames.dtype}")
  if suffix == ".gif":
    return iio.imwrite("<bytes>", frames, extension=suffix, duration=MS_PER_SECOND / fps, loop=0)
  if suffix == ".mp4":
    if not mp4_available():
      raise RuntimeError("writing mp4 needs the imageio-ffmpeg package, which is not installed; write a .gif")
    # H.264 in yuv420p stores colour at half resolution, so both sides must be even.
    even = [(0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)]
    return iio.imwrite("<bytes>", np.pad(frames, even, mode="edge"), extension=suffix, fps=fps, macro_block_size=1)
  raise ValueError(f"expected a video suffix in {VIDEO_SUFFIXES}, found {suffix!r}")


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
  """Writes uint8 [T, H, W, 3] atomically as GIF or mp4, chosen by the suffix of `path`."""
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1].lower()
  try:
    data = encode_video(frames, suffix, fps)
  except (RuntimeError, ValueError) as e:
    raise type(e)(f"{path}: {e}") from e
  atomic_write_bytes(path, data)
