"""Streaming benchmark: how fast and how steadily the student streams (random weights unless --checkpoint).

  python -m msjax.bench.stream --preset tiny --chunks 200 [--checkpoint DIR] [--decoder taehv]
  python -m msjax.bench.stream --preset tiny --flat          # 1000 chunks: is the chunk time flat, is memory?

Reports compile time, first-frame latency (after compilation: prompt, first-frame encode, cross-attention K/V
and the first chunk), time per later chunk (mean ± std, max), FPS end to end (tracks rasterised on the host,
generate, commit, decode, frames copied to the host) and DiT-only (denoise steps + commit, no decode), peak
memory (the device's when it reports it, else the process's peak RSS) and achieved TFLOP/s against
`flops_per_chunk`. The tracks are a grid of points circling slowly, so every chunk's track grid differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from configs import sample as sample_config
from msjax import codecs
from msjax import config_utils
from msjax import io_utils
from msjax.data import tracks as tracks_lib
from msjax.stream import sampler as sampler_lib

FLAT_CHUNKS = 1000
FLAT_EARLY = (10, 110)  # chunks [10, 110): steady state after warm-up
FLAT_LATE = 100  # the last 100 chunks
FLAT_TOLERANCE = 0.05
TRACK_GRID_SIDE = 8  # benchmark tracks: an 8 x 8 grid of points
TRACK_RADIUS_FRAC = 0.1  # circling at a tenth of the frame's smaller side
TRACK_PERIOD_FRAMES = 97  # one loop per this many frames (not a multiple of a chunk, so chunks differ)
BYTES_PER_MIB = 2**20
KIB = 1024


def flops_per_chunk(config) -> float:
  """FLOPs of the DiT for one streamed chunk: (num_steps denoising passes + 1 commit pass) x `flops_per_pass`."""
  return float((config.stream.num_steps + 1) * flops_per_pass(config))


def flops_per_pass(config) -> float:
  """FLOPs of one DiT pass over a chunk against a full cache (a `denoise` or a `commit`): `dit_flops` with the
  chunk's latent frames as queries and S + W + 1 chunks of keys (cached K/V are not recomputed). For Wan 2.1
  1.3B at 480p, c3s1w1 this is 24.3 TFLOP, so 4 x 24.3 = 97 TFLOP per 3-step chunk (../shared/reference/wan.md
  section 6)."""
  s = config.stream
  return dit_flops(config, s.chunk_frames, s.chunk_frames * (s.sink_chunks + s.window_chunks + 1))


def dit_flops(config, query_frames: int, key_frames: int) -> float:
  """FLOPs of one DiT forward whose queries are `query_frames` latent frames attending over `key_frames`.

  A matmul [m, k] x [k, n] is 2mkn FLOPs. With D = model.dim, F = ffn_dim, L = layers, Nq / Nk the query / key
  tokens, T = text_len:
    linear layers  2 Nq L (4D^2 + 2D^2 + 2DF)   self q,k,v,o; cross q,o (text K/V are computed once); the FFN
    self-attention 4 Nq Nk D L                  QK^T and AV, 2 Nq Nk D each
    cross-attention 4 Nq T D L                  (plus 4 Nq I D L over I CLIP tokens when enabled)
    patch embed    2 Nq (in_channels * patch volume) D, head 2 Nq D (out_channels * patch volume)
    track head     2 cells (sd + so) sd + 2 cells sd tc, cells = latent cells of the query frames, sd = stride x
                   embed_dim, so = stride x offset channels (nearest_offset only, else 0)
  Norms, modulation, RoPE and the time embedding are elementwise or per-frame and left out.
  """
  geo = config_utils.geometry(config)
  m = config.model
  d, layers = m.dim, m.num_layers
  temporal_patch = m.patch_size[0]
  nq = query_frames * geo.tokens_per_frame // temporal_patch
  nk = key_frames * geo.tokens_per_frame // temporal_patch
  patch_volume = int(np.prod(m.patch_size))
  linear = 2 * nq * layers * (6 * d * d + 2 * d * m.ffn_dim)
  attention = 4 * nq * nk * d * layers + 4 * nq * m.text_len * d * layers
  if m.image_cross_attn:
    attention += 4 * nq * m.image_tokens * d * layers
  embed = 2 * nq * geo.in_channels * patch_volume * d + 2 * nq * d * geo.out_channels * patch_volume
  track = 0
  if m.track_channels:
    cells = query_frames * geo.latent_height * geo.latent_width
    packed = config.codec.temporal_stride * config.tracks.embed_dim
    offsets = config.codec.temporal_stride * config_utils.track_offset_channels(config.tracks.splat)
    track = 2 * cells * (packed + offsets) * packed + 2 * cells * packed * m.track_channels
  return float(linear + attention + embed + track)


def process_rss_bytes() -> int:
  """The process's resident memory now (Linux /proc), else its peak so far."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


