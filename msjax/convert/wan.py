"""Wan 2.1 / 2.2 DiT checkpoints (official `WanModel` names or diffusers `WanTransformer3DModel` names) -> `WanDiT`.

Two rule tables, one per naming scheme (key names: reference/wan.md section 1.6, checked against a live diffusers
state dict). Layout changes are the generic ones from `common`: Linear weights transposed, the Conv3d patch embedding
permuted to [pt, ph, pw, in, D], [1, n, D] modulation tables squeezed, per-block tensors stacked on the leading layer
axis of the scanned blocks. Diffusers swaps the norm names: its affine `norm2` (before cross-attention) is Wan's
`norm3`, and its parameter-free `norm3` has no weights.

Our patch embedding may have more input channels than the checkpoint: [latent | image mask | first-frame latent |
tracks]. A T2V checkpoint fills the first `latent_channels`, a Wan 2.1 I2V / VideoX-Fun InP checkpoint the first
latent + mask + latent; the rest (and the msjax-only track head's effect) start at zero, so the converted model
computes exactly what the checkpoint did until those channels are trained. The track head itself takes its values
from the model's own init (zero-initialising it too would leave it without gradient).

  params, plan = convert_wan("diffusion_pytorch_model.safetensors", get_preset("wan2_1_1_3b"))
  python -m msjax.convert wan --src ckpt.safetensors --preset wan2_1_1_3b --out DIR [--names auto|official|diffusers]
      [--set model.image_cross_attn=True]   # preset overrides, e.g. for an I2V checkpoint with the CLIP branch

Memory: converting holds the fp32 params plus one checkpoint tensor at a time; orbax's write briefly adds a
second copy (measured: 2.3 GB, then 5.1 GB peak for a 10-layer, 0.49 B-parameter Wan 1.3B slice).
"""

from __future__ import annotations

import argparse
import ast
from typing import Any, Mapping, Sequence

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections

from msjax.convert import common
from msjax.convert.common import Rule, conv_rules, linear_rules, norm_rules, squeeze_leading
from msjax.models import dit
from msjax.models import track_head

NAMINGS = ("official", "diffusers")
# Wrappers seen around Wan state dicts: ComfyUI, Self Forcing / CausVid generators, DDP, torch.compile.
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "module.", "_orig_mod.")
# Top-level param subtrees with no PyTorch counterpart; their values come from the model's init.
MSJAX_ONLY = ("track_head",)

_BLOCK = r"blocks\.(?P<layer>\d+)\."

OFFICIAL_RULES: tuple[Rule, ...] = (
    *conv_rules(r"patch_embedding", "patch_embedding", grow_in_channels=True),
    *linear_rules(r"text_embedding\.0", "text_embedding/fc1"),
    *linear_rules(r"text_embedding\.2", "text_embedding/fc2"),
    *linear_rules(r"time_embedding\.0", "time_embedding/fc1"),
    *linear_rules(r"time_embedding\.2", "time_embedding/fc2"),
    *linear_rules(r"time_projection\.1", "time_projection"),
    *norm_rules(r"img_emb\.proj\.0", "image_embedding/norm_in"),
    *linear_rules(r"img_emb\.proj\.1", "image_embedding/fc1"),
    *linear_rules(r"img_emb\.proj\.3", "image_embedding/fc2"),
    *norm_rules(r"img_emb\.proj\.4", "image_embedding/norm_out"),
    Rule(_BLOCK + r"modulation", "blocks/modulation", squeeze_leading),
    *linear_rules(_BLOCK + r"self_attn\.(?P<proj>[qkvo])", "blocks/self_attn/{proj}"),
    *norm_rules(_BLOCK + r"self_attn\.(?P<norm>norm_[qk])", "blocks/self_attn/{norm}", bias=False),
    *norm_rules(_BLOCK + r"norm3", "blocks/norm3"),
    *linear_rules(_BLOCK + r"cross_attn\.(?P<proj>[qkvo]|k_img|v_img)", "blocks/cross_attn/{proj}"),
    *norm_rules(_BLOCK + r"cross_attn\.(?P<norm>norm_[qk]|norm_k_img)", "blocks/cross_attn/{norm}", bias=False),
    *linear_rules(_BLOCK + r"ffn\.0", "blocks/ffn/fc1"),
    *linear_rules(_BLOCK + r"ffn\.2", "blocks/ffn/fc2"),
    Rule(r"head\.modulation", "head/modulation", squeeze_leading),
    *linear_rules(r"head\.head", "head/linear"),
)

