"""Wan 2.1 VAE checkpoints (official `Wan2.1_VAE.pth` names or diffusers `AutoencoderKLWan` names) -> `WanVAEModel`.

The rule tables are generated from the `WanVAEConfig` by walking the same layer lists the modules are built
from (`encoder_layer_names`, `decoder_layer_names`), so a checkpoint index always lands on the layer that runs
in that position. Key names: reference/wan.md section 2.3, checked against a live diffusers state dict.
Layout changes: conv weights [O, I, *window] -> [*window, I, O]; RMS-norm gains [C, 1, 1(, 1)] -> [C]; the
attention's 1x1 Conv2d projections -> Dense kernels [I, O].

  params, plan = convert_wan_vae("Wan2.1_VAE.pth")
  python -m msjax.convert wan_vae --src Wan2.1_VAE.pth --out DIR [--names auto|official|diffusers]
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Mapping, Sequence

import numpy as np

from msjax.codecs import wan_vae
from msjax.convert import common
from msjax.convert.common import Rule, conv_rules

NAMINGS = ("official", "diffusers")
# Wrappers seen around VAE state dicts (pipelines saved whole, DDP, torch.compile).
KEY_PREFIXES = ("vae.", "first_stage_model.", "model.", "module.", "_orig_mod.")


def _gain_vector(gamma: np.ndarray) -> np.ndarray:
  """RMS_norm gain [C, 1, 1(, 1)] -> [C]."""
  return gamma.reshape(gamma.shape[0])


def _pointwise_dense(weight: np.ndarray) -> np.ndarray:
  """1x1 Conv2d weight [O, I, 1, 1] -> Dense kernel [I, O]."""
  if weight.shape[2:] != (1, 1):
    raise ValueError(f"expected a 1x1 conv weight, got window {weight.shape[2:]}")
  return weight[:, :, 0, 0].T


def _gain_rule(src: str, dst: str) -> Rule:
  return Rule(re.escape(src) + r"\.gamma", dst + "/gamma", _gain_vector)


def _causal_conv_rules(src: str, dst: str) -> tuple[Rule, ...]:
  return conv_rules(re.escape(src), dst + "/conv")


def _residual_rules(src: str, dst: str, names: str) -> tuple[Rule, ...]:
  parts = ({"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
            "shortcut": "shortcut"} if names == "official" else
           {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "shortcut": "conv_shortcut"})
  return (_gain_rule(f"{src}.{parts['norm1']}", f"{dst}/norm1"),
          *_causal_conv_rules(f"{src}.{parts['conv1']}", f"{dst}/conv1"),
          _gain_rule(f"{src}.{parts['norm2']}", f"{dst}/norm2"),
          *_causal_conv_rules(f"{src}.{parts['conv2']}", f"{dst}/conv2"),
          *_causal_conv_rules(f"{src}.{parts['shortcut']}", f"{dst}/shortcut"))


def _resample_rules(src: str, dst: str) -> tuple[Rule, ...]:
  return (*conv_rules(re.escape(f"{src}.resample.1"), f"{dst}/spatial_conv"),
          *_causal_conv_rules(f"{src}.time_conv", f"{dst}/time_conv"))


def _attention_rules(src: str, dst: str) -> tuple[Rule, ...]:
  rules = [_gain_rule(f"{src}.norm", f"{dst}/norm")]
  for proj in ("to_qkv", "proj"):
    rules += [Rule(re.escape(f"{src}.{proj}") + r"\.weight", f"{dst}/{proj}/kernel", _pointwise_dense),
              Rule(re.escape(f"{src}.{proj}") + r"\.bias", f"{dst}/{proj}/bias")]
  return tuple(rules)


def _mid_rules(src: str, dst: str, names: str) -> tuple[Rule, ...]:
  res_0, attn, res_1 = (("middle.0", "middle.1", "middle.2") if names == "official" else
                        ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"))
  return (*_residual_rules(f"{src}.{res_0}", f"{dst}/res_0", names),
          *_attention_rules(f"{src}.{attn}", f"{dst}/attn"),
          *_residual_rules(f"{src}.{res_1}", f"{dst}/res_1", names))


def _head_rules(src: str, dst: str, names: str) -> tuple[Rule, ...]:
  norm, conv = ("head.0", "head.2") if names == "official" else ("norm_out", "conv_out")
  return (_gain_rule(f"{src}.{norm}", f"{dst}/norm_out"), *_causal_conv_rules(f"{src}.{conv}", f"{dst}/conv_out"))


def wan_vae_rules(config: wan_vae.WanVAEConfig, names: str) -> tuple[Rule, ...]:
  """The full key map for `config` under one naming scheme ('official' or 'diffusers')."""
  if names not in NAMINGS:
    raise ValueError(f"names must be one of {', '.join(NAMINGS)}, got {names!r}")
  official = names == "official"
  rules = [*_causal_conv_rules("conv1" if official else "quant_conv", "quant_conv"),
           *_causal_conv_rules("conv2" if official else "post_quant_conv", "post_quant_conv")]

  conv_in = "conv1" if official else "conv_in"
  rules += _causal_conv_rules(f"encoder.{conv_in}", "encoder/conv_in")
  stage_list = "encoder.downsamples" if official else "encoder.down_blocks"
  for index, (kind, name) in enumerate(wan_vae.encoder_layer_names(config)):
    src = f"{stage_list}.{index}"
    rules += (_residual_rules(src, f"encoder/{name}", names) if kind == "res" else
              _resample_rules(src, f"encoder/{name}"))
  rules += _mid_rules("encoder", "encoder/mid", names)
  rules += _head_rules("encoder", "encoder/head", names)

  rules += _causal_conv_rules(f"decoder.{conv_in}", "decoder/conv_in")
  rules += _mid_rules("decoder", "decoder/mid", names)
  res_in_stage = 0
  for index, (stage, kind, name) in enumerate(wan_vae.decoder_layer_names(config)):
    if official:
      src = f"decoder.upsamples.{index}"
    elif kind == "res":
      src = f"decoder.up_blocks.{stage}.resnets.{res_in_stage}"
    else:
      src = f"decoder.up_blocks.{stage}.upsamplers.0"
    res_in_stage = res_in_stage + 1 if kind == "res" else 0
    rules += (_residual_rules(src, f"decoder/{name}", names) if kind == "res" else
              _resample_rules(src, f"decoder/{name}"))
  rules += _head_rules("decoder", "decoder/head", names)
  return tuple(rules)


def as_source(src: common.PathLike | common.TensorSource | Mapping[str, Any], entry: str | None = None,
              prefixes: Sequence[str] = KEY_PREFIXES) -> common.TensorSource:
  """A path, an in-memory state dict or a TensorSource -> a TensorSource with wrapper `prefixes` removed."""
  if isinstance(src, common.TensorSource):
    source = src
  elif isinstance(src, Mapping):
    source = common.from_state_dict(src)
  else:
    source = common.open_checkpoint(src, entry=entry)
  return common.strip_common_prefix(source, prefixes)


def detect_names(source: common.TensorSource, config: wan_vae.WanVAEConfig = wan_vae.WAN21_VAE) -> str:
  """'official' or 'diffusers': the table that matches more of the checkpoint's keys."""
  return common.choose_rules(source, {n: wan_vae_rules(config, n) for n in NAMINGS}, what="Wan VAE")


