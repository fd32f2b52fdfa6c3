"""Motion-transfer tracks: Lucas-Kanade against the sprites world's exact tracks, occlusion, resampling, the CLI.

Evaluation points, chosen so that the numbers mean something for a texture tracker on flat-coloured sprites:
  * accuracy is measured on *sprite points* (grid points whose first-frame pixel has a sprite's colour) in the
    frames where both the ground truth and the tracker call them visible;
  * the tracker must not buy that accuracy by hiding points: of the sprite points it accepts in frame 0 (their
    window holds an edge or corner, the rest are flat and rightly untrackable), it must keep most of the
    ground-truth-visible frames;
  * occlusion is tested on the corners of a square that a sprite passes in front of.
"""

import re

import imageio.v2 as imageio
import numpy as np
import pytest

from msjax import config_utils
from msjax.data import sprites
from msjax.data import tracks as tracks_lib
from msjax.tracks_sources import __main__ as cli
from msjax.tracks_sources import motion_transfer

SIZE = 128  # LK needs sprites of a few windows' size: 10-20 px radius at 128 x 128
NUM_FRAMES = 9
GRID = 32
MAX_MEDIAN_ERROR = 0.5  # px
MIN_RECALL = 0.6  # measured 0.63-1.0 per clip on seeds 0-7
MAX_FALSE_VISIBLE = 0.05  # measured <= 0.002 on seeds 0-3
SPRITES = sprites.SpritesConfig(height=SIZE, width=SIZE, num_frames=NUM_FRAMES, grid=GRID, effect_prob=0.0,
                                min_sprites=2, max_sprites=2)


def _on_sprite(clip: sprites.Clip) -> np.ndarray:
  """bool [N]: the track starts on a pixel with a sprite's colour."""
  pixel = np.floor(clip.tracks[0]).astype(int)
  colour = clip.video[0, pixel[:, 1], pixel[:, 0]]
  return (colour[:, None, :] == clip.colors[None]).all(axis=-1).any(axis=-1)


def test_lucas_kanade_matches_sprite_ground_truth():
  errors, kept, truly_visible, false_visible, accepted = [], 0, 0, 0, 0
  for seed in range(4):
    clip = sprites.render_clip(seed, SPRITES)
    tracks = motion_transfer.track_frames(iter(clip.video), clip.tracks[0])
    on_sprite = _on_sprite(clip)
    both = clip.visibility & tracks.visible & on_sprite
    errors.append(np.linalg.norm(tracks.points - clip.tracks, axis=-1)[both])
    trackable = tracks.visible[0] & on_sprite
    kept += int((tracks.visible & clip.visibility)[:, trackable].sum())
    truly_visible += int(clip.visibility[:, trackable].sum())
    false_visible += int((tracks.visible & ~clip.visibility)[:, on_sprite].sum())
    accepted += int(tracks.visible[:, on_sprite].sum())
    flat = _flat_window(clip.video[0], clip.tracks[0], motion_transfer.LucasKanadeConfig().window)
    assert flat.any() and not tracks.visible[:, flat].any(), "points with a flat window cannot be tracked"
  errors = np.concatenate(errors)
  assert errors.size > 500
  assert np.median(errors) <= MAX_MEDIAN_ERROR
  assert kept / truly_visible >= MIN_RECALL
  assert false_visible / accepted <= MAX_FALSE_VISIBLE


def _flat_window(frame: np.ndarray, points: np.ndarray, window: int) -> np.ndarray:
  """bool [N]: the pixels LK reads around the point are a single colour.

  That is the window, plus one pixel each side for its sub-pixel interpolation and one for the image gradient.
  """
  reach = window // 2 + 2
  pixel = np.floor(points).astype(int)
  flat = np.zeros(len(points), bool)
  for index, (column, row) in enumerate(pixel):
    patch = frame[max(row - reach, 0):row + reach + 1, max(column - reach, 0):column + reach + 1]
    inside = reach <= row < frame.shape[0] - reach and reach <= column < frame.shape[1] - reach
    flat[index] = inside and (patch == patch[0, 0]).all()
  return flat


def _occlusion_scene(num_frames: int) -> tuple[sprites.Clip, np.ndarray, np.ndarray]:
  """A square drifting right while a circle in front sweeps left across its top corners.

  Returns the clip, the square's four corner pixels' centres [4, 2] in frame 0 and the square's
  displacement [T, 2].
  """
  config = sprites.SpritesConfig(height=SIZE, width=SIZE, num_frames=num_frames, grid=GRID, effect_prob=0.0)
  frame = np.arange(num_frames)
  square_start, square_radius = np.array([40, 64]), 16.0
  square = square_start + np.stack([frame, 0 * frame], axis=-1)
  circle = np.stack([120 - 7 * frame, 40 + 0 * frame], axis=-1)
  scene = sprites.Scene(shapes=("square", "circle"), color_names=("blue", "yellow"), radii=(square_radius, 18.0),
                        centres=np.stack([square, circle], axis=1).astype(np.int32), background_name="grey")
  half = np.floor(sprites.SQUARE_HALF_SIDE * square_radius)
  signs = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]])  # top-left, top-right, bottom-left, bottom-right
  corners = square_start + signs * half + 0.5
  return sprites.render_scene(scene, config), corners.astype(np.float32), square - square_start


