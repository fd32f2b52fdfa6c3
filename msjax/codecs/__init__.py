"""Video <-> latent codecs behind one protocol (base.Codec); `make_codec` picks one from a config."""

from __future__ import annotations

import importlib

import ml_collections

from msjax.codecs.base import Codec
from msjax.codecs.pack import PackCodec

# Codecs with learned weights live in modules that pull in more code; they are imported only when asked for.
_LAZY_CODECS = {"wan": "msjax.codecs.wan_vae", "taehv": "msjax.codecs.taehv"}
CODEC_NAMES = ("pack", *_LAZY_CODECS)


def make_codec(config: ml_collections.ConfigDict) -> Codec:
  """Returns the codec named by `config.codec.name`, built from `config` (each module's `from_config`)."""
  name = config.codec.name
  if name == "pack":
    return PackCodec.from_config(config)
  if name not in _LAZY_CODECS:
    raise ValueError(f"unknown config.codec.name {name!r}; expected one of {', '.join(CODEC_NAMES)}")
  module = importlib.import_module(_LAZY_CODECS[name])
  if not hasattr(module, "from_config"):
    raise NotImplementedError(f"{module.__name__} has no module-level from_config(config) for codec {name!r}")
  return module.from_config(config)


__all__ = ["Codec", "PackCodec", "CODEC_NAMES", "make_codec"]
