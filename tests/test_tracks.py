"""Track files, validation, ID embeddings, rasterisation (numpy and jax), chunk ranges and mid-chunk masking."""

import os
import re
import warnings

import chex
import jax
import numpy as np
import pytest

from msjax import config_utils
from msjax.data import tracks as tracks_lib
from msjax.data.tracks import TracksError

NUM_FRAMES, NUM_TRACKS = 5, 4
HEIGHT, WIDTH, STRIDE = 16, 24, 4


def _random_tracks(seed: int = 0, num_frames: int = NUM_FRAMES, num_tracks: int = NUM_TRACKS):
  rng = np.random.default_rng(seed)
  points = (rng.uniform(0, 1, (num_frames, num_tracks, 2)) * [WIDTH, HEIGHT]).astype(np.float32)
  visible = rng.uniform(size=(num_frames, num_tracks)) < 0.7
  return points, visible


def _assert_tracks(tracks: tracks_lib.Tracks, points: np.ndarray, visible: np.ndarray) -> None:
  chex.assert_type([tracks.points, tracks.visible], [np.float32, bool])
  np.testing.assert_array_equal(tracks.points, points)
  np.testing.assert_array_equal(tracks.visible, visible)
  assert (tracks.num_frames, tracks.num_tracks) == visible.shape


# ----------------------------------------------------------------------------------------------------------
# Readers.

READER_FORMATS = {
    # name: (suffix, writer(path, points, visible) -> None, visibility expected after reading)
    "npy_TN2": (".npy", lambda p, x, v: np.save(p, x), "all"),
    "npy_TN3": (".npy", lambda p, x, v: np.save(p, np.concatenate([x, v[..., None].astype(np.float32)], -1)), "v"),
    "npy_1TN2": (".npy", lambda p, x, v: np.save(p, x[None]), "all"),
    "npy_1TN3": (".npy", lambda p, x, v: np.save(p, np.concatenate([x, v[..., None] * 0.9], -1)[None]), "v"),
    "npy_TN2_float64": (".npy", lambda p, x, v: np.save(p, x.astype(np.float64)), "all"),
    "npz_TN2_vis": (".npz", lambda p, x, v: np.savez(p, tracks=x, visibility=v), "v"),
    "npz_1TN2_vis1TN": (".npz", lambda p, x, v: np.savez(p, tracks=x[None], visibility=v[None]), "v"),
    "npz_TN2_float_vis": (".npz", lambda p, x, v: np.savez(p, tracks=x, visibility=v * 0.8 + 0.1), "v"),
    "npz_TN3": (".npz", lambda p, x, v: np.savez(p, tracks=np.concatenate([x, v[..., None]], -1)), "v"),
    "npz_TN2_only": (".npz", lambda p, x, v: np.savez(p, tracks=x), "all"),
}


@pytest.mark.parametrize("name", sorted(READER_FORMATS))
def test_reader_formats_round_trip(tmp_path, name):
  suffix, write, expected = READER_FORMATS[name]
  points, visible = _random_tracks()
  path = tmp_path / f"{name}{suffix}"
  write(str(path), points, visible)
  tracks = tracks_lib.load_tracks(path)
  _assert_tracks(tracks, points, visible if expected == "v" else np.ones_like(visible))


def test_integer_coordinates_are_accepted(tmp_path):
  points = np.arange(NUM_FRAMES * NUM_TRACKS * 2).reshape(NUM_FRAMES, NUM_TRACKS, 2)
  path = tmp_path / "ints.npy"
  np.save(path, points)
  _assert_tracks(tracks_lib.load_tracks(path), points.astype(np.float32), np.ones((NUM_FRAMES, NUM_TRACKS), bool))


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_save_load_round_trip(tmp_path, suffix):
  points, visible = _random_tracks(seed=1)
  path = tmp_path / f"saved{suffix}"
  tracks_lib.save_tracks(path, tracks_lib.Tracks(points, visible))
  _assert_tracks(tracks_lib.load_tracks(path), points, visible)
  assert sorted(os.listdir(tmp_path)) == [f"saved{suffix}"]  # no temporary file left behind
  if suffix == ".npy":
    raw = np.load(path)
    chex.assert_shape(raw, (NUM_FRAMES, NUM_TRACKS, 3))
    chex.assert_type(raw, np.float32)