def test_visibility_drops_while_occluded_and_recovers():
  num_frames = 21  # the circle leaves the frame at the end
  clip, corners, displacement = _occlusion_scene(num_frames)
  tracks = motion_transfer.track_frames(iter(clip.video), corners)
  truth = corners[None] + displacement[:, None]
  pixel = np.floor(truth).astype(int)
  square_colour = sprites.SPRITE_COLORS["blue"]
  truly_visible = (clip.video[np.arange(num_frames)[:, None], pixel[..., 1], pixel[..., 0]] == square_colour).all(-1)
  top = slice(0, 2)
  assert not truly_visible[:, top].all(axis=0).any(), "the scene must occlude both top corners"
  assert truly_visible[:, 2:].all(), "the bottom corners are never occluded"

  assert not (tracks.visible & ~truly_visible).any(), "an occluded corner was reported visible"
  assert tracks.visible[:, 2:].all()
  assert tracks.visible[0].all() and tracks.visible[-1].all(), "corners re-validate once the occluder has passed"
  error = np.linalg.norm(tracks.points - truth, axis=-1)
  assert error[tracks.visible].max() <= MAX_MEDIAN_ERROR


def test_resample_frames_interpolates_in_time_and_hides_around_hidden_frames():
  source_frames, num_frames, num_tracks = 9, 13, 3
  time = np.arange(source_frames, dtype=np.float32)
  velocity = np.array([[1.0, -0.5], [0.0, 2.0], [3.0, 0.25]], np.float32)
  points = (10 + time[:, None, None] * velocity[None]).astype(np.float32)
  visible = np.ones((source_frames, num_tracks), bool)
  visible[4, 1] = False
  resampled = motion_transfer.resample_frames(tracks_lib.Tracks(points=points, visible=visible), num_frames)
  new_time = np.linspace(0, source_frames - 1, num_frames)
  np.testing.assert_allclose(resampled.points, 10 + new_time[:, None, None] * velocity[None], atol=1e-5)
  touches_frame_4 = np.abs(new_time - 4) < 1  # interpolates from source frame 4 (or is it)
  np.testing.assert_array_equal(resampled.visible[:, 1], ~touches_frame_4)
  assert resampled.visible[:, [0, 2]].all()


def _write_video(path, video: np.ndarray) -> None:
  imageio.mimwrite(path, video, fps=8)


def test_transfer_fits_tracks_to_a_target_size_and_length(tmp_path):
  clip = sprites.render_clip(0, SPRITES)
  video = tmp_path / "clip.mp4"
  _write_video(video, clip.video)
  full = motion_transfer.transfer_tracks(video, grid=8)
  small = motion_transfer.transfer_tracks(video, grid=8, size=(SIZE // 2, SIZE // 2), num_frames=5)
  assert small.points.shape == (5, 64, 2)
  # Half size, every other frame: the same tracker run, mapped.
  np.testing.assert_allclose(small.points, full.points[::2] / 2, atol=1e-5)
  np.testing.assert_array_equal(small.visible, full.visible[::2])
  with pytest.raises(config_utils.ConfigError, match="1 \\+ 4"):
    motion_transfer.transfer_tracks(video, grid=8, num_frames=6)


def test_cli_transfer_round_trip_on_an_mp4(tmp_path, capsys):
  clip = sprites.render_clip(1, SPRITES)
  video, out = tmp_path / "clip.mp4", tmp_path / "tracks.npy"
  _write_video(video, clip.video)
  assert cli.main(["transfer", "--video", str(video), "--grid", str(GRID), "--out", str(out)]) == 0
  written = tracks_lib.load_tracks(out)
  expected = motion_transfer.transfer_tracks(video, grid=GRID)
  np.testing.assert_array_equal(written.points, expected.points)
  np.testing.assert_array_equal(written.visible, expected.visible)
  # The file carried the motion: lossy mp4 frames still track the sprites to within a pixel.
  both = clip.visibility & written.visible & _on_sprite(clip)
  assert both.sum() > 100
  assert np.median(np.linalg.norm(written.points - clip.tracks, axis=-1)[both]) <= 1.0
  assert f"{NUM_FRAMES} frames x {GRID * GRID} tracks" in capsys.readouterr().out


@pytest.mark.parametrize("name, content, message", [
    ("missing.mp4", None, "video file not found"),
    ("garbage.mp4", b"this is not a video", "could not"),
])
def test_cli_transfer_bad_video_is_one_clear_error(tmp_path, capsys, name, content, message):
  video, out = tmp_path / name, tmp_path / "tracks.npy"
  if content is not None:
    video.write_bytes(content)
  assert cli.main(["transfer", "--video", str(video), "--out", str(out)]) == 1
  assert re.search(re.escape(str(video)) + ".*" + message, capsys.readouterr().err)
  assert not out.exists()


def test_gif_frames_are_read_as_rgb(tmp_path):
  clip = sprites.render_clip(2, SPRITES)
  gif = tmp_path / "clip.gif"
  imageio.mimwrite(gif, clip.video[:3])
  frames = list(motion_transfer.read_frames(gif, max_frames=2))
  assert len(frames) == 2 and frames[0].shape == (SIZE, SIZE, 3) and frames[0].dtype == np.uint8
  np.testing.assert_array_equal(frames[1], clip.video[1])
