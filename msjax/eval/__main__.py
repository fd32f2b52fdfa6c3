"""Evaluate a generator on held-out sprites clips: `python -m msjax.eval --generator first_frame --out DIR`.

  python -m msjax.eval --config configs/teacher.py --checkpoint DIR --generator teacher --num_clips 100 --out DIR

Writes DIR/report.json (every metric per clip and aggregated, for the generator and the first-frame and
true-video baselines) and DIR/samples.gif (true | generated | baseline), and prints a summary table.
Generators are looked up in the registry of `msjax.eval.register_generator`; `first_frame` and `true_video`
are built in; the model generators of `msjax.eval.generators` (teacher, student) are imported by default, and other
modules can register theirs (name them in --generator_modules). `--track_condition shuffled_ids` or `none`
gives the teacher its tracks with the IDs after frame 0 shuffled, or no tracks: set against `given`, they show
whether the model follows a point by its ID or only reads where points are; `latent_means` holds each latent
frame's points at their mean place, which shows whether it reads how they move within a latent frame (compare
the reports' motion lead by place). `--sample_seeds 0,1,2` scores the
generator once per sampling seed and reports the spread, for claims near a target.
"""

from __future__ import annotations

import importlib

from absl import app, flags, logging
from ml_collections import config_flags

from msjax import io_utils
from msjax.data import sprites as sprites_lib
from msjax.eval import metrics, report, sprites_eval

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sample.py",
                                          "Config holding a model preset (file[:preset]).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory for model generators (default: "
                                  "config.checkpoint when the config has one).")
_GENERATOR = flags.DEFINE_string("generator", sprites_eval.FIRST_FRAME, "Registered generator to evaluate.")
_GENERATOR_MODULES = flags.DEFINE_list("generator_modules", ["msjax.eval.generators"], "Modules to import first; they register "
                                       "generators with msjax.eval.register_generator.")
_TRACK_CONDITION = flags.DEFINE_enum("track_condition", sprites_eval.TRACKS_GIVEN,
                                     sprites_eval.TRACK_CONDITIONS,
                                     "Motion condition of the teacher generator: the tracks as given, with "
                                     "the IDs after frame 0 shuffled (does the model follow points by their "
                                     "IDs?), none, or latent_means: each latent frame's points held at their "
                                     "mean place (does the model read motion within a latent frame?).")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 100, "Held-out clips to evaluate.")
_SEED_START = flags.DEFINE_integer("seed_start", sprites_eval.EVAL_SEED_START, "First held-out seed.")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", 0, "Frames per clip (1 + 4k); 0 = the config's length.")
_OUT = flags.DEFINE_string("out", None, "Output directory for report.json and samples.gif.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "Clips shown in the sample grid (0: no grid).")
_BASELINES = flags.DEFINE_bool("baselines", True, "Also score the first-frame and true-video baselines.")
_DRAW_TRACKS = flags.DEFINE_bool("draw_tracks", True, "Draw moving tracks as dots in the sample grid.")
_SCALE = flags.DEFINE_integer("scale", 2, "Integer upscaling of the sample grid.")
_SAMPLE_SEEDS = flags.DEFINE_list("sample_seeds", [], "Run the generator once per seed (config.seed: its noise and "
                                  "track IDs) on the same clips and report each and their mean and std; empty: "
                                  "config.seed once.")


_fail = io_utils.exit_bad_input


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; all options are --flags")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint restore at INFO
    logging.set_verbosity(logging.WARNING)
  if not _OUT.value:
    _fail("--out is required (the directory for report.json and samples.gif)")
  config = _CONFIG.value
  for module in _GENERATOR_MODULES.value:
    try:
      importlib.import_module(module)
    except ImportError as e:
      _fail(f"--generator_modules: cannot import {module!r} ({e})")
  try:
    seeds = sprites_eval.eval_seeds(_NUM_CLIPS.value, _SEED_START.value)
    world = sprites_eval.world_config(config, _NUM_FRAMES.value or None)
    checkpoint = _CHECKPOINT.value if _CHECKPOINT.value is not None else config.get("checkpoint", "")
    sample_seeds = sprites_eval.check_sample_seeds(_SAMPLE_SEEDS.value) if _SAMPLE_SEEDS.value else []
  except ValueError as e:  # bad seeds, sample seeds or frame count
    _fail(str(e))

  def make_generate_fn(sample_seed: int | None) -> sprites_eval.GenerateFn:
    seeded = config
    if sample_seed is not None:
      seeded = config.copy_and_resolve_references()
      with seeded.unlocked():
        seeded.seed = sample_seed
    context = sprites_eval.GeneratorContext(config=seeded, checkpoint=checkpoint, world=world, seeds=tuple(seeds),
                                            track_condition=_TRACK_CONDITION.value)
    return sprites_eval.make_generator(_GENERATOR.value, context)

  if world.motion == sprites_lib.MOTION_MIXED:
    print(f"note: config.data.sprite_motion is {world.motion!r}, so about half the clips are jump clips; the "
          f"sprites world of the teacher's targets is smooth (--config.data.sprite_motion=smooth)")
  print(f"evaluating {_GENERATOR.value!r} on {len(seeds)} clips (seeds {seeds[0]}..{seeds[-1]}, "
        f"{world.num_frames} frames of {world.height}x{world.width}, scored from frame "
        f"{metrics.FIRST_SCORED_FRAME})" + (f", sample seeds {sample_seeds}" if sample_seeds else ""))
  kwargs = dict(seeds=seeds, config=config, baselines=_BASELINES.value, num_frames=world.num_frames,
                num_samples=_NUM_SAMPLES.value, progress=True)
  try:
    if sample_seeds:
      result = sprites_eval.evaluate_sample_seeds(make_generate_fn, sample_seeds, **kwargs)
    else:
      result = sprites_eval.evaluate(make_generate_fn(None), **kwargs)
  except sprites_eval.GeneratorError as e:  # unknown generator, or an output that is not the asked-for video
    _fail(str(e))
  result["generator_name"] = _GENERATOR.value
  result["checkpoint"] = checkpoint
  result["track_condition"] = _TRACK_CONDITION.value
  written = report.write_report(_OUT.value, result, fps=config.video.fps, scale=_SCALE.value,
                                draw_tracks=_DRAW_TRACKS.value)
  print(report.format_summary(result))
  for kind, path in written.items():
    print(f"wrote {kind}: {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=io_utils.parse_flags)
