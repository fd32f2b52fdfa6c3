"""The `sprites` toy world: procedural videos whose tracks, visibility and sprite centres are exact.

A clip is a flat background colour with 1-3 flat-coloured sprites (circle, square, triangle) moving on smooth
random paths that bounce off the frame borders. Sprites are drawn back to front in index order (sprite 0 is
furthest back) and the order never changes, so they occlude each other consistently. An optional text-only
effect changes the background colour over time, giving text guidance something to do.

`motion = "jump"` is a diagnostic variant: each sprite jumps to a new random place at the first pixel frame of
every latent frame and stays there for that latent frame. Nothing but the tracks then says where a sprite is,
and nothing but the track IDs says which sprite it is, so a model can only colour it right by matching each
point's ID to the first frame (paper Eq. 1); in smooth motion a sprite is always near where it just was.
With `jump_drift` each sprite also moves on from its new place at a random velocity (the smooth clips' speeds, any
direction) over the latent frame's pixel frames, so only each frame's tracks say where it goes within a latent
frame (see "Sprites held still within latent frames" in docs/teacher_ids.md).
`motion = "mixed"` draws smooth or jump for each clip with even odds: training on it keeps rewarding ID reading
while the model also learns the smooth world it is evaluated on (docs/teacher_ids.md).

Why the ground truth is exact:
  * Each sprite is one fixed binary stamp translated by whole pixels (no rotation, no resampling), so every
    pixel of a sprite moves exactly with the sprite.
  * Pixel (row i, column j) covers [j, j+1) x [i, i+1) (centre (j + 0.5, i + 0.5)); a point (x, y) lies in pixel
    (floor(y), floor(x)), the same convention as `msjax.data.tracks`.
  * Tracks start at the `grid` x `grid` first-frame cell centres. A point belongs to the surface that is topmost
    in its pixel at frame 0 (a sprite, or the background); it moves with that surface (background points stay
    put) and is visible exactly when that surface is the topmost one in its pixel. Coordinates are never
    clipped: a sprite point whose pixel leaves the frame is simply invisible (random clips keep sprites inside
    the frame, so this only happens in hand-built scenes).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from msjax import config_utils
from msjax.data import tracks as tracks_lib

SHAPES = ("circle", "square", "triangle")
# Saturated sprite colours and muted background colours: the two sets are far apart in RGB (also after a
# background effect), so a sprite can always be found by its colour.
SPRITE_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
    "magenta": (220, 60, 210),
    "cyan": (40, 210, 220),
    "orange": (250, 140, 20),
}
BACKGROUND_COLORS = {
    "grey": (120, 120, 120),
    "black": (20, 20, 20),
    "navy": (30, 35, 90),
    "brown": (100, 65, 40),
}
EFFECT_DARKEN = "darken"
EFFECT_BRIGHTEN = "brighten"
EFFECT_TURN = "turn_"  # followed by a background colour name, e.g. "turn_navy"

# Shape geometry in units of the sprite radius r (the circle's radius).
SQUARE_HALF_SIDE = 0.9
TRIANGLE_CIRCUMRADIUS = 1.25  # equilateral, apex up
STAMP_EXTENT = max(1.0, SQUARE_HALF_SIDE, TRIANGLE_CIRCUMRADIUS)  # stamp half-size / r, covers every shape

MOTION_SMOOTH = "smooth"
MOTION_JUMP = "jump"
MOTION_MIXED = "mixed"
MOTIONS = (MOTION_SMOOTH, MOTION_JUMP, MOTION_MIXED)


def palette() -> dict[str, np.ndarray]:
  """Colour name -> uint8 RGB [3] for every sprite and background colour (prompts and colour detectors)."""
  return {name: np.array(rgb, np.uint8) for name, rgb in {**SPRITE_COLORS, **BACKGROUND_COLORS}.items()}


@dataclasses.dataclass(frozen=True)
class SpritesConfig:
  """Size of the world and the ranges its random scenes are drawn from.

  Lengths ending in `_frac` are fractions of min(height, width) (speeds per frame), so scenes look the same at
  any resolution: at 64x64 the radius is 5-10 px and the speed 0.4-1.5 px per frame.
  """
  height: int = 64
  width: int = 64
  num_frames: int = 45  # 1 + temporal_stride * k
  temporal_stride: int = 4
  min_sprites: int = 1
  max_sprites: int = 3
  grid: int = 16  # tracks: grid x grid first-frame query points
  effect_prob: float = 0.5  # probability of a text-only background effect
  effect_strength: float = 0.6  # how far darken/brighten move the background towards black/white
  min_radius_frac: float = 5 / 64
  max_radius_frac: float = 10 / 64
  min_speed_frac: float = 0.4 / 64
  max_speed_frac: float = 1.5 / 64
  accel_frac: float = 0.12 / 64  # std of the per-frame random acceleration before smoothing
  accel_smoothing: int = 9  # frames of the moving average that makes the acceleration smooth
  motion: str = MOTION_SMOOTH  # smooth | jump | mixed (module docstring)
  jump_drift: bool = False  # jump clips' sprites also move within each latent frame (module docstring)

  def __post_init__(self):
    config_utils.latent_frames(self.num_frames, self.temporal_stride)  # raises ConfigError if not 1 + s*k
    if self.motion not in MOTIONS:
      raise config_utils.ConfigError(f"sprite motion must be one of {', '.join(MOTIONS)}, got {self.motion!r}")
    if not 1 <= self.min_sprites <= self.max_sprites <= len(SPRITE_COLORS):
      raise config_utils.ConfigError(
          f"need 1 <= min_sprites <= max_sprites <= {len(SPRITE_COLORS)} (distinct colours), got "
          f"{self.min_sprites}..{self.max_sprites}")
    if not 0 < self.min_radius_frac <= self.max_radius_frac:
      raise config_utils.ConfigError(
          f"need 0 < min_radius_frac <= max_radius_frac, got {self.min_radius_frac}, {self.max_radius_frac}")
    stamp = 2 * _stamp_half_size(self.max_radius_frac * self.scale) + 1
    if stamp >= min(self.height, self.width):
      raise config_utils.ConfigError(
          f"sprites up to {stamp} px wide do not fit in a {self.height}x{self.width} frame with room to move; "
          f"lower max_radius_frac ({self.max_radius_frac})")
    if self.grid < 1:
      raise config_utils.ConfigError(f"grid must be >= 1, got {self.grid}")

  @property
  def scale(self) -> float:
    """Pixels per unit of a `_frac` length."""
    return float(min(self.height, self.width))

  @classmethod
  def from_config(cls, config) -> "SpritesConfig":
    """Takes the frame size, length, temporal stride and track grid from a preset ConfigDict, and the motion
    from `config.data.sprite_motion` where the config has it (smooth otherwise)."""
    data = config.get("data")
    motion = data.get("sprite_motion", MOTION_SMOOTH) if data is not None else MOTION_SMOOTH
    jump_drift = bool(data.get("jump_drift", False)) if data is not None else False
    return cls(height=config.video.height, width=config.video.width, num_frames=config.video.num_frames,
               temporal_stride=config.codec.temporal_stride, grid=config.tracks.grid, motion=motion,
               jump_drift=jump_drift)


@dataclasses.dataclass(frozen=True)
class Scene:
  """Everything random about a clip; `render_scene` turns it into pixels and ground truth deterministically.

  Sprites are listed back to front. `centres` holds each sprite's centre pixel (column, row) per frame.
  """
  shapes: tuple[str, ...]
  color_names: tuple[str, ...]
  radii: tuple[float, ...]  # pixels
  centres: np.ndarray  # int [T, S, 2]
  background_name: str
  effect: str = ""  # "" | "darken" | "brighten" | "turn_<background colour>"


@dataclasses.dataclass(frozen=True, eq=False)
class Clip:
  """A rendered clip and its exact ground truth (conventions in the module docstring).

  `centroids` is the mean pixel centre of each sprite's full stamp: what a colour detector measures when the
  sprite is unoccluded.
  """
  video: np.ndarray  # uint8 [T, H, W, 3]
  tracks: np.ndarray  # float32 [T, N, 2] pixel (x, y), N = grid * grid, not clipped
  visibility: np.ndarray  # bool [T, N]
  centroids: np.ndarray  # float32 [T, S, 2]
  sprite_visible: np.ndarray  # bool [T, S]
  colors: np.ndarray  # uint8 [S, 3]
  background: np.ndarray  # uint8 [T, 3]
  shapes: tuple[str, ...]
  prompt: str
  effect: str


# ----------------------------------------------------------------------------------------------------------
# Shapes.


def _stamp_half_size(radius: float) -> int:
  return math.ceil(radius * STAMP_EXTENT)


def sprite_stamp(shape: str, radius: float) -> np.ndarray:
  """Bool [2R+1, 2R+1] mask of a shape centred on the middle pixel, tested at pixel centres."""
  half = _stamp_half_size(radius)
  dy, dx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
  if shape == "circle":
    return dx**2 + dy**2 <= radius**2
  if shape == "square":
    return np.maximum(np.abs(dx), np.abs(dy)) <= SQUARE_HALF_SIDE * radius
  if shape == "triangle":
    circumradius = TRIANGLE_CIRCUMRADIUS * radius
    return (dy >= -circumradius) & (dy <= circumradius / 2) & (np.abs(dx) * math.sqrt(3) <= dy + circumradius)
  raise ValueError(f"unknown sprite shape {shape!r}; expected one of {SHAPES}")


# ----------------------------------------------------------------------------------------------------------
# Random scenes.


def _fold(position: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
  """Reflects an unbounded path into [low, high]: a point bouncing elastically off both walls."""
  span = high - low
  phase = np.mod(position - low, 2 * span)
  return low + span - np.abs(phase - span)


def _smooth_acceleration(rng: np.random.Generator, config: SpritesConfig, num_sprites: int) -> np.ndarray:
  """[T, S, 2] white noise averaged over `accel_smoothing` frames, so velocities change smoothly."""
  window = config.accel_smoothing
  noise = rng.normal(0.0, config.accel_frac * config.scale, (config.num_frames + window - 1, num_sprites, 2))
  summed = np.cumsum(np.concatenate([np.zeros((1, num_sprites, 2)), noise]), axis=0)
  return (summed[window:] - summed[:-window]) / window


def _centre_range(config: SpritesConfig, half_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per sprite, the lowest and highest centre pixel (x, y) [S, 2] that keep its whole stamp in the frame."""
  low = half_sizes[:, None].astype(np.int64)
  return low, np.array([config.width, config.height])[None, :] - 1 - low