def peak_memory() -> tuple[int, str]:
  """(bytes, what was measured): the device's peak when it reports one, else the process's peak RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB, "process peak RSS"


def circling_tracks(config, num_frames: int) -> tracks_lib.Tracks:
  """A grid of points circling together: valid tracks that change in every chunk."""
  height, width = config.video.height, config.video.width
  start = tracks_lib.grid_points(height, width, TRACK_GRID_SIDE)
  angle = 2 * np.pi * np.arange(num_frames) / TRACK_PERIOD_FRAMES
  radius = TRACK_RADIUS_FRAC * min(height, width)
  offset = radius * np.stack([np.cos(angle) - 1, np.sin(angle)], axis=-1)
  points = np.clip(start[None] + offset[:, None], 0, [width - 1, height - 1]).astype(np.float32)
  return tracks_lib.Tracks(points=points, visible=np.ones(points.shape[:2], bool))


@dataclasses.dataclass(frozen=True)
class StreamRun:
  """One timed stream after compilation."""
  first_frame_s: float  # from asking for the stream to its first frames on the host
  chunk_s: list[float]  # wall seconds per chunk, the first included
  chunk_cpu_s: list[float]  # process CPU seconds (all threads) per chunk: unlike wall time, not inflated when
                            # other processes share the CPU
  frames: int
  wall_s: float
  rss_start: int
  rss_end: int
  rss_per_chunk: list[int]  # resident bytes after each chunk: growth after warm-up, not just end - start

  @property
  def fps(self) -> float:
    return self.frames / self.wall_s


def time_stream(sampler: sampler_lib.StreamSampler, num_chunks: int, seed: int = 0) -> StreamRun:
  """Streams `num_chunks` chunks end to end through `stream_chunks` (frames reach the host, then are dropped)."""
  config = sampler.config
  num_frames = config_utils.video_frames(num_chunks * config.stream.chunk_frames, config.codec.temporal_stride)
  tracks = circling_tracks(config, num_frames)
  first_frame = np.zeros((config.video.height, config.video.width, 3), np.uint8)
  rss_start = process_rss_bytes()
  begin = time.perf_counter()
  first_at, seconds, cpu_seconds, frames, rss = None, [], [], 0, []
  cpu_before = time.process_time()
  for chunk in sampler_lib.stream_chunks(sampler.model, first_frame, "", tracks, num_frames, seed=seed,
                                         sampler=sampler):
    first_at = first_at or time.perf_counter()
    cpu_now = time.process_time()
    cpu_seconds.append(cpu_now - cpu_before)
    cpu_before = cpu_now
    seconds.append(chunk.seconds)
    frames += chunk.frames.shape[0]
    rss.append(process_rss_bytes())
  wall = time.perf_counter() - begin
  return StreamRun(first_frame_s=first_at - begin, chunk_s=seconds, chunk_cpu_s=cpu_seconds, frames=frames,
                   wall_s=wall, rss_start=rss_start, rss_end=process_rss_bytes(), rss_per_chunk=rss)


def time_dit_only(sampler: sampler_lib.StreamSampler, num_chunks: int) -> list[float]:
  """Seconds per later chunk of denoising + commit alone (no decode, no host copy), waiting on the cache."""
  first_frame = np.zeros((sampler.config.video.height, sampler.config.video.width, 3), np.uint8)
  state = sampler_lib.start_stream(sampler, first_frame, "", seed=0)
  state, _ = sampler.chunk_step(state, sampler.dummy_grid(1, True), is_first=True, decode=False)
  grid = sampler.dummy_grid(1, False)
  jax.block_until_ready(state)
  seconds = []
  for _ in range(num_chunks - 1):
    begin = time.perf_counter()
    state, _ = sampler.chunk_step(state, grid, is_first=False, decode=False)
    jax.block_until_ready(state)
    seconds.append(time.perf_counter() - begin)
  return seconds


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def benchmark(sampler: sampler_lib.StreamSampler, num_chunks: int) -> dict[str, Any]:
  """Every number of the module docstring, for `num_chunks` chunks (at least 2)."""
  config = sampler.config
  compile_s = sampler.warmup()
  compile_dit_s = sampler.warmup(decode=False)
  run = time_stream(sampler, num_chunks)
  dit = time_dit_only(sampler, num_chunks)
  later = run.chunk_s[1:]
  mean, std = _mean_std(later)
  dit_mean, dit_std = _mean_std(dit)
  frames_per_chunk = config.codec.temporal_stride * config.stream.chunk_frames
  flops = flops_per_chunk(config)
  memory, memory_kind = peak_memory()
  ms = io_utils.MS_PER_SECOND
  return {
      "device": jax.devices()[0].device_kind, "preset": config.preset, "dtype": config.model.dtype,
      "stream": f"c{config.stream.chunk_frames}s{config.stream.sink_chunks}w{config.stream.window_chunks}",
      "steps": config.stream.num_steps, "chunks": num_chunks, "frames": run.frames,
      "compile_s": compile_s, "compile_dit_only_s": compile_dit_s, "first_frame_s": run.first_frame_s,
      "chunk_ms_mean": ms * mean, "chunk_ms_std": ms * std, "chunk_ms_max": ms * max(later),
      "fps_end_to_end": run.fps, "dit_chunk_ms_mean": ms * dit_mean, "dit_chunk_ms_std": ms * dit_std,
      "fps_dit_only": frames_per_chunk / dit_mean, "tflop_per_chunk": flops / 1e12,
      "tflops_achieved": flops / dit_mean / 1e12, "memory_mib": memory / BYTES_PER_MIB, "memory_kind": memory_kind,
  }


def flatness(sampler: sampler_lib.StreamSampler, num_chunks: int = FLAT_CHUNKS) -> dict[str, Any]:
  """Chunk time of chunks [10, 110) against the last 100, and resident memory at the start and the end."""
  sampler.warmup()
  run = time_stream(sampler, num_chunks)

  def early_late(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values[FLAT_EARLY[0]:FLAT_EARLY[1]]), statistics.mean(values[-FLAT_LATE:])

  early, late = early_late(run.chunk_s)
  cpu_early, cpu_late = early_late(run.chunk_cpu_s)
  ms = io_utils.MS_PER_SECOND
  return {
      "device": jax.devices()[0].device_kind, "preset": sampler.config.preset, "chunks": num_chunks,
      "chunk_ms_10_110": ms * early, "chunk_ms_last_100": ms * late, "late_over_early": late / early,
      "flat": abs(late / early - 1) <= FLAT_TOLERANCE, "cpu_ms_10_110": ms * cpu_early,
      "cpu_ms_last_100": ms * cpu_late, "cpu_late_over_early": cpu_late / cpu_early,
      "cpu_flat": abs(cpu_late / cpu_early - 1) <= FLAT_TOLERANCE, "rss_start_mib": run.rss_start / BYTES_PER_MIB,
      "rss_at_110_mib": run.rss_per_chunk[FLAT_EARLY[1] - 1] / BYTES_PER_MIB,
      "rss_end_mib": run.rss_end / BYTES_PER_MIB, "fps_end_to_end": run.fps, "load_average": os.getloadavg(),
  }


def format_result(result: dict[str, Any]) -> str:
  if "late_over_early" in result:
    return (f"{result['preset']} on {result['device']}, {result['chunks']} chunks: chunks 10-110 "
            f"{result['chunk_ms_10_110']:.1f} ms, last 100 {result['chunk_ms_last_100']:.1f} ms wall "
            f"(x{result['late_over_early']:.3f}, {'flat' if result['flat'] else 'NOT flat'}); CPU time "
            f"{result['cpu_ms_10_110']:.1f} -> {result['cpu_ms_last_100']:.1f} ms "
            f"(x{result['cpu_late_over_early']:.3f}, {'flat' if result['cpu_flat'] else 'NOT flat'}); RSS "
            f"{result['rss_start_mib']:.0f} (start) -> {result['rss_at_110_mib']:.0f} (chunk 110) -> "
            f"{result['rss_end_mib']:.0f} MiB (end); {result['fps_end_to_end']:.1f} FPS; load average "
            f"{result['load_average'][0]:.1f}")
  return "\n".join([
      f"{result['preset']} {result['stream']} {result['steps']} steps {result['dtype']} on {result['device']}, "
      f"{result['chunks']} chunks ({result['frames']} frames)",
      f"  compile          {result['compile_s']:.1f} s (+ {result['compile_dit_only_s']:.1f} s DiT-only programs)",
      f"  first frame      {io_utils.MS_PER_SECOND * result['first_frame_s']:.1f} ms",
      f"  chunk            {result['chunk_ms_mean']:.1f} ± {result['chunk_ms_std']:.1f} ms "
      f"(max {result['chunk_ms_max']:.1f} ms)",
      f"  FPS end to end   {result['fps_end_to_end']:.1f}",
      f"  FPS DiT only     {result['fps_dit_only']:.1f} ({result['dit_chunk_ms_mean']:.1f} ± "
      f"{result['dit_chunk_ms_std']:.1f} ms per chunk)",
      f"  compute          {result['tflop_per_chunk']:.4g} TFLOP per chunk, {result['tflops_achieved']:.3g} TFLOP/s",
      f"  memory           {result['memory_mib']:.0f} MiB ({result['memory_kind']})",
  ])


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m msjax.bench.stream", description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--chunks", type=int, default=200, help="chunks to stream (at least 2)")
  parser.add_argument("--checkpoint", default=None, help="student to load (default: random weights)")
  parser.add_argument("--decoder", default=None, choices=codecs.CODEC_NAMES, help="default: the preset's")
  parser.add_argument("--decoder_checkpoint", default="",
                      help="converted VAE / TAEHV params (random only without --checkpoint)")
  parser.add_argument("--flat", action="store_true", help=f"flatness check over {FLAT_CHUNKS} chunks")
  parser.add_argument("--json", default=None, help="also write the result here (atomically)")
  args = parser.parse_args(argv)
  if args.chunks < 2:
    parser.error(f"--chunks must be at least 2 (the first chunk is timed apart), got {args.chunks}")
  config = sample_config.get_config(args.preset)
  model = sampler_lib.load_stream_model(config, checkpoint=args.checkpoint, decoder=args.decoder or config.decoder,
                                        decoder_checkpoint=args.decoder_checkpoint)
  sampler = sampler_lib.StreamSampler(model)
  result = flatness(sampler) if args.flat else benchmark(sampler, args.chunks)
  print(format_result(result), flush=True)
  if args.json:
    io_utils.atomic_write_bytes(args.json, (json.dumps(result, indent=1) + "\n").encode())
  return 0


if __name__ == "__main__":
  sys.exit(main())
