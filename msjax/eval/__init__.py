"""Evaluation on the `sprites` toy world: motion following (EPE), image quality (PSNR, SSIM), drift over time
and text-effect adherence, for any generator callable; `python -m msjax.eval` runs it from the command line."""

from msjax.eval.sprites_eval import (EVAL_SEED_START, GeneratorContext, GeneratorError, Sample, eval_seeds,
                                     evaluate, generator_names, make_generator, register_generator)

__all__ = ["EVAL_SEED_START", "GeneratorContext", "GeneratorError", "Sample", "eval_seeds", "evaluate",
           "generator_names", "make_generator", "register_generator"]
