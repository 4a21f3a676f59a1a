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
  image: "Input image", input_reference: "Input image", loras: "LoRA adapters" };

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
  $("image-box").classList.toggle("hidden", info.max_images === 0);
  $("frames-box").classList.toggle("hidden", !info.video);
}

function params() {
  const p = { prompt: $("prompt").value };
  const add = (name, id, parse) => { const v = $(id).value; if (v !== "") p[name] = parse(v); };
  add("negative_prompt", "negative", String);
  add("num_inference_steps", "steps", parseInt);
  add("guidance_scale", "guidance", parseFloat);
  add("seed", "seed", parseInt);
  if ($("width").value && $("height").value) p.size = $("width").value + "x" + $("height").value;
  if (info.video) add("num_frames", "frames", parseInt);
  return p;
}

function asForm(p, fileField, file) {
  const form = new FormData();
  for (const [k, v] of Object.entries(p)) form.append(k, String(v));
  form.append(fileField, file);
  return form;
}

async function generateImage(p, file) {
  const body = file ? asForm(p, "image", file) : JSON.stringify(Object.assign({ response_format: "b64_json" }, p));
  const path = file ? "/v1/images/edits" : "/v1/images/generations";
  const opts = { method: "POST", body };
  if (!file) opts.headers = { "Content-Type": "application/json" };
  const out = await (await api(path, opts)).json();
  const img = document.createElement("img");
  img.alt = p.prompt;
  img.src = "data:image/" + out.output_format + ";base64," + out.data[0].b64_json;
  return { element: img, seed: out.data[0].seed };
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
