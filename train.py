"""Train a stage of MotionStream: `python train.py --config configs/teacher.py` or `--config configs/distill.py`."""

from __future__ import annotations

import sys

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (file[:preset]).", lock_config=True)

STAGES = ("teacher", "causal_init", "dmd")


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  if config is None:
    print("error: --config is required, e.g. --config configs/teacher.py", file=sys.stderr)
    sys.exit(2)
  if config.stage not in STAGES:
    print(f"error: config.stage must be one of {', '.join(STAGES)}, got {config.stage!r}", file=sys.stderr)
    sys.exit(2)
  print(f"error: training stage {config.stage!r} is not implemented in this build yet", file=sys.stderr)
  sys.exit(1)


if __name__ == "__main__":
  app.run(main)
