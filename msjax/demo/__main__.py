"""`python -m msjax.demo [--checkpoint DIR] [--host 127.0.0.1] [--port 8000] [--random_weights]`.

Loads the student (default: the shipped tiny one), compiles its chunk programs, then serves the demo page and
prints its URL. A checkpoint that cannot be used ends the run with one `error: ...` line and exit code 2, like
sample.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Sequence

from msjax import io_utils

EXIT_BAD_INPUT = io_utils.EXIT_BAD_INPUT


def _parser() -> argparse.ArgumentParser:
  from configs import models  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m msjax.demo", description="Interactive motion-controlled "
                                   "streaming in the browser: drag points on the first frame, watch it move.")
  parser.add_argument("--checkpoint", default=None, help="student: exported model folder or distillation workdir "
                      "(default: the shipped student of the preset, checkpoints/PRESET_student)")
  parser.add_argument("--preset", default="tiny", choices=models.PRESETS, help="model preset (default: tiny)")
  parser.add_argument("--random_weights", action="store_true", help="stream with random weights (no checkpoint)")
  parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
  parser.add_argument("--port", type=int, default=8000, help="port (0: any free port; default: 8000)")
  return parser


def _fail(message: str) -> int:
  print(io_utils.error_line(message), file=sys.stderr)
  return EXIT_BAD_INPUT


async def _serve(engine, host: str, port: int) -> int:
  from msjax.demo import server  # pylint: disable=g-import-not-at-top
  loop = asyncio.get_running_loop()
  try:
    runner, url = await server.start_server(engine, host, port)
  except OSError as e:
    return _fail(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port")
  stop = asyncio.Event()
  for signum in (signal.SIGINT, signal.SIGTERM):
    loop.add_signal_handler(signum, stop.set)
  try:
    seconds = await loop.run_in_executor(engine.executor, engine.warmup)
    print(f"compiled the chunk programs in {seconds:.1f} s", flush=True)
    print(f"msjax demo: open {url} (Ctrl-C stops the server)", flush=True)
    await stop.wait()
  finally:
    await runner.cleanup()
    engine.close()
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's INFO lines stay off the terminal
  from configs import sample as sample_config  # pylint: disable=g-import-not-at-top
  from msjax import config_utils  # pylint: disable=g-import-not-at-top
  from msjax import inference  # pylint: disable=g-import-not-at-top
  from msjax.demo import server  # pylint: disable=g-import-not-at-top
  from msjax.models import text as text_lib  # pylint: disable=g-import-not-at-top
  from msjax.stream import sampler as sampler_lib  # pylint: disable=g-import-not-at-top

  config = sample_config.get_config(args.preset)
  checkpoint = None if args.random_weights else (args.checkpoint or config.checkpoint)
  if args.random_weights and args.checkpoint:
    return _fail("give --checkpoint or --random_weights, not both")
  if checkpoint is not None and not os.path.isdir(checkpoint):
    return _fail(f"{checkpoint}: no such checkpoint folder; pass --checkpoint DIR (an exported student or a "
                 "distillation workdir), or --random_weights")
  try:
    model = sampler_lib.load_stream_model(config, checkpoint=checkpoint, decoder=config.decoder,
                                          decoder_checkpoint=config.decoder_checkpoint)
    engine = server.DemoEngine(model)
  except (inference.ModelError, sampler_lib.DecoderError, config_utils.ConfigError, text_lib.TextEncoderError) as e:
    return _fail(str(e))
  print(f"model: {model.stage}, preset {config.preset}, {config.video.width}x{config.video.height} at "
        f"{config.video.fps} fps, from {checkpoint or 'random weights'}", flush=True)
  return asyncio.run(_serve(engine, args.host, args.port))


if __name__ == "__main__":
  sys.exit(main())
