"""3-axis RoPE: Wan's pair split and frequencies, interleaved pairing, relative positions, the cache rule."""

import numpy as np
import pytest

from msjax.models import rope

THETA = 10000.0


def _reference_rope(x: np.ndarray, frames: int, height: int, width: int, frame_start: int) -> np.ndarray:
  """Direct float64 complex rotation, written from Wan's description: pair k of each head vector is
  (x[2k], x[2k+1]); pairs [0, a) rotate with the frame index, the next b with the row, the last b with the
  column, where b = (d/2) // 3 and a = d/2 - 2b; axis j's k-th frequency is theta^(-2k / (2 * its pairs))."""
  head_dim = x.shape[-1]
  pairs = head_dim // 2
  b = pairs // 3
  a = pairs - 2 * b
  out = np.empty(x.shape, np.float64)
  token = 0
  for f in range(frames):
    for h in range(height):
      for w in range(width):
        angles = np.empty(pairs)
        for k in range(pairs):
          if k < a:
            angles[k] = (frame_start + f) * THETA ** (-2.0 * k / (2 * a))
          elif k < a + b:
            angles[k] = h * THETA ** (-2.0 * (k - a) / (2 * b))
          else:
            angles[k] = w * THETA ** (-2.0 * (k - a - b) / (2 * b))
        z = x[:, token, :, 0::2].astype(np.float64) + 1j * x[:, token, :, 1::2]
        z = z * np.exp(1j * angles)
        out[:, token, :, 0::2] = z.real
        out[:, token, :, 1::2] = z.imag
        token += 1
  return out


@pytest.mark.parametrize("head_dim,expected", [(128, (22, 21, 21)), (64, (12, 10, 10)), (6, (1, 1, 1))])
def test_axis_split_matches_wan(head_dim, expected):
  split = rope.axis_split(head_dim)
  assert (split.frame_pairs, split.row_pairs, split.col_pairs) == expected
  # Wan's per-axis denominators: d - 4 (d // 6) for frames and 2 (d // 6) for rows / columns.
  assert 2 * split.frame_pairs == head_dim - 4 * (head_dim // 6)
  assert 2 * split.row_pairs == 2 * (head_dim // 6)


def test_axis_split_rejects_odd_head_dim():
  with pytest.raises(ValueError, match="head_dim"):
    rope.axis_split(31)


@pytest.mark.parametrize("head_dim,frame_start", [(128, 0), (32, 5)])
def test_apply_rope_equals_float64_reference(head_dim, frame_start):
  frames, height, width, heads = 2, 3, 4, 2
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, frames * height * width, heads, head_dim)).astype(np.float32)
  table = rope.rope_table(frames, height, width, frame_start, head_dim, THETA)
  got = np.asarray(rope.apply_rope(x, table))
  np.testing.assert_allclose(got, _reference_rope(x, frames, height, width, frame_start), atol=2e-5)


def test_pairs_are_interleaved():
  """A vector living only in elements (0, 1) stays in (0, 1): the pairing is (2k, 2k+1), not split halves."""
  head_dim = 32
  x = np.zeros((1, 4, 1, head_dim), np.float32)
  x[..., 0] = 1.0
  table = rope.rope_table(4, 1, 1, 0, head_dim, THETA)
  got = np.asarray(rope.apply_rope(x, table))[0, :, 0]
  np.testing.assert_allclose(got[:, 2:], 0.0, atol=1e-7)
  np.testing.assert_allclose(got[:, 0], np.cos(np.arange(4)), atol=1e-6)
  np.testing.assert_allclose(got[:, 1], np.sin(np.arange(4)), atol=1e-6)


def test_scores_depend_only_on_position_differences():
  """q.k after RoPE is unchanged when both positions move by the same offset on every axis."""
  head_dim, frames, height, width = 64, 6, 4, 5
  rng = np.random.default_rng(1)
  q = rng.standard_normal((1, 1, 1, head_dim)).astype(np.float32)
  k = rng.standard_normal((1, 1, 1, head_dim)).astype(np.float32)

  def rotated_at(x, table, f, h, w):
    token = (f * height + h) * width + w
    one = rope.RopeTable(cos=table.cos[token:token + 1], sin=table.sin[token:token + 1])
    return np.asarray(rope.apply_rope(x, one)).ravel()

  def score(frame_start, qpos, kpos):
    table = rope.rope_table(frames, height, width, frame_start, head_dim, THETA)
    return rotated_at(q, table, *qpos) @ rotated_at(k, table, *kpos)

  base = score(0, (3, 2, 4), (1, 0, 1))
  assert score(7, (3, 2, 4), (1, 0, 1)) == pytest.approx(base, abs=1e-4)  # temporal offset
  assert score(0, (4, 3, 3), (2, 1, 0)) == pytest.approx(base, abs=1e-4)  # all axes shifted by 1 / 1 / -1
  assert score(0, (3, 2, 4), (0, 0, 1)) != pytest.approx(base, abs=1e-3)  # a different distance differs


def test_cache_rule_positions():
  chunk = 3
  # c3s1w1, cache mode: fills at absolute positions, then the current chunk stays at (S + W) * c.
  currents = [int(rope.cache_frames(n, min(max(n - 1, 0), 1), 1, 1, chunk, "cache").current_start)
              for n in range(5)]
  assert currents == [0, 3, 6, 6, 6]
  full = rope.cache_frames(10, 1, 1, 1, chunk, "cache")
  assert np.asarray(full.window_starts).tolist() == [3]
  # Absolute mode keeps growing.
  assert [int(rope.cache_frames(n, min(max(n - 1, 0), 1), 1, 1, chunk, "absolute").current_start)
          for n in range(5)] == [0, 3, 6, 9, 12]
  with pytest.raises(ValueError, match="rope_mode"):
    rope.cache_frames(0, 0, 1, 1, chunk, "relative")
