"""Train a stage of MotionStream: `python train.py --config configs/teacher.py` or `--config configs/distill.py`.

Override any config value on the command line, e.g. `--config configs/teacher.py:tiny --config.train.steps=100
--config.workdir=runs/try`. A run resumes from the newest checkpoint in its workdir.
"""

from __future__ import annotations

import importlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from msjax import io_utils

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (file[:preset]).", lock_config=True)

STAGES = ("teacher", "causal_init", "dmd")
# stage -> module with `train(config)`; stages without one yet are reported as such.
STAGE_MODULES = {"teacher": "msjax.train.teacher", "causal_init": "msjax.train.causal_init",
                 "dmd": "msjax.train.dmd"}


def main(argv: list[str]) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    io_utils.exit_bad_input("--config is required, e.g. --config configs/teacher.py")
  if config.stage not in STAGES:
    io_utils.exit_bad_input(f"config.stage must be one of {', '.join(STAGES)}, got {config.stage!r}")
  module_name = STAGE_MODULES[config.stage]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:
      raise
    print(f"error: training stage {config.stage!r} is not implemented in this build yet", file=sys.stderr)
    sys.exit(1)
  try:
    module.train(config)
  except _user_errors() as e:  # a missing teacher, pairs folder or checkpoint, a bad config: no traceback
    print(f"error: {e}", file=sys.stderr)  # multi-line messages keep their layout
    sys.exit(io_utils.EXIT_BAD_INPUT)


def _user_errors() -> tuple[type[Exception], ...]:
  """Errors that mean "fix your inputs or config", each carrying a message that says how."""
  from msjax import config_utils, inference  # pylint: disable=g-import-not-at-top
  from msjax.train import loop, ode_pairs  # pylint: disable=g-import-not-at-top
  return (config_utils.ConfigError, inference.ModelError, loop.CheckpointMismatchError, ode_pairs.PairsError,
          FileNotFoundError)


if __name__ == "__main__":
  app.run(main, flags_parser=io_utils.parse_flags)
