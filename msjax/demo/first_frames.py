"""Where a demo stream's first frame comes from: the built-in sprite scenes, or an image the page uploads."""

from __future__ import annotations

import dataclasses
import io
import warnings

import ml_collections
import numpy as np
from PIL import Image

from msjax import inference
from msjax.data import sprites

EXAMPLE = "example"
SPRITES_PREFIX = "sprites:"
LISTED_SPRITES_SEEDS = (1, 2, 3, 4)  # the random scenes the page offers (any seed is accepted)
RGB = 3


class FirstFrameError(ValueError):
  """A scene name or an uploaded image that cannot become a first frame; the message says why."""


@dataclasses.dataclass(frozen=True)
class FirstFrame:
  frame: np.ndarray  # uint8 [H, W, 3]
  prompt: str  # the scene's description ("" for an upload)
  source: str  # what the page shows as the frame's origin


def scene_names() -> list[dict[str, str]]:
  """The scenes the page lists: [{"name", "label"}]."""
  listed = [{"name": EXAMPLE, "label": "example scene"}]
  listed += [{"name": f"{SPRITES_PREFIX}{seed}", "label": f"sprites, seed {seed}"} for seed in LISTED_SPRITES_SEEDS]
  return listed


def scene_frame(name: str, config: ml_collections.ConfigDict) -> FirstFrame:
  """Frame 0 and prompt of a built-in scene: 'example' (sample.py's default) or 'sprites:SEED'."""
  world = dataclasses.replace(sprites.SpritesConfig.from_config(config), num_frames=1)
  if name == EXAMPLE:
    clip = sprites.example_scene(world)
  elif name.startswith(SPRITES_PREFIX) and name[len(SPRITES_PREFIX):].isdigit():
    clip = sprites.render_clip(int(name[len(SPRITES_PREFIX):]), world)
  else:
    raise FirstFrameError(f"unknown scene {name!r}; expected {EXAMPLE!r} or '{SPRITES_PREFIX}SEED' (SEED >= 0)")
  return FirstFrame(frame=clip.video[0], prompt=clip.prompt, source=name)


def uploaded_frame(data: bytes, height: int, width: int) -> FirstFrame:
  """An uploaded png / jpg (any size, grey, RGBA or palette) as the model's first frame."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as opened:
        image = np.asarray(opened.convert("RGB"))
  except Image.UnidentifiedImageError as e:
    raise FirstFrameError(f"the uploaded file ({len(data)} bytes) is not an image Pillow can read (unknown "
                          "format; expected png or jpg)") from e
  except (OSError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise FirstFrameError(f"the uploaded file ({len(data)} bytes) is not an image Pillow can read ({reason})") from e
  if image.ndim != 3 or image.shape[-1] != RGB or min(image.shape[:2]) < 1:
    raise FirstFrameError(f"the uploaded image has shape {image.shape}; expected [H, W, 3] with H, W >= 1")
  found = f"{image.shape[1]}x{image.shape[0]}"
  return FirstFrame(frame=inference.fit_image(image, height, width), prompt="",
                    source=f"uploaded {found} image, fitted to {width}x{height}")