def _random_paths(rng: np.random.Generator, config: SpritesConfig, half_sizes: np.ndarray) -> np.ndarray:
  """[T, S, 2] integer centre pixels (x, y): speed-limited smooth motion, bouncing so stamps stay in frame."""
  num_sprites = len(half_sizes)
  low, high = (bound.astype(np.float64) for bound in _centre_range(config, half_sizes))
  start = rng.uniform(low, high)
  angle = rng.uniform(0, 2 * np.pi, num_sprites)
  speed = rng.uniform(config.min_speed_frac, config.max_speed_frac, num_sprites) * config.scale
  velocity = (speed * np.stack([np.cos(angle), np.sin(angle)])).T  # [S, 2]
  velocity = velocity[None] + np.cumsum(_smooth_acceleration(rng, config, num_sprites), axis=0)
  norm = np.linalg.norm(velocity, axis=-1, keepdims=True)
  velocity *= np.minimum(1.0, config.max_speed_frac * config.scale / np.maximum(norm, 1e-9))
  offsets = np.concatenate([np.zeros((1, num_sprites, 2)), np.cumsum(velocity[:-1], axis=0)])
  return np.rint(_fold(start[None] + offsets, low[None], high[None])).astype(np.int32)


def _jump_paths(rng: np.random.Generator, config: SpritesConfig, half_sizes: np.ndarray) -> np.ndarray:
  """[T, S, 2] integer centre pixels (x, y): a uniform random place per latent frame, held for its pixel frames,
  or with `jump_drift` left at a random velocity (smooth clips' speeds, any direction) over them."""
  low, high = _centre_range(config, half_sizes)
  num_sprites = len(half_sizes)
  num_latent = config_utils.latent_frames(config.num_frames, config.temporal_stride)
  places = rng.integers(low, high + 1, size=(num_latent, num_sprites, 2))  # [F, S, 2]
  stride = config.temporal_stride
  frames = np.arange(config.num_frames)
  latent_of_frame = (frames + stride - 1) // stride  # frame 0 alone, then stride each
  if not config.jump_drift:
    return places[latent_of_frame].astype(np.int32)
  speed = rng.uniform(config.min_speed_frac, config.max_speed_frac, (num_latent, num_sprites)) * config.scale
  angle = rng.uniform(0, 2 * np.pi, (num_latent, num_sprites))
  velocity = speed[..., None] * np.stack([np.cos(angle), np.sin(angle)], axis=-1)  # [F, S, 2]
  steps = np.where(frames == 0, 0, (frames - 1) % stride)[:, None, None]  # pixel frames since the jump
  path = places[latent_of_frame] + steps * velocity[latent_of_frame]
  return np.rint(_fold(path, low[None], high[None])).astype(np.int32)


