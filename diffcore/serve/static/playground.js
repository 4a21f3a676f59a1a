// The playground uses the public routes only, like any other client. No build step, no CDN.
"use strict";
const $ = (id) => document.getElementById(id);
let info = null;

// The API key lives in this tab's sessionStorage; localStorage only when "remember" is ticked.
const KEY = "diffcore-api-key";
const storedKey = () => sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || "";

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("api-key").value || storedKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function saveKey() {
  const key = $("api-key").value;
  sessionStorage.setItem(KEY, key);
  if ($("remember-key").checked && key) localStorage.setItem(KEY, key); else localStorage.removeItem(KEY);
}

function askForKey(sent) {
  $("key-box").classList.remove("hidden");
  $("key-message").textContent = sent
    ? "The server refused this API key. Check it against the key the server was started with "
      + "(--api-key or DIFFCORE_API_KEY), correct it in the API key field at the top of the form and press Enter."
    : "This server needs an API key: type it in the API key field at the top of the form and press Enter.";
  $("api-key").focus();
}

// Field names in the server's messages -> the labels on this page.
const LABELS = { prompt: "Prompt", negative_prompt: "Negative prompt", size: "Width x height", height: "Height",
  width: "Width", num_inference_steps: "Steps", guidance_scale: "Guidance", seed: "Seed", num_frames: "Frames",
  image: "Input image", input_reference: "Input image", loras: "LoRA adapters", mask: "Mask", strength: "Strength" };

// An error the server answered, in the page's words: which field, what is wrong, what to do.
function userError(status, body) {
  const e = (body && body.error) || {};
  let text = (e.message || status + " error")
    .replace(/^invalid sampling parameter '[^']*':\s*/, "").replace(/^[A-Z]\w+Error:\s*/, "")
    .replace(/;?\s*raise it with .*$/, "").replace(/this engine's budget of ([\d,]+)(?: \(\w+\))?/, "this server's limit of $1");
  for (const [name, label] of Object.entries(LABELS)) text = text.replace(new RegExp("\\b" + name + "\\b", "g"), label.toLowerCase());
  let message = text;
  if (status === 429) message = "The server is busy (its queue is full): try again in a moment.";
  else if (status === 413) message = "The input image is too large: " + text + ". Use a smaller file.";
  else if (status >= 500 && status !== 503) {
    message = "Something went wrong on the server" + (e.request_id ? " (request " + e.request_id + ")" : "")
      + "; its log has the details. Try again, or with other settings.";
  } else if (e.param && LABELS[e.param]) message = LABELS[e.param] + ": " + text + ". Change it and try again.";
  const error = new Error(message); error.status = status; return error;
}

async function api(path, options) {
  const sent = headers((options || {}).headers);
  const response = await fetch(path, Object.assign({}, options, { headers: sent }));
  if (response.status === 401) {
    askForKey(Boolean(sent.Authorization));
    const error = new Error($("key-message").textContent); error.status = 401; throw error;
  }
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch (e) { /* not JSON */ }
    throw userError(response.status, body);
  }
  return response;
}

async function connect() {
  try {
    info = await (await api("/v1/playground/info")).json();
  } catch (error) {
    if (error.status === 401) { $("model").textContent = "API key needed"; return; }  // saveKey() reconnects
    $("model").textContent = error.status === 503 ? "loading the model..." : error.message;
    setTimeout(connect, 1000);
    return;
  }
  $("key-message").textContent = "";
  $("model").textContent = info.model + (info.video ? (info.audio ? " (video with sound)" : " (video)") : "");
  const d = info.defaults;
  if (d.width) $("width").value = d.width;
  if (d.height) $("height").value = d.height;
  $("steps").value = d.num_inference_steps;
  $("guidance").value = d.guidance_scale;
  const tasks = info.tasks || [];
  $("image-box").classList.toggle("hidden", info.max_images === 0 && tasks.length === 0);
  $("strength-box").classList.toggle("hidden", !tasks.includes("img2img") && !tasks.includes("inpaint"));
  $("frames-box").classList.toggle("hidden", !info.video);
  $("live-box").classList.toggle("hidden", !info.realtime);  // realtime.js: block-causal models stream live
}

// The mask brush: the uploaded picture on a canvas; painting erases it to transparent, which is OpenAI's mask
// form (transparent = the area to edit), sent as the edit's `mask` field.
let masked = false;

function loadMaskCanvas() {
  const file = $("image").files[0];
  masked = false;
  const show = Boolean(file) && (info.tasks || []).includes("inpaint");
  $("mask-box").classList.toggle("hidden", !show);
  if (!show) return;
  const img = new Image();
  img.onload = () => {
    const c = $("mask-canvas");
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    c.style.width = Math.max(256, Math.min(360, img.naturalWidth)) + "px";
    c.getContext("2d").drawImage(img, 0, 0);
    c.dataset.ready = "1";
  };
  img.src = URL.createObjectURL(file);
}

function paint(event) {
  const c = $("mask-canvas");
  const rect = c.getBoundingClientRect();
  const scale = c.width / rect.width;
  const ctx = c.getContext("2d");
  ctx.globalCompositeOperation = "destination-out";
  ctx.beginPath();
  ctx.arc((event.clientX - rect.left) * scale, (event.clientY - rect.top) * scale,
          parseFloat($("brush").value) * scale / 2, 0, 2 * Math.PI);
  ctx.fill();
  masked = true;
}