def plan_wan_vae(source: common.TensorSource, config: wan_vae.WanVAEConfig = wan_vae.WAN21_VAE,
                 names: str = "auto") -> common.Plan:
  """Checks that `source` fits the `WanVAEModel` of `config`; keys and shapes only (nothing is read)."""
  if names == "auto":
    names = detect_names(source, config)
  hint = (f"read with {names} names; a Wan 2.1 VAE has base_dim {config.base_dim}, z_dim {config.z_dim}, "
          f"dim_mult {config.dim_mult} (Wan 2.2's 48-channel VAE is a different architecture)")
  return common.plan_conversion(source, wan_vae_rules(config, names), wan_vae.WanVAECodec(config).param_shapes(), hint=hint)


def convert_wan_vae(src: common.PathLike | common.TensorSource | Mapping[str, Any],
                    config: wan_vae.WanVAEConfig = wan_vae.WAN21_VAE, *, names: str = "auto",
                    entry: str | None = None) -> tuple[dict[str, Any], common.Plan]:
  """A Wan VAE checkpoint -> (`WanVAEModel` params as numpy arrays, the plan that says what came from where)."""
  source = as_source(src, entry)
  plan = plan_wan_vae(source, config, names)
  return common.materialize(plan, source), plan


def convert_wan_vae_cli(argv: Sequence[str] | None = None) -> int:
  """`python -m msjax.convert wan_vae ...`: converts, writes an orbax checkpoint, prints a summary."""
  parser = argparse.ArgumentParser(prog="python -m msjax.convert wan_vae", description=convert_wan_vae_cli.__doc__)
  common.add_io_arguments(parser)
  parser.add_argument("--names", default="auto", choices=("auto", *NAMINGS), help="key naming of the checkpoint")
  args = parser.parse_args(argv)
  source = as_source(args.src, args.entry)
  names = detect_names(source) if args.names == "auto" else args.names
  params, plan = convert_wan_vae(source, names=names)
  out = common.save_params(params, args.out, overwrite=args.overwrite)
  print(f"Wan 2.1 VAE ({names} names): {plan.summary()}")
  print(f"wrote {out}")
  return 0
