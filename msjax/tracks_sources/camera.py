"""Camera-control tracks: first-frame grid points lifted to 3-D with a depth map and reprojected along a camera path.

This is how the paper drives a static scene with a camera move (section 7.2): it needs only 2-D tracks, so a
camera move becomes the image motion each scene point would have if the camera moved that way.

Conventions (OpenCV's pinhole camera):
  * camera axes: x right, y down, z forward (the viewing direction);
  * a pixel point (u, v) follows msjax.data.tracks (pixel j covers [j, j+1)); a camera point (x, y, z) with z > 0
    projects to u = cx + s * fx * x / z, v = cy + s * fy * y / z, where s is the path's zoom factor;
  * depth is z-depth (distance along the optical axis, not along the ray), as MoGe and most depth nets give it;
    +inf marks points at infinity (sky), which rotations move and translations do not;
  * a pose is camera-to-world, [R | C]: R's columns are the camera axes in world coordinates, C the camera
    centre. The world is the first frame's camera, so a path is stored relative to frame 0 (pose 0 = identity).

Presets move the camera over T frames as `ease(i / (T - 1)) * amount` for frame i:
  pan    turn about the camera's vertical axis by amount x horizontal field of view (+ turns right)
  tilt   turn about the camera's horizontal axis by amount x vertical field of view (+ turns up)
  zoom   scale the focal length to 1 + amount (+ zooms in; the camera does not move)
  dolly  move along the optical axis by amount x pivot depth (+ moves forward)
  truck  move sideways by amount x pivot depth (+ moves right): a translational pan, with parallax
  orbit  circle the pivot (on the optical axis at the scene's median depth) about the vertical axis by
         amount x horizontal field of view, turning to keep it centred (+ moves right)
Translations scale with the scene's median depth, so presets give the same tracks whatever the depth map's unit.
Points behind the camera (z <= 0) or outside the frame are hidden for that frame and clipped into it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Callable

import chex
import cv2
import numpy as np
from scipy.spatial.transform import Rotation

from msjax.data import tracks as tracks_lib
from msjax.tracks_sources import TrackSourceError, TrackSourceWarning, fit_to_frame

DEFAULT_FOV_DEGREES = 60.0  # horizontal field of view when no focal length is given
PNG_DEPTH_SCALE = 1e-3  # 16-bit depth PNGs conventionally store millimetres
PLANE_DEPTH = 1.0  # depth of the fronto-parallel plane used when no depth map is given
ROTATION_TOLERANCE = 1e-4  # max |R^T R - I| entry accepted for a pose's rotation
DEPTH_SUFFIXES = (".npy", ".png")
XYZ = 3

EASINGS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda s: s,
    "ease_in": lambda s: 1.0 - np.cos(0.5 * np.pi * s),
    "ease_out": lambda s: np.sin(0.5 * np.pi * s),
    "ease_in_out": lambda s: 0.5 - 0.5 * np.cos(np.pi * s),
}
PRESETS = ("pan", "tilt", "zoom", "dolly", "truck", "orbit")


@dataclasses.dataclass(frozen=True)
class Intrinsics:
  """A pinhole camera for a height x width frame: focal lengths and principal point in pixels."""
  height: int
  width: int
  fx: float
  fy: float
  cx: float
  cy: float

  def __post_init__(self):
    if self.height <= 0 or self.width <= 0:
      raise ValueError(f"frame size must be positive, got {self.height}x{self.width}")
    if not (self.fx > 0 and self.fy > 0 and math.isfinite(self.fx) and math.isfinite(self.fy)):
      raise ValueError(f"focal lengths must be positive and finite, got fx={self.fx}, fy={self.fy}")

  @classmethod
  def from_fov(cls, height: int, width: int, fov_degrees: float = DEFAULT_FOV_DEGREES) -> Intrinsics:
    """Square pixels, principal point at the frame centre, `fov_degrees` across the width."""
    if not 0 < fov_degrees < 180:
      raise ValueError(f"horizontal field of view must be in (0, 180) degrees, got {fov_degrees}")
    focal = 0.5 * width / math.tan(0.5 * math.radians(fov_degrees))
    return cls(height=height, width=width, fx=focal, fy=focal, cx=0.5 * width, cy=0.5 * height)

  @property
  def horizontal_fov(self) -> float:
    """Radians across the frame width."""
    return 2.0 * math.atan(0.5 * self.width / self.fx)

  @property
  def vertical_fov(self) -> float:
    """Radians across the frame height."""
    return 2.0 * math.atan(0.5 * self.height / self.fy)


@dataclasses.dataclass(frozen=True, eq=False)
class CameraPath:
  """Per-frame camera-to-world poses float64 [T, 4, 4] (pose 0 = identity) and zoom factors float64 [T]."""
  cam_to_world: np.ndarray
  focal_scale: np.ndarray

  def __post_init__(self):
    chex.assert_rank(self.cam_to_world, 3)
    chex.assert_shape(self.cam_to_world, (None, 4, 4))
    chex.assert_shape(self.focal_scale, self.cam_to_world.shape[:1])

  @property
  def num_frames(self) -> int:
    return self.cam_to_world.shape[0]


def _rigid(rotation: np.ndarray, centre: np.ndarray) -> np.ndarray:
  """[T, 3, 3] rotations and [T, 3] centres -> [T, 4, 4] camera-to-world matrices."""
  poses = np.zeros((rotation.shape[0], 4, 4))
  poses[:, :3, :3] = rotation
  poses[:, :3, 3] = centre
  poses[:, 3, 3] = 1.0
  return poses


def preset_path(preset: str, amount: float, num_frames: int, intrinsics: Intrinsics, *, easing: str = "linear",
                pivot_depth: float = PLANE_DEPTH) -> CameraPath:
  """The camera path of a named preset (table in the module docstring) over `num_frames` frames."""
  if preset not in PRESETS:
    raise ValueError(f"unknown camera preset {preset!r}; expected one of {PRESETS}")
  if easing not in EASINGS:
    raise ValueError(f"unknown easing {easing!r}; expected one of {tuple(EASINGS)}")
  if num_frames < 1:
    raise ValueError(f"a camera path needs at least one frame, got num_frames={num_frames}")
  if not (pivot_depth > 0 and math.isfinite(pivot_depth)):
    raise ValueError(f"pivot depth must be positive and finite, got {pivot_depth}")
  progress = amount * EASINGS[easing](np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1))
  rotation = np.broadcast_to(np.eye(XYZ), (num_frames, XYZ, XYZ))
  centre = np.zeros((num_frames, XYZ))
  focal_scale = np.ones(num_frames)
  if preset == "pan":
    rotation = Rotation.from_euler("y", progress[:, None] * intrinsics.horizontal_fov).as_matrix()
  elif preset == "tilt":
    rotation = Rotation.from_euler("x", progress[:, None] * intrinsics.vertical_fov).as_matrix()
  elif preset == "zoom":
    if amount <= -1:
      raise ValueError(f"zoom amount must be > -1 (the focal length ends at 1 + amount times its start), got {amount}")
    focal_scale = 1.0 + progress
  elif preset == "dolly":
    centre[:, 2] = progress * pivot_depth
  elif preset == "truck":
    centre[:, 0] = progress * pivot_depth
  else:  # orbit: turning by -angle about y looks back at the pivot from a centre moved to the right
    rotation = Rotation.from_euler("y", -progress[:, None] * intrinsics.horizontal_fov).as_matrix()
    pivot = np.array([0.0, 0.0, pivot_depth])
    centre = pivot + rotation @ -pivot
  return CameraPath(cam_to_world=_rigid(rotation, centre), focal_scale=focal_scale)


# ----------------------------------------------------------------------------------------------------------
# Inputs from files.


def _check_file(path: str, suffixes: tuple[str, ...], what: str) -> str:
  """The lower-case suffix of an existing file, or an error naming the file and what was expected."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in suffixes:
    raise TrackSourceError(f"{path}: expected a {what} file ending in {' or '.join(suffixes)}, found {suffix!r}")
  if not os.path.isfile(path):
    raise TrackSourceError(f"{path}: {what} file not found")
  return suffix


