"""The video-folder tfds builder on mp4 clips (of sprites) that the tests write themselves."""

import os
import pathlib

import imageio.v2 as imageio
import numpy as np
import pytest
import tensorflow_datasets as tfds

from msjax import config_utils
from msjax.data import sprites
from msjax.data import tfds_videos

pytest.importorskip("imageio_ffmpeg", reason="writing the test mp4s needs imageio-ffmpeg (absent on the GPU image)")

TARGET = tfds_videos.VideoFolderConfig(name="test_32", height=32, width=32, num_frames=9)
SOURCE_FRAMES = 13  # longer than TARGET.num_frames: the builder keeps the first num_frames
MIN_LUMA_PSNR_DB = 32.0  # h264 at quality 10 measures ~37-39 dB here; a one-pixel misalignment ~23-26 dB
# imageio-ffmpeg runs ffmpeg through subprocess (fork + exec at once), which JAX's fork warning cannot tell apart.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


def _luma_psnr(a: np.ndarray, b: np.ndarray) -> float:
  """PSNR of the RGB means: yuv420 h264 smears colour at sharp sprite edges, brightness survives."""
  error = np.mean((a.astype(np.float64).mean(-1) - b.astype(np.float64).mean(-1)) ** 2)
  return float(10 * np.log10(255.0 ** 2 / error))


def _write_clip(folder: pathlib.Path, name: str, clip: sprites.Clip, prompt: str | None = None,
                tracks: np.ndarray | None = None) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f"{name}.mp4"
  imageio.mimwrite(path, clip.video, fps=16, macro_block_size=1, quality=10)
  np.savez(folder / f"{name}.npz", tracks=clip.tracks if tracks is None else tracks, visibility=clip.visibility)
  if prompt is not None:
    (folder / f"{name}.txt").write_text(prompt + "\n")
  return path


def _render(seed: int, height: int, width: int) -> sprites.Clip:
  return sprites.render_clip(seed, sprites.SpritesConfig(height=height, width=width, num_frames=SOURCE_FRAMES,
                                                         grid=8))


def test_same_size_clip_keeps_frames_and_tracks(tmp_path):
  clip = _render(1, TARGET.height, TARGET.width)
  example = tfds_videos.load_clip(_write_clip(tmp_path, "same", clip, prompt="a prompt"), TARGET)
  keep = slice(0, TARGET.num_frames)
  assert example["video"].shape == (TARGET.num_frames, TARGET.height, TARGET.width, 3)
  assert _luma_psnr(example["video"], clip.video[keep]) > MIN_LUMA_PSNR_DB
  np.testing.assert_array_equal(example["tracks"], clip.tracks[keep])
  np.testing.assert_array_equal(example["visibility"], clip.visibility[keep])
  assert example["prompt"] == "a prompt" and example["name"] == "same"


def test_wide_clip_is_centre_cropped_and_resized_with_its_tracks(tmp_path):
  height, width = 2 * TARGET.height, 2 * TARGET.width + 16  # crop 8 px each side, then halve
  left, scale = 8, 0.5
  clip = _render(2, height, width)
  example = tfds_videos.load_clip(_write_clip(tmp_path, "wide", clip), TARGET)
  keep = slice(0, TARGET.num_frames)
  crop = clip.video[keep, :, left:left + 2 * TARGET.width].astype(np.float32)
  halved = crop.reshape(TARGET.num_frames, TARGET.height, 2, TARGET.width, 2, 3).mean(axis=(2, 4))
  assert _luma_psnr(example["video"], halved) > MIN_LUMA_PSNR_DB

  points = clip.tracks[keep]
  expected = (points - np.array([left, 0], np.float32)) * np.float32(scale)
  inside = ((expected >= 0) & (expected < [TARGET.width, TARGET.height])).all(-1)
  assert (~inside).any() and inside.any()  # the crop must actually cut some tracks for this test to mean much
  np.testing.assert_allclose(example["tracks"][inside], expected[inside], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(example["visibility"], clip.visibility[keep] & inside)
  assert example["prompt"] == ""


def test_builder_makes_train_and_validation_splits_from_subfolders(tmp_path):
  tfds.disable_progress_bar()
  clips = tmp_path / "clips"
  for split, seeds in [("train", (3, 4)), ("validation", (5,))]:
    for seed in seeds:
      _write_clip(clips / split, f"clip{seed}", _render(seed, TARGET.height, TARGET.width), prompt=f"p{seed}")
  builder = tfds_videos.VideoFolder(data_dir=os.fspath(tmp_path / "tfds"), config=TARGET)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(clips)))
  source = builder.as_data_source()
  names = {split: sorted(source[split][i]["name"].decode() for i in range(len(source[split])))
           for split in ("train", "validation")}
  assert names == {"train": ["clip3", "clip4"], "validation": ["clip5"]}
  example = source["validation"][0]
  assert example["prompt"].decode() == "p5"
  assert example["video"].shape == (TARGET.num_frames, TARGET.height, TARGET.width, 3)
  assert example["tracks"].shape == (TARGET.num_frames, 64, 2)


def _break_missing_tracks(folder, video):
  (folder / "clip.npz").unlink()


def _break_tracks_length(folder, video):
  clip = _render(0, TARGET.height, TARGET.width)
  np.savez(folder / "clip.npz", tracks=clip.tracks[:-1])


def _break_video_bytes(folder, video):
  video.write_bytes(b"not a video at all")


@pytest.mark.parametrize("break_clip, message", [
    (_break_missing_tracks, r"clip\.mp4: expected its tracks in clip\.npz"),
    (_break_tracks_length, r"clip\.npz: expected tracks for all 13 frames of clip\.mp4, found 12"),
    (_break_video_bytes, r"clip\.mp4: could not read the video"),
])
def test_bad_clips_get_an_error_naming_the_file(tmp_path, break_clip, message):
  video = _write_clip(tmp_path, "clip", _render(0, TARGET.height, TARGET.width))
  break_clip(tmp_path, video)
  with pytest.raises(tfds_videos.ClipError, match=message):
    tfds_videos.load_clip(video, TARGET)


def test_too_short_clip_and_bad_length_config_are_rejected(tmp_path):
  video = _write_clip(tmp_path, "clip", _render(0, TARGET.height, TARGET.width))
  longer = tfds_videos.VideoFolderConfig(name="long", height=32, width=32, num_frames=17)
  with pytest.raises(tfds_videos.ClipError, match=r"clip\.mp4: expected at least num_frames=17 frames, found 13"):
    tfds_videos.load_clip(video, longer)
  with pytest.raises(config_utils.ConfigError, match="1 \\+ 4\\*k"):
    tfds_videos.VideoFolderConfig(name="bad", num_frames=10)
