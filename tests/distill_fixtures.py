"""Shared builders for the student-stage tests (ODE pairs, causal adaptation, DMD): a micro distillation config
and a random teacher saved the way a trained one is, so the stages run end to end in seconds on a CPU."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
from jax import flatten_util
import jax.numpy as jnp
import ml_collections

from configs import distill
from msjax import codecs
from msjax import inference
from msjax.models import dit
from msjax.models import text as text_lib
from msjax.models import track_head

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_TIMEOUT_S = 900
# Noise added to the random teacher's parameters: Wan zero-initialises the output head, which would make every
# velocity zero and every test below trivially pass.
PARAM_NOISE = 0.05

# 32x32 px, 9 frames -> 3 latent frames of 8x8 (16 tokens each), chunks of 1 latent frame -> 3 chunks, 2 steps.
MICRO = {
    "video.height": 32, "video.width": 32, "video.num_frames": 9,
    "tracks.grid": 8, "tracks.min_tracks": 8, "tracks.max_tracks": 16,
    "model.dim": 32, "model.num_layers": 1, "model.num_heads": 2, "model.ffn_dim": 64, "model.text_len": 4,
    "stream.chunk_frames": 1, "stream.num_steps": 2, "stream.sink_chunks": 1, "stream.window_chunks": 1,
    "data.num_train": 4, "data.num_validation": 2,
    "ode_pairs.num_pairs": 3, "ode_pairs.shard_size": 2, "ode_pairs.euler_steps": 4,
    "causal_init.num_validation": 1, "causal_init.sink_range": (0, 1), "causal_init.window_range": (1, 2),
    "causal_init.train.batch_size": 2, "causal_init.train.log_every": 1,
    "dmd.critic_steps": 2, "dmd.train.batch_size": 1, "dmd.train.log_every": 1,
    "eval.batch_size": 1, "eval.num_samples": 1, "eval.timesteps": (0.5,),
}
TEXT_ENCODER = {"width": 16, "num_layers": 1, "num_heads": 2}


def micro_config(root: str | os.PathLike, small_text: bool = True, **overrides) -> ml_collections.ConfigDict:
  """configs/distill.py:tiny shrunk by MICRO, with every path (data, pairs, workdirs, teacher) under `root`.

  `small_text` also shrinks the learned text encoder (TEXT_ENCODER); those keys cannot be set from the command
  line, so tests of `train.py` leave it at its defaults.
  """
  root = os.fspath(root)
  c = distill.get_config("tiny")
  if small_text:
    c.text.update(TEXT_ENCODER)
  paths = {"data.data_dir": "data", "ode_pairs.dir": "pairs", "teacher_checkpoint": "teacher",
           "causal_init.workdir": "causal_init", "dmd.workdir": "dmd", "dmd.init_checkpoint": "causal_init"}
  values = dict(MICRO, **{key: os.path.join(root, name) for key, name in paths.items()})
  values.update(overrides)
  for dotted, value in values.items():
    *sections, name = dotted.split(".")
    node = c
    for section in sections:
      node = node[section]
    node[name] = value
  return c


@functools.lru_cache(maxsize=None)
def _random_params(model_spec: dit.DiTSpec, text_settings: tuple, text_len: int, seed: int):
  """(DiT params with PARAM_NOISE, text params), built once per model shape and seed in a test session."""
  model = dit.WanDiT(model_spec)
  text_config = ml_collections.ConfigDict({"text": dict(text_settings),
                                           "model": {"text_len": text_len, "text_dim": model_spec.text_dim}})

  @jax.jit
  def draw(key):
    latents = jnp.zeros((1, 1, 2 * model_spec.patch_size[1], 2 * model_spec.patch_size[2],
                         model_spec.latent_channels))
    cond = track_head.Conditioning(
        context=jnp.zeros((1, text_len, model_spec.text_dim)), first_latent=latents[:, 0],
        track_grid=jnp.zeros((1, 1, latents.shape[2], latents.shape[3], model_spec.track_embed_dim)))
    params = model.init(key, latents, jnp.zeros((1,)), cond)["params"]
    flat, unravel = flatten_util.ravel_pytree(params)
    return unravel(flat + PARAM_NOISE * jax.random.normal(jax.random.fold_in(key, 1), flat.shape))

  text_params = text_lib.make_text_encoder(text_config).init_params(jax.random.PRNGKey(seed + 1))
  return draw(jax.random.PRNGKey(seed)), text_params


def random_model(config: ml_collections.ConfigDict, seed: int) -> inference.Model:
  """A random DiT (head included, see PARAM_NOISE) with a random learned text encoder, for a micro config."""
  dit_params, text_params = _random_params(dit.DiTSpec.from_config(config), tuple(sorted(config.text.items())),
                                           config.model.text_len, seed)
  return inference.Model(config=config, dit_params=dit_params, text_encoder=text_lib.make_text_encoder(config),
                         text_params=text_params, codec=codecs.make_codec(config), codec_params=None, stage="random")


def save_model(model: inference.Model, path: str | os.PathLike, stage: str) -> inference.Model:
  """Writes `model` as an exported folder at `path` (what load_model reads) and loads it back."""
  params = {inference.DIT_PARAMS: model.dit_params, inference.TEXT_PARAMS: model.text_params}
  inference.save_model(os.fspath(path), params, model.config, {"stage": stage, "step": 0, "source": "test"})
  return inference.load_model(os.fspath(path), model.config)


def saved_teacher(config: ml_collections.ConfigDict, seed: int = 0) -> inference.Model:
  """A random teacher saved at `config.teacher_checkpoint`."""
  return save_model(random_model(config, seed), config.teacher_checkpoint, "teacher")


def cli_overrides(config: ml_collections.ConfigDict) -> list[str]:
  """Command-line flags that make `configs/distill.py:tiny` into the micro `config` (built with small_text=False)."""
  args = [f"--config={REPO}/configs/distill.py:tiny"]
  args += [f"--config.{dotted}={value}" for dotted, value in MICRO.items()]
  args += [f"--config.data.data_dir={config.data.data_dir}", f"--config.ode_pairs.dir={config.ode_pairs.dir}",
           f"--config.teacher_checkpoint={config.teacher_checkpoint}",
           f"--config.dmd.init_checkpoint={config.dmd.init_checkpoint}",
           f"--config.causal_init.workdir={config.causal_init.workdir}", f"--config.dmd.workdir={config.dmd.workdir}"]
  return args


def run_train_py(config: ml_collections.ConfigDict, cwd: str | os.PathLike, extra: list[str]) -> str:
  """`python train.py` on the micro `config` (`cli_overrides`) plus `extra`; returns its output, failing on a
  non-zero exit."""
  args = [sys.executable, os.path.join(REPO, "train.py")] + cli_overrides(config)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(args + extra, cwd=cwd, env=env, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout + result.stderr
