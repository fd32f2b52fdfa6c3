"""Camera-control tracks: preset moves against closed-form pinhole geometry, pose files, depth files, the CLI."""

import math
import re

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from msjax.data import tracks as tracks_lib
from msjax.tracks_sources import TrackSourceError, TrackSourceWarning
from msjax.tracks_sources import __main__ as cli
from msjax.tracks_sources import camera

HEIGHT, WIDTH = 32, 48
NUM_FRAMES = 5
GRID = 6
INTRINSICS = camera.Intrinsics.from_fov(HEIGHT, WIDTH)
ATOL = 1e-3  # px; float32 output of float64 maths


def _linear_progress(amount: float) -> np.ndarray:
  return amount * np.linspace(0.0, 1.0, NUM_FRAMES)


def _grid() -> np.ndarray:
  return tracks_lib.grid_points(HEIGHT, WIDTH, GRID).astype(np.float64)


def _in_frame(points: np.ndarray) -> np.ndarray:
  return ((points >= 0) & (points < [WIDTH, HEIGHT])).all(axis=-1)


def _assert_matches(tracks: tracks_lib.Tracks, expected: np.ndarray) -> None:
  """Visible exactly where the expected point is in the frame, and there at the expected position."""
  inside = _in_frame(expected)
  np.testing.assert_array_equal(tracks.visible, inside)
  np.testing.assert_allclose(tracks.points[inside], expected[inside], atol=ATOL)


def _plane(depth: float) -> np.ndarray:
  return np.full((HEIGHT, WIDTH), depth, np.float32)


def _preset(preset: str, amount: float, depth: np.ndarray, easing: str = "linear") -> tracks_lib.Tracks:
  path = camera.preset_path(preset, amount, NUM_FRAMES, INTRINSICS, easing=easing,
                            pivot_depth=camera.median_depth(depth))
  return camera.reproject(depth, path, INTRINSICS, _grid())


# ----------------------------------------------------------------------------------------------------------
# Presets against closed forms.


@pytest.mark.parametrize("depth", [2.0, 7.0])
def test_rotational_pan_moves_points_by_the_turn_angle(depth):
  amount = 0.2
  tracks = _preset("pan", amount, _plane(depth))
  angle = _linear_progress(amount)[:, None] * INTRINSICS.horizontal_fov  # [T, 1]
  grid = _grid()
  slope = (grid[:, 0] - INTRINSICS.cx) / INTRINSICS.fx  # tan of each point's angle off the axis
  expected_x = INTRINSICS.cx + INTRINSICS.fx * np.tan(np.arctan(slope) - angle)
  expected_y = INTRINSICS.cy + (grid[:, 1] - INTRINSICS.cy) / (slope * np.sin(angle) + np.cos(angle))
  _assert_matches(tracks, np.stack([expected_x, expected_y], axis=-1))
  assert not tracks.visible[-1].all(), "a 12-degree turn must push the left-most columns out of the frame"


def test_translational_pan_shifts_every_point_by_focal_times_baseline_over_depth(tmp_path):
  depth, amount = 3.0, 0.1
  depth_file = tmp_path / "plane.npy"
  np.save(depth_file, _plane(depth))
  tracks = camera.camera_tracks(INTRINSICS, grid=GRID, preset="truck", amount=amount, num_frames=NUM_FRAMES,
                                depth_path=depth_file)
  baseline = _linear_progress(amount) * depth  # the truck preset moves amount x the median depth
  shift = -INTRINSICS.fx * baseline / depth
  expected = _grid()[None] + np.stack([shift, np.zeros_like(shift)], axis=-1)[:, None]
  _assert_matches(tracks, expected)


