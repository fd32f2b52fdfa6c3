"""`sample.py` as users run it (subprocesses): outputs, --overlay, --eval, and one clear line per bad input."""

import os
import re
import subprocess
import sys

import imageio.v3 as iio
import jax
import numpy as np
import pytest

from configs import sample as sample_config
from msjax import inference
from msjax import io_utils
from msjax.data import tracks as tracks_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "sample.py")
EXAMPLE_TRACKS = os.path.join(REPO, "examples", "drag_one.npy")
TIMEOUT_S = 240
NUM_FRAMES = 20  # two chunks: 9 + 11 of 12 frames (the last one trimmed)
# A one-layer, 32-wide DiT and precomputed text keep a subprocess run to seconds; every other number is tiny's.
SMALL_MODEL = {"model.dim": 32, "model.num_layers": 1, "model.num_heads": 2, "model.ffn_dim": 64,
               "text.encoder": "precomputed"}
SMALL_FLAGS = [f"--config.{key}={value}" for key, value in SMALL_MODEL.items()]
PARAM_SCALE = 0.02
MAX_SHIPPED_EPE_PX = 3.0  # the shipped student on examples/drag_one.npy (measured: 1.80 px, 51% missed)
MAX_SHIPPED_MISSED = 0.75


def _run(args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, SAMPLE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT_S, check=False)


def _small_config(preset: str = "tiny"):
  config = sample_config.get_config(preset)
  if preset == "tiny":
    for key, value in SMALL_MODEL.items():
      section, field = key.split(".")
      config[section][field] = value
  return config


