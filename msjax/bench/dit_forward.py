"""Time one DiT pass over a streamed chunk against a full cache, and compare it with the FLOPs it must do.

  python -m msjax.bench.dit_forward --preset tiny                       # CPU, float32, XLA attention
  python -m msjax.bench.dit_forward --preset wan2_1_1_3b --reps 20      # GPU: bf16, cuDNN attention (preset)

The cache is first filled to its steady state (S sink + W window chunks committed), so every timed pass sees
the most keys it ever will; after that the cost per chunk is constant for the rest of a stream. Weights are
random (speed does not depend on them). Printed: compile time, the pass (`denoise`) and the commit pass in ms
(mean ± std over --reps), FLOPs per pass (`msjax.bench.stream.flops_per_pass`) and the achieved TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from configs import models
from msjax import config_utils
from msjax import inference
from msjax import io_utils
from msjax.bench import stream as stream_bench
from msjax.models import kv_cache
from msjax.models.track_head import Conditioning

TERA = 1e12


def chunk_inputs(config, rng: jax.Array) -> tuple[jax.Array, Conditioning]:
  """A random later-chunk latent [1, c, h, w, C] and its conditioning (text, tracks; no first frame)."""
  geo = config_utils.geometry(config)
  m = config.model
  keys = jax.random.split(rng, 4)
  latents = jax.random.normal(keys[0], (1, geo.chunk_frames, geo.latent_height, geo.latent_width,
                                        geo.latent_channels))
  grid = None
  if m.track_channels:
    grid = jax.random.normal(keys[1], (1, config.codec.temporal_stride * geo.chunk_frames, geo.latent_height,
                                       geo.latent_width, config_utils.track_grid_channels(config)))
  image_tokens = jax.random.normal(keys[3], (1, m.image_tokens, m.image_embed_dim)) if m.image_cross_attn else None
  context = jax.random.normal(keys[2], (1, m.text_len, m.text_dim))
  return latents, Conditioning(context=context, track_grid=grid, image_tokens=image_tokens)


def _timed(fn, reps: int) -> list[float]:
  seconds = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - start)
  return seconds


def run(config, reps: int, seed: int = 0) -> dict[str, Any]:
  """Compiles, fills the cache, times `reps` denoise and commit passes; returns the figures as a dict."""
  params_rng, input_rng = jax.random.split(jax.random.PRNGKey(seed))
  params = jax.jit(lambda key: inference.init_dit_params(config, key))(params_rng)
  latents, cond = chunk_inputs(config, input_rng)
  state = kv_cache.init_cache(params, config, cond, batch=1)
  denoise = jax.jit(kv_cache.denoise)
  commit = jax.jit(kv_cache.commit)
  t = jnp.full((1,), 0.5, jnp.float32)

  start = time.perf_counter()
  jax.block_until_ready(denoise(params, state, latents, t, cond))
  compile_seconds = time.perf_counter() - start
  steady_chunks = config.stream.sink_chunks + config.stream.window_chunks
  for _ in range(steady_chunks):  # fill the sink, then the window: every later chunk looks the same
    state = commit(params, state, latents, cond)
  jax.block_until_ready(denoise(params, state, latents, t, cond))  # the steady-state program

  forward = _timed(lambda: denoise(params, state, latents, t, cond), reps)
  commit_times = _timed(lambda: commit(params, state, latents, cond), reps)
  flops = stream_bench.flops_per_pass(config)
  mean = float(np.mean(forward))
  ms = io_utils.MS_PER_SECOND
  return {
      "preset": config.preset, "device": jax.devices()[0].device_kind, "dtype": config.model.dtype,
      "attention": config.model.attention, "tokens_per_chunk": config_utils.geometry(config).tokens_per_chunk,
      "sink_chunks": config.stream.sink_chunks, "window_chunks": config.stream.window_chunks,
      "chunk_frames": config.stream.chunk_frames, "reps": reps, "compile_s": compile_seconds,
      "forward_ms_mean": mean * ms, "forward_ms_std": float(np.std(forward)) * ms,
      "commit_ms_mean": float(np.mean(commit_times)) * ms,
      "commit_ms_std": float(np.std(commit_times)) * ms,
      "tflop_per_forward": flops / TERA, "tflops_achieved": flops / mean / TERA,
  }


def format_result(r: dict[str, Any]) -> str:
  return (f"{r['preset']} on {r['device']} ({r['dtype']}, {r['attention']} attention), c{r['chunk_frames']}"
          f"s{r['sink_chunks']}w{r['window_chunks']}, {r['tokens_per_chunk']} tokens per chunk\n"
          f"  compile            {r['compile_s']:.1f} s\n"
          f"  forward per chunk  {r['forward_ms_mean']:.2f} ± {r['forward_ms_std']:.2f} ms ({r['reps']} reps)\n"
          f"  commit per chunk   {r['commit_ms_mean']:.2f} ± {r['commit_ms_std']:.2f} ms\n"
          f"  FLOPs per forward  {r['tflop_per_forward'] * 1e3:.4g} GFLOP -> {r['tflops_achieved']:.3g} TFLOP/s")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m msjax.bench.dit_forward", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="tiny", choices=models.PRESETS)
  parser.add_argument("--reps", type=int, default=50)
  parser.add_argument("--dtype", default=None, help="override model.dtype (float32 | bfloat16)")
  parser.add_argument("--attention", default=None, help="override model.attention (xla | cudnn)")
  parser.add_argument("--sink", type=int, default=None, help="override stream.sink_chunks")
  parser.add_argument("--window", type=int, default=None, help="override stream.window_chunks")
  parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
  args = parser.parse_args(argv)
  config = models.get_preset(args.preset)
  for section, key, value in (("model", "dtype", args.dtype), ("model", "attention", args.attention),
                              ("stream", "sink_chunks", args.sink), ("stream", "window_chunks", args.window)):
    if value is not None:
      config[section][key] = value
  result = run(config, args.reps)
  print(format_result(result))
  if args.json:
    io_utils.atomic_write_bytes(args.json, (json.dumps(result, indent=1) + "\n").encode())
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