def _load_npy(path: str, what: str) -> np.ndarray:
  try:
    array = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise TrackSourceError(f"{path}: could not read the {what} as a .npy array ({type(e).__name__}: {e})") from e
  if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
    raise TrackSourceError(f"{path}: the {what} must hold real numbers, found dtype {array.dtype}")
  return array


def poses_to_path(poses: np.ndarray, *, source: str = "<poses>") -> CameraPath:
  """[T, 4, 4] or [T, 3, 4] camera-to-world poses (OpenCV axes) -> a path relative to the first pose."""
  poses = np.asarray(poses, np.float64)
  if poses.ndim != 3 or poses.shape[1:] not in ((4, 4), (3, 4)) or poses.shape[0] == 0:
    raise TrackSourceError(f"{source}: camera poses must have shape (T, 4, 4) or (T, 3, 4) camera-to-world, "
                           f"found {poses.shape}")
  if not np.isfinite(poses).all():
    raise TrackSourceError(f"{source}: camera poses must be finite, found {int((~np.isfinite(poses)).sum())} "
                           f"NaN/inf values")
  if poses.shape[1] == 4 and not np.allclose(poses[:, 3], [0.0, 0.0, 0.0, 1.0]):
    bad = int(np.argwhere(~np.isclose(poses[:, 3], [0.0, 0.0, 0.0, 1.0]).all(axis=-1))[0, 0])
    raise TrackSourceError(f"{source}: the last row of every 4x4 pose must be [0, 0, 0, 1], found "
                           f"{poses[bad, 3].tolist()} in pose {bad}")
  rotation = poses[:, :3, :3]
  drift = np.abs(np.swapaxes(rotation, 1, 2) @ rotation - np.eye(XYZ)).max(axis=(1, 2))
  improper = np.linalg.det(rotation) <= 0
  if (drift > ROTATION_TOLERANCE).any() or improper.any():
    bad = int(np.argmax((drift > ROTATION_TOLERANCE) | improper))
    raise TrackSourceError(f"{source}: pose {bad} is not a rigid camera-to-world transform (its 3x3 part must be a "
                           f"rotation: orthonormal with determinant +1; found max |R^T R - I| = {drift[bad]:.3g}, "
                           f"det = {np.linalg.det(rotation[bad]):.3g}); scale or shear is not supported")
  absolute = _rigid(rotation, poses[:, :3, 3])
  relative = np.linalg.inv(absolute[0]) @ absolute
  return CameraPath(cam_to_world=relative, focal_scale=np.ones(poses.shape[0]))


