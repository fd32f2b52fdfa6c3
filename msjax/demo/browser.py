"""Drives the demo page in headless Chromium, as a user would: the end-to-end test and the README screenshot.

  python -m msjax.demo.browser --out examples/demo_screenshot.png [--checkpoint DIR]

Uses Debian's `chromium` and `chromium-driver` (apt-get install chromium chromium-driver) through Selenium 4
(requirements-dev.txt); nothing is downloaded. The server runs as `python -m msjax.demo --port 0` in a
subprocess, so the command users type is what gets tested.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import importlib.util
import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW_SIZE = (1000, 820)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
URL_MARKER = "msjax demo: open "
SERVER_START_S = 180  # loading and compiling the student on a busy 2-core CPU
SERVER_STOP_S = 20
POLL_S = 0.05
DATA_URL_SEPARATOR = ","
EXAMPLE_RED_CIRCLE = 0  # sprite index in `sprites.example_scene`


class BrowserError(RuntimeError):
  """The server or the page did not do what the run needed; the message says what, with the server's log."""


def missing_browser() -> str | None:
  """Why the page cannot be driven here (no Selenium, no Chromium, no chromedriver), or None."""
  if importlib.util.find_spec("selenium") is None:
    return "the selenium package is not installed (pip install -r requirements-dev.txt)"
  for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
    if not os.access(path, os.X_OK):
      return f"{path} not found (apt-get install -y {package})"
  return None


# ---- the server -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ServerProcess:
  url: str
  log: list[str]  # everything it printed so far (a reader thread keeps appending)


@contextlib.contextmanager
def demo_server(args: Sequence[str] = (), start_timeout_s: float = SERVER_START_S) -> Iterator[ServerProcess]:
  """`python -m msjax.demo --port 0 ARGS` running until the block ends; yields its URL and log."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  process = subprocess.Popen([sys.executable, "-m", "msjax.demo", "--port", "0", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines: queue.Queue[str | None] = queue.Queue()
  log: list[str] = []

  def read() -> None:
    for line in process.stdout:
      log.append(line.rstrip())
      lines.put(line)
    lines.put(None)

  threading.Thread(target=read, daemon=True).start()
  try:
    deadline = time.monotonic() + start_timeout_s
    url = None
    while url is None:
      try:
        line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        raise BrowserError(f"the demo server printed no URL in {start_timeout_s:.0f} s; its output:\n"
                           + "\n".join(log)) from None
      if line is None:
        raise BrowserError(f"the demo server exited ({process.wait()}) before serving; its output:\n" + "\n".join(log))
      if line.startswith(URL_MARKER):
        url = line[len(URL_MARKER):].split()[0]
    yield ServerProcess(url=url, log=log)
  finally:
    if process.poll() is None:
      process.send_signal(signal.SIGTERM)
      try:
        process.wait(timeout=SERVER_STOP_S)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---- the page ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DragRun:
  """What the page received while a point was dragged, and how it looked."""
  frames: np.ndarray  # uint8 [T, H, W, 3] every frame the page received, oldest first
  chunk_seqs: np.ndarray  # int [T] the newest pointer message each frame's chunk followed
  grab_seq: int
  release_seq: int
  stats: dict[str, Any]  # the page's counters at the end (fps, latency, chunk time, ...)
  screenshot: bytes  # PNG of the browser window


def _chromium():
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--force-device-scale-factor=1",
                   f"--window-size={WINDOW_SIZE[0]},{WINDOW_SIZE[1]}"):
    options.add_argument(argument)
  return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _wait(driver, condition: str, what: str, timeout_s: float) -> dict[str, Any]:
  """Polls the page's stats until the JS expression `condition` (over `s`) holds; returns those stats."""
  deadline = time.monotonic() + timeout_s
  while True:
    stats = driver.execute_script("return window.msjaxDemo ? window.msjaxDemo.stats() : null")
    if stats is not None and driver.execute_script(f"const s = arguments[0]; return Boolean({condition});", stats):
      return stats
    if time.monotonic() > deadline:
      raise BrowserError(f"the page did not {what} within {timeout_s:.0f} s (its stats: {stats})")
    time.sleep(POLL_S)


def _decode(data_url: str) -> np.ndarray:
  payload = base64.b64decode(data_url.split(DATA_URL_SEPARATOR, 1)[1])
  return np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))


