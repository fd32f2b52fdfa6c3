'use strict';
// The msjax demo page. Pointer actions go to the server as JSON (protocol: msjax/demo/protocol.py); frames come
// back as JPEG binary messages after the header that announces them, and are played at the model's fps.
// `window.msjaxDemo` exposes counters and the received frames for the end-to-end browser test.

const KEPT_FRAMES = 512;       // received frames kept for inspection
const MOVE_THRESHOLD_PX = 3;   // screen pixels a press must travel before it is a drag rather than a click
const TARGET_CANVAS_PX = 512;  // small frames are scaled up by a whole factor to about this size
const STATS_WINDOW_MS = 1000;
const LATENCY_SAMPLES = 64;  // pointer messages the shown latency averages
const TICK_MS = 4;

const el = (id) => document.getElementById(id);

const demo = {
  ws: null,
  info: null,             // the server's hello
  state: 'connecting',
  epoch: 0,               // bumped when a stream ends, so frames of the old one are dropped
  seq: 0,                 // pointer messages sent so far
  nextPointId: 1,
  pending: null,          // {header, left}: an announced message whose binary frames are still arriving
  decoding: Promise.resolve(),
  queue: [],              // decoded frames waiting to be drawn: {bitmap, seq, epoch}
  shown: null,            // the bitmap on the canvas
  nextDue: 0,
  kept: [],               // the last KEPT_FRAMES received frames: {blob, chunk, seq}
  received: 0,
  drawn: 0,
  drawTimes: [],
  sentAt: new Map(),      // pointer seq -> send time, until a frame following it is drawn
  latencies: [],
  lastChunk: null,        // the newest chunk header
  points: new Map(),      // id -> {x, y, grid, state: 'held' | 'pinned'}
  held: null,             // {id, startX, startY, moved}
  grabSeq: -1,
  releaseSeq: -1,
};

// ---- connection -------------------------------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const ws = new WebSocket(`${scheme}://${location.host}/ws`);
  ws.binaryType = 'blob';
  ws.onmessage = (event) => (typeof event.data === 'string' ? onText(JSON.parse(event.data)) : onFrame(event.data));
  ws.onclose = () => {
    if (demo.state !== 'busy') {
      setState('disconnected');
      say('The connection closed; reload the page to start again.', 'error');
    }
  };
  demo.ws = ws;
}

function send(message) {
  if (demo.ws && demo.ws.readyState === WebSocket.OPEN) demo.ws.send(JSON.stringify(message));
}

function say(text, kind) {
  const box = el('message');
  box.textContent = text;
  box.className = kind;
}

function onText(message) {
  switch (message.type) {
    case 'hello': setup(message); break;
    case 'first_frame':  // the server has dropped every point (a reset or a new first frame)
      demo.points.clear();
      el('prompt').value = message.prompt;
      el('source').textContent = `first frame: ${message.source}`;
      demo.pending = {header: message, left: 1};
      break;
    case 'chunk':
      demo.lastChunk = message;
      demo.pending = {header: message, left: message.frames};
      break;
    case 'state': setState(message.state); break;
    case 'notice': say(message.message, 'notice'); break;
    case 'error': say(message.message, 'error'); break;
    case 'busy':
      setState('busy');
      say(message.message, 'error');
      break;
    default: say(`unexpected message from the server: ${message.type}`, 'error');
  }
}

function onFrame(blob) {
  const pending = demo.pending;
  if (!pending || pending.left <= 0) return;  // not announced by a header
  pending.left -= 1;
  const header = pending.header;
  const epoch = demo.epoch;
  if (header.type === 'chunk') {
    demo.received += 1;
    demo.kept.push({blob, chunk: header.index, seq: header.seq});
    if (demo.kept.length > KEPT_FRAMES) demo.kept.shift();
  }
  demo.decoding = demo.decoding.then(() => createImageBitmap(blob)).then((bitmap) => {
    if (header.type === 'first_frame') show(bitmap);
    else if (epoch === demo.epoch) demo.queue.push({bitmap, seq: header.seq});
    else bitmap.close();
  }, () => say('a frame could not be decoded', 'error'));
}