def load_poses(path: str | os.PathLike) -> CameraPath:
  """A `.npy` of per-frame camera-to-world poses (see `poses_to_path`)."""
  source = os.fspath(path)
  _check_file(source, (".npy",), "camera poses")
  return poses_to_path(_load_npy(source, "camera poses"), source=source)


def _read_depth_png(path: str, png_scale: float) -> np.ndarray:
  image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  if image is None:
    raise TrackSourceError(f"{path}: could not read the depth map as a PNG image")
  if image.dtype != np.uint16 or image.ndim != 2:
    channels = 1 if image.ndim == 2 else image.shape[2]
    raise TrackSourceError(f"{path}: a depth PNG must be single-channel 16-bit, found {image.dtype} with "
                           f"{channels} channel(s)")
  return image.astype(np.float64) * png_scale


def load_depth(path: str | os.PathLike, *, height: int, width: int, png_scale: float = PNG_DEPTH_SCALE) -> np.ndarray:
  """A depth map as float32 [height, width]: a `.npy` H x W float array, or a 16-bit PNG times `png_scale`.

  Depth must be positive; +inf is accepted (points at infinity). A map of another size is resized to the frame
  (nearest neighbour, so no depth is invented across object edges) with a warning.
  """
  source = os.fspath(path)
  suffix = _check_file(source, DEPTH_SUFFIXES, "depth map")
  if suffix == ".npy":
    depth = _load_npy(source, "depth map").astype(np.float64)
    if depth.ndim == 3 and depth.shape[-1] == 1:  # H x W x 1
      depth = depth[..., 0]
    elif depth.ndim == 3 and depth.shape[0] == 1:  # 1 x H x W
      depth = depth[0]
  else:
    if not png_scale > 0:
      raise ValueError(f"png_scale must be positive, got {png_scale}")
    depth = _read_depth_png(source, png_scale)
  if depth.ndim != 2 or 0 in depth.shape:
    raise TrackSourceError(f"{source}: a depth map must be a 2-D H x W array, found shape {depth.shape}")
  invalid = np.isnan(depth) | (depth <= 0)
  if invalid.any():
    raise TrackSourceError(f"{source}: depth must be positive (or +inf for points at infinity), found "
                           f"{int(invalid.sum())} of {depth.size} pixels NaN or <= 0 (missing depth? fill it first)")
  if depth.shape != (height, width):
    warnings.warn(f"{source}: depth map is {depth.shape[0]}x{depth.shape[1]} (HxW), the frame is {height}x{width}; "
                  f"resized with nearest-neighbour sampling", TrackSourceWarning, stacklevel=2)
    depth = cv2.resize(depth.astype(np.float32), (width, height), interpolation=cv2.INTER_NEAREST)
  return depth.astype(np.float32)


def median_depth(depth: np.ndarray, *, source: str = "<depth>") -> float:
  """The scene's median finite depth: the pivot of `orbit` and the unit of the translation presets."""
  finite = depth[np.isfinite(depth)]
  if finite.size == 0:
    raise TrackSourceError(f"{source}: every depth is infinite; a scene scale (median finite depth) is needed")
  return float(np.median(finite))


# ----------------------------------------------------------------------------------------------------------
# Reprojection.