def drag_demo(url: str, start_xy: Sequence[float], end_xy: Sequence[float], *, scene: str = "example",
              grid: bool = False, drag_seconds: float = 1.0, steps: int = 16, screenshot_step: int | None = None,
              min_frames: int = 24, timeout_s: float = 60) -> DragRun:
  """Opens the page, picks `scene` and drags (a `grid` of points, or one) from `start_xy` to `end_xy` (frame
  pixels) in `steps` moves over `drag_seconds` (the drag starts the stream); waits for `min_frames` frames and a
  chunk made after the release, pauses and returns what the page received. The screenshot is taken after
  `screenshot_step` moves (the button still down), or by default just before pausing."""
  from selenium.webdriver.common.action_chains import ActionChains  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import Select  # pylint: disable=g-import-not-at-top
  driver = _chromium()
  try:
    driver.set_page_load_timeout(timeout_s)
    driver.set_script_timeout(timeout_s)
    driver.get(url)
    stats = _wait(driver, "s.info && s.state === 'idle'", "connect and show the first frame", timeout_s)
    info = stats["info"]
    choice = Select(driver.find_element(By.ID, "scene"))
    if choice.first_selected_option.get_attribute("value") != scene:
      choice.select_by_value(scene)
    if driver.find_element(By.ID, "grid").is_selected() != grid:
      driver.find_element(By.ID, "grid").click()

    canvas = driver.find_element(By.ID, "view")
    scale = canvas.size["width"] / info["width"]
    start = np.asarray(start_xy, np.float64)
    centre = np.array([info["width"], info["height"]]) / 2  # Selenium offsets are from the element's centre
    offset = np.rint((start - centre) * scale).astype(int)
    path = np.rint((np.asarray(end_xy) - start) * scale * (np.arange(steps + 1)[:, None] / steps)).astype(int)
    moves = np.diff(path, axis=0)
    # One ActionChains keeps one pointer: the button stays down between its two `perform`s.
    actions = ActionChains(driver, duration=max(1, round(1000 * drag_seconds / steps)))
    actions.move_to_element_with_offset(canvas, int(offset[0]), int(offset[1])).click_and_hold()
    screenshot = None
    for index, (dx, dy) in enumerate(moves, start=1):
      actions.move_by_offset(int(dx), int(dy))
      if index == screenshot_step:
        actions.perform()
        screenshot = driver.get_screenshot_as_png()
    actions.release().perform()

    _wait(driver, f"s.releaseSeq >= 0 && s.lastChunkSeq >= s.releaseSeq && s.received >= {min_frames}",
          "receive a chunk made after the drag", timeout_s)
    screenshot = screenshot or driver.get_screenshot_as_png()
    driver.find_element(By.ID, "pause").click()
    stats = driver.execute_script("return window.msjaxDemo.stats()")
    kept = driver.execute_async_script("window.msjaxDemo.exportFrames().then(arguments[arguments.length - 1]);")
  finally:
    driver.quit()
  return DragRun(frames=np.stack([_decode(frame["data"]) for frame in kept]),
                 chunk_seqs=np.array([frame["seq"] for frame in kept]), grab_seq=stats["grabSeq"],
                 release_seq=stats["releaseSeq"], stats=stats, screenshot=screenshot)


def example_drag(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
  """(start, end) frame pixels of the drag the test and the screenshot make: the example scene's red circle,
  a quarter of the frame down (a path no other sprite is near)."""
  from msjax.data import sprites  # pylint: disable=g-import-not-at-top
  world = sprites.SpritesConfig(height=height, width=width, num_frames=1)
  start = sprites.example_scene(world).centroids[0, EXAMPLE_RED_CIRCLE].astype(np.float64)
  return start, start + np.array([0.0, height / 4])


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m msjax.demo.browser", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="PNG screenshot to write")
  parser.add_argument("--checkpoint", default=None, help="student for the server (default: the shipped one)")
  args = parser.parse_args(argv)
  reason = missing_browser()
  if reason:
    print(f"error: {reason}", file=sys.stderr)
    return 2
  from configs import sample as sample_config  # pylint: disable=g-import-not-at-top
  from msjax import io_utils  # pylint: disable=g-import-not-at-top
  config = sample_config.get_config("tiny")
  start, end = example_drag(config.video.width, config.video.height)
  with demo_server(["--checkpoint", args.checkpoint] if args.checkpoint else []) as server_process:
    run = drag_demo(server_process.url, start, end, grid=True)
  io_utils.atomic_write_bytes(args.out, run.screenshot)
  print(f"wrote {args.out} ({run.frames.shape[0]} frames received, page stats: fps {run.stats['fps']:.1f}, "
        f"latency {run.stats['latencyMs']} ms, chunk {run.stats['chunkMs']} ms)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
