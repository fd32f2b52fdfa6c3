"""The browser demo without a browser: the protocol, the live track source, first frames, pacing, and the server
as a page sees it (aiohttp's test client against a small random-weight student)."""

import asyncio
import contextlib
import functools
import io
import json
import os
import subprocess
import sys

from aiohttp import test_utils
from aiohttp import web
import numpy as np
from PIL import Image
import pytest

from configs import sample as sample_config
from msjax.demo import first_frames
from msjax.demo import live_tracks
from msjax.demo import protocol
from msjax.demo import server
from msjax.models import text as text_lib
from msjax.stream import sampler as sampler_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEIGHT = WIDTH = 32
CAPACITY = 16
STRIDE = 4
TIMEOUT_S = 120
# A one-layer, 32-wide student at 32x32 px compiles in seconds; every other number is the tiny preset's.
SMALL_MODEL = {"model.dim": 32, "model.num_layers": 1, "model.num_heads": 2, "model.ffn_dim": 64,
               "video.height": HEIGHT, "video.width": WIDTH}
QUIET_S = 1.0  # a paused stream sends nothing for this long (a chunk takes ~0.1 s here)
FAST_FPS = 1000  # the page "plays" this fast, so pacing never holds a test back


def _grab(**fields):
  return json.dumps({"type": "grab", "id": 1, "x": 3.5, "y": 4.0, "grid": False, "seq": 0, **fields})


def _parse(text):
  return protocol.parse_message(text, height=HEIGHT, width=WIDTH)


# ---- protocol ---------------------------------------------------------------------------------------------


def test_every_message_type_parses_to_its_fields():
  assert _parse(_grab()) == protocol.Grab(id=1, x=3.5, y=4.0, grid=False, seq=0)
  assert _parse('{"type": "move", "id": 2, "x": 0, "y": 31.9, "seq": 7}') == protocol.Move(id=2, x=0.0, y=31.9,
                                                                                          seq=7)
  assert _parse('{"type": "release", "id": 2, "keep": true, "seq": 8}') == protocol.Release(id=2, keep=True, seq=8)
  assert _parse('{"type": "scene", "name": "sprites:3"}') == protocol.Scene(name="sprites:3")
  assert _parse('{"type": "prompt", "text": "a red circle"}') == protocol.Prompt(text="a red circle")
  for kind, cls in (("start", protocol.Start), ("pause", protocol.Pause), ("reset", protocol.Reset)):
    assert isinstance(_parse(json.dumps({"type": kind})), cls)


