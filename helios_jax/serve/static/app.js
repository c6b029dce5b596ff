// The realtime page: a WebSocket client of /v1/realtime/video that plays the streamed JPEG
// frames on a canvas at the video's frame rate, chunk by chunk as they arrive.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  ws: null, fps: 24, queue: [], shown: 0, chunks: 0, pending: null, skipBinary: 0,
  decodeChain: Promise.resolve(), timer: null, startedAt: 0, firstChunkS: null,
  lastPrompt: "-", streamFps: null, genFps: null, phase: "idle", sessionId: null,
};

function setStatus() {
  const f = (x, d = 2) => (x == null ? "-" : Number(x).toFixed(d));
  $("status").textContent =
      `${state.phase} · session ${state.sessionId || "-"}\n` +
      `time to first chunk ${f(state.firstChunkS)} s · streamed ${f(state.streamFps, 1)} FPS · ` +
      `generated ${f(state.genFps, 1)} FPS · buffered ${state.queue.length} frames`;
  $("chunks-received").textContent = String(state.chunks);
  $("frames-shown").textContent = String(state.shown);
  $("last-prompt").textContent = state.lastPrompt;
}

function log(line) {
  const div = document.createElement("div");
  div.textContent = line;
  $("log").prepend(div);
}

function showError(message) { $("error").textContent = message; }

function setRunning(running) {
  $("start").disabled = running;
  $("stop").disabled = !running;
  $("update").disabled = !running;
}

function drawNext() {  // one frame per tick; waits (buffering) when none is decoded yet
  const frame = state.queue.shift();
  if (!frame) return;
  const canvas = $("player");
  if (canvas.width !== frame.width || canvas.height !== frame.height) {
    canvas.width = frame.width;
    canvas.height = frame.height;
    canvas.style.aspectRatio = `${frame.width} / ${frame.height}`;
  }
  canvas.getContext("2d").drawImage(frame, 0, 0);
  frame.close();
  state.shown += 1;
  setStatus();
}

function onChunkMedia(event, buffer) {
  // Decode the chunk's JPEGs in order (chained after the previous chunk) and queue them.
  const blobs = [];
  let offset = 0;
  for (const size of event.sizes) {
    blobs.push(new Blob([buffer.slice(offset, offset + size)], { type: event.media }));
    offset += size;
  }
  state.decodeChain = state.decodeChain
      .then(() => Promise.all(blobs.map((b) => createImageBitmap(b))))
      .then((frames) => { state.queue.push(...frames); setStatus(); })
      .catch((e) => showError(`could not decode chunk ${event.index}: ${e}`));
}

function onEvent(ev) {
  switch (ev.type) {
    case "session.queued":
      state.sessionId = ev.session_id;
      state.phase = ev.position ? `queued (${ev.position} ahead)` : "starting";
      break;
    case "session.started":
      state.phase = "generating";
      state.fps = ev.fps || 24;
      clearInterval(state.timer);
      state.timer = setInterval(drawNext, 1000 / state.fps);
      log(`session ${ev.session_id} started: ${ev.width}x${ev.height}, seed ${ev.seed}`);
      break;
    case "chunk": {
      state.pending = ev;
      state.chunks += 1;
      if (ev.time_to_first_chunk_s != null) state.firstChunkS = ev.time_to_first_chunk_s;
      state.streamFps = ev.stream_fps;
      state.genFps = ev.fps;
      const mix = ev.prompts.map((p) => `${p.prompt} (${Number(p.weight).toFixed(2)})`);
      state.lastPrompt = ev.prompts[0] ? ev.prompts[0].prompt : "-";
      $("last-prompt").dataset.weights = JSON.stringify(ev.prompts);
      log(`chunk ${ev.index}: ${mix.join(" + ")} · DiT ${ev.dit_s.toFixed(2)} s · ` +
          `decode ${ev.decode_s.toFixed(2)} s`);
      break;
    }
    case "prompt.accepted":
      log(`prompt update accepted: "${ev.prompt}" (blends in from the next chunk)`);
      break;
    case "busy":
      showError(`${ev.message}`);
      state.phase = "busy";
      setRunning(false);
      break;
    case "error":
      showError(`${ev.code}: ${ev.message}`);
      break;
    case "session.ended":
      state.phase = `ended (${ev.reason}, ${ev.chunks} chunks)`;
      setRunning(false);
      if (ev.video_url) {
        $("download").href = ev.video_url;
        $("download").hidden = false;
      }
      log(`session ended: ${ev.reason}`);
      break;
    default:
      break;
  }
  setStatus();
}

function onMessage(msg) {
  if (typeof msg.data === "string") {
    onEvent(JSON.parse(msg.data));
    return;
  }
  if (state.skipBinary > 0) { state.skipBinary -= 1; return; }
  const ev = state.pending;
  if (!ev) return;
  state.pending = null;
  if (ev.latents_bytes) state.skipBinary = 1;
  onChunkMedia(ev, msg.data);
}

function connect() {
  return new Promise((resolve, reject) => {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) { resolve(state.ws); return; }
    const proto = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${proto}://${location.host}/v1/realtime/video`);
    ws.binaryType = "arraybuffer";
    ws.onmessage = onMessage;
    ws.onopen = () => resolve(ws);
    ws.onerror = () => reject(new Error("could not connect to the server"));
    ws.onclose = () => { state.ws = null; setRunning(false); };
    state.ws = ws;
  });
}

async function start() {
  showError("");
  $("download").hidden = true;
  state.queue.forEach((f) => f.close());
  Object.assign(state, { queue: [], shown: 0, chunks: 0, pending: null, skipBinary: 0,
                         firstChunkS: null, streamFps: null, genFps: null, sessionId: null,
                         lastPrompt: "-", phase: "connecting" });
  $("log").textContent = "";
  setStatus();
  const event = { type: "session.start", prompt: $("prompt").value };
  if ($("negative").value.trim()) event.negative_prompt = $("negative").value;
  for (const [key, id] of [["seed", "seed"], ["height", "height"], ["width", "width"],
                           ["interpolation_steps", "interp"]]) {
    if ($(id).value !== "") event[key] = Number($(id).value);
  }
  try {
    const ws = await connect();
    setRunning(true);
    ws.send(JSON.stringify(event));
  } catch (e) {
    showError(String(e.message || e));
    state.phase = "idle";
    setStatus();
  }
}

function stop() {
  if (state.ws) state.ws.send(JSON.stringify({ type: "session.stop" }));
}

function update() {
  const prompt = $("next-prompt").value;
  if (state.ws && prompt.trim()) {
    state.ws.send(JSON.stringify({ type: "prompt.update", prompt }));
  }
}

async function init() {
  $("start").onclick = start;
  $("stop").onclick = stop;
  $("update").onclick = update;
  try {
    const cfg = await (await fetch("/v1/config")).json();
    $("height").value = cfg.default_height;
    $("width").value = cfg.default_width;
    $("interp").value = cfg.interpolation_steps;
  } catch (e) {
    showError(`could not read /v1/config: ${e}`);
  }
  setStatus();
}

init();
