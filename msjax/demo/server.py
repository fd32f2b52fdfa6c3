"""The demo server: one page, one WebSocket session at a time, chunks streamed to it as the student makes them.

The student runs in a single worker thread (`DemoEngine.executor`), so the event loop keeps answering the page
while a chunk is made, and every piece of model work (warm-up, a chunk, a session started after another one
dropped) queues on that one thread: the compiled sampler is never entered twice at once.

Generation is paced by the page's playback: a chunk is started once the frames already sent will run out
about when it is done (`PlaybackClock`), so the stream neither starves the page nor runs far ahead of it, and
a pointer move reaches the screen after about one chunk's generation time plus one chunk of playback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import io
import logging
import os
from typing import Any, Iterator, Sequence

import aiohttp
from aiohttp import web
import chex
import ml_collections
import numpy as np
from PIL import Image

from msjax import inference
from msjax.data import tracks as tracks_lib
from msjax.demo import first_frames
from msjax.demo import live_tracks
from msjax.demo import protocol
from msjax.models import text as text_lib
from msjax.stream import sampler as sampler_lib

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
JPEG_QUALITY = 90
JPEG_SUBSAMPLING_444 = 0  # full-resolution colour: small sprite frames keep their edges' colours
MAX_UPLOAD_BYTES = 32 << 20
LEAD_MARGIN = 1.5  # start the next chunk when the page's unplayed frames last 1.5 x one chunk's making time
LEAD_SLACK_S = 0.1  # plus this much for delivery and decoding in the page
IDLE, RUNNING, PAUSED = "idle", "running", "paused"
PRECOMPUTED_TEXT = "precomputed"
# Errors a user's input can cause; they become an {"type": "error"} reply, never a dead session.
USER_ERRORS = (protocol.ProtocolError, live_tracks.LiveTracksError, first_frames.FirstFrameError,
               text_lib.TextEncoderError, tracks_lib.TracksError)

log = logging.getLogger(__name__)


def encode_jpeg(frame: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> JPEG bytes (what the page draws)."""
  chex.assert_rank(frame, 3)
  chex.assert_type(frame, np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(frame).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING_444)
  return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class EncodedChunk:
  """A made chunk ready to send: its JPEG frames and what the page shows about it."""
  index: int
  seq: int  # the newest pointer message its tracks follow
  seconds: float  # the sampler's time for the chunk
  jpegs: list[bytes]


def make_chunk(chunks: Iterator[sampler_lib.Chunk], live: live_tracks.LiveTracks) -> EncodedChunk:
  """Runs in the model thread: the stream's next chunk, encoded."""
  chunk = next(chunks)
  return EncodedChunk(index=chunk.index, seq=live.chunk_seq, seconds=chunk.seconds,
                      jpegs=[encode_jpeg(frame) for frame in chunk.frames])


class PlaybackClock:
  """When the page will have played every frame sent so far (it plays at `fps`, starting as frames arrive)."""

  def __init__(self, fps: float):
    self.fps = fps
    self._play_end = 0.0

  def reset(self) -> None:
    """The page's queue is empty (a new or resumed stream)."""
    self._play_end = 0.0

  def sent(self, frames: int, now: float) -> None:
    self._play_end = max(self._play_end, now) + frames / self.fps

  def buffered(self, now: float) -> float:
    """Seconds of sent frames the page has not played yet."""
    return max(0.0, self._play_end - now)


class DemoEngine:
  """The model, its compiled sampler and the one thread that runs them; holds at most one session."""

  def __init__(self, model: inference.Model):
    self.model = model
    self.config: ml_collections.ConfigDict = model.config
    self.sampler = sampler_lib.StreamSampler(model)
    self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="msjax-demo-model")
    self.session: Session | None = None

  @property
  def text_prompts(self) -> bool:
    """Whether prompts are text; a 'precomputed' encoder reads a prompt as the path of an .npy embedding."""
    return self.config.text.encoder != PRECOMPUTED_TEXT

  def scene_prompt(self, first: first_frames.FirstFrame) -> str:
    """The prompt a new first frame comes with: its description, unless prompts are embedding files."""
    return first.prompt if self.text_prompts else ""

  @property
  def track_capacity(self) -> int:
    """Track slots of a live source: the most tracks the model saw in training."""
    return max(1, self.config.tracks.max_tracks)

  def warmup(self) -> float:
    """Compiles every program a stream runs; returns the seconds it took."""
    return self.sampler.warmup()

  def hello(self) -> dict[str, Any]:
    config = self.config
    return protocol.reply(
        protocol.HELLO, width=config.video.width, height=config.video.height, fps=config.video.fps,
        scenes=first_frames.scene_names(), first_chunk_frames=self.sampler.first_chunk_frames,
        later_chunk_frames=self.sampler.later_chunk_frames, max_points=self.track_capacity,
        max_upload_bytes=MAX_UPLOAD_BYTES, preset=config.preset, stage=self.model.stage,
        prompt_kind="text" if self.text_prompts else "embedding_path")

  def new_live_tracks(self) -> live_tracks.LiveTracks:
    config = self.config
    return live_tracks.LiveTracks(height=config.video.height, width=config.video.width,
                                  capacity=self.track_capacity, spatial_stride=config.codec.spatial_stride)

  def new_stream(self, first: first_frames.FirstFrame, prompt: str,
                 live: live_tracks.LiveTracks) -> Iterator[sampler_lib.Chunk]:
    """An unbounded stream following `live`; nothing runs until its first chunk is asked for."""
    config = self.config
    source = live.chunks(config.stream.chunk_frames, config.codec.temporal_stride)
    return sampler_lib.stream_chunks(self.model, first.frame, prompt, source, seed=int(config.get("seed", 0)),
                                     sampler=self.sampler)

  def close(self) -> None:
    self.executor.shutdown(wait=False, cancel_futures=True)


