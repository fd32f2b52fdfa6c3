"""Prints one of the README's two top commands, so CI runs exactly what the README tells people to run.

Usage: python3 .ci/readme_command.py {main,test}
The README opens with two fenced ```bash blocks: the first is the main job, the second the test command.
"""

import pathlib
import re
import sys

WHICH = {"main": 0, "test": 1}


def main() -> None:
  if len(sys.argv) != 2 or sys.argv[1] not in WHICH:
    sys.exit("usage: readme_command.py {main,test}")
  readme = pathlib.Path(__file__).resolve().parent.parent / "README.md"
  blocks = re.findall(r"^```bash\n(.*?)^```", readme.read_text(), flags=re.S | re.M)
  if len(blocks) < 2:
    sys.exit(f"{readme}: expected two ```bash blocks at the top, found {len(blocks)}")
  print(blocks[WHICH[sys.argv[1]]].strip())


if __name__ == "__main__":
  main()
