"""The demo's WebSocket protocol: what the page may send, checked strictly, and what the server sends back.

Page -> server, JSON text messages (every field required, no others allowed):
  {"type": "scene", "name": "example" | "sprites:SEED"}      first frame from a built-in scene
  {"type": "prompt", "text": STR}                             prompt of the next stream
  {"type": "grab", "id": INT, "x": NUM, "y": NUM, "grid": BOOL, "seq": INT}
  {"type": "move", "id": INT, "x": NUM, "y": NUM, "seq": INT}
  {"type": "release", "id": INT, "keep": BOOL, "seq": INT}
  {"type": "start"} | {"type": "pause"} | {"type": "reset"}
and binary messages: an uploaded first frame (png / jpg file bytes).
Points are pixel (x, y) in the model's frame; `seq` is the page's counter of pointer messages, echoed in chunk
headers so the page can time a pointer move to the first frame that follows it.

Server -> page, JSON text messages:
  hello        the model's frame size, fps, scenes, chunk sizes, prompt kind (once, on connect)
  first_frame  a new first frame: {"prompt", "source"}, then 1 binary message (JPEG)
  chunk        {"index", "frames", "seconds", "seq"}, then `frames` binary messages (JPEG, one per frame)
  state        {"state": "idle" | "running" | "paused"}
  notice       {"message"}: information, nothing failed
  error        {"message"}: a message that could not be used; the session and its stream go on
  busy         {"message"}: another page holds the model; the connection is closed
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, ClassVar

MAX_PROMPT_CHARS = 2000
MAX_INT = 2**53 - 1  # the largest integer a JavaScript number holds exactly

# Server -> page message types.
HELLO = "hello"
FIRST_FRAME = "first_frame"
CHUNK = "chunk"
STATE = "state"
NOTICE = "notice"
ERROR = "error"
BUSY = "busy"


class ProtocolError(ValueError):
  """A page message that does not follow the protocol; the message says what was expected and found."""


@dataclasses.dataclass(frozen=True)
class Scene:
  TYPE: ClassVar[str] = "scene"
  name: str


@dataclasses.dataclass(frozen=True)
class Prompt:
  TYPE: ClassVar[str] = "prompt"
  text: str


@dataclasses.dataclass(frozen=True)
class Grab:
  TYPE: ClassVar[str] = "grab"
  id: int
  x: float
  y: float
  grid: bool
  seq: int


@dataclasses.dataclass(frozen=True)
class Move:
  TYPE: ClassVar[str] = "move"
  id: int
  x: float
  y: float
  seq: int


@dataclasses.dataclass(frozen=True)
class Release:
  TYPE: ClassVar[str] = "release"
  id: int
  keep: bool
  seq: int


@dataclasses.dataclass(frozen=True)
class Start:
  TYPE: ClassVar[str] = "start"


@dataclasses.dataclass(frozen=True)
class Pause:
  TYPE: ClassVar[str] = "pause"


@dataclasses.dataclass(frozen=True)
class Reset:
  TYPE: ClassVar[str] = "reset"


Message = Scene | Prompt | Grab | Move | Release | Start | Pause | Reset
MESSAGES: dict[str, type] = {cls.TYPE: cls for cls in typing.get_args(Message)}


def _check_field(kind: str, name: str, value: Any, expected: type) -> Any:
  """`value` if it has the field's JSON type (bool is not a number here, 1.0 is not an integer)."""
  where = f"{kind!r} message: field {name!r}"
  if expected is bool:
    if not isinstance(value, bool):
      raise ProtocolError(f"{where} must be true or false, found {value!r}")
    return value
  if expected is str:
    if not isinstance(value, str):
      raise ProtocolError(f"{where} must be a string, found {value!r}")
    if len(value) > MAX_PROMPT_CHARS:
      raise ProtocolError(f"{where} must be at most {MAX_PROMPT_CHARS} characters, found {len(value)}")
    return value
  if expected is int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
      raise ProtocolError(f"{where} must be an integer in [0, {MAX_INT}], found {value!r}")
    return value
  if expected is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise ProtocolError(f"{where} must be a finite number, found {value!r}")
    return float(value)
  raise TypeError(f"no JSON check for field type {expected}")


def parse_message(text: str, *, height: int, width: int) -> Message:
  """One page text message -> its dataclass; raises ProtocolError naming what is wrong.

  Points must lie in the `height` x `width` frame: [0, width) x [0, height).
  """
  try:
    data = json.loads(text)
  except ValueError as e:
    raise ProtocolError(f"expected a JSON object, found text that is not JSON ({e})") from e
  if not isinstance(data, dict):
    raise ProtocolError(f"expected a JSON object with a 'type', found {type(data).__name__}")
  kind = data.get("type")
  cls = MESSAGES.get(kind) if isinstance(kind, str) else None
  if cls is None:
    raise ProtocolError(f"unknown message type {kind!r}; expected one of {', '.join(sorted(MESSAGES))}")
  types = typing.get_type_hints(cls)
  names = {field.name for field in dataclasses.fields(cls)}
  missing = sorted(names - data.keys())
  unknown = sorted(data.keys() - names - {"type"})
  if missing or unknown:
    raise ProtocolError(f"{kind!r} message: expected fields {sorted(names) or 'none'}, "
                        f"missing {missing or 'none'}, unknown {unknown or 'none'}")
  message = cls(**{name: _check_field(kind, name, data[name], types[name]) for name in names})
  if isinstance(message, (Grab, Move)) and not (0 <= message.x < width and 0 <= message.y < height):
    raise ProtocolError(f"{kind!r} message: point ({message.x}, {message.y}) lies outside the {width}x{height} "
                        f"frame (x in [0, {width}), y in [0, {height}))")
  return message


def reply(kind: str, **fields: Any) -> dict[str, Any]:
  """A server -> page message."""
  return {"type": kind, **fields}
