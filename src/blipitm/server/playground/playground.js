// blipitm playground: calls only the public API (/v1/models, /v1/explain). No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "blipitm-api-key"; // sessionStorage only: gone when the tab closes
const MAX_SIDE = 512; // overlays are drawn at most this large

const state = { image: null, results: [], selected: -1, token: -1, grid: 0 };

// -- API ----------------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const init = body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const r = await fetch(path, init);
  const payload = await r.json().catch(() => ({}));
  if (!r.ok) {
    const err = new Error((payload.error && payload.error.message) || r.statusText);
    err.status = r.status;
    throw err;
  }
  return payload;
}

async function checkKey() {
  // The page learns whether the server wants a key the way any client would: by asking.
  try {
    showModels(await api("v1/models"));
    document.body.dataset.auth = "open";
  } catch (e) {
    if (e.status === 401) showKeyField();
    document.body.dataset.auth = e.status === 401 ? "key" : "unknown";
  }
}

function showModels(list) {
  // The picker, fed by /v1/models: shown when there is a choice; the default model first.
  // Only matching models explain (a captioner answers /v1/chat/completions).
  const models = list.data.filter((m) => m.kind !== "caption");
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...models.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id + (m.default ? " (default)" : "") + (m.status === "ready" ? "" : ` (${m.status})`);
    return option;
  }));
  if (models.some((m) => m.id === previous)) select.value = previous;
  $("model-row").hidden = models.length < 2;
}

function showKeyField() {
  $("key-row").hidden = false;
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
}

// -- float32 maps --------------------------------------------------------------------------------

function decodeTensor(t) {
  const bytes = Uint8Array.from(atob(t.data), (c) => c.charCodeAt(0));
  return { shape: t.shape, data: new Float32Array(bytes.buffer) }; // little-endian, as the API
}

// -- getAttMap, as LAVIS draws a map (bilinear resize instead of bicubic) -------------------------

function unit(a) {
  let lo = Infinity, hi = -Infinity;
  for (const v of a) { if (v < lo) lo = v; if (v > hi) hi = v; }
  const span = hi - lo;
  return a.map((v) => (span > 0 ? (v - lo) / span : 0));
}

function resizeBilinear(src, g, w, h) {
  const out = new Float32Array(w * h);
  for (let y = 0; y < h; y++) {
    const fy = Math.min(Math.max((y + 0.5) * g / h - 0.5, 0), g - 1);
    const y0 = Math.floor(fy), y1 = Math.min(y0 + 1, g - 1), ty = fy - y0;
    for (let x = 0; x < w; x++) {
      const fx = Math.min(Math.max((x + 0.5) * g / w - 0.5, 0), g - 1);
      const x0 = Math.floor(fx), x1 = Math.min(x0 + 1, g - 1), tx = fx - x0;
      const top = src[y0 * g + x0] * (1 - tx) + src[y0 * g + x1] * tx;
      const bottom = src[y1 * g + x0] * (1 - tx) + src[y1 * g + x1] * tx;
      out[y * w + x] = top * (1 - ty) + bottom * ty;
    }
  }
  return out;
}

function blur(a, w, h, sigma) {
  // Separable Gaussian, edges extended, truncated at 4 sigma (scikit-image's gaussian).
  const r = Math.floor(4 * sigma + 0.5);
  const k = [];
  let sum = 0;
  for (let i = -r; i <= r; i++) { const v = Math.exp(-0.5 * (i / sigma) ** 2); k.push(v); sum += v; }
  for (let i = 0; i < k.length; i++) k[i] /= sum;
  const tmp = new Float32Array(w * h), out = new Float32Array(w * h);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    let s = 0;
    for (let i = -r; i <= r; i++) s += k[i + r] * a[y * w + Math.min(Math.max(x + i, 0), w - 1)];
    tmp[y * w + x] = s;
  }
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    let s = 0;
    for (let i = -r; i <= r; i++) s += k[i + r] * tmp[Math.min(Math.max(y + i, 0), h - 1) * w + x];
    out[y * w + x] = s;
  }
  return out;
}

const JET = [ // matplotlib's jet: (x, value) breakpoints per channel
  [[0, 0], [0.35, 0], [0.66, 1], [0.89, 1], [1, 0.5]],
  [[0, 0], [0.125, 0], [0.375, 1], [0.64, 1], [0.91, 0], [1, 0]],
  [[0, 0.5], [0.11, 1], [0.34, 1], [0.65, 0], [1, 0]],
];

function jet(v, channel) {
  const pts = JET[channel];
  for (let i = 1; i < pts.length; i++) {
    if (v <= pts[i][0]) {
      const [x0, y0] = pts[i - 1], [x1, y1] = pts[i];
      return y0 + (y1 - y0) * (v - x0) / (x1 - x0);
    }
  }
  return pts[pts.length - 1][1];
}

function drawOverlay(map, grid) {
  const img = $("preview"), canvas = $("overlay");
  const scale = Math.min(1, MAX_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
  const w = Math.max(1, Math.round(img.naturalWidth * scale));
  const h = Math.max(1, Math.round(img.naturalHeight * scale));
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, w, h);
  const pixels = ctx.getImageData(0, 0, w, h);
  const up = resizeBilinear(unit(Array.from(map)), grid, w, h);
  const a = unit(Array.from(blur(up, w, h, 0.02 * Math.max(w, h))));
  const p = pixels.data;
  for (let i = 0; i < w * h; i++) {
    const wgt = Math.pow(a[i], 0.7);
    for (let c = 0; c < 3; c++) {
      p[4 * i + c] = Math.round(255 * ((1 - wgt) * p[4 * i + c] / 255 + wgt * jet(a[i], c)));
    }
  }
  ctx.putImageData(pixels, 0, 0);
  canvas.hidden = false;
}

