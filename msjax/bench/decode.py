"""Decode-time benchmark for the real codecs (Wan 2.1 VAE, TAEHV) with random weights.

Two numbers per codec: a full decode of a whole clip (81 frames at 832x480 by default: 21 latent frames in one
jitted call), and the streaming setting, where each chunk of `--chunk-latents` latent frames (3, i.e. 12 video
frames) is decoded by one jitted step carrying the causal cache. Compile time is reported apart from run time;
run times are medians over `--repeats`.

  python -m msjax.bench.decode                                   # GPU: full size, bf16
  JAX_PLATFORMS=cpu python -m msjax.bench.decode --height 64 --width 64 --frames 21 --reduced-width
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from msjax import config_utils
from msjax.codecs import taehv, wan_vae

CODECS = ("wan", "taehv")


@dataclasses.dataclass(frozen=True)
class DecodeTiming:
  codec: str
  dtype: str
  video_shape: tuple[int, ...]  # [B, T, H, W, 3] of the full decode
  full_compile_s: float | None
  full_s: float | None
  chunk_latents: int
  chunk_frames: int  # video frames a later chunk yields
  chunk_compile_s: float
  chunk_s: float  # one later (non-first) chunk, carrying the cache

  @property
  def full_fps(self) -> float | None:
    return None if self.full_s is None else self.video_shape[1] / self.full_s

  @property
  def chunk_fps(self) -> float:
    return self.chunk_frames / self.chunk_s


def build_codec(name: str, dtype: str, reduced_width: bool) -> Any:
  """The codec to time: the released architecture, or its narrow test variant with `reduced_width`."""
  if name == "wan":
    config = wan_vae.reduced_config() if reduced_width else wan_vae.WAN21_VAE
    return wan_vae.WanVAECodec(dataclasses.replace(config, dtype=dtype))
  if name == "taehv":
    config = taehv.reduced_config() if reduced_width else taehv.TAEW2_1
    return taehv.TAEHVCodec(dataclasses.replace(config, dtype=dtype))
  raise ValueError(f"unknown codec {name!r}; expected one of {', '.join(CODECS)}")


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def time_codec(name: str, *, height: int, width: int, frames: int, chunk_latents: int, dtype: str,
               reduced_width: bool, repeats: int, full: bool, seed: int = 0) -> DecodeTiming:
  """Times full and streaming decode of one codec on random latents (batch 1)."""
  codec = build_codec(name, dtype, reduced_width)
  s = codec.spatial_stride
  if height % s or width % s:
    raise ValueError(f"--height and --width must be multiples of the codec's spatial stride {s}, got {height}x{width}")
  num_latents = config_utils.latent_frames(frames, codec.temporal_stride)
  params = codec.init_params(seed)
  shape = (1, num_latents, height // s, width // s, codec.latent_channels)
  latents = jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))

  full_compile = full_time = None
  if full:
    decode = jax.jit(codec.decode)
    video, full_compile = _timed(lambda: decode(params, latents))
    full_time = statistics.median(_timed(lambda: decode(params, latents))[1] for _ in range(repeats))
    del video

  # Donating the cache lets XLA update it in place; the CPU backend does not implement donation.
  donate = () if jax.default_backend() == "cpu" else (1,)
  step = jax.jit(codec.decode_chunk, static_argnames="is_first", donate_argnums=donate)
  chunk = latents[:, :chunk_latents]
  state = codec.init_decode_state(params, 1, *shape[2:4])
  (state, _), _ = _timed(lambda: step(params, state, chunk, is_first=True))
  (state, _), chunk_compile = _timed(lambda: step(params, state, chunk, is_first=False))
  times = []
  for _ in range(repeats):
    (state, _), elapsed = _timed(lambda: step(params, state, chunk, is_first=False))
    times.append(elapsed)
  return DecodeTiming(codec=name, dtype=dtype, video_shape=(1, frames, height, width, 3), full_compile_s=full_compile,
                      full_s=full_time, chunk_latents=chunk_latents,
                      chunk_frames=chunk_latents * codec.temporal_stride, chunk_compile_s=chunk_compile,
                      chunk_s=statistics.median(times))


def format_row(t: DecodeTiming) -> str:
  full = "skipped" if t.full_s is None else f"{t.full_s:8.3f} s ({t.full_fps:7.1f} FPS, compile {t.full_compile_s:.1f} s)"
  return (f"{t.codec:6s} {t.dtype:9s} {t.video_shape[1]}x{t.video_shape[2]}x{t.video_shape[3]}  full: {full}  "
          f"chunk of {t.chunk_latents} latents: {1e3 * t.chunk_s:9.1f} ms ({t.chunk_fps:7.1f} FPS, first call "
          f"{t.chunk_compile_s:.1f} s)")


def _write_json_atomically(path: str, rows: Sequence[DecodeTiming]) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  payload = [{**dataclasses.asdict(r), "full_fps": r.full_fps, "chunk_fps": r.chunk_fps,
              "device": jax.devices()[0].device_kind} for r in rows]
  with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
    json.dump(payload, f, indent=2)
  os.replace(f.name, path)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m msjax.bench.decode", description=__doc__.split("\n")[0])
  parser.add_argument("--codec", nargs="+", default=list(CODECS), choices=CODECS)
  parser.add_argument("--height", type=int, default=480)
  parser.add_argument("--width", type=int, default=832)
  parser.add_argument("--frames", type=int, default=81, help="video frames of the full decode (1 + 4k)")
  parser.add_argument("--chunk-latents", type=int, default=3, help="latent frames per streaming chunk")
  parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                      help="compute dtype; auto = bfloat16 on accelerators, float32 on CPU")
  parser.add_argument("--reduced-width", action="store_true", help="narrow test variants (for CPU runs)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--skip-full", action="store_true", help="only time the streaming chunks")
  parser.add_argument("--json", default=None, help="also write the results here (atomically)")
  args = parser.parse_args(argv)
  dtype = args.dtype if args.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), random weights, batch 1")
  rows = []
  for name in args.codec:
    rows.append(time_codec(name, height=args.height, width=args.width, frames=args.frames,
                           chunk_latents=args.chunk_latents, dtype=dtype, reduced_width=args.reduced_width,
                           repeats=args.repeats, full=not args.skip_full))
    print(format_row(rows[-1]), flush=True)
  if args.json:
    _write_json_atomically(args.json, rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