class Session:
  """One page's stream: its first frame, prompt, control points and the task that produces chunks."""

  def __init__(self, engine: DemoEngine, ws: web.WebSocketResponse):
    self.engine = engine
    self.ws = ws
    self.config = engine.config
    self.live = engine.new_live_tracks()
    self.first = first_frames.scene_frame(first_frames.EXAMPLE, self.config)
    self.prompt = engine.scene_prompt(self.first)
    self.state = IDLE
    self.chunks: Iterator[sampler_lib.Chunk] | None = None  # the stream (None: no stream yet)
    self.producer: asyncio.Task | None = None
    self.clock = PlaybackClock(self.config.video.fps)
    self.produce_seconds = 0.0  # the last chunk's making time, model thread included
    self._send_lock = asyncio.Lock()  # a header and its binary frames go out together
    self._tasks: set[asyncio.Task] = set()  # producers still finishing a chunk after a reset

  # ---- sending ---------------------------------------------------------------------------------------------

  async def _send(self, message: dict[str, Any], frames: Sequence[bytes] = ()) -> None:
    """A JSON message and the binary frames it announces, unless the page is gone."""
    async with self._send_lock:
      if self.ws.closed:
        return
      try:
        await self.ws.send_json(message)
        for frame in frames:
          await self.ws.send_bytes(frame)
      except ConnectionError:  # the page went away mid-send; the handler's loop ends the session
        return

  async def _send_first_frame(self) -> None:
    await self._send(protocol.reply(protocol.FIRST_FRAME, prompt=self.prompt, source=self.first.source),
                     [encode_jpeg(self.first.frame)])

  async def _send_state(self) -> None:
    await self._send(protocol.reply(protocol.STATE, state=self.state))

  async def error(self, message: str) -> None:
    await self._send(protocol.reply(protocol.ERROR, message=message))

  async def open(self) -> None:
    await self._send(self.engine.hello())
    await self._send_first_frame()
    await self._send_state()

  # ---- page messages ---------------------------------------------------------------------------------------

  async def on_text(self, text: str) -> None:
    config = self.config
    try:
      message = protocol.parse_message(text, height=config.video.height, width=config.video.width)
      await self._apply(message)
    except USER_ERRORS as e:
      await self.error(str(e))

  async def on_image(self, data: bytes) -> None:
    height, width = self.config.video.height, self.config.video.width
    loop = asyncio.get_running_loop()
    try:
      first = await loop.run_in_executor(None, first_frames.uploaded_frame, data, height, width)
    except first_frames.FirstFrameError as e:
      await self.error(str(e))
      return
    await self._new_first_frame(first)

  async def _apply(self, message: protocol.Message) -> None:
    if isinstance(message, protocol.Scene):
      await self._new_first_frame(first_frames.scene_frame(message.name, self.config))
    elif isinstance(message, protocol.Prompt):
      self.prompt = message.text
      if self.chunks is not None:
        await self._send(protocol.reply(protocol.NOTICE, message="the prompt applies to the next stream "
                                        "(reset, then start): a stream embeds its prompt once"))
    elif isinstance(message, protocol.Grab):
      self.live.grab(message.id, message.x, message.y, grid=message.grid, seq=message.seq)
    elif isinstance(message, protocol.Move):
      self.live.move(message.id, message.x, message.y, seq=message.seq)
    elif isinstance(message, protocol.Release):
      self.live.release(message.id, keep=message.keep, seq=message.seq)
    elif isinstance(message, protocol.Start):
      await self._start()
    elif isinstance(message, protocol.Pause):
      if self.state == RUNNING:
        self.state = PAUSED  # the producer sends the chunk it is making, then stops
        await self._send_state()
    elif isinstance(message, protocol.Reset):
      await self._reset()
      await self._send_first_frame()

  async def _new_first_frame(self, first: first_frames.FirstFrame) -> None:
    await self._reset()
    self.first = first
    self.prompt = self.engine.scene_prompt(first)
    await self._send_first_frame()

  async def _start(self) -> None:
    if self.state == RUNNING:
      return
    if self.chunks is None:
      self.chunks = self.engine.new_stream(self.first, self.prompt, self.live)
    self.clock.reset()  # a new or resumed stream: the page has played everything
    self.state = RUNNING
    await self._send_state()
    if self.producer is None or self.producer.done():
      self.producer = asyncio.create_task(self._produce(self.chunks))
      self._tasks.add(self.producer)
      self.producer.add_done_callback(self._tasks.discard)

  async def _reset(self) -> None:
    """Drops the stream and every point; a chunk still being made is thrown away when it is done."""
    self.chunks = None
    self.producer = None
    self.live.clear()
    self.state = IDLE
    await self._send_state()

  def close(self) -> None:
    """The page left: stop asking for chunks (one in the model thread finishes and is dropped)."""
    self.chunks = None
    self.producer = None
    self.state = IDLE

  # ---- the stream ------------------------------------------------------------------------------------------

  def _lead_seconds(self) -> float:
    return self.produce_seconds * LEAD_MARGIN + LEAD_SLACK_S

  async def _produce(self, chunks: Iterator[sampler_lib.Chunk]) -> None:
    """Makes and sends chunks of `chunks` while it is the session's running stream."""
    loop = asyncio.get_running_loop()
    while self.state == RUNNING and self.chunks is chunks:
      wait = self.clock.buffered(loop.time()) - self._lead_seconds()
      if wait > 0:
        await asyncio.sleep(wait)
        continue  # paused or reset meanwhile?
      begin = loop.time()
      try:
        encoded = await loop.run_in_executor(self.engine.executor, make_chunk, chunks, self.live)
      except USER_ERRORS as e:  # e.g. a prompt the text encoder cannot read: this stream cannot go on
        await self._stream_failed(chunks, str(e))
        return
      except Exception as e:  # pylint: disable=broad-except  # the server outlives a failed stream
        log.exception("chunk generation failed")
        await self._stream_failed(chunks, f"generating a chunk failed ({type(e).__name__}: {e})")
        return
      if self.chunks is not chunks:
        return  # reset or left while the chunk was made
      self.produce_seconds = loop.time() - begin
      await self._send(protocol.reply(protocol.CHUNK, index=encoded.index, frames=len(encoded.jpegs),
                                      seconds=encoded.seconds, seq=encoded.seq), encoded.jpegs)
      self.clock.sent(len(encoded.jpegs), loop.time())

  async def _stream_failed(self, chunks: Iterator[sampler_lib.Chunk], message: str) -> None:
    if self.chunks is not chunks:
      return
    self.chunks, self.producer, self.state = None, None, IDLE
    await self.error(message)
    await self._send_state()


