"""The interactive browser demo: `python -m msjax.demo`, then drag points on the first frame and watch them move.

  server.py        aiohttp app: the page, one WebSocket session, chunks made in a worker thread and streamed
  protocol.py      the messages, checked strictly
  live_tracks.py   the control points the page moves, turned into each chunk's tracks
  first_frames.py  built-in scenes and uploaded images
  browser.py       drives the page in headless Chromium (the end-to-end test, the README screenshot)
  static/          the page: plain HTML, CSS and JavaScript, nothing external
"""