def reproject(depth: np.ndarray, path: CameraPath, intrinsics: Intrinsics,
              query_points: np.ndarray) -> tracks_lib.Tracks:
  """Tracks of `query_points` [N, 2] (first-frame pixels) as the camera follows `path` over the static scene.

  Each point takes the depth of the pixel it lies in. Hidden points (behind the camera or out of the frame)
  are clipped into the frame; their coordinates carry no meaning beyond that.
  """
  height, width = intrinsics.height, intrinsics.width
  chex.assert_shape(depth, (height, width))
  chex.assert_rank(query_points, 2)
  chex.assert_axis_dimension(query_points, 1, tracks_lib.XY)
  query = np.asarray(query_points, np.float64)
  size = np.array([width, height], np.float64)
  if ((query < 0) | (query >= size)).any():
    raise ValueError(f"query points must lie in the {height}x{width} frame, found x in [{query[:, 0].min()}, "
                     f"{query[:, 0].max()}], y in [{query[:, 1].min()}, {query[:, 1].max()}]")
  pixel = np.floor(query).astype(np.int64)
  point_depth = np.asarray(depth, np.float64)[pixel[:, 1], pixel[:, 0]]
  focal = np.array([intrinsics.fx, intrinsics.fy])
  principal = np.array([intrinsics.cx, intrinsics.cy])
  rays = np.concatenate([(query - principal) / focal, np.ones((len(query), 1))], axis=-1)  # z = 1
  at_infinity = np.isinf(point_depth)
  # Homogeneous world points: finite points (ray * depth, 1), points at infinity (direction, 0).
  world = np.where(at_infinity[:, None], rays, rays * np.where(at_infinity, 1.0, point_depth)[:, None])
  weight = np.where(at_infinity, 0.0, 1.0)
  rotation = path.cam_to_world[:, :3, :3]
  centre = path.cam_to_world[:, :3, 3]
  offset = world[None] - weight[None, :, None] * centre[:, None, :]  # [T, N, 3]
  camera = np.einsum("tji,tnj->tni", rotation, offset)  # R^T (X - w C)
  depth_in_camera = camera[..., 2]
  in_front = depth_in_camera > 0
  safe_depth = np.where(in_front, depth_in_camera, 1.0)
  projected = principal + path.focal_scale[:, None, None] * focal * camera[..., :2] / safe_depth[..., None]
  # Far-off projections are pulled to just outside the frame first, so float32 cannot overflow; in/out is kept.
  projected = np.clip(projected, -1.0, size + 1.0)
  return fit_to_frame(projected.astype(np.float32), in_front, height=height, width=width, source="camera path")


# ----------------------------------------------------------------------------------------------------------
# The whole source: files and settings in, tracks out.


def camera_tracks(intrinsics: Intrinsics, *, grid: int, preset: str | None = None, amount: float = 0.0,
                  num_frames: int | None = None, easing: str = "linear", poses_path: str | os.PathLike | None = None,
                  depth_path: str | os.PathLike | None = None, png_scale: float = PNG_DEPTH_SCALE) -> tracks_lib.Tracks:
  """Tracks of a `grid` x `grid` lattice of first-frame points under a camera preset or a pose file.

  Without `depth_path` the scene is a fronto-parallel plane at `PLANE_DEPTH`, so only the move's shape matters.
  A pose file fixes the frame count; `num_frames`, if also given, must agree with it.
  """
  if (preset is None) == (poses_path is None):
    raise ValueError(f"give exactly one camera path: a preset or a pose file; got preset={preset!r}, "
                     f"poses_path={poses_path!r}")
  if grid < 1:
    raise ValueError(f"grid must be >= 1, got {grid}")
  height, width = intrinsics.height, intrinsics.width
  if depth_path is None:
    depth = np.full((height, width), PLANE_DEPTH, np.float32)
    depth_source = "<plane>"
  else:
    depth = load_depth(depth_path, height=height, width=width, png_scale=png_scale)
    depth_source = os.fspath(depth_path)
  if poses_path is not None:
    path = load_poses(poses_path)
    if num_frames is not None and num_frames != path.num_frames:
      raise TrackSourceError(f"{os.fspath(poses_path)}: the pose file has {path.num_frames} frames, but "
                             f"num_frames={num_frames} was asked for; drop one or make them agree")
  else:
    if num_frames is None:
      raise ValueError("a camera preset needs num_frames")
    path = preset_path(preset, amount, num_frames, intrinsics, easing=easing,
                       pivot_depth=median_depth(depth, source=depth_source))
  return reproject(depth, path, intrinsics, tracks_lib.grid_points(height, width, grid))