def test_zoom_scales_offsets_from_the_principal_point_by_the_focal_ratio():
  amount = 0.5
  tracks = _preset("zoom", amount, _plane(2.0), easing="ease_in_out")
  progress = np.linspace(0.0, 1.0, NUM_FRAMES)
  ratio = 1.0 + amount * (0.5 - 0.5 * np.cos(np.pi * progress))  # ease_in_out
  principal = np.array([INTRINSICS.cx, INTRINSICS.cy])
  expected = principal + ratio[:, None, None] * (_grid() - principal)[None]
  _assert_matches(tracks, expected)
  assert ratio[NUM_FRAMES // 2] == pytest.approx(1.0 + amount / 2)


def test_dolly_in_over_a_plane_scales_by_depth_over_remaining_depth():
  depth, amount = 4.0, 0.5
  tracks = _preset("dolly", amount, _plane(depth))
  travelled = _linear_progress(amount) * depth
  scale = depth / (depth - travelled)  # ends at 2x
  principal = np.array([INTRINSICS.cx, INTRINSICS.cy])
  expected = principal + scale[:, None, None] * (_grid() - principal)[None]
  _assert_matches(tracks, expected)
  assert scale[-1] == pytest.approx(2.0)


def test_orbit_keeps_the_pivot_fixed_and_shows_parallax():
  depth = _plane(2.0)
  depth[:8, :8] = 6.0  # far and near patches: fewer than half the pixels, so the median (pivot) stays 2
  depth[:8, 8:16] = 1.0
  path = camera.preset_path("orbit", 0.15, NUM_FRAMES, INTRINSICS, pivot_depth=camera.median_depth(depth))
  centre = [INTRINSICS.cx, INTRINSICS.cy]
  near, far = [12.5, 4.5], [4.5, 4.5]
  tracks = camera.reproject(depth, path, INTRINSICS, np.array([centre, near, far]))
  assert tracks.visible.all()
  np.testing.assert_allclose(tracks.points[:, 0], np.broadcast_to(centre, (NUM_FRAMES, 2)), atol=ATOL)
  near_motion = tracks.points[-1, 1, 0] - tracks.points[0, 1, 0]
  far_motion = tracks.points[-1, 2, 0] - tracks.points[0, 2, 0]
  # The camera circles right around the pivot: nearer than it, points move left; beyond it, right.
  assert near_motion < -0.5 and far_motion > 0.5


def test_points_at_infinity_follow_rotation_but_not_translation():
  depth = _plane(2.0)
  depth[:, WIDTH // 2:] = np.inf  # right half is sky
  grid = _grid()
  sky = grid[:, 0] >= WIDTH // 2
  truck = _preset("truck", 0.1, depth)
  np.testing.assert_allclose(truck.points[:, sky], np.broadcast_to(grid[sky], truck.points[:, sky].shape), atol=ATOL)
  assert (np.abs(truck.points[-1, ~sky, 0] - grid[~sky, 0]) > 1).all()
  pan = _preset("pan", 0.1, depth)
  np.testing.assert_allclose(pan.points[:, sky], _preset("pan", 0.1, _plane(2.0)).points[:, sky], atol=ATOL)


# ----------------------------------------------------------------------------------------------------------
# Pose files and the camera convention.


def _pose(rotation: np.ndarray, centre: np.ndarray) -> np.ndarray:
  pose = np.eye(4)
  pose[:3, :3] = rotation
  pose[:3, 3] = centre
  return pose


def test_pose_reprojection_agrees_with_opencv_project_points():
  rng = np.random.default_rng(0)
  depth = rng.uniform(3.0, 6.0, (HEIGHT, WIDTH)).astype(np.float32)
  rotation = Rotation.from_euler("xyz", [0.05, -0.08, 0.03]).as_matrix()
  centre = np.array([0.2, -0.1, 0.3])
  path = camera.poses_to_path(np.stack([np.eye(4), _pose(rotation, centre)]))
  grid = _grid()
  tracks = camera.reproject(depth, path, INTRINSICS, grid)

  pixel = np.floor(grid).astype(int)
  point_depth = depth[pixel[:, 1], pixel[:, 0]].astype(np.float64)
  world = np.stack([(grid[:, 0] - INTRINSICS.cx) / INTRINSICS.fx * point_depth,
                    (grid[:, 1] - INTRINSICS.cy) / INTRINSICS.fy * point_depth, point_depth], axis=-1)
  matrix = np.array([[INTRINSICS.fx, 0, INTRINSICS.cx], [0, INTRINSICS.fy, INTRINSICS.cy], [0, 0, 1]])
  world_to_camera = rotation.T
  rvec, _ = cv2.Rodrigues(world_to_camera)
  projected, _ = cv2.projectPoints(world, rvec, -world_to_camera @ centre, matrix, None)
  expected = np.stack([grid, projected[:, 0]])
  _assert_matches(tracks, expected)


@pytest.mark.parametrize("preset", ["pan", "orbit", "dolly"])
@pytest.mark.parametrize("layout", ["4x4", "3x4"])
def test_pose_file_reproduces_the_preset(tmp_path, preset, layout):
  depth = _plane(2.5)
  depth[20:, 30:] = 4.0
  preset_tracks = _preset(preset, 0.2, depth)
  path = camera.preset_path(preset, 0.2, NUM_FRAMES, INTRINSICS, pivot_depth=camera.median_depth(depth))
  # Poses in some other world frame: the source must express them relative to the first camera.
  world = _pose(Rotation.from_euler("zyx", [0.7, -0.4, 1.1]).as_matrix(), np.array([3.0, -1.0, 5.0]))
  poses = world @ path.cam_to_world
  poses_file = tmp_path / "poses.npy"
  np.save(poses_file, poses if layout == "4x4" else poses[:, :3])
  depth_file = tmp_path / "depth.npy"
  np.save(depth_file, depth)
  from_file = camera.camera_tracks(INTRINSICS, grid=GRID, poses_path=poses_file, depth_path=depth_file)
  np.testing.assert_array_equal(from_file.visible, preset_tracks.visible)
  np.testing.assert_allclose(from_file.points, preset_tracks.points, atol=ATOL)


def test_points_behind_the_camera_are_hidden():
  depth = _plane(4.0)
  depth[:, :WIDTH // 2] = 1.0  # left half near
  forward = _pose(np.eye(3), np.array([0.0, 0.0, 2.0]))  # step past the near half
  tracks = camera.reproject(depth, camera.poses_to_path(np.stack([np.eye(4), forward])), INTRINSICS, _grid())
  near = _grid()[:, 0] < WIDTH // 2
  assert tracks.visible[0].all()
  assert not tracks.visible[1, near].any()
  principal = np.array([INTRINSICS.cx, INTRINSICS.cy])
  expected_far = principal + 2.0 * (_grid()[~near] - principal)  # depth 4 -> 2
  _assert_matches(tracks_lib.Tracks(points=tracks.points[1:, ~near], visible=tracks.visible[1:, ~near]),
                  expected_far[None])
  assert tracks.visible[1, ~near].any()


@pytest.mark.parametrize("poses, message", [
    (np.zeros((3, 4, 3)), "shape (T, 4, 4) or (T, 3, 4)"),
    (np.stack([np.eye(4), np.diag([2.0, 2.0, 2.0, 1.0])]), "pose 1 is not a rigid"),
    (np.stack([np.eye(4), np.diag([1.0, 1.0, -1.0, 1.0])]), "pose 1 is not a rigid"),
])
def test_bad_pose_file_names_the_file(tmp_path, poses, message):
  poses_file = tmp_path / "bad_poses.npy"
  np.save(poses_file, poses)
  with pytest.raises(TrackSourceError, match=re.escape(str(poses_file)) + ".*" + re.escape(message)):
    camera.load_poses(poses_file)


def test_pose_file_frame_count_must_agree(tmp_path):
  poses_file = tmp_path / "poses.npy"
  np.save(poses_file, np.broadcast_to(np.eye(4), (3, 4, 4)))
  with pytest.raises(TrackSourceError, match="3 frames"):
    camera.camera_tracks(INTRINSICS, grid=GRID, poses_path=poses_file, num_frames=NUM_FRAMES)


# ----------------------------------------------------------------------------------------------------------
# Depth files.


def test_depth_png_scaled_and_resized_depth_with_warning(tmp_path):
  rng = np.random.default_rng(1)
  millimetres = rng.integers(500, 9000, (HEIGHT // 2, WIDTH // 2)).astype(np.uint16)
  png = tmp_path / "depth.png"
  assert cv2.imwrite(str(png), millimetres)
  with pytest.warns(TrackSourceWarning, match=re.escape(str(png)) + f".*16x24.*{HEIGHT}x{WIDTH}"):
    depth = camera.load_depth(png, height=HEIGHT, width=WIDTH)
  assert depth.shape == (HEIGHT, WIDTH) and depth.dtype == np.float32
  np.testing.assert_allclose(depth[::2, ::2], millimetres * camera.PNG_DEPTH_SCALE, rtol=1e-6)
  half = camera.load_depth(png, height=HEIGHT // 2, width=WIDTH // 2, png_scale=0.5)
  np.testing.assert_allclose(half, millimetres * 0.5)


@pytest.mark.parametrize("name, write, message", [
    ("missing.npy", None, "not found"),
    ("depth.txt", lambda p: p.write_text("1"), "ending in .npy or .png"),
    ("negative.npy", lambda p: np.save(p, -np.ones((4, 4))), "depth must be positive"),
    ("cube.npy", lambda p: np.save(p, np.ones((2, 4, 4))), "2-D H x W"),
    ("colour.png", lambda p: cv2.imwrite(str(p), np.zeros((4, 4, 3), np.uint8)), "single-channel 16-bit"),
    ("broken.npy", lambda p: p.write_bytes(b"not an array"), "could not read"),
])
def test_bad_depth_file_names_the_file(tmp_path, name, write, message):
  depth_file = tmp_path / name
  if write is not None:
    write(depth_file)
  with pytest.raises(TrackSourceError, match=re.escape(str(depth_file)) + ".*" + re.escape(message)):
    camera.load_depth(depth_file, height=HEIGHT, width=WIDTH)


# ----------------------------------------------------------------------------------------------------------
# Command line.


def test_cli_camera_round_trip(tmp_path, capsys):
  depth = _plane(2.0)
  depth[:, :10] = 3.0
  depth_file = tmp_path / "depth.npy"
  np.save(depth_file, depth)
  out = tmp_path / "tracks.npy"
  code = cli.main(["camera", "--preset", "pan", "--amount", "0.3", "--frames", str(NUM_FRAMES), "--size",
                   f"{HEIGHT}x{WIDTH}", "--depth", str(depth_file), "--grid", str(GRID), "--out", str(out)])
  assert code == 0, capsys.readouterr().err
  written = tracks_lib.load_tracks(out)
  expected = camera.camera_tracks(INTRINSICS, grid=GRID, preset="pan", amount=0.3, num_frames=NUM_FRAMES,
                                  depth_path=depth_file)
  np.testing.assert_array_equal(written.points, expected.points)
  np.testing.assert_array_equal(written.visible, expected.visible)
  assert f"{NUM_FRAMES} frames x {GRID * GRID} tracks" in capsys.readouterr().out

  fov = 2 * math.degrees(math.atan(0.5 * WIDTH / 30.0))  # the same camera given as --fov and as --intrinsics
  by_fov, by_intrinsics = tmp_path / "fov.npz", tmp_path / "intrinsics.npz"
  common = ["camera", "--preset", "zoom", "--frames", "3", "--size", f"{HEIGHT}x{WIDTH}", "--grid", "3"]
  assert cli.main(common + ["--fov", str(fov), "--out", str(by_fov)]) == 0
  assert cli.main(common + ["--intrinsics", "30", "30", str(WIDTH / 2), str(HEIGHT / 2), "--out",
                            str(by_intrinsics)]) == 0
  np.testing.assert_allclose(tracks_lib.load_tracks(by_fov).points, tracks_lib.load_tracks(by_intrinsics).points,
                             atol=ATOL)


def test_cli_camera_missing_depth_is_one_clear_error(tmp_path, capsys):
  out = tmp_path / "tracks.npy"
  missing = tmp_path / "nowhere.npy"
  code = cli.main(["camera", "--preset", "tilt", "--frames", "3", "--size", "8x8", "--depth", str(missing),
                   "--out", str(out)])
  err = capsys.readouterr().err
  assert code == 1 and str(missing) in err and "not found" in err
  assert not out.exists()


def test_cli_rejects_a_malformed_size(capsys):
  with pytest.raises(SystemExit):
    cli.main(["camera", "--preset", "pan", "--frames", "3", "--size", "64by64", "--out", "x.npy"])
  assert "HEIGHTxWIDTH" in capsys.readouterr().err