def test_save_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
  points, visible = _random_tracks()
  path = tmp_path / "keep.npy"
  tracks_lib.save_tracks(path, tracks_lib.Tracks(points, visible))
  before = path.read_bytes()

  def broken_save(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(np, "save", broken_save)
  with pytest.raises(OSError, match="disk full"):
    tracks_lib.save_tracks(path, tracks_lib.Tracks(points + 1, visible))
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["keep.npy"]


def test_save_rejects_unknown_suffix_and_missing_directory(tmp_path):
  tracks = tracks_lib.Tracks(*_random_tracks())
  with pytest.raises(TracksError, match="out.txt"):
    tracks_lib.save_tracks(tmp_path / "out.txt", tracks)
  with pytest.raises(TracksError, match="does not exist"):
    tracks_lib.save_tracks(tmp_path / "missing_dir" / "out.npy", tracks)


# ----------------------------------------------------------------------------------------------------------
# Malformed files: each gets its own TracksError naming the file.

def _good():
  return _random_tracks()[0]


MALFORMED = {
    # name: (file name, writer(path) or None for no file, pattern the message must contain)
    "missing": ("missing.npy", None, "not found"),
    "directory": ("folder.npy", lambda p: os.mkdir(p), "directory"),
    "wrong_suffix": ("tracks.txt", lambda p: np.savetxt(p, np.zeros(3)), "suffix"),
    "garbage_npy": ("garbage.npy", lambda p: open(p, "wb").write(b"not a numpy file"), "could not read"),
    "garbage_npz": ("garbage.npz", lambda p: open(p, "wb").write(b"PK not a zip"), "could not read"),
    "pickled_objects": ("objects.npy", lambda p: np.save(p, np.array([{"a": 1}], object), allow_pickle=True),
                        "could not read"),
    "rank2": ("rank2.npy", lambda p: np.save(p, np.zeros((NUM_FRAMES, 2), np.float32)), "shape"),
    "rank5": ("rank5.npy", lambda p: np.save(p, np.zeros((1, 1, NUM_FRAMES, NUM_TRACKS, 2), np.float32)), "shape"),
    "last_dim4": ("dim4.npy", lambda p: np.save(p, np.zeros((NUM_FRAMES, NUM_TRACKS, 4), np.float32)), "shape"),
    "batch2": ("batch2.npy", lambda p: np.save(p, np.zeros((2, NUM_FRAMES, NUM_TRACKS, 2), np.float32)), "batch"),
    "strings": ("strings.npy", lambda p: np.save(p, np.full((NUM_FRAMES, NUM_TRACKS, 2), "x")), "dtype"),
    "complex": ("complex.npy", lambda p: np.save(p, _good().astype(np.complex64)), "dtype"),
    "bool": ("bool.npy", lambda p: np.save(p, _good() > 1), "dtype"),
    "nan": ("nan.npy", lambda p: np.save(p, np.where(np.arange(2) == 1, np.nan, _good())), "NaN"),
    "inf": ("inf.npy", lambda p: np.save(p, np.where(np.arange(2) == 0, np.inf, _good())), "NaN/inf"),
    "no_frames": ("no_frames.npy", lambda p: np.save(p, np.zeros((0, NUM_TRACKS, 2), np.float32)), "T=0"),
    "no_tracks": ("no_tracks.npy", lambda p: np.save(p, np.zeros((NUM_FRAMES, 0, 2), np.float32)), "N=0"),
    "visibility_shape": ("vis_shape.npz",
                         lambda p: np.savez(p, tracks=_good(), visibility=np.ones((NUM_FRAMES, NUM_TRACKS + 1))),
                         "visibility must have shape"),
    "visibility_nan": ("vis_nan.npz",
                       lambda p: np.savez(p, tracks=_good(), visibility=np.full((NUM_FRAMES, NUM_TRACKS), np.nan)),
                       "visibility must be finite"),
    "visibility_twice": ("vis_twice.npz",
                         lambda p: np.savez(p, tracks=np.zeros((NUM_FRAMES, NUM_TRACKS, 3), np.float32),
                                            visibility=np.ones((NUM_FRAMES, NUM_TRACKS), bool)),
                         "visibility given twice"),
    "npz_without_tracks": ("no_key.npz", lambda p: np.savez(p, points=_good()), "'tracks'"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_file_raises_naming_the_file(tmp_path, name):
  file_name, write, pattern = MALFORMED[name]
  path = tmp_path / file_name
  if write is not None:
    write(str(path))
    assert path.exists(), "the writer must create exactly the named file"
  with pytest.raises(TracksError) as error:
    tracks_lib.load_tracks(path, height=HEIGHT, width=WIDTH)
  message = str(error.value)
  assert str(path) in message
  assert re.search(re.escape(pattern), message), message


# ----------------------------------------------------------------------------------------------------------
# Out-of-frame points.

def test_out_of_frame_points_are_hidden_clipped_and_warned_once():
  points, _ = _random_tracks(seed=2)
  outside = {(0, 0): (-1.0, 3.0), (1, 2): (WIDTH, 5.0), (3, 1): (2.0, HEIGHT + 7.5), (4, 3): (-0.01, -3.0)}
  for (t, n), xy in outside.items():
    points[t, n] = xy
  visible = np.ones((NUM_FRAMES, NUM_TRACKS), bool)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tracks = tracks_lib.validate_tracks(points, visible, source="user.npy", height=HEIGHT, width=WIDTH)
  assert len(caught) == 1 and issubclass(caught[0].category, tracks_lib.TracksWarning)
  assert "user.npy" in str(caught[0].message) and f"{len(outside)} of {points[..., 0].size}" in str(caught[0].message)
  expected_visible = np.ones_like(visible)
  for t, n in outside:
    expected_visible[t, n] = False
  np.testing.assert_array_equal(tracks.visible, expected_visible)
  assert (tracks.points >= 0).all() and (tracks.points[..., 0] < WIDTH).all() and (tracks.points[..., 1] < HEIGHT).all()
  assert (np.floor(tracks.points[..., 0]) <= WIDTH - 1).all()
  np.testing.assert_array_equal(tracks.points[expected_visible], points[expected_visible])


def test_frame_check_needs_both_height_and_width():
  with pytest.raises(ValueError, match="both height and width"):
    tracks_lib.validate_tracks(_random_tracks()[0], height=HEIGHT)


def test_in_frame_points_do_not_warn():
  points, visible = _random_tracks(seed=3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tracks = tracks_lib.validate_tracks(points, visible, height=HEIGHT, width=WIDTH)
  _assert_tracks(tracks, points, visible)


# ----------------------------------------------------------------------------------------------------------
# IDs, subsets and embeddings.

def test_track_embeddings_are_unit_sin_cos_pairs():
  dim = 16
  ids = np.array([0, 1, 7, 9999])
  embeddings = tracks_lib.track_embeddings(ids, dim)
  chex.assert_shape(embeddings, (len(ids), dim))
  chex.assert_type(embeddings, np.float32)
  sin, cos = embeddings[:, :dim // 2], embeddings[:, dim // 2:]
  np.testing.assert_allclose(sin**2 + cos**2, 1.0, atol=1e-6)
  np.testing.assert_allclose(embeddings[0], np.r_[np.zeros(dim // 2), np.ones(dim // 2)])
  np.testing.assert_allclose(sin[:, 0], np.sin(ids), atol=1e-6)  # the fastest frequency is 1 radian per ID
  lowest = tracks_lib.EMBED_BASE ** (-(dim // 2 - 1) / (dim // 2))
  np.testing.assert_allclose(sin[:, -1], np.sin(ids * lowest), atol=1e-6)
  assert len({row.tobytes() for row in embeddings}) == len(ids)


def test_track_embeddings_reject_odd_dim_and_float_ids():
  with pytest.raises(ValueError, match="even"):
    tracks_lib.track_embeddings(np.arange(3), 7)
  with pytest.raises(TypeError, match="integers"):
    tracks_lib.track_embeddings(np.arange(3.0))


def test_random_track_ids_are_distinct_and_in_range():
  rng = np.random.default_rng(0)
  ids = tracks_lib.random_track_ids(rng, 50, 60)
  assert len(set(ids.tolist())) == 50 and ids.min() >= 0 and ids.max() < 60
  with pytest.raises(ValueError, match="distinct"):
    tracks_lib.random_track_ids(rng, 61, 60)


def test_sample_track_subset_sizes_and_order():
  rng = np.random.default_rng(0)
  sizes = set()
  for _ in range(200):
    subset = tracks_lib.sample_track_subset(rng, 100, 10, 20)
    assert 10 <= len(subset) <= 20
    assert (np.diff(subset) > 0).all() and subset.min() >= 0 and subset.max() < 100
    sizes.add(len(subset))
  assert sizes == set(range(10, 21))
  assert len(tracks_lib.sample_track_subset(rng, 5, 10, 20)) == 5  # capped at the tracks available
  with pytest.raises(ValueError):
    tracks_lib.sample_track_subset(rng, 100, 20, 10)


def test_grid_points_are_cell_centres():
  points = tracks_lib.grid_points(HEIGHT, WIDTH, 4)
  chex.assert_shape(points, (16, 2))
  cell_w, cell_h = WIDTH / 4, HEIGHT / 4
  np.testing.assert_allclose(points[0], [cell_w / 2, cell_h / 2])
  np.testing.assert_allclose(points[1], [1.5 * cell_w, cell_h / 2])  # row-major: x varies fastest
  np.testing.assert_allclose(points[-1], [WIDTH - cell_w / 2, HEIGHT - cell_h / 2])


# ----------------------------------------------------------------------------------------------------------
# Rasterisation.

def _raster(points, visible, embeddings, splat="nearest"):
  return tracks_lib.rasterize(points, visible, embeddings, height=HEIGHT, width=WIDTH, stride=STRIDE, splat=splat)


def test_rasterize_places_embedding_in_its_cell_and_zero_elsewhere():
  embeddings = tracks_lib.track_embeddings(np.array([3, 11]), 8)
  points = np.array([[[5.0, 9.9], [23.99, 0.0]], [[4.0, 4.0], [0.0, 15.5]]], np.float32)
  visible = np.array([[True, True], [True, False]])
  grid = _raster(points, visible, embeddings)
  chex.assert_shape(grid, (2, HEIGHT // STRIDE, WIDTH // STRIDE, 8))
  chex.assert_type(grid, np.float32)
  expected = np.zeros_like(grid)
  expected[0, 2, 1] = embeddings[0]  # y 9.9 -> row 2, x 5 -> column 1
  expected[0, 0, 5] = embeddings[1]
  expected[1, 1, 1] = embeddings[0]  # the hidden track 1 leaves frame 1 empty otherwise
  np.testing.assert_array_equal(grid, expected)


def test_rasterize_sums_collisions_and_ignores_order():
  embeddings = tracks_lib.track_embeddings(np.array([1, 2, 3]), 8)
  points = np.array([[[1.0, 1.0], [3.9, 3.9], [12.0, 12.0]]], np.float32)  # tracks 0 and 1 share cell (0, 0)
  visible = np.ones((1, 3), bool)
  grid = _raster(points, visible, embeddings)
  np.testing.assert_allclose(grid[0, 0, 0], embeddings[0] + embeddings[1], atol=1e-6)
  np.testing.assert_array_equal(grid[0, 3, 3], embeddings[2])
  order = np.array([2, 0, 1])
  np.testing.assert_allclose(_raster(points[:, order], visible[:, order], embeddings[order]), grid, atol=1e-6)


@pytest.mark.parametrize("splat", config_utils.TRACK_SPLATS)
def test_rasterize_drops_points_outside_the_frame(splat):
  embeddings = tracks_lib.track_embeddings(np.array([5]), 8)
  for xy in ([-0.5, 2.0], [WIDTH, 2.0], [2.0, HEIGHT + 1.0], [3e10, -3e10]):
    grid = _raster(np.array([[xy]], np.float32), np.ones((1, 1), bool), embeddings, splat)
    assert not grid.any(), xy


def test_bilinear_splat_on_a_cell_centre_equals_nearest():
  embeddings = tracks_lib.track_embeddings(np.array([7, 8]), 8)
  centres = (np.array([[[1, 2], [4, 0]]], np.float32) + 0.5) * STRIDE  # cells (row 2, col 1) and (0, 4)
  visible = np.ones((1, 2), bool)
  np.testing.assert_allclose(_raster(centres, visible, embeddings, "bilinear"), _raster(centres, visible, embeddings),
                             atol=1e-6)


def test_bilinear_splat_encodes_the_position_inside_a_cell():
  # One track per frame at random interior positions: the share of its embedding in each cell is a bilinear
  # weight, the weights sum to 1, and their average cell centre is the point itself (which nearest loses).
  rng = np.random.default_rng(0)
  embedding = tracks_lib.track_embeddings(np.array([42]), 16)
  cells_high, cells_wide = HEIGHT // STRIDE, WIDTH // STRIDE
  points = rng.uniform(0.5 * STRIDE, [(cells_wide - 0.5) * STRIDE, (cells_high - 0.5) * STRIDE], (20, 1, 2))
  grid = _raster(points.astype(np.float32), np.ones((20, 1), bool), embedding, "bilinear")
  share = grid @ embedding[0] / (embedding[0] @ embedding[0])  # [T, rows, cols]
  assert ((share > 1e-6).sum(axis=(1, 2)) <= 4).all()
  np.testing.assert_allclose(share.sum(axis=(1, 2)), 1.0, atol=1e-5)
  rows, cols = np.meshgrid(np.arange(cells_high), np.arange(cells_wide), indexing="ij")
  centre_x = (np.einsum("trc,rc->t", share, cols) + 0.5) * STRIDE
  centre_y = (np.einsum("trc,rc->t", share, rows) + 0.5) * STRIDE
  np.testing.assert_allclose(np.stack([centre_x, centre_y], -1), points[:, 0], atol=1e-3)
  nearest = _raster(points.astype(np.float32), np.ones((20, 1), bool), embedding) @ embedding[0]
  assert not np.allclose(nearest, share * (embedding[0] @ embedding[0]), atol=1e-3)


def test_nearest_offset_keeps_nearest_ids_and_adds_the_position_inside_the_cell():
  # The first D channels are nearest's grid exactly; the two after them, in the one cell a lone point lands in,
  # give its (x, y) back: (column + 1/2 + offset / 2) * stride. Everywhere else they are zero.
  rng = np.random.default_rng(1)
  embedding = tracks_lib.track_embeddings(np.array([42]), 16)
  points = rng.uniform(0, [WIDTH, HEIGHT], (20, 1, 2)).astype(np.float32)
  visible = np.ones((20, 1), bool)
  grid = _raster(points, visible, embedding, "nearest_offset")
  assert grid.shape[-1] == 16 + config_utils.TRACK_OFFSET_CHANNELS
  np.testing.assert_array_equal(grid[..., :16], _raster(points, visible, embedding))
  for frame in range(20):
    row, col = (points[frame, 0, ::-1] // STRIDE).astype(int)
    offset = grid[frame, row, col, 16:]
    assert np.all(offset >= -1) and np.all(offset < 1)
    np.testing.assert_allclose((np.array([col, row]) + 0.5 + offset / 2) * STRIDE, points[frame, 0], atol=1e-4)
    others = np.delete(grid[frame, ..., 16:].reshape(-1, 2), row * (WIDTH // STRIDE) + col, axis=0)
    assert not others.any()
  # A point on a cell centre has offset zero, so a static query grid at the centres gives nearest's grid + zeros.
  centre = np.array([[[2.5 * STRIDE, 1.5 * STRIDE]]], np.float32)
  assert not _raster(centre, np.ones((1, 1), bool), embedding, "nearest_offset")[..., 16:].any()


def test_rasterize_rejects_an_unknown_splat():
  points, visible = _random_tracks()
  with pytest.raises(ValueError, match="splat"):
    _raster(points, visible, np.zeros((NUM_TRACKS, 8), np.float32), "cubic")


def test_rasterize_rejects_stride_not_dividing_frame():
  points, visible = _random_tracks()
  with pytest.raises(ValueError, match="divisible"):
    tracks_lib.rasterize(points, visible, np.zeros((NUM_TRACKS, 8), np.float32), height=HEIGHT, width=WIDTH,
                         stride=5)


@pytest.mark.parametrize("splat", config_utils.TRACK_SPLATS)
def test_numpy_and_jax_rasterisers_agree(splat):
  rng = np.random.default_rng(4)
  num_tracks = 40  # many tracks on a 4x6 grid: collisions are certain
  points = rng.uniform(-2, 1.1, (6, num_tracks, 2)) * [WIDTH, HEIGHT]  # some points fall outside
  points = points.astype(np.float32)
  visible = rng.uniform(size=(6, num_tracks)) < 0.8
  embeddings = tracks_lib.track_embeddings(tracks_lib.random_track_ids(rng, num_tracks, 1000), 16)
  expected = tracks_lib.rasterize(points, visible, embeddings, height=HEIGHT, width=WIDTH, stride=STRIDE,
                                  splat=splat)
  raster = jax.jit(tracks_lib.rasterize_jax, static_argnames=("height", "width", "stride", "splat"))
  got = raster(points, visible, embeddings, height=HEIGHT, width=WIDTH, stride=STRIDE, splat=splat)
  assert np.abs(expected).sum(axis=-1).astype(bool).sum() > 5  # the comparison is not between empty grids
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Chunks and masking.

def test_shuffle_later_ids_moves_ids_between_points_after_frame_zero_only():
  rng = np.random.default_rng(0)
  points = rng.uniform(0, 64, (5, 4, 2)).astype(np.float32)
  visible = rng.uniform(size=(5, 4)) > 0.3
  embeddings = tracks_lib.track_embeddings(np.array([3, 70, 500, 9000]), 8)
  order = np.array([2, 0, 3, 1])
  shuffled_points, shuffled_visible = tracks_lib.shuffle_later_ids(points, visible, order)
  np.testing.assert_array_equal(shuffled_points[0], points[0])
  np.testing.assert_array_equal(shuffled_points[1:, 0], points[1:, 2])  # track 0's ID follows track 2 later
  np.testing.assert_array_equal(shuffled_visible[1:], visible[1:, order])
  raster = dict(height=64, width=64, stride=4)
  given = tracks_lib.rasterize(points, visible, embeddings, **raster)
  shuffled = tracks_lib.rasterize(shuffled_points, shuffled_visible, embeddings, **raster)
  np.testing.assert_array_equal(shuffled[0], given[0])
  occupied = lambda grid: np.abs(grid).sum(-1) > 0
  np.testing.assert_array_equal(occupied(shuffled), occupied(given))  # the same cells hold points
  assert not np.allclose(shuffled[1:], given[1:])  # but other IDs
  with pytest.raises(ValueError, match="must be a permutation of the 4 tracks"):
    tracks_lib.shuffle_later_ids(points, visible, np.array([0, 0, 1, 2]))


def test_latent_frame_means_hold_each_latent_frame_at_its_mean_place():
  velocity = np.array([[1.0, 0.5], [0.0, -2.0]], np.float32)  # px per frame of 2 tracks
  points = 10 + np.arange(9, dtype=np.float32)[:, None, None] * velocity  # frame 0, then 2 latent frames of 4
  held = tracks_lib.latent_frame_means(points, 4)
  assert held.shape == points.shape and held.dtype == points.dtype
  np.testing.assert_array_equal(held[0], points[0])
  np.testing.assert_allclose(held[1:5], np.broadcast_to(points[1:5].mean(axis=0), (4, 2, 2)))
  np.testing.assert_allclose(held[5:], np.broadcast_to(points[5:].mean(axis=0), (4, 2, 2)))
  assert not np.allclose(held, points)
  np.testing.assert_array_equal(tracks_lib.latent_frame_means(points, 1), points)
  with pytest.raises(ValueError, match="9 frames do not split"):
    tracks_lib.latent_frame_means(points, 3)


def test_chunk_frame_ranges_cover_the_clip_exactly():
  ranges = tracks_lib.chunk_frame_ranges(45, 3, 4)
  assert ranges == [(0, 9), (9, 21), (21, 33), (33, 45)]
  for num_frames, chunk in ((81, 3), (121, 3), (45, 1), (45, 2), (9, 5)):
    ranges = tracks_lib.chunk_frame_ranges(num_frames, chunk, 4)
    assert ranges[0][0] == 0 and ranges[-1][1] == num_frames
    assert all(end == next_start for (_, end), (next_start, _) in zip(ranges, ranges[1:]))
    latent = config_utils.latent_frames(num_frames, 4)
    assert len(ranges) == -(-latent // chunk)
  assert tracks_lib.chunk_frame_ranges(121, 3, 4)[-1] == (117, 121)  # Wan 2.2: 31 latent frames, short tail
  with pytest.raises(config_utils.ConfigError):
    tracks_lib.chunk_frame_ranges(44, 3, 4)


def test_mask_mid_chunks_zeroes_exactly_the_chosen_chunks():
  grid = np.random.default_rng(0).uniform(0.5, 1, (45, 2, 3, 4)).astype(np.float32)
  original = grid.copy()
  ranges = tracks_lib.chunk_frame_ranges(45, 3, 4)
  seen_masked = set()
  for seed in range(30):
    masked_grid, masked = tracks_lib.mask_mid_chunks(grid, np.random.default_rng(seed), chunk_latent_frames=3,
                                                     temporal_stride=4, prob=0.5)
    chex.assert_shape(masked, (len(ranges),))
    chex.assert_type(masked, bool)
    assert not masked[0]
    for (start, end), is_masked in zip(ranges, masked):
      if is_masked:
        assert not masked_grid[start:end].any()
      else:
        np.testing.assert_array_equal(masked_grid[start:end], grid[start:end])
    seen_masked.update(np.flatnonzero(masked).tolist())
  np.testing.assert_array_equal(grid, original)  # pure: the input is untouched
  assert seen_masked == {1, 2, 3}


def test_mask_mid_chunks_rate_matches_prob():
  rng = np.random.default_rng(0)
  grid = np.ones((45, 1), np.float32)
  draws = np.array([tracks_lib.mask_mid_chunks(grid, rng, chunk_latent_frames=3, temporal_stride=4, prob=0.2)[1]
                    for _ in range(2000)])
  assert not draws[:, 0].any()
  rate = draws[:, 1:].mean()
  assert abs(rate - 0.2) < 0.02, rate  # std of the estimate is ~0.005
  for prob, expected in ((0.0, [False, False, False, False]), (1.0, [False, True, True, True])):
    _, masked = tracks_lib.mask_mid_chunks(grid, rng, chunk_latent_frames=3, temporal_stride=4, prob=prob)
    assert masked.tolist() == expected
