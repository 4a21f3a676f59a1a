// The playground's live video panel: WebSocket /v1/realtime/video (docs/serve.md), shown for block-causal models.
// With "H.264 video" the blocks are fragmented-MP4 chunks appended to a Media Source Extensions buffer instead.
// Uses playground.js's globals ($, info, storedKey, userError); playground.js shows the panel (info.realtime). Frames come as raw rgb24 (exact, no codec needed)
// and are painted on a canvas at the model's frame rate as the blocks arrive; the prompt can change mid-stream.
"use strict";
const live = { ws: null, queue: [], shown: 0, timer: null, fps: 16, received: 0, media: null };

// fMP4: one MediaSource per generation; chunks are appended in order (a SourceBuffer takes one at a time).
function mediaAppend(chunk, mimeType) {
  if (!live.media) {
    const ms = new MediaSource();
    live.media = { source: ms, buffer: null, pending: [], ended: false };
    const video = $("live-video");
    video.dataset.chunks = "0";
    video.src = URL.createObjectURL(ms);
    ms.addEventListener("sourceopen", () => {
      live.media.buffer = ms.addSourceBuffer(mimeType);
      live.media.buffer.addEventListener("updateend", () => {
        video.dataset.chunks = String(+video.dataset.chunks + 1);
        mediaPump();
      });
      mediaPump();
    });
  }
  live.media.pending.push(chunk);
  mediaPump();
}

function mediaPump() {
  const m = live.media;
  if (!m || !m.buffer || m.buffer.updating) return;
  if (m.pending.length) m.buffer.appendBuffer(m.pending.shift());
  else if (m.ended && m.source.readyState === "open") m.source.endOfStream();
}


function liveStatus(text) { $("live-status").textContent = text; }

function liveParams() {
  const p = { type: "start", format: $("live-format").value, prompt: $("prompt").value };
  const add = (name, id) => { const v = $(id).value; if (v !== "") p[name] = parseInt(v, 10); };
  add("seed", "seed");
  add("num_frames", "frames");
  if ($("width").value && $("height").value) p.size = $("width").value + "x" + $("height").value;
  return p;
}

function paintNext() {  // one frame per tick, at the stream's fps; the panel keeps the last one shown
  const frame = live.queue.shift();
  if (!frame) return;
  const c = $("live-canvas");
  if (c.width !== frame.width || c.height !== frame.height) { c.width = frame.width; c.height = frame.height; }
  const rgba = new Uint8ClampedArray(frame.width * frame.height * 4);
  for (let i = 0, j = 0; i < frame.data.length; i += 3, j += 4) {
    rgba[j] = frame.data[i]; rgba[j + 1] = frame.data[i + 1]; rgba[j + 2] = frame.data[i + 2]; rgba[j + 3] = 255;
  }
  c.getContext("2d").putImageData(new ImageData(rgba, frame.width, frame.height), 0, 0);
  live.shown += 1;
  c.dataset.framesShown = String(live.shown);
}

function liveStop(text) {
  if (live.ws) { live.ws.onclose = null; live.ws.close(); live.ws = null; }
  $("live-start").disabled = false; $("live-stop").disabled = true; $("live-send").disabled = true;
  if (text) liveStatus(text);
}

function liveStart() {
  if (!info || !info.realtime) return;
  liveStop();
  $("live-error").textContent = "";
  live.queue = []; live.shown = 0; live.received = 0; live.media = null;
  const fmp4 = $("live-format").value === "fmp4";
  $("live-canvas").classList.toggle("hidden", fmp4); $("live-video").classList.toggle("hidden", !fmp4);
  $("live-canvas").dataset.framesShown = "0";
  $("live-log").replaceChildren();
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + "/v1/realtime/video");
  ws.binaryType = "arraybuffer";
  live.ws = ws;
  let header = null;
  ws.onopen = () => {
    const key = $("api-key").value || storedKey();
    if (key) ws.send(JSON.stringify({ type: "auth", api_key: key }));  // browsers cannot set the header
    ws.send(JSON.stringify(liveParams()));
    $("live-start").disabled = true; $("live-stop").disabled = false; $("live-send").disabled = false;
    liveStatus("starting...");
  };
  ws.onmessage = (event) => {
    if (typeof event.data !== "string" && header.mime_type) {  // the binary half of a block: an fMP4 chunk
      mediaAppend(event.data, header.mime_type);
      live.received += header.num_frames;
      liveStatus("block " + (header.index + 1) + " received (" + live.received + " frames)");
      return;
    }
    if (typeof event.data !== "string") {  // the binary half of a block: its frames, h * w * 3 bytes each
      const bytes = new Uint8Array(event.data);
      const size = header.width * header.height * 3;
      for (let f = 0; f < header.num_frames; f++) {
        live.queue.push({ width: header.width, height: header.height, data: bytes.subarray(f * size, (f + 1) * size) });
      }
      live.received += header.num_frames;
      liveStatus("block " + (header.index + 1) + " received (" + live.received + " frames)");
      return;
    }
    const m = JSON.parse(event.data);
    const note = (text) => { const li = document.createElement("li"); li.textContent = text; $("live-log").append(li); };
    if (m.type === "started") {
      live.fps = m.fps || 16;
      clearInterval(live.timer);
      live.timer = setInterval(paintNext, 1000 / live.fps);
      note("started: " + m.width + "x" + m.height + ", " + m.num_frames + " frames at " + m.fps + " fps, seed " + m.seed);
    } else if (m.type === "block") {
      header = m;
    } else if (m.type === "prompt") {
      note("prompt \"" + m.prompt + "\" from block " + (m.from_block + 1));
    } else if (m.type === "done") {
      note("done: " + m.num_frames + " frames");
      if (live.media) { live.media.ended = true; mediaPump(); }
      liveStop("done");
    } else if (m.type === "error") {
      $("live-error").textContent = userError(m.error.code === "invalid_api_key" ? 401 : 400, m).message;
      liveStop("");
    }
  };
  ws.onclose = () => liveStop("connection closed");
}

$("live-start").addEventListener("click", liveStart);
$("live-stop").addEventListener("click", () => liveStop("stopped"));
$("live-send").addEventListener("click", () => {
  const text = $("live-prompt").value;
  if (live.ws && text.trim()) live.ws.send(JSON.stringify({ type: "prompt", prompt: text }));
});