// -- the view ------------------------------------------------------------------------------------

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function loadFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus("That is not an image file.", true);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;
    $("preview").src = reader.result;
    $("overlay").hidden = true;
    $("view").hidden = false;
    $("shown").textContent = "The image";
    setStatus("Image loaded: " + file.name);
  };
  reader.readAsDataURL(file);
}

function show(index, token) {
  state.selected = index;
  state.token = token;
  const r = state.results[index];
  for (const b of $("results").querySelectorAll("button")) {
    b.setAttribute("aria-pressed", String(Number(b.dataset.index) === index));
  }
  const tokens = $("tokens");
  tokens.replaceChildren();
  r.tokens.forEach((word, t) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = word;
    b.dataset.token = String(t);
    b.setAttribute("aria-pressed", String(t === token));
    b.addEventListener("click", () => show(index, t === token ? -1 : t));
    tokens.append(b);
  });
  const map = token < 0 ? r.map : r.tokenMaps.slice(token * state.grid ** 2, (token + 1) * state.grid ** 2);
  drawOverlay(map, state.grid);
  const overlay = $("overlay");
  overlay.dataset.shown = token < 0 ? "caption:" + index : "token:" + index + ":" + token;
  $("shown").textContent = token < 0
    ? "Map of \u201c" + r.text + "\u201d"
    : "Map of the word \u201c" + r.tokens[token] + "\u201d in \u201c" + r.text + "\u201d";
}

function render(response) {
  state.grid = response.grid;
  const layer = $("layer");
  layer.max = String(response.num_layers - 1);
  layer.value = String(response.layer);
  $("layer-value").textContent = String(response.layer);
  state.results = response.data.map((d) => ({
    text: d.text,
    tokens: d.tokens,
    prob: d.itm_probability,
    cosine: d.itc_cosine,
    map: decodeTensor(d.map).data,
    tokenMaps: decodeTensor(d.token_maps).data,
  }));
  const order = state.results.map((_, i) => i).sort((a, b) => state.results[b].prob - state.results[a].prob);
  const list = $("results");
  list.replaceChildren();
  order.forEach((i, rank) => {
    const r = state.results[i];
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.index = String(i);
    b.dataset.itmProbability = String(r.prob);
    b.dataset.itcCosine = String(r.cosine);
    b.setAttribute("aria-pressed", "false");
    b.setAttribute("aria-label", `rank ${rank + 1}: ${r.text}, ITM probability ${r.prob.toFixed(4)}, ITC cosine ${r.cosine.toFixed(4)}`);
    const pct = Math.max(0, Math.min(100, 100 * r.prob));
    b.innerHTML = '<span class="rank"></span><span class="text"></span>' +
      '<span class="nums">ITM <span class="prob"></span> · ITC <span class="cos"></span></span>' +
      '<span class="bar" aria-hidden="true"><span></span></span>';
    b.querySelector(".rank").textContent = String(rank + 1);
    b.querySelector(".text").textContent = r.text;
    b.querySelector(".prob").textContent = r.prob.toFixed(4);
    b.querySelector(".cos").textContent = r.cosine.toFixed(4);
    b.querySelector(".bar span").style.width = pct + "%";
    b.addEventListener("click", () => show(i, -1));
    li.append(b);
    list.append(li);
  });
  show(order[0], -1);
}

async function run(event) {
  if (event) event.preventDefault();
  const texts = $("captions").value.split("\n").map((t) => t.trim()).filter((t) => t);
  if (!state.image) { setStatus("Choose an image first.", true); $("drop").focus(); return; }
  if (!texts.length) { setStatus("Type at least one caption.", true); $("captions").focus(); return; }
  setStatus("Explaining " + texts.length + " caption" + (texts.length > 1 ? "s" : "") + "\u2026");
  $("run").disabled = true;
  try {
    const layer = $("layer").dataset.touched ? Number($("layer").value) : null;
    const model = $("model").value || null;
    const response = await api("v1/explain", { image: state.image, texts, layer, model });
    render(response);
    setStatus(`Done: ${texts.length} caption(s), layer ${response.layer}.`);
  } catch (e) {
    if (e.status === 401) showKeyField();
    setStatus("Error: " + e.message, true);
  } finally {
    $("run").disabled = false;
  }
}

function init() {
  const drop = $("drop"), file = $("file");
  $("form").addEventListener("submit", run);
  file.addEventListener("change", () => loadFile(file.files[0]));
  drop.addEventListener("click", () => file.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); }
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    loadFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.files].find((f) => f.type.startsWith("image/"));
    if (item) loadFile(item);
  });
  $("api-key").addEventListener("input", (e) => {
    sessionStorage.setItem(KEY_STORE, e.target.value);
    api("v1/models").then(showModels).catch(() => {});
  });
  const layer = $("layer");
  layer.addEventListener("input", () => { $("layer-value").textContent = layer.value; });
  layer.addEventListener("change", () => {
    layer.dataset.touched = "1";
    if (state.results.length) run();
  });
  checkKey();
}

document.addEventListener("DOMContentLoaded", init);