def random_scene(seed: int, config: SpritesConfig = SpritesConfig()) -> Scene:
  """Draws every random choice of a clip from `np.random.default_rng(seed)`."""
  rng = np.random.default_rng(seed)
  num_sprites = int(rng.integers(config.min_sprites, config.max_sprites + 1))
  shapes = tuple(str(s) for s in rng.choice(SHAPES, num_sprites))
  color_names = tuple(str(c) for c in rng.choice(list(SPRITE_COLORS), num_sprites, replace=False))
  radii = rng.uniform(config.min_radius_frac, config.max_radius_frac, num_sprites) * config.scale
  half_sizes = np.array([_stamp_half_size(r) for r in radii])
  motion = config.motion
  if motion == MOTION_MIXED:  # drawn only here, so smooth and jump scenes keep their random streams
    motion = MOTION_JUMP if rng.random() < 0.5 else MOTION_SMOOTH
  paths = _jump_paths if motion == MOTION_JUMP else _random_paths
  centres = paths(rng, config, half_sizes)
  backgrounds = list(BACKGROUND_COLORS)
  background_name = str(rng.choice(backgrounds))
  effect = ""
  if rng.random() < config.effect_prob:
    others = [b for b in backgrounds if b != background_name]
    effect = str(rng.choice([EFFECT_DARKEN, EFFECT_BRIGHTEN] + [EFFECT_TURN + b for b in others]))
  return Scene(shapes=shapes, color_names=color_names, radii=tuple(float(r) for r in radii), centres=centres,
               background_name=background_name, effect=effect)


