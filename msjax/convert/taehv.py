"""TAEHV checkpoints (`taew2_1.pth` / `taew2_1.safetensors`) -> `TAEHVModel` params.

TAEHV's keys are positions in two nn.Sequentials (`encoder.N...`, `decoder.N...`; reference/wan.md
section 3.2). The rule table walks `encoder_layout` / `decoder_layout`, the same lists the modules are built
from, so index N always maps onto the layer that runs N-th. Layout changes: conv weights [O, I, kh, kw] ->
[kh, kw, I, O].

  params, plan = convert_taehv("taew2_1.safetensors")
  python -m msjax.convert taehv --src taew2_1.pth --out DIR
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping, Sequence

from msjax.codecs import taehv
from msjax.convert import common, wan_vae
from msjax.convert.common import Rule, conv_kernel, conv_rules

KEY_PREFIXES = ("taehv.", "model.", "module.", "_orig_mod.")


def _layer_rules(prefix: str, index: int, layer: taehv.Layer) -> tuple[Rule, ...]:
  src = rf"{prefix}\.{index}"
  dst = f"{prefix}/{layer.name}"
  if layer.kind == "conv":
    return conv_rules(src, dst) if layer.bias else (Rule(src + r"\.weight", dst + "/kernel", conv_kernel),)
  if layer.kind in ("pool", "grow"):  # TPool / TGrow: a bias-free 1x1 conv inside the wrapper module
    return (Rule(src + r"\.conv\.weight", dst + "/kernel", conv_kernel),)
  if layer.kind == "mem":
    rules = []
    for i in range(taehv.MEMBLOCK_CONVS):  # at nn.Sequential positions 0, 2, 4 (ReLUs between)
      rules += conv_rules(rf"{src}\.conv\.{2 * i}", f"{dst}/conv_{i}")
    return (*rules, Rule(src + r"\.skip\.weight", dst + "/skip/kernel", conv_kernel))
  return ()  # relu, clamp, upsample: no parameters


def taehv_rules(config: taehv.TAEHVConfig = taehv.TAEW2_1) -> tuple[Rule, ...]:
  """The full key map for `config` (encoder and decoder)."""
  rules = []
  for prefix, layout in (("encoder", taehv.encoder_layout(config)), ("decoder", taehv.decoder_layout(config))):
    for index, layer in enumerate(layout):
      rules += _layer_rules(prefix, index, layer)
  return tuple(rules)


def plan_taehv(source: common.TensorSource, config: taehv.TAEHVConfig = taehv.TAEW2_1) -> common.Plan:
  """Checks that `source` fits the `TAEHVModel` of `config`; keys and shapes only (nothing is read)."""
  hint = (f"this converter reads TAEHV for Wan 2.1 (taew2_1: {config.latent_channels} latent channels, patch size "
          "1); taew2_2 / taehv1_5 / taeltx checkpoints have other latent widths and patch sizes")
  return common.plan_conversion(source, taehv_rules(config), taehv.TAEHVCodec(config).param_shapes(), hint=hint)


def convert_taehv(src: common.PathLike | common.TensorSource | Mapping[str, Any],
                  config: taehv.TAEHVConfig = taehv.TAEW2_1, *,
                  entry: str | None = None) -> tuple[dict[str, Any], common.Plan]:
  """A TAEHV checkpoint -> (`TAEHVModel` params as numpy arrays, the plan that says what came from where)."""
  source = wan_vae.as_source(src, entry, KEY_PREFIXES)
  plan = plan_taehv(source, config)
  return common.materialize(plan, source), plan


def convert_taehv_cli(argv: Sequence[str] | None = None) -> int:
  """`python -m msjax.convert taehv ...`: converts, writes an orbax checkpoint, prints a summary."""
  parser = argparse.ArgumentParser(prog="python -m msjax.convert taehv", description=convert_taehv_cli.__doc__)
  common.add_io_arguments(parser)
  args = parser.parse_args(argv)
  params, plan = convert_taehv(args.src, entry=args.entry)
  out = common.save_params(params, args.out, overwrite=args.overwrite)
  print(f"TAEHV (taew2_1): {plan.summary()}")
  print(f"wrote {out}")
  return 0