def _save_student(path, preset: str = "tiny") -> str:
  """An exported student: the small model with random weights (shapes from tracing, no compilation), or for
  another preset a placeholder (the preset check comes before any array is read)."""
  config = _small_config(preset)
  if preset == "tiny":
    shapes = jax.eval_shape(lambda: inference.init_dit_params(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (PARAM_SCALE * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  else:
    params = {"placeholder": np.zeros((1,), np.float32)}
  return inference.save_model(str(path), {"dit": params}, config, {"stage": "student", "step": 1})


def _embeddings(path) -> str:
  io_utils.save_npy(path, np.random.default_rng(0).standard_normal((5, 384)).astype(np.float32))
  return str(path)


def _assert_one_error_line(result, *names):
  assert result.returncode == 2, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert "Traceback" not in result.stderr
  for name in names:
    assert name in lines[0], lines[0]


def _written(directory) -> list[str]:
  return sorted(os.listdir(directory))


# ----------------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit code 2, nothing written.


def _bad_tracks(tmp_path, kind: str) -> str:
  path = tmp_path / f"{kind}.npy"
  if kind == "wrong_rank":
    np.save(path, np.zeros((10, 4), np.float32))
  elif kind == "nan":
    points = np.full((9, 4, 2), 10.0, np.float32)
    points[3, 1, 0] = np.nan
    np.save(path, points)
  elif kind == "empty":
    np.save(path, np.zeros((0, 4, 2), np.float32))
  return str(path)


@pytest.mark.parametrize("kind,expected", [("missing", "not found"), ("wrong_rank", "(T, N, 2)"),
                                           ("nan", "NaN"), ("empty", "at least one frame")])
def test_bad_tracks_give_one_error_line(tmp_path, kind, expected):
  tracks = str(tmp_path / "missing.npy") if kind == "missing" else _bad_tracks(tmp_path, kind)
  before = _written(tmp_path)
  result = _run(["--tracks", tracks, "--random_weights", "--out", str(tmp_path / "o.gif")], tmp_path)
  _assert_one_error_line(result, os.path.basename(tracks), expected)
  assert _written(tmp_path) == before


def test_unreadable_image_gives_one_error_line(tmp_path):
  image = tmp_path / "photo.png"
  image.write_bytes(b"this is not a png")
  result = _run(["--tracks", EXAMPLE_TRACKS, "--image", str(image), "--random_weights", "--out",
                 str(tmp_path / "o.gif")], tmp_path)
  _assert_one_error_line(result, "photo.png", "cannot read as an image")
  assert _written(tmp_path) == ["photo.png"]


def test_checkpoint_of_another_preset_gives_one_error_line(tmp_path):
  checkpoint = _save_student(tmp_path / "wan_student", preset="wan2_1_1_3b")
  result = _run(["--tracks", EXAMPLE_TRACKS, "--checkpoint", checkpoint, "--out", str(tmp_path / "o.gif"),
                 *SMALL_FLAGS], tmp_path)
  _assert_one_error_line(result, "wan_student", "'wan2_1_1_3b'", "'tiny'")
  assert _written(tmp_path) == ["wan_student"]


@pytest.mark.slow
def test_bad_prompt_embeddings_and_decoder_give_one_error_line(tmp_path):
  embeds = tmp_path / "umt5.npy"
  io_utils.save_npy(embeds, np.zeros((5, 7), np.float32))
  result = _run(["--tracks", EXAMPLE_TRACKS, "--prompt_embeds", str(embeds), "--random_weights"], tmp_path)
  _assert_one_error_line(result, "umt5.npy", "384")
  result = _run(["--tracks", EXAMPLE_TRACKS, "--decoder", "taehv", "--random_weights"], tmp_path)
  _assert_one_error_line(result, "taehv", "'tiny'")
  assert _written(tmp_path) == ["umt5.npy"]


def test_missing_checkpoint_gives_one_error_line(tmp_path):
  result = _run(["--tracks", EXAMPLE_TRACKS, "--config.checkpoint", str(tmp_path / "none")], tmp_path)
  _assert_one_error_line(result, str(tmp_path / "none"), "--random_weights")
  result = _run(["--tracks", EXAMPLE_TRACKS, "--checkpoint", str(tmp_path / "gone")], tmp_path)
  _assert_one_error_line(result, str(tmp_path / "gone"))
  assert _written(tmp_path) == []


def test_readme_command_streams_the_shipped_student_along_the_track(tmp_path):
  """The README's first command on the shipped student: the dragged sprite follows the example track."""
  result = _run(["--tracks", EXAMPLE_TRACKS, "--eval", "--out", str(tmp_path / "drag.gif")], tmp_path)
  assert result.returncode == 0, result.stderr
  match = re.search(r"track EPE ([0-9.]+) px over (\d+) sprite-frames \(sprite missed in (\d+)%\)", result.stdout)
  assert match, result.stdout
  epe, missed = float(match.group(1)), int(match.group(3)) / 100
  # Measured 1.80 px with the sprite found in 49% of frames; a model that ignores the track leaves the sprite
  # at its start (16 px from the track's end), and a broken one is found nowhere.
  assert epe <= MAX_SHIPPED_EPE_PX and missed <= MAX_SHIPPED_MISSED, result.stdout
  assert _written(tmp_path) == ["drag.gif"]


# ----------------------------------------------------------------------------------------------------------
# Streams that work.


def test_png_folder_with_overlay_and_eval_from_a_checkpoint(tmp_path):
  checkpoint = _save_student(tmp_path / "student")
  out = tmp_path / "frames"
  result = _run(["--tracks", EXAMPLE_TRACKS, "--checkpoint", checkpoint, "--prompt_embeds",
                 _embeddings(tmp_path / "e.npy"), "--num_frames", str(NUM_FRAMES), "--out", str(out), "--overlay",
                 "--eval", *SMALL_FLAGS], tmp_path)
  assert result.returncode == 0, result.stderr
  for expected in ("frames: 20 in 2 chunks", "FPS", "first frame after", "eval: track EPE", f"wrote {out}"):
    assert expected in result.stdout, result.stdout
  names = _written(out)
  assert len(names) == NUM_FRAMES and names[0].endswith(".png")
  assert sorted(_written(tmp_path)) == ["e.npy", "frames", "student"]  # no staging folder left behind
  video = np.stack([iio.imread(out / name) for name in names])
  tracks = tracks_lib.load_tracks(EXAMPLE_TRACKS)
  column, row = np.floor(tracks.points[:NUM_FRAMES]).astype(int).transpose(2, 0, 1)
  dots = video[np.arange(NUM_FRAMES)[:, None], row, column]  # [T, N, 3] at every (moving, visible) point
  assert np.isin(dots, (0, 255)).all() and (dots == dots[..., :1]).all()  # black or white dots


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_video_files_from_an_image_with_random_weights(tmp_path, suffix):
  image = tmp_path / "wide.png"
  iio.imwrite(image, np.random.default_rng(0).integers(0, 256, (40, 100, 3), dtype=np.uint8))
  out = tmp_path / f"sample{suffix}"
  result = _run(["--tracks", EXAMPLE_TRACKS, "--image", str(image), "--random_weights", "--num_frames",
                 str(NUM_FRAMES), "--loop_tracks", "--prompt_embeds", _embeddings(tmp_path / "e.npy"), "--out",
                 str(out), *SMALL_FLAGS], tmp_path)
  assert result.returncode == 0, result.stderr
  assert "100x40; scaled to cover the model's 64x64 and centre-cropped" in result.stdout, result.stdout
  assert sum(1 for _ in iio.imiter(out)) == NUM_FRAMES
  assert sorted(_written(tmp_path)) == sorted(["e.npy", "wide.png", out.name])