DIFFUSERS_RULES: tuple[Rule, ...] = (
    *conv_rules(r"patch_embedding", "patch_embedding", grow_in_channels=True),
    *linear_rules(r"condition_embedder\.text_embedder\.linear_1", "text_embedding/fc1"),
    *linear_rules(r"condition_embedder\.text_embedder\.linear_2", "text_embedding/fc2"),
    *linear_rules(r"condition_embedder\.time_embedder\.linear_1", "time_embedding/fc1"),
    *linear_rules(r"condition_embedder\.time_embedder\.linear_2", "time_embedding/fc2"),
    *linear_rules(r"condition_embedder\.time_proj", "time_projection"),
    *norm_rules(r"condition_embedder\.image_embedder\.norm1", "image_embedding/norm_in"),
    *linear_rules(r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", "image_embedding/fc1"),
    *linear_rules(r"condition_embedder\.image_embedder\.ff\.net\.2", "image_embedding/fc2"),
    *norm_rules(r"condition_embedder\.image_embedder\.norm2", "image_embedding/norm_out"),
    Rule(_BLOCK + r"scale_shift_table", "blocks/modulation", squeeze_leading),
    *linear_rules(_BLOCK + r"attn1\.to_(?P<proj>[qkv])", "blocks/self_attn/{proj}"),
    *linear_rules(_BLOCK + r"attn1\.to_out\.0", "blocks/self_attn/o"),
    *norm_rules(_BLOCK + r"attn1\.(?P<norm>norm_[qk])", "blocks/self_attn/{norm}", bias=False),
    *norm_rules(_BLOCK + r"norm2", "blocks/norm3"),
    *linear_rules(_BLOCK + r"attn2\.to_(?P<proj>[qkv])", "blocks/cross_attn/{proj}"),
    *linear_rules(_BLOCK + r"attn2\.to_out\.0", "blocks/cross_attn/o"),
    *linear_rules(_BLOCK + r"attn2\.add_k_proj", "blocks/cross_attn/k_img"),
    *linear_rules(_BLOCK + r"attn2\.add_v_proj", "blocks/cross_attn/v_img"),
    *norm_rules(_BLOCK + r"attn2\.(?P<norm>norm_[qk])", "blocks/cross_attn/{norm}", bias=False),
    *norm_rules(_BLOCK + r"attn2\.norm_added_k", "blocks/cross_attn/norm_k_img", bias=False),
    Rule(_BLOCK + r"attn2\.norm_added_q\.weight", None),  # diffusers itself ignores it on load
    *linear_rules(_BLOCK + r"ffn\.net\.0\.proj", "blocks/ffn/fc1"),
    *linear_rules(_BLOCK + r"ffn\.net\.2", "blocks/ffn/fc2"),
    Rule(r"scale_shift_table", "head/modulation", squeeze_leading),
    *linear_rules(r"proj_out", "head/linear"),
)

RULES: Mapping[str, tuple[Rule, ...]] = {"official": OFFICIAL_RULES, "diffusers": DIFFUSERS_RULES}


def detect_names(source: common.TensorSource) -> str:
  """'official' or 'diffusers': the table that matches more of the checkpoint's keys."""
  return common.choose_rules(source, RULES, what="Wan DiT")


def _model_and_inputs(config: ml_collections.ConfigDict) -> tuple[Any, tuple[Any, ...]]:
  """`WanDiT` for `config` and the smallest inputs that create every parameter (one patch, one text token)."""
  config = config.copy_and_resolve_references()
  config.model.attention = "xla"  # the kernel choice does not change parameters; XLA traces on any backend
  spec = dit.DiTSpec.from_config(config)
  pt, ph, pw = spec.patch_size
  image_tokens = jnp.zeros((1, 1, spec.image_embed_dim)) if spec.image_cross_attn else None
  cond = track_head.Conditioning(context=jnp.zeros((1, 1, spec.text_dim)), image_tokens=image_tokens)
  return dit.WanDiT(spec), (jnp.zeros((1, pt, ph, pw, spec.latent_channels)), jnp.zeros((1, pt)), cond)


def param_shapes(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The nested tree of `WanDiT` parameter shapes for `config`, without allocating anything."""
  model, inputs = _model_and_inputs(config)
  return jax.eval_shape(lambda rng: model.init(rng, *inputs)["params"], jax.random.key(0))


def _init_msjax_only(config: ml_collections.ConfigDict, paths: Sequence[str], seed: int) -> dict[str, Any]:
  """Values for params the checkpoint cannot provide, from the model's own init (only those are computed)."""
  if not paths:
    return {}
  model, inputs = _model_and_inputs(config)

  def init_subset(rng: jax.Array) -> dict[str, jax.Array]:
    flat = traverse_util.flatten_dict(model.init(rng, *inputs)["params"], sep=common.PATH_SEP)
    return {path: flat[path] for path in paths}

  # Under jit, XLA drops the init of everything not returned, so the full-size model is never built.
  return jax.device_get(jax.jit(init_subset)(jax.random.key(seed)))


def as_source(src: common.PathLike | common.TensorSource | Mapping[str, Any],
              entry: str | None = None) -> common.TensorSource:
  """`common.as_source` with the wrapper prefixes Wan DiT checkpoints come with."""
  return common.as_source(src, entry, KEY_PREFIXES)


def plan_wan(source: common.TensorSource, config: ml_collections.ConfigDict, names: str = "auto") -> common.Plan:
  """Checks that `source` fits the `WanDiT` of `config`; keys and shapes only (nothing is read)."""
  if names == "auto":
    names = detect_names(source)
  if names not in RULES:
    raise ValueError(f"names must be 'auto' or one of {', '.join(NAMINGS)}, got {names!r}")
  hint = (f"read with {names} names; check that the preset matches the checkpoint (dim, num_layers, ffn_dim, "
          "text_dim, patch_size, latent_channels, image_cross_attn)")
  return common.plan_conversion(source, RULES[names], param_shapes(config), initialised=MSJAX_ONLY, hint=hint)


def convert_wan(src: common.PathLike | common.TensorSource | Mapping[str, Any], config: ml_collections.ConfigDict,
                *, names: str = "auto", entry: str | None = None,
                seed: int = 0) -> tuple[dict[str, Any], common.Plan]:
  """A Wan DiT checkpoint -> (`WanDiT` params as numpy arrays, the plan that says what came from where)."""
  source = as_source(src, entry)
  plan = plan_wan(source, config, names)
  initial = _init_msjax_only(config, plan.initialised, seed)
  return common.materialize(plan, source, initial), plan


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """A copy of `config` with 'dotted.key=value' overrides (values parsed as Python literals, else strings)."""
  config = config.copy_and_resolve_references()
  flat = {}
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set expects KEY=VALUE (e.g. model.image_cross_attn=True), got {item!r}")
    try:
      flat[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      flat[key] = text
  for key in flat:
    *parents, field = key.split(".")
    node = config
    for name in parents:
      node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or field not in node:
      raise ValueError(f"--set {key}: the preset has no such field")
  try:
    config.update_from_flattened_dict(flat)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"--set {overrides}: {e}") from e
  return config


def convert_wan_cli(argv: Sequence[str] | None = None) -> int:
  """`python -m msjax.convert wan ...`: converts, writes an orbax checkpoint, prints a summary."""
  from configs import models  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(prog="python -m msjax.convert wan", description=convert_wan_cli.__doc__)
  common.add_io_arguments(parser)
  parser.add_argument("--preset", required=True, choices=models.PRESETS, help="model preset the params are for")
  parser.add_argument("--names", default="auto", choices=("auto", *NAMINGS), help="key naming of the checkpoint")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="preset override, repeatable, e.g. model.image_cross_attn=True for an I2V checkpoint")
  parser.add_argument("--seed", type=int, default=0, help="init seed of the msjax-only track head")
  args = parser.parse_args(argv)
  common.check_output_dir(args.out, args.overwrite)
  try:
    config = apply_overrides(models.get_preset(args.preset), args.set)
  except ValueError as e:
    parser.error(str(e))
  source = as_source(args.src, args.entry)
  names = detect_names(source) if args.names == "auto" else args.names
  params, plan = convert_wan(source, config, names=names, seed=args.seed)
  return common.save_and_report(params, plan, args, f"Wan DiT ({names} names) for preset {args.preset}")
