"""`python -m msjax.convert NAME --src CKPT --out DIR ...`: PyTorch checkpoints -> orbax params for msjax.

NAME picks a converter; each parses its own flags (`python -m msjax.convert NAME --help`). A converter is a
function `fn(argv) -> exit code` registered in CONVERTERS and imported only when chosen, so a converter's
dependencies never load for another.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from msjax.convert.common import ConversionError

# name -> (module, function taking argv and returning an exit code)
CONVERTERS = {
    "wan": ("msjax.convert.wan", "convert_wan_cli"),
    "wan_vae": ("msjax.convert.wan_vae", "convert_wan_vae_cli"),
    "taehv": ("msjax.convert.taehv", "convert_taehv_cli"),
}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  usage = f"usage: python -m msjax.convert {{{','.join(CONVERTERS)}}} --src CKPT --out DIR ..."
  if not argv or argv[0] in ("-h", "--help"):
    print(usage, file=sys.stderr)
    return 0 if argv else 2
  if argv[0] not in CONVERTERS:
    print(f"unknown converter {argv[0]!r}\n{usage}", file=sys.stderr)
    return 2
  module_name, function_name = CONVERTERS[argv[0]]
  try:
    converter = getattr(importlib.import_module(module_name), function_name)
  except (ImportError, AttributeError) as e:
    print(f"converter {argv[0]!r} is not available ({module_name}.{function_name}: {e})", file=sys.stderr)
    return 2
  try:
    return converter(argv[1:])
  except (ConversionError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