function setup(info) {
  demo.info = info;
  const canvas = el('view');
  const scale = Math.max(1, Math.floor(TARGET_CANVAS_PX / Math.max(info.width, info.height)));
  canvas.width = info.width * scale;
  canvas.height = info.height * scale;
  el('model').textContent = `${info.preset} ${info.stage} · ${info.width}×${info.height} · ${info.fps} fps`;
  el('prompt').placeholder = info.prompt_kind === 'text' ? 'describe the video'
    : 'path of a precomputed text embedding (.npy) on the server';
  const select = el('scene');
  select.replaceChildren(...info.scenes.map((scene) => new Option(scene.label, scene.name)));
}

function setState(state) {
  if (state === 'idle' && demo.state !== 'idle') {
    demo.epoch += 1;
    demo.queue.forEach((frame) => frame.bitmap.close());
    demo.queue = [];
    demo.sentAt.clear();
  }
  demo.state = state;
  el('state').textContent = state;
}

// ---- playback ---------------------------------------------------------------------------------------------

function show(bitmap) {
  if (demo.shown) demo.shown.close();
  demo.shown = bitmap;
  draw();
}

function draw() {
  const canvas = el('view');
  const ctx = canvas.getContext('2d');
  ctx.imageSmoothingEnabled = false;
  if (demo.shown) ctx.drawImage(demo.shown, 0, 0, canvas.width, canvas.height);
  if (!demo.info) return;
  const scale = canvas.width / demo.info.width;
  for (const point of demo.points.values()) {
    const x = point.x * scale;
    const y = point.y * scale;
    ctx.lineWidth = 2;
    ctx.strokeStyle = point.state === 'held' ? '#ffb000' : '#ffffff';
    ctx.beginPath();
    if (point.grid) ctx.rect(x - 12, y - 12, 24, 24);
    else ctx.arc(x, y, 7, 0, 2 * Math.PI);
    ctx.stroke();
  }
}

function tick() {
  if (!demo.info || !demo.queue.length) return;
  const now = performance.now();
  if (now < demo.nextDue) return;
  while (demo.queue.length > 2 * demo.info.later_chunk_frames) demo.queue.shift().bitmap.close();  // catch up
  const frame = demo.queue.shift();
  show(frame.bitmap);
  demo.drawn += 1;
  demo.drawTimes.push(now);
  measureLatency(frame.seq, now);
  const frameMs = 1000 / demo.info.fps;
  demo.nextDue = now - demo.nextDue > frameMs ? now + frameMs : demo.nextDue + frameMs;
}

function measureLatency(seq, now) {
  // Every pointer message up to `seq` is first followed by this frame: that is its latency.
  for (const [sent, at] of demo.sentAt) {  // insertion order = increasing seq
    if (sent > seq) break;
    demo.latencies.push(now - at);
    demo.sentAt.delete(sent);
  }
  demo.latencies.splice(0, demo.latencies.length - LATENCY_SAMPLES);
}

const mean = (values) => values.reduce((a, b) => a + b, 0) / values.length;

function stats() {
  const now = performance.now();
  demo.drawTimes = demo.drawTimes.filter((t) => now - t <= STATS_WINDOW_MS);
  const chunk = demo.lastChunk;
  return {
    state: demo.state,
    received: demo.received,
    drawn: demo.drawn,
    fps: demo.drawTimes.length * 1000 / STATS_WINDOW_MS,
    chunkMs: chunk ? chunk.seconds * 1000 : null,
    chunkFps: chunk ? chunk.frames / chunk.seconds : null,
    latencyMs: demo.latencies.length ? mean(demo.latencies) : null,
    lastChunkIndex: chunk ? chunk.index : -1,
    lastChunkSeq: chunk ? chunk.seq : -1,
    grabSeq: demo.grabSeq,
    releaseSeq: demo.releaseSeq,
    points: demo.points.size,
    info: demo.info,
  };
}