# ----------------------------------------------------------------------------------------------------------
# Rendering.


def _background_colors(scene: Scene, config: SpritesConfig) -> np.ndarray:
  """uint8 [T, 3]: the background colour, moving linearly to the effect's target over the clip."""
  start = np.array(BACKGROUND_COLORS[scene.background_name], np.float64)
  if not scene.effect:
    target = start
  elif scene.effect == EFFECT_DARKEN:
    target = start * (1 - config.effect_strength)
  elif scene.effect == EFFECT_BRIGHTEN:
    target = start + (255 - start) * config.effect_strength
  elif scene.effect.startswith(EFFECT_TURN) and scene.effect[len(EFFECT_TURN):] in BACKGROUND_COLORS:
    target = np.array(BACKGROUND_COLORS[scene.effect[len(EFFECT_TURN):]], np.float64)
  else:
    raise ValueError(f"unknown background effect {scene.effect!r}")
  weight = np.linspace(0.0, 1.0, config.num_frames)[:, None]
  return np.rint(start + (target - start) * weight).astype(np.uint8)


def _effect_phrase(effect: str) -> str:
  if effect == EFFECT_DARKEN:
    return "the background slowly darkens"
  if effect == EFFECT_BRIGHTEN:
    return "the background slowly brightens"
  return f"the background slowly turns {effect[len(EFFECT_TURN):]}"


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _prompt(scene: Scene) -> str:
  items = [f"{_article(color)} {color} {shape}" for color, shape in zip(scene.color_names, scene.shapes)]
  listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
  prompt = f"{listed} on a {scene.background_name} background"
  return f"{prompt}; {_effect_phrase(scene.effect)}" if scene.effect else prompt


def _check_scene(scene: Scene, config: SpritesConfig) -> None:
  num_sprites = len(scene.shapes)
  if not (len(scene.color_names) == len(scene.radii) == num_sprites and num_sprites >= 1):
    raise ValueError(f"scene lists {num_sprites} shapes, {len(scene.color_names)} colours and "
                     f"{len(scene.radii)} radii; expected the same number (>= 1) of each")
  if scene.centres.shape != (config.num_frames, num_sprites, 2):
    raise ValueError(f"scene centres must have shape {(config.num_frames, num_sprites, 2)}, "
                     f"found {scene.centres.shape}")
  if len(set(scene.color_names)) != num_sprites or not set(scene.color_names) <= set(SPRITE_COLORS):
    raise ValueError(f"sprite colours must be distinct names from {sorted(SPRITE_COLORS)}, got {scene.color_names}")
  if scene.background_name not in BACKGROUND_COLORS:
    raise ValueError(f"background must be one of {sorted(BACKGROUND_COLORS)}, got {scene.background_name!r}")