$("mask-canvas").addEventListener("pointerdown", (e) => { $("mask-canvas").setPointerCapture(e.pointerId); paint(e); });
$("mask-canvas").addEventListener("pointermove", (e) => { if (e.buttons) paint(e); });
$("clear-mask").addEventListener("click", loadMaskCanvas);
$("image").addEventListener("change", loadMaskCanvas);
$("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
const maskBlob = () => new Promise((resolve) => $("mask-canvas").toBlob(resolve, "image/png"));

function params() {
  const p = { prompt: $("prompt").value };
  // A field still at the model's default (prefilled from /v1/playground/info) is left out: the server uses the same
  // default, and a model that does not read it (Qwen-Image-Layered's guidance_scale) would refuse it as unused.
  const d = info.defaults || {};
  const add = (name, id, parse) => {
    const v = $(id).value;
    if (v !== "" && !(d[name] !== undefined && d[name] !== null && String(d[name]) === v)) p[name] = parse(v);
  };
  add("negative_prompt", "negative", String);
  add("num_inference_steps", "steps", parseInt);
  add("guidance_scale", "guidance", parseFloat);
  add("seed", "seed", parseInt);
  if ($("width").value && $("height").value) p.size = $("width").value + "x" + $("height").value;
  if (info.video) add("num_frames", "frames", parseInt);
  return p;
}

function asForm(p, fileField, file, mask) {
  const form = new FormData();
  for (const [k, v] of Object.entries(p)) form.append(k, String(v));
  form.append(fileField, file);
  if (mask) form.append("mask", mask, "mask.png");
  return form;
}

async function generateImage(p, file) {
  const tasks = info.tasks || [];
  const mask = file && masked && tasks.includes("inpaint") ? await maskBlob() : null;
  // A picture for a model that serves image-to-image / inpainting: the strength slider says how much is repainted.
  if (file && (mask || (info.max_images === 0 && tasks.includes("img2img")))) p.strength = parseFloat($("strength").value);
  const body = file ? asForm(p, "image", file, mask) : JSON.stringify(Object.assign({ response_format: "b64_json" }, p));
  const path = file ? "/v1/images/edits" : "/v1/images/generations";
  const opts = { method: "POST", body };
  if (!file) opts.headers = { "Content-Type": "application/json" };
  const out = await (await api(path, opts)).json();
  const images = out.data.map((item) => {
    const img = document.createElement("img");
    img.alt = p.prompt + (item.layer ? " (layer " + item.layer + ")" : "");
    img.src = "data:image/" + out.output_format + ";base64," + item.b64_json;
    if (!item.layer) return img;
    const fig = document.createElement("figure");  // a layered model: its layers side by side, captioned
    const cap = document.createElement("figcaption");
    cap.textContent = "layer " + item.layer;
    fig.append(img, cap);
    return fig;
  });
  if (images.length === 1) return { element: images[0], seed: out.data[0].seed };
  const row = document.createElement("div");
  row.className = "layers"; row.style.display = "flex"; row.style.gap = ".5rem";
  row.append(...images);
  return { element: row, seed: out.data[0].seed };
}

async function generateVideo(p, file) {
  const opts = { method: "POST" };
  if (file) opts.body = asForm(p, "input_reference", file);
  else { opts.body = JSON.stringify(p); opts.headers = { "Content-Type": "application/json" }; }
  let job = await (await api("/v1/videos", opts)).json();
  while (job.status === "queued" || job.status === "in_progress") {
    $("progress").value = job.progress;
    $("status").textContent = job.status.replace("_", " ") + " " + job.progress + "%";
    await new Promise((r) => setTimeout(r, 500));
    job = await (await api("/v1/videos/" + job.id)).json();
  }
  if (job.status !== "completed") throw new Error("video failed: " + (job.error ? job.error.message : job.status));
  const blob = await (await api("/v1/videos/" + job.id + "/content")).blob();
  const video = document.createElement("video");
  video.src = URL.createObjectURL(blob); video.controls = true; video.loop = true; video.autoplay = true; video.muted = !job.has_audio;  // a sound track plays (autoplay may wait for a click)
  return { element: video, seed: p.seed };
}

function remember(result, prompt) {
  const fig = document.createElement("figure");
  const thumb = result.element.cloneNode(true);
  thumb.removeAttribute("controls");
  fig.appendChild(thumb);
  const cap = document.createElement("figcaption");
  cap.textContent = prompt.slice(0, 40) + (result.seed !== undefined ? " (seed " + result.seed + ")" : "");
  fig.appendChild(cap);
  fig.onclick = () => { $("result").replaceChildren(result.element.cloneNode(true)); };
  $("history").prepend(fig);
  while ($("history").children.length > 12) $("history").lastChild.remove();
}

$("api-key").addEventListener("change", () => { saveKey(); connect(); });
$("remember-key").addEventListener("change", saveKey);
$("remember-key").checked = Boolean(localStorage.getItem(KEY));

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!info) return;
  const p = params();
  const file = $("image").files[0];
  $("generate").disabled = true; $("error").textContent = "";
  $("progress").classList.remove("hidden"); $("progress").removeAttribute("value");
  $("status").textContent = "generating...";
  const started = performance.now();
  try {
    const result = info.video ? await generateVideo(p, file) : await generateImage(p, file);
    $("result").replaceChildren(result.element);
    remember(result, p.prompt);
    $("status").textContent = "done in " + ((performance.now() - started) / 1000).toFixed(1) + " s";
  } catch (error) {
    $("error").textContent = error.message; $("status").textContent = "";
  } finally {
    $("generate").disabled = false; $("progress").classList.add("hidden");
  }
});

connect();