function showStats() {
  const s = stats();
  el('fps').textContent = `${s.fps.toFixed(1)} fps (model ${demo.info ? demo.info.fps : '–'})`;
  el('chunk').textContent = s.chunkMs === null ? '–'
    : `${s.chunkMs.toFixed(0)} ms per chunk (${s.chunkFps.toFixed(0)} fps)`;
  el('latency').textContent = s.latencyMs === null ? '–' : `${s.latencyMs.toFixed(0)} ms pointer → screen`;
  el('frames').textContent = `${s.received}`;
  el('points').textContent = `${s.points}`;
}

// ---- pointer ----------------------------------------------------------------------------------------------

function framePoint(event) {
  const rect = el('view').getBoundingClientRect();
  const inside = (value, size) => Math.min(Math.max(value, 0), size - 1e-3);
  return {
    x: inside((event.clientX - rect.left) / rect.width * demo.info.width, demo.info.width),
    y: inside((event.clientY - rect.top) / rect.height * demo.info.height, demo.info.height),
  };
}

function pointerMessage(message) {
  const seq = demo.seq++;
  send({...message, seq});
  if (demo.state === 'running') demo.sentAt.set(seq, performance.now());
  return seq;
}

function onPointerDown(event) {
  if (!demo.info || demo.held || event.button !== 0 || demo.state === 'busy') return;
  el('view').setPointerCapture(event.pointerId);
  const p = framePoint(event);
  const id = demo.nextPointId++;
  const grid = el('grid').checked;
  demo.held = {id, startX: event.clientX, startY: event.clientY, moved: false};
  demo.points.set(id, {x: p.x, y: p.y, grid, state: 'held'});
  demo.grabSeq = pointerMessage({type: 'grab', id, x: p.x, y: p.y, grid});
  draw();
}

function onPointerMove(event) {
  const held = demo.held;
  if (!held) return;
  if (!held.moved && Math.hypot(event.clientX - held.startX, event.clientY - held.startY) < MOVE_THRESHOLD_PX) return;
  if (!held.moved && demo.state === 'idle') start();  // dragging is how most people will start
  held.moved = true;
  const p = framePoint(event);
  Object.assign(demo.points.get(held.id), p);
  pointerMessage({type: 'move', id: held.id, x: p.x, y: p.y});
  draw();
}

function onPointerUp() {
  const held = demo.held;
  if (!held) return;
  demo.held = null;
  const keep = el('keep').checked;
  if (held.moved && !keep) demo.points.delete(held.id);
  else demo.points.get(held.id).state = 'pinned';
  demo.releaseSeq = pointerMessage({type: 'release', id: held.id, keep});
  draw();
}

// ---- controls ---------------------------------------------------------------------------------------------

function start() {
  if (demo.state === 'idle') send({type: 'prompt', text: el('prompt').value});
  demo.sentAt.clear();
  send({type: 'start'});
}

async function upload() {
  const file = el('upload').files[0];
  if (!file || !demo.info) return;
  if (file.size > demo.info.max_upload_bytes) {
    say(`${file.name} is ${file.size} bytes; the server takes images up to ${demo.info.max_upload_bytes}`, 'error');
    return;
  }
  demo.ws.send(await file.arrayBuffer());
  el('upload').value = '';
}

function blobToDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

window.msjaxDemo = {
  stats,
  exportFrames: () => Promise.all(demo.kept.map(async (frame) => (
    {chunk: frame.chunk, seq: frame.seq, data: await blobToDataUrl(frame.blob)}))),
};

const canvas = el('view');
canvas.addEventListener('pointerdown', onPointerDown);
canvas.addEventListener('pointermove', onPointerMove);
canvas.addEventListener('pointerup', onPointerUp);
canvas.addEventListener('pointercancel', onPointerUp);
el('start').addEventListener('click', start);
el('pause').addEventListener('click', () => send({type: 'pause'}));
el('reset').addEventListener('click', () => send({type: 'reset'}));
el('scene').addEventListener('change', (event) => send({type: 'scene', name: event.target.value}));
el('prompt').addEventListener('change', (event) => send({type: 'prompt', text: event.target.value}));
el('upload').addEventListener('change', upload);
setInterval(tick, TICK_MS);
setInterval(showStats, 250);
connect();