def render_scene(scene: Scene, config: SpritesConfig = SpritesConfig()) -> Clip:
  """Draws a scene and derives its tracks, visibility, centroids and prompt (vectorised over frames)."""
  _check_scene(scene, config)
  num_frames, height, width = config.num_frames, config.height, config.width
  num_sprites = len(scene.shapes)
  frames = np.arange(num_frames)[:, None]

  # owner[t, i, j]: index of the topmost sprite in pixel (i, j) at frame t, -1 for background.
  owner = np.full((num_frames, height, width), -1, np.int8)
  centroids = np.zeros((num_frames, num_sprites, 2), np.float32)
  for index, (shape, radius) in enumerate(zip(scene.shapes, scene.radii)):
    stamp = sprite_stamp(shape, radius)
    half = stamp.shape[0] // 2
    rows, cols = np.nonzero(stamp)
    rows = scene.centres[:, index, 1, None] + rows[None] - half  # [T, M]
    cols = scene.centres[:, index, 0, None] + cols[None] - half
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    owner[np.broadcast_to(frames, rows.shape)[inside], rows[inside], cols[inside]] = index
    stamp_centre = np.array([cols.mean(axis=1), rows.mean(axis=1)]).T + 0.5  # pixel centres
    centroids[:, index] = stamp_centre

  colors = np.array([SPRITE_COLORS[name] for name in scene.color_names], np.uint8)
  background = _background_colors(scene, config)
  surface_colors = np.concatenate([background[:, None], np.broadcast_to(colors, (num_frames,) + colors.shape)],
                                  axis=1)  # [T, S+1, 3], surface 0 = background
  surface = frames[:, :, None].astype(np.int32) * (num_sprites + 1) + owner + 1  # [T, H, W] into the flat table
  video = np.take(surface_colors.reshape(-1, 3), surface, axis=0)

  # Tracks: each query point follows the surface that is topmost in its pixel at frame 0.
  start = tracks_lib.grid_points(height, width, config.grid)  # [N, 2]
  start_pixel = np.floor(start).astype(np.int64)
  start_owner = owner[0, start_pixel[:, 1], start_pixel[:, 0]].astype(np.int64)
  displacement = np.concatenate([np.zeros((num_frames, 1, 2), np.int64),
                                 scene.centres - scene.centres[:1]], axis=1)  # [T, S+1, 2]
  shift = displacement[:, start_owner + 1]  # [T, N, 2]
  points = (start[None] + shift).astype(np.float32)
  pixel = start_pixel[None] + shift
  in_frame = (pixel[..., 0] >= 0) & (pixel[..., 0] < width) & (pixel[..., 1] >= 0) & (pixel[..., 1] < height)
  owner_there = owner[frames, np.clip(pixel[..., 1], 0, height - 1), np.clip(pixel[..., 0], 0, width - 1)]
  visibility = in_frame & (owner_there == start_owner[None])

  counts = np.bincount((frames * (num_sprites + 1) + owner.reshape(num_frames, -1) + 1).ravel(),
                       minlength=num_frames * (num_sprites + 1)).reshape(num_frames, num_sprites + 1)
  return Clip(video=video, tracks=points, visibility=visibility, centroids=centroids,
              sprite_visible=counts[:, 1:] > 0, colors=colors, background=background, shapes=scene.shapes,
              prompt=_prompt(scene), effect=scene.effect)


def render_clip(seed: int, config: SpritesConfig = SpritesConfig()) -> Clip:
  """The clip for `seed`: identical arrays for the same seed and config."""
  return render_scene(random_scene(seed, config), config)


# Layout of `example_scene` as fractions of the frame: (shape, colour, radius_frac, x, y, bob x, bob y).
_EXAMPLE_SPRITES = (
    ("circle", "red", 8 / 64, 0.25, 0.28, 0.03, 0.02),
    ("square", "blue", 7 / 64, 0.75, 0.30, -0.02, 0.03),
    ("triangle", "yellow", 7 / 64, 0.50, 0.72, 0.04, -0.02),
)
_EXAMPLE_BACKGROUND = "grey"


def example_scene(config: SpritesConfig = SpritesConfig()) -> Clip:
  """The built-in scene `sample.py` starts from: three well separated sprites bobbing gently, no effect.

  Hand-placed rather than drawn from a seed so its layout is the same at every size and length.
  """
  t = np.linspace(0.0, 2 * np.pi, config.num_frames)[:, None]
  size = np.array([config.width, config.height], np.float64)
  centres = np.stack([
      np.rint((np.array([x, y]) + np.array([bob_x, bob_y]) * np.sin(t)) * size).astype(np.int32)
      for _, _, _, x, y, bob_x, bob_y in _EXAMPLE_SPRITES
  ], axis=1)
  scene = Scene(shapes=tuple(s[0] for s in _EXAMPLE_SPRITES), color_names=tuple(s[1] for s in _EXAMPLE_SPRITES),
                radii=tuple(s[2] * config.scale for s in _EXAMPLE_SPRITES), centres=centres,
                background_name=_EXAMPLE_BACKGROUND)
  return render_scene(scene, config)