@pytest.mark.parametrize("text, expected", [
    ("not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"type": "jump"}', "unknown message type 'jump'"),
    ('{"x": 1}', "unknown message type None"),
    ('{"type": "move", "id": 1, "x": 1, "seq": 0}', "missing ['y']"),
    (_grab(color="red"), "unknown ['color']"),
    ('{"type": "start", "now": true}', "unknown ['now']"),
    (_grab(id=True), "'id' must be an integer"),
    (_grab(id=1.0), "'id' must be an integer"),
    (_grab(id=-1), "'id' must be an integer"),
    (_grab(seq="3"), "'seq' must be an integer"),
    (_grab(x="3"), "'x' must be a finite number"),
    (_grab(x=float("nan")), "'x' must be a finite number"),
    (_grab(grid=1), "'grid' must be true or false"),
    ('{"type": "prompt", "text": 5}', "'text' must be a string"),
    (json.dumps({"type": "prompt", "text": "a" * (protocol.MAX_PROMPT_CHARS + 1)}), "at most"),
    (_grab(x=WIDTH), "outside the 32x32 frame"),
    (_grab(y=-0.5), "outside the 32x32 frame"),
])
def test_bad_messages_are_refused_with_the_reason(text, expected):
  with pytest.raises(protocol.ProtocolError) as caught:
    _parse(text)
  assert expected in str(caught.value)


# ---- live tracks ------------------------------------------------------------------------------------------


def _live(capacity=CAPACITY):
  return live_tracks.LiveTracks(height=HEIGHT, width=WIDTH, capacity=capacity, spatial_stride=STRIDE)


def test_a_dragged_point_moves_linearly_from_the_last_chunk_end_to_the_pointer():
  live = _live()
  live.grab(1, 10.0, 10.0, grid=False, seq=0)
  live.move(1, 14.0, 12.0, seq=1)
  live.move(1, 18.0, 14.0, seq=2)  # only where the pointer is now matters
  chunk = live.next_chunk(4)
  assert chunk.points.shape == (4, CAPACITY, 2) and chunk.visible.shape == (4, CAPACITY)
  np.testing.assert_allclose(chunk.points[:, 0], [[12, 11], [14, 12], [16, 13], [18, 14]])
  assert chunk.visible[:, 0].all() and not chunk.visible[:, 1:].any()
  assert live.chunk_seq == 2
  live.move(1, 26.0, 14.0, seq=3)
  np.testing.assert_allclose(live.next_chunk(2).points[:, 0], [[22, 14], [26, 14]])  # from where it stopped
  np.testing.assert_allclose(live.next_chunk(3).points[:, 0], [[26, 14]] * 3)  # no move: it stays


def test_a_click_pins_a_static_visible_point_and_a_dropped_drag_can_vanish():
  live = _live()
  live.grab(1, 5.0, 6.0, grid=False, seq=0)
  live.release(1, keep=False, seq=1)  # a click: pinned whatever `keep` says
  live.grab(2, 20.0, 20.0, grid=False, seq=2)
  live.move(2, 24.0, 20.0, seq=3)
  live.release(2, keep=False, seq=4)  # a drag let go without keeping: gone
  for frames in (9, 12):
    chunk = live.next_chunk(frames)
    np.testing.assert_array_equal(chunk.points[:, 0], np.broadcast_to([5.0, 6.0], (frames, 2)))
    assert chunk.visible[:, 0].all() and not chunk.visible[:, 1:].any()
  with pytest.raises(live_tracks.LiveTracksError, match="pinned, not held"):
    live.move(1, 7.0, 7.0, seq=5)


def test_a_grid_drag_moves_all_its_points_together():
  live = _live()
  live.grab(1, 16.0, 16.0, grid=True, seq=0)
  live.move(1, 20.0, 13.0, seq=1)
  chunk = live.next_chunk(4)
  count = live_tracks.GRID_SIDE**2
  assert chunk.visible[:, :count].all() and not chunk.visible[:, count:].any()
  start = 16.0 + live_tracks.grid_offsets(HEIGHT, WIDTH, STRIDE)
  np.testing.assert_allclose(chunk.points[-1, :count] - start, np.broadcast_to([4.0, -3.0], (count, 2)))
  spacing = np.diff(np.unique(start[:, 0]))
  assert np.all(spacing >= STRIDE), spacing  # one point per latent cell at least
  np.testing.assert_allclose(chunk.points[0, :count] - start, np.broadcast_to([1.0, -0.75], (count, 2)))


def test_points_dragged_over_the_border_are_hidden_there_not_lost():
  live = _live()
  live.grab(1, 26.0, 16.0, grid=True, seq=0)  # the right column sits 4 px to the right of the anchor
  live.move(1, WIDTH - 0.5, 16.0, seq=1)
  chunk = live.next_chunk(4)
  assert (chunk.points >= 0).all() and (chunk.points[..., 0] < WIDTH).all()
  count = live_tracks.GRID_SIDE**2
  assert chunk.visible[0, :count].all()  # a quarter of the way, the whole grid is still in frame
  assert not chunk.visible[-1, :count].all() and chunk.visible[-1, :count].any()


def test_pointer_actions_that_cannot_apply_are_refused():
  live = _live(capacity=live_tracks.GRID_SIDE**2 + 1)
  with pytest.raises(live_tracks.LiveTracksError, match="no point with id 5"):
    live.move(5, 1.0, 1.0, seq=0)
  live.grab(1, 10.0, 10.0, grid=True, seq=0)
  with pytest.raises(live_tracks.LiveTracksError, match="exists already"):
    live.grab(1, 12.0, 12.0, grid=False, seq=1)
  with pytest.raises(live_tracks.LiveTracksError, match="all 10 track slots"):
    live.grab(2, 12.0, 12.0, grid=True, seq=1)
  live.grab(2, 12.0, 12.0, grid=False, seq=1)  # one slot was left
  live.clear()
  live.grab(3, 12.0, 12.0, grid=True, seq=2)  # a reset frees them all


def test_live_chunks_have_each_chunk_s_frame_count_and_a_fixed_track_count():
  live = _live()
  source = live.chunks(chunk_frames=3, temporal_stride=4)
  counts = []
  for index in range(3):
    if index == 1:
      live.grab(1, 3.0, 3.0, grid=False, seq=0)  # tracks added mid-stream keep the slot count
    chunk = next(source)
    counts.append(chunk.num_frames)
    assert chunk.num_tracks == CAPACITY
  assert counts == [sampler_lib.chunk_span(i, 3, 4)[1] - sampler_lib.chunk_span(i, 3, 4)[0] for i in range(3)]
  assert counts == [9, 12, 12]


# ---- first frames and pacing ------------------------------------------------------------------------------


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def test_uploads_are_fitted_to_the_frame_and_garbage_is_refused():
  wide = np.zeros((20, 60, 3), np.uint8)
  wide[:, 25:35] = 255  # scaled 1.6x to 96x32 and centre-cropped to columns 32..64: white at 8..24
  first = first_frames.uploaded_frame(_png(wide), HEIGHT, WIDTH)
  assert first.frame.shape == (HEIGHT, WIDTH, 3) and first.frame.dtype == np.uint8 and "60x20" in first.source
  assert first.frame[:, 10:22].min() > 200 and first.frame[:, :5].max() < 50 and first.frame[:, -5:].max() < 50
  grey = first_frames.uploaded_frame(_png(np.full((HEIGHT, WIDTH), 90, np.uint8)), HEIGHT, WIDTH)
  np.testing.assert_array_equal(grey.frame, 90)
  with pytest.raises(first_frames.FirstFrameError, match="not an image"):
    first_frames.uploaded_frame(b"\x89PNG but not really", HEIGHT, WIDTH)


def test_scenes_by_name():
  config = _config()
  example = first_frames.scene_frame(first_frames.EXAMPLE, config)
  assert example.frame.shape == (HEIGHT, WIDTH, 3) and "red circle" in example.prompt
  one, two = (first_frames.scene_frame(f"sprites:{seed}", config) for seed in (1, 2))
  assert not np.array_equal(one.frame, two.frame)
  for listed in first_frames.scene_names():
    first_frames.scene_frame(listed["name"], config)
  for bad in ("sprites:", "sprites:-1", "beach"):
    with pytest.raises(first_frames.FirstFrameError, match="unknown scene"):
      first_frames.scene_frame(bad, config)


def test_playback_clock_counts_unplayed_frames():
  clock = server.PlaybackClock(fps=10)
  clock.sent(5, now=100.0)
  assert clock.buffered(100.2) == pytest.approx(0.3)
  clock.sent(10, now=100.2)  # queued behind the 0.3 s left
  assert clock.buffered(100.2) == pytest.approx(1.3)
  assert clock.buffered(200.0) == 0.0
  clock.sent(2, now=200.0)  # the page starved meanwhile: playback restarts now
  assert clock.buffered(200.0) == pytest.approx(0.2)


# ---- the server, as a page sees it ------------------------------------------------------------------------


def _config():
  config = sample_config.get_config("tiny")
  for key, value in SMALL_MODEL.items():
    section, field = key.split(".")
    config[section][field] = value
  config.video.fps = FAST_FPS
  return config


@functools.lru_cache(maxsize=None)
def _engine() -> server.DemoEngine:
  model = sampler_lib.load_stream_model(_config(), checkpoint=None, decoder="pack")
  engine = server.DemoEngine(model)
  engine.warmup()
  return engine


class Page:
  """A page's end of the WebSocket: typed receives that skip nothing silently."""

  def __init__(self, ws):
    self.ws = ws

  async def send(self, **message):
    await self.ws.send_str(json.dumps(message))

  async def json(self):
    message = await self.ws.receive(timeout=TIMEOUT_S)
    assert message.type == web.WSMsgType.TEXT, message
    return json.loads(message.data)

  async def frames(self, count):
    frames = []
    for _ in range(count):
      message = await self.ws.receive(timeout=TIMEOUT_S)
      assert message.type == web.WSMsgType.BINARY, message
      frames.append(np.asarray(Image.open(io.BytesIO(message.data))))
    return frames

  async def expect(self, kind):
    """The next message of type `kind`, skipping state changes only."""
    while True:
      message = await self.json()
      if message["type"] == kind:
        return message
      assert message["type"] == protocol.STATE, message

  async def until_quiet(self, seconds=QUIET_S):
    """Every JSON message (their frames read and dropped) until the server says nothing for `seconds`."""
    messages = []
    while True:
      try:
        message = await self.ws.receive(timeout=seconds)
      except asyncio.TimeoutError:
        return messages
      if message.type == web.WSMsgType.TEXT:
        messages.append(json.loads(message.data))
      else:
        assert message.type == web.WSMsgType.BINARY, message

  async def chunk(self):
    header = await self.expect(protocol.CHUNK)
    return header, await self.frames(header["frames"])

  async def opened(self):
    hello = await self.json()
    assert hello["type"] == protocol.HELLO
    first = await self.json()
    assert first["type"] == protocol.FIRST_FRAME
    await self.frames(1)
    assert await self.json() == protocol.reply(protocol.STATE, state=server.IDLE)
    return hello


@contextlib.asynccontextmanager
async def _client():
  async with test_utils.TestServer(server.make_app(_engine())) as test_server:
    async with test_utils.TestClient(test_server) as client:
      yield client


@contextlib.asynccontextmanager
async def _page(client):
  ws = await client.ws_connect("/ws")
  try:
    yield Page(ws)
  finally:
    await ws.close()


def _run(body):
  asyncio.run(asyncio.wait_for(body(), TIMEOUT_S))


def test_a_page_gets_the_model_s_frames_chunk_by_chunk_following_its_pointer():
  async def body():
    async with _client() as client:
      page_html = await (await client.get("/")).text()
      assert "demo.js" in page_html and (await client.get("/static/demo.js")).status == 200
      async with _page(client) as page:
        hello = await page.opened()
        assert (hello["width"], hello["height"], hello["fps"]) == (WIDTH, HEIGHT, FAST_FPS)
        assert hello["first_chunk_frames"] == 9 and hello["later_chunk_frames"] == 12
        assert hello["prompt_kind"] == "text" and hello["max_points"] == _config().tracks.max_tracks
        await page.send(type="grab", id=1, x=8.0, y=8.0, grid=True, seq=0)
        await page.send(type="start")
        header, frames = await page.chunk()
        assert (header["index"], header["frames"], header["seq"]) == (0, 9, 0)
        assert len(frames) == 9 and frames[0].shape == (HEIGHT, WIDTH, 3) and header["seconds"] > 0
        await page.send(type="move", id=1, x=20.0, y=8.0, seq=1)
        while header["seq"] < 1:  # the chunk in the making may predate the move; a later one follows it
          header, frames = await page.chunk()
        assert header["frames"] == 12 and len(frames) == 12
  _run(body)


def test_a_second_page_is_told_the_model_is_busy():
  async def body():
    async with _client() as client:
      async with _page(client) as first:
        await first.opened()
        async with _page(client) as second:
          busy = await second.json()
          assert busy["type"] == protocol.BUSY and "another page" in busy["message"]
          closing = await second.ws.receive(timeout=TIMEOUT_S)
          assert closing.type in (web.WSMsgType.CLOSE, web.WSMsgType.CLOSED), closing
        await first.send(type="start")  # the first page's session is untouched
        header, _ = await first.chunk()
        assert header["index"] == 0
      for _ in range(100):  # the server notices the first page left
        if _engine().session is None:
          break
        await asyncio.sleep(0.05)
      async with _page(client) as third:
        await third.opened()
  _run(body)


def test_bad_messages_get_an_error_and_the_stream_goes_on():
  async def body():
    async with _client() as client:
      async with _page(client) as page:
        await page.opened()
        await page.send(type="start")
        header, _ = await page.chunk()
        bad = ["{oops", json.dumps({"type": "fly"}), _grab(x=-1.0), _grab(grid="yes"),
               json.dumps({"type": "move", "id": 42, "x": 1, "y": 1, "seq": 1})]
        for text in bad:
          await page.ws.send_str(text)
        await page.ws.send_bytes(b"not an image at all")
        errors = []
        while len(errors) < len(bad) + 1:
          message = await page.json()
          if message["type"] == protocol.CHUNK:
            await page.frames(message["frames"])
            header = message
          else:
            assert message["type"] == protocol.ERROR, message
            errors.append(message["message"])
        for expected in ("not JSON", "unknown message type 'fly'", "outside", "true or false", "no point with id 42",
                         "not an image"):
          assert any(expected in error for error in errors), (expected, errors)
        later, _ = await page.chunk()
        assert later["index"] > header["index"]
  _run(body)


def test_pause_keeps_the_stream_and_reset_starts_over():
  async def body():
    async with _client() as client:
      async with _page(client) as page:
        await page.opened()
        await page.send(type="start")
        first, _ = await page.chunk()
        await page.send(type="pause")
        quiet = await page.until_quiet()  # a chunk in the making is still sent, then nothing until resumed
        assert protocol.reply(protocol.STATE, state=server.PAUSED) in quiet
        last = max([first] + [m for m in quiet if m["type"] == protocol.CHUNK], key=lambda m: m["index"])
        await page.send(type="start")
        resumed, _ = await page.chunk()
        assert resumed["index"] == last["index"] + 1  # the same stream, not a new one
        await page.send(type="reset")
        assert (await page.expect(protocol.FIRST_FRAME))["source"] == first_frames.EXAMPLE
        await page.frames(1)
        await page.send(type="scene", name="sprites:2")
        scene = await page.expect(protocol.FIRST_FRAME)
        assert scene["source"] == "sprites:2" and scene["prompt"]
        await page.frames(1)
        await page.send(type="start")
        restarted = await page.expect(protocol.CHUNK)
        assert restarted["index"] == 0
        await page.frames(restarted["frames"])
  _run(body)


def test_a_stream_that_cannot_go_on_is_reported_and_the_session_stays(monkeypatch):
  def unreadable_prompt(first, prompt, live):
    del first, live
    raise text_lib.TextEncoderError(f"text embedding file {prompt}: not found")
    yield  # pylint: disable=unreachable  # a generator: nothing runs until the first chunk is asked for

  monkeypatch.setattr(_engine(), "new_stream", unreadable_prompt)

  async def body():
    async with _client() as client:
      async with _page(client) as page:
        await page.opened()
        await page.send(type="prompt", text="missing.npy")
        await page.send(type="start")
        assert (await page.expect(protocol.ERROR))["message"] == "text embedding file missing.npy: not found"
        assert await page.json() == protocol.reply(protocol.STATE, state=server.IDLE)
        await page.send(type="scene", name="sprites:1")
        assert (await page.expect(protocol.FIRST_FRAME))["source"] == "sprites:1"
  _run(body)


def test_cli_refuses_a_bad_checkpoint_in_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for checkpoint in (tmp_path / "missing", tmp_path):
    result = subprocess.run([sys.executable, "-m", "msjax.demo", "--checkpoint", str(checkpoint), "--port", "0"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(checkpoint) in lines[0], result.stderr
