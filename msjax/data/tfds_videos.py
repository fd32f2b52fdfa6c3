"""tfds builder for a user's folder of clips with tracks: `VideoFolder`.

Layout of the folder (passed as tfds's manual_dir):
  name.mp4   the clip (any container ffmpeg reads, or a GIF)
  name.npz   its tracks: `tracks` [T, N, 2] (+ optional `visibility` [T, N]); formats as `tracks.load_tracks`
  name.txt   optional prompt (empty when missing)
Clips directly in the folder form the 'train' split; if the folder has `train/` and/or `validation/` subfolders,
each becomes the split of that name instead.

Every clip is cropped to the configured aspect ratio about its centre and resized to height x width in one PIL
resampling step (antialiased bicubic), and its tracks get the same affine map. Track coordinates follow
`msjax.data.tracks` (pixel j covers [j, j+1)), which is also PIL's convention, so the map is exactly
x' = (x - crop_left) * scale. Points that leave the crop are hidden. Clips keep their first `num_frames` frames
(a 1 + ts*k count); a clip shorter than that, a tracks file of another length, or an unreadable file is an
error naming the file.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import warnings
from typing import Any, Iterator

import imageio.v2 as imageio
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from msjax import config_utils
from msjax.data import tracks as tracks_lib
from msjax.data.tfds_sprites import ArrayRecordBuilder

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")
SPLITS = ("train", "validation")


class ClipError(ValueError):
  """A clip in the folder that cannot be used; the message names the file, what was expected and found."""


@dataclasses.dataclass(eq=False)
class VideoFolderConfig(tfds.core.BuilderConfig):
  """Target size and length of the clips (`name` names the prepared dataset's folder under data_dir)."""
  height: int = 64
  width: int = 64
  num_frames: int = 45
  temporal_stride: int = 4  # the codec's: num_frames must be 1 + temporal_stride * k

  def __post_init__(self):
    config_utils.latent_frames(self.num_frames, self.temporal_stride)  # raises a ConfigError naming the rule
    if self.height <= 0 or self.width <= 0:
      raise config_utils.ConfigError(f"video folder config {self.name!r}: size must be positive, got "
                                     f"{self.height}x{self.width}")


@dataclasses.dataclass(frozen=True)
class CropResize:
  """The affine map from a source frame to the target: x' = (x - left) * scale, y' = (y - top) * scale."""
  left: float
  top: float
  scale: float
  height: int
  width: int

  @classmethod
  def centre(cls, source_height: int, source_width: int, height: int, width: int) -> CropResize:
    """Largest centred crop with the target's aspect ratio."""
    scale = max(height / source_height, width / source_width)
    return cls(left=(source_width - width / scale) / 2, top=(source_height - height / scale) / 2, scale=scale,
               height=height, width=width)

  def frame(self, frame: np.ndarray) -> np.ndarray:
    """Any HxW(xC) uint8 frame -> [height, width, 3] uint8 RGB."""
    box = (self.left, self.top, self.left + self.width / self.scale, self.top + self.height / self.scale)
    image = Image.fromarray(frame).convert("RGB")
    return np.asarray(image.resize((self.width, self.height), Image.Resampling.BICUBIC, box=box))

  def points(self, points: np.ndarray) -> np.ndarray:
    """[..., 2] pixel (x, y) -> the same points in the target frame."""
    offset = np.array([self.left, self.top], np.float32)
    return ((points - offset) * np.float32(self.scale)).astype(np.float32)


def read_video(path: pathlib.Path, height: int, width: int) -> tuple[np.ndarray, CropResize]:
  """All frames of a video file, cropped and resized on the fly -> uint8 [T, height, width, 3]."""
  frames, crop = [], None
  try:
    reader = imageio.get_reader(path)
    try:
      for frame in reader:  # iterate: list(reader) fails on ffmpeg's unknown length
        frame = np.asarray(frame)
        if crop is None:
          crop = CropResize.centre(frame.shape[0], frame.shape[1], height, width)
        frames.append(crop.frame(frame))
    finally:
      reader.close()
  except Exception as e:  # imageio raises many types for broken files; all mean "unreadable"
    raise ClipError(f"{path}: could not read the video ({type(e).__name__}: {e})") from e
  if not frames:
    raise ClipError(f"{path}: the video has no frames")
  return np.stack(frames), crop


def load_clip(video_path: pathlib.Path, config: VideoFolderConfig) -> dict[str, Any]:
  """One clip with its tracks and prompt, fitted to `config` -> the feature dict stored on disk."""
  tracks_path = video_path.with_suffix(".npz")
  if not tracks_path.is_file():
    raise ClipError(f"{video_path}: expected its tracks in {tracks_path.name} beside it, found none")
  video, crop = read_video(video_path, config.height, config.width)
  source_frames = video.shape[0]
  if source_frames < config.num_frames:
    raise ClipError(f"{video_path}: expected at least num_frames={config.num_frames} frames, found {source_frames}")
  tracks = tracks_lib.load_tracks(tracks_path)
  if tracks.num_frames != source_frames:
    raise ClipError(f"{tracks_path}: expected tracks for all {source_frames} frames of {video_path.name}, "
                    f"found {tracks.num_frames} frames")
  keep = slice(0, config.num_frames)
  with warnings.catch_warnings():  # points cropped away are expected here, not a user error worth a warning
    warnings.simplefilter("ignore", tracks_lib.TracksWarning)
    fitted = tracks_lib.validate_tracks(crop.points(tracks.points[keep]), tracks.visible[keep],
                                        source=os.fspath(tracks_path), height=config.height, width=config.width)
  prompt_path = video_path.with_suffix(".txt")
  prompt = prompt_path.read_text(encoding="utf-8").strip() if prompt_path.is_file() else ""
  return {"video": video[keep], "tracks": fitted.points, "visibility": fitted.visible, "prompt": prompt,
          "name": video_path.stem}


def list_clips(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


class VideoFolder(ArrayRecordBuilder):
  """A folder of user clips with point tracks and optional prompts (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [VideoFolderConfig(name="64x64x45", description="The `tiny` preset's size and length.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Pass the clip folder as download_config=tfds.download.DownloadConfig("
                                  "manual_dir=FOLDER); see msjax/data/tfds_videos.py for its layout.")

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(c.num_frames, c.height, c.width, 3), dtype=np.uint8),
            # Each clip brings its own number of tracks.
            "tracks": tfds.features.Tensor(shape=(c.num_frames, None, 2), dtype=np.float32),
            "visibility": tfds.features.Tensor(shape=(c.num_frames, None), dtype=np.bool_),
            "prompt": tfds.features.Text(),
            "name": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    folder = pathlib.Path(dl_manager.manual_dir)
    if not folder.is_dir():
      raise ClipError(f"{folder}: expected a folder of clips, found none. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    split_folders = {split: folder / split for split in SPLITS if (folder / split).is_dir()} or {"train": folder}
    splits = {}
    for split, split_folder in split_folders.items():
      clips = list_clips(split_folder)
      if not clips:
        raise ClipError(f"{split_folder}: expected video files ({', '.join(VIDEO_SUFFIXES)}), found none")
      splits[split] = self._generate_examples(clips)
    return splits

  def _generate_examples(self, clips: list[pathlib.Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    for clip in clips:
      yield clip.stem, load_clip(clip, self.builder_config)