# ----------------------------------------------------------------------------------------------------------
# The web app.

ENGINE = web.AppKey("engine", DemoEngine)


async def _index(request: web.Request) -> web.FileResponse:
  del request
  return web.FileResponse(os.path.join(STATIC_DIR, "index.html"))


async def _websocket(request: web.Request) -> web.WebSocketResponse:
  engine = request.app[ENGINE]
  ws = web.WebSocketResponse(max_msg_size=MAX_UPLOAD_BYTES)
  await ws.prepare(request)
  if engine.session is not None:
    await ws.send_json(protocol.reply(protocol.BUSY, message="another page is using the model; close it (or its "
                                      "tab), then reload this one"))
    await ws.close()
    return ws
  session = Session(engine, ws)
  engine.session = session
  try:
    await session.open()
    async for message in ws:
      if message.type == web.WSMsgType.TEXT:
        await session.on_text(message.data)
      elif message.type == web.WSMsgType.BINARY:
        await session.on_image(message.data)
  finally:
    session.close()
    engine.session = None
  return ws


async def _close_session(app: web.Application) -> None:
  session = app[ENGINE].session
  if session is not None:
    await session.ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server shutting down")


def make_app(engine: DemoEngine) -> web.Application:
  app = web.Application()
  app[ENGINE] = engine
  app.router.add_get("/", _index)
  app.router.add_get("/ws", _websocket)
  app.router.add_static("/static/", STATIC_DIR)
  app.on_shutdown.append(_close_session)
  return app


async def start_server(engine: DemoEngine, host: str, port: int) -> tuple[web.AppRunner, str]:
  """Serves the demo on host:port (0: any free port); returns the runner (call `cleanup()`) and the URL."""
  runner = web.AppRunner(make_app(engine), access_log=None)
  await runner.setup()
  try:
    await web.TCPSite(runner, host, port).start()
  except BaseException:
    await runner.cleanup()
    raise
  bound_host, bound_port = runner.addresses[0][:2]
  shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
  return runner, f"http://{shown_host}:{bound_port}/"
