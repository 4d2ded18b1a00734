// The model page: the card, the proof, and the model itself, run here by onnxruntime-web on what you draw or
// drop, with the same recipe as the servers (images.js); a switch asks a running server too.
"use strict";

const state = { card: null, session: null, last: null, errors: [] };
const TOPK = 5; // bars shown, in the browser and from the server
window.torchship = state; // what tests (and curious people) read

const $ = (id) => document.getElementById(id);

async function json(path) {
  const r = await fetch(path);
  return r.ok ? r.json() : null;
}

function show(id, on) {
  $(id).hidden = !on;
}

// ---- the card, the figures, the proof

function describeNamed(card) {
  const sig = card.signature, list = (ts) => ts.map((t) => `${t.name} ${t.datatype} [${t.shape.join(", ")}]`).join("; ");
  $("summary").textContent = `answers ${sig.outputs.map((t) => t.name).join(", ")} from ${sig.inputs.map((t) => t.name).join(", ")}`;
  const p = card.provenance || {};
  const rows = [
    ["inputs", list(sig.inputs)],
    ["outputs", list(sig.outputs)],
    ...sig.inputs.filter((t) => t.range).map((t) => [`${t.name} values`, `${t.range[0]} to ${t.range[1]}${t.mask ? " (a mask)" : ""}`]),
    ...Object.entries(sig.dims).map(([d, [lo, hi]]) => [d, `${lo} to ${hi}`]),
    ["architecture", `${card.architecture.spec}(${JSON.stringify(card.architecture.kwargs)})`],
    ["source", p.source ? `${p.source} (sha256 ${String(p.source_sha256).slice(0, 16)}...)` : "(unknown)"],
    ["made", `${p.created_at || "?"} with torch ${p.torch || "?"}, onnx ${p.onnx || "?"}, onnxruntime ${p.onnxruntime || "?"}`],
  ];
  $("card").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", k), el("dd", String(v))]));
}

function describe(card) {
  $("title").textContent = card.name;
  if (card.input_kind === "named") return describeNamed(card);
  const tensor = card.input_kind === "tensor";
  const kind = card.task === "classify" ? `classifies ${card.labels.length} labels`
    : card.task === "detect" ? `finds ${card.labels.length - 1} kinds of object`
    : card.task === "segment" ? `labels every pixel with one of ${card.labels.length} classes`
    : card.task === "regress" ? `predicts ${card.output_names.join(", ")}` : "reconstructs its input";
  const acc = card.metrics && card.metrics.test_accuracy != null ? `; test accuracy ${card.metrics.test_accuracy.toFixed(4)}` : "";
  const from = tensor ? `rows of ${card.input_shape.join(" x ")} number(s)` : `${card.input_shape.join("x")} images`;
  $("summary").textContent = `${kind} from ${from}${acc}`;
  $("recipe").textContent = card.preprocess;
  const p = card.provenance || {};
  const rows = [
    ["input", `${card.input_name}: ${card.input_shape.join(" x ")} ${tensor ? "per example" : "(C x H x W)"}, float32`],
    ["output", `${card.output_name}: ${card.output_kind}${card.task === "regress" ? ` (${card.output_names.join(", ")})` : ""}`],
    [card.task === "regress" ? "units" : "labels", (card.task === "regress" ? card.units : card.labels).join(", ") || "(none)"],
    ["preprocessing", `${card.preprocess}${card.resize ? ` (shorter side ${card.resize}, centre crop)` : ""}; mean ${card.mean.join(", ")}, std ${card.std.join(", ")}`],
    ["architecture", `${card.architecture.spec}(${JSON.stringify(card.architecture.kwargs)})`],
    ["dataset", card.dataset || "(none)"],
    ["source", p.source ? `${p.source} (sha256 ${String(p.source_sha256).slice(0, 16)}...)` : "(unknown)"],
    ["epoch", p.epoch ?? "n/a"],
    ["made", `${p.created_at || "?"} with torch ${p.torch || "?"}, onnx ${p.onnx || "?"}, onnxruntime ${p.onnxruntime || "?"}`],
  ];
  for (const [k, v] of Object.entries(card.metrics || {})) rows.push([k.replace(/_/g, " "), typeof v === "number" ? v.toPrecision(4) : v]);
  $("card").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", k), el("dd", String(v))]));
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text != null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function proof(report) {
  if (!report) return;
  show("proof-section", true);
  const i = report.inputs;
  if (i.named) return namedProof(report);
  if (i.detect) return detectionProof(report);
  const what = i.ranged != null ? `${i.total} rows (${i.real} held-out + ${i.ranged} drawn over the training range)`
    : `${i.total} images (${i.real ? `${i.real} held-out` : `${i.smooth} smooth`} + ${i.noise} noise)`;
  $("proof-summary").textContent = `${report.passed ? "All checks pass" : "Some checks FAIL"}: every format against a float64 copy of the eager model on ${what}, atol ${report.atol}, rtol ${report.rtol}.${report.tolerance_note ? " " + report.tolerance_note : ""}`;
  const head = ["backend", "batch", "max abs", "p99 abs", "top-1", "fails", "result"];
  const t = el("table");
  t.appendChild(el("tr")).append(...head.map((h) => el("th", h)));
  const sci = (v) => (v == null ? "n/a" : v.toExponential(2));
  for (const c of report.checks) {
    const row = t.appendChild(el("tr"));
    row.append(el("td", c.backend), el("td", c.batch_size), el("td", sci(c.max_abs)), el("td", sci(c.p99_abs)),
      el("td", c.top1_agreement == null ? "n/a" : c.top1_agreement.toFixed(4)), el("td", c.failures),
      el("td", c.passed ? "PASS" : "FAIL", c.passed ? "pass" : "fail"));
  }
  for (const a of report.approximations || []) {
    const row = t.appendChild(el("tr"));
    row.append(el("td", a.backend), el("td", "all"), el("td", sci(a.max_abs)), el("td", sci(a.p99_abs)),
      el("td", a.agreement.toFixed(4)), el("td", a.accuracy_change_points == null ? "" : `${a.accuracy_change_points.toFixed(2)} pts`),
      el("td", a.passed ? "PASS" : "FAIL", a.passed ? "pass" : "fail"));
  }
  $("proof").replaceChildren(t);
}

function detectionProof(report) {
  const i = report.inputs;
  $("proof-summary").textContent = `${report.passed ? "All checks pass" : "Some checks FAIL"}: every format's detections against eager PyTorch's on ${i.total} drawn scenes (${i.sizes.join(", ")}; ${i.empty} with nothing to find): ${i.rules}.`;
  const t = el("table");
  t.appendChild(el("tr")).append(...["backend", "judged", "matched", "left out", "missing", "extra", "result"].map((h) => el("th", h)));
  for (const c of report.checks) {
    const w = c.worst;
    t.appendChild(el("tr")).append(el("td", c.backend), el("td", w.judged), el("td", w.matched ?? 0), el("td", w.excluded ?? 0),
      el("td", w.missing.length), el("td", w.extra.length), el("td", c.passed ? "PASS" : "FAIL", c.passed ? "pass" : "fail"));
  }
  $("proof").replaceChildren(t);
}

function namedProof(report) {
  const i = report.inputs, lengths = i.cases.map((c) => Object.entries(c).map(([d, v]) => `${d} ${v}`).join(", ") || "fixed shapes");
  $("proof-summary").textContent = `${report.passed ? "All checks pass" : "Some checks FAIL"}: every output of every format against a float64 copy of the eager model, ${i.rows} examples at each of ${lengths.join("; ")}${i.padded.length ? `, and a padded batch of rows of different ${i.padded.join(", ")}` : ""}; atol ${report.atol}, rtol ${report.rtol}.`;
  const t = el("table"), sci = (v) => (v == null ? "n/a" : v.toExponential(2));
  t.appendChild(el("tr")).append(...["backend", "output", "lengths", "batch", "max abs", "fails", "result"].map((h) => el("th", h)));
  for (const c of report.checks) {
    const dims = Object.entries(c.dims || {}).map(([d, v]) => `${d} ${v}`).join(", ");
    t.appendChild(el("tr")).append(el("td", c.backend), el("td", c.output), el("td", dims), el("td", c.batch_size),
      el("td", sci(c.max_abs)), el("td", c.failures), el("td", c.passed ? "PASS" : "FAIL", c.passed ? "pass" : "fail"));
  }
  $("proof").replaceChildren(t);
}

function figure(id, section, src, present) {
  if (!present.includes(src)) return;
  $(id).src = src;
  show(section, true);
}

// ---- the answers (handlers/responses.py)

function softmax(scores) {
  const m = Math.max(...scores), e = scores.map((s) => Math.fround(Math.exp(Math.fround(s - m))));
  const total = e.reduce((a, b) => a + b, 0);
  return e.map((v) => Math.fround(v / total));
}

function respond(card, output) {
  if (card.task === "reconstruct") return { reconstruction: output };
  if (card.task === "regress") {
    const v = Array.from(output);
    return { values: v, value: card.output_names.length === 1 ? v[0] : Object.fromEntries(card.output_names.map((n, i) => [n, v[i]])) };
  }
  const probs = card.output_kind === "probabilities" ? Array.from(output) : softmax(Array.from(output));
  const order = probs.map((p, i) => i).sort((a, b) => probs[b] - probs[a] || a - b).slice(0, Math.min(TOPK, probs.length));
  const round = (p) => Math.round(p * 1e6) / 1e6;
  return { label: card.labels[order[0]], probability: round(probs[order[0]]),
           topk: order.map((i) => ({ label: card.labels[i], probability: round(probs[i]) })) };
}

function bars(answer) {
  if (answer.error) return [el("p", answer.error, "error")];
  if (Array.isArray(answer)) return Vision.picture(state.card, { detections: answer, size: state.last.answer.size }, state.image);
  if (answer.detections || answer.counts) return Vision.picture(state.card, answer, state.image);
  if (answer.value !== undefined || answer.predictions) return [valueOf(answer)];
  if (answer.image_png_base64 || answer.reconstruction) return [reconstruction(answer)];
  return answer.topk.map((t, i) => {
    const row = el("div", null, i === 0 ? "bar top" : "bar");
    const fill = el("div", null, "fill");
    fill.style.width = `${(100 * t.probability).toFixed(1)}%`;
    const track = el("div", null, "track");
    track.appendChild(fill);
    row.append(el("span", t.label, "label"), track, el("span", t.probability.toFixed(4)));
    return row;
  });
}

function reconstruction(answer) {
  const [c, h, w] = state.card.input_shape, pair = el("div", null, "pair");
  const input = el("canvas"), output = el("canvas");
  for (const cv of [input, output]) { cv.width = w; cv.height = h; }
  input.getContext("2d").drawImage($("seen"), 0, 0, w, h);
  input.title = "input";
  if (answer.reconstruction) {
    const img = output.getContext("2d").createImageData(w, h), n = h * w, x = answer.reconstruction;
    for (let i = 0; i < n; i++) for (let k = 0; k < 3; k++) {
      const ch = c === 1 ? 0 : k, v = x[ch * n + i] * state.card.std[ch] + state.card.mean[ch];
      img.data[i * 4 + k] = Math.round(Math.min(Math.max(v, 0), 1) * 255);
    }
    for (let i = 0; i < n; i++) img.data[i * 4 + 3] = 255;
    output.getContext("2d").putImageData(img, 0, 0);
  } else {
    const im = new Image();
    im.onload = () => output.getContext("2d").drawImage(im, 0, 0, w, h);
    im.src = `data:image/png;base64,${answer.image_png_base64}`;
  }
  output.title = "reconstruction";
  pair.append(input, output);
  return pair;
}

function valueOf(answer) {
  const v = answer.predictions ? answer.predictions[0] : answer.value;
  const names = state.card.output_names, units = state.card.units || [];
  const show = (name, x, i) => `${name} = ${Number(x).toFixed(4)}${units[i] ? " " + units[i] : ""}`;
  if (typeof v === "number") return el("p", show(names[0], v, 0), "value");
  if (v && v.label !== undefined) return el("p", `${v.label} (${Number(v.probability).toFixed(4)})`, "value");
  return el("p", names.map((n, i) => show(n, v[n], i)).join(", "), "value");
}

function render(where, answer) {
  const box = $(where).querySelector(".result");
  box.replaceChildren(...bars(answer));
}

// ---- running the model

function seen(x) {
  const [c, h, w] = state.card.input_shape, n = h * w, small = document.createElement("canvas");
  small.width = w;
  small.height = h;
  const img = small.getContext("2d").createImageData(w, h);
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < 3; k++) {
      const ch = c === 1 ? 0 : k, v = x[ch * n + i] * state.card.std[ch] + state.card.mean[ch];
      img.data[i * 4 + k] = Math.round(Math.min(Math.max(v, 0), 1) * 255);
    }
    img.data[i * 4 + 3] = 255;
  }
  small.getContext("2d").putImageData(img, 0, 0);
  const ctx = $("seen").getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(small, 0, 0, $("seen").width, $("seen").height);
}

async function classify(rgba, w, h, bytes, type, source) {
  const card = state.card;
  let answer, x = null;
  try {
    x = Images.prepare(card, rgba, w, h);
    seen(x);
    const out = await state.session.run({ [card.input_name]: new ort.Tensor("float32", x, [1, ...card.input_shape]) });
    answer = card.task === "detect" ? Vision.detections(card, out, h, w)
      : card.task === "segment" ? Vision.segmentation(card, out[card.output_name].data, h, w)
      : respond(card, out[card.output_name].data);
    if (card.task === "detect" || card.task === "segment") state.image = await createImageBitmap(new ImageData(new Uint8ClampedArray(rgba), w, h));
  } catch (e) {
    answer = { error: e instanceof Images.InputError ? e.message : `could not run the model: ${e.message}` };
  }
  const kept = answer.mask ? { ...answer, mask: undefined } : answer; // tests read the answer; the mask is drawn
  state.last = { source, input: x ? Array.from(x) : null, answer: kept, remote: null };
  render("local", answer);
  if ($("use-server").checked) await ask(bytes, type);
  state.last.done = true;
}

async function ask(bytes, type) {
  render("remote", { topk: [] });
  $("remote").querySelector(".result").textContent = "asking the server ...";
  const key = $("key").value.trim();
  let answer;
  try {
    const r = await fetch("relay/predictions", { method: "POST", body: bytes,
      headers: { "Content-Type": type || "application/octet-stream", "X-TopK": String(Math.max(1, Math.min(TOPK, state.card.labels.length))),
                 ...(key ? { Authorization: `Bearer ${key}` } : {}) } });
    const body = await r.json().catch(() => ({}));
    answer = r.ok ? body : { error: `${r.status}: ${body.error || body.message || "the server refused"}` };
  } catch (e) {
    answer = { error: `no server answered (${e.message})` };
  }
  state.last.remote = answer;
  render("remote", answer);
}

// ---- the drawing pad and the drop zone

function pad() {
  const canvas = $("pad"), ctx = canvas.getContext("2d");
  const clear = () => { ctx.fillStyle = "white"; ctx.fillRect(0, 0, canvas.width, canvas.height); };
  clear();
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.strokeStyle = "black";
  let drawing = false, strokes = 0;
  const at = (e) => { const r = canvas.getBoundingClientRect(); return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height]; };
  canvas.addEventListener("pointerdown", (e) => {
    drawing = true;
    canvas.setPointerCapture(e.pointerId);
    ctx.lineWidth = e.pointerType === "pen" && e.pressure > 0 ? 10 + 14 * e.pressure : 18;
    const [x, y] = at(e);
    ctx.beginPath();
    ctx.moveTo(x, y);
    ctx.lineTo(x + 0.01, y);
    ctx.stroke();
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    const [x, y] = at(e);
    ctx.lineTo(x, y);
    ctx.stroke();
  });
  const finish = async () => {
    if (!drawing) return;
    drawing = false;
    strokes += 1;
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const png = await new Promise((ok) => canvas.toBlob(ok, "image/png"));
    await classify(data.data, canvas.width, canvas.height, png, "image/png", "pad");
  };
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", finish);
  $("clear").addEventListener("click", () => { clear(); strokes = 0; render("local", { topk: [] }); });
}

async function openFile(file) {
  $("dropped").textContent = `${file.name} (${file.size} bytes)`;
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { premultiplyAlpha: "none", colorSpaceConversion: "none" });
  } catch (e) {
    render("local", { error: "not an image this browser can read" });
    return;
  }
  const c = document.createElement("canvas");
  c.width = bitmap.width;
  c.height = bitmap.height;
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const data = ctx.getImageData(0, 0, c.width, c.height);
  await classify(data.data, c.width, c.height, await file.arrayBuffer(), file.type, "file");
}

function dropZone() {
  const zone = $("drop");
  for (const ev of ["dragenter", "dragover"]) zone.addEventListener(ev, (e) => { e.preventDefault(); zone.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) zone.addEventListener(ev, () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer.files.length) openFile(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (e) => { if (e.target.files.length) openFile(e.target.files[0]); });
}

// ---- tensor models: rows of numbers instead of images

function standardize(card, rows) {
  const per = card.input_shape.slice(1).reduce((a, b) => a * b, 1), n = card.input_shape[0] * per;
  const x = new Float32Array(rows.length * n);
  rows.forEach((row, r) => row.flat(Infinity).forEach((v, i) => {
    const f = Math.floor(i / per);
    x[r * n + i] = Math.fround(Math.fround(Math.fround(v) - Math.fround(card.mean[f])) / Math.fround(card.std[f]));
  }));
  return x;
}

async function runRows(rows) {
  const card = state.card, x = standardize(card, rows);
  const out = await state.session.run({ [card.input_name]: new ort.Tensor("float32", x, [rows.length, ...card.input_shape]) });
  const data = out[card.output_name].data, k = data.length / rows.length;
  return rows.map((_, r) => data.slice(r * k, (r + 1) * k));
}

async function answerRows(rows, source) {
  let answer;
  try {
    answer = respond(state.card, (await runRows(rows))[0]);
  } catch (e) {
    answer = { error: `could not run the model: ${e.message}` };
  }
  state.last = { source, input: rows, answer, remote: null };
  render("local", answer);
  if ($("use-server").checked) await ask(JSON.stringify({ instances: rows }), "application/json");
  state.last.done = true;
}

function range(card) {
  if (card.input_range && card.input_range.length) return card.input_range[0];
  return [card.mean[0] - 2 * card.std[0], card.mean[0] + 2 * card.std[0]];
}

async function plotLine(x) {
  const card = state.card, [lo, hi] = range(card), cv = $("line"), ctx = cv.getContext("2d");
  const xs = Array.from({ length: 61 }, (_, i) => lo + (hi - lo) * i / 60);
  const ys = (await runRows(xs.map((v) => [v]))).map((o) => o[0]);
  const yLo = Math.min(...ys), yHi = Math.max(...ys), pad = 30;
  const px = (v) => pad + (cv.width - 2 * pad) * (v - lo) / (hi - lo);
  const py = (v) => cv.height - pad - (cv.height - 2 * pad) * (v - yLo) / ((yHi - yLo) || 1);
  ctx.clearRect(0, 0, cv.width, cv.height);
  ctx.strokeStyle = "#d8dee6";
  ctx.strokeRect(pad, pad, cv.width - 2 * pad, cv.height - 2 * pad);
  ctx.fillStyle = "#5b6876";
  ctx.font = "12px system-ui";
  ctx.fillText(`${card.output_names[0]} over the training range of x`, pad, pad - 10);
  ctx.fillText(lo.toFixed(2), pad, cv.height - 10);
  ctx.fillText(hi.toFixed(2), cv.width - pad - 24, cv.height - 10);
  ctx.strokeStyle = "#2f6fde";
  ctx.lineWidth = 2;
  ctx.beginPath();
  xs.forEach((v, i) => (i ? ctx.lineTo(px(v), py(ys[i])) : ctx.moveTo(px(v), py(ys[i]))));
  ctx.stroke();
  const y = (await runRows([[x]]))[0][0];
  ctx.fillStyle = "#b3261e";
  ctx.beginPath();
  ctx.arc(px(Math.min(Math.max(x, lo), hi)), py(y), 5, 0, 2 * Math.PI);
  ctx.fill();
}

function tensorInputs() {
  const card = state.card;
  show("image-try", false);
  show("tensor-try", true);
  const one = card.task === "regress" && card.input_shape.length === 1 && card.input_shape[0] === 1;
  if (one) {
    show("one-number", true);
    const [lo, hi] = range(card), slider = $("x"), box = $("x-box");
    slider.min = lo; slider.max = hi; slider.step = (hi - lo) / 200;
    slider.value = box.value = ((lo + hi) / 2).toFixed(3);
    const go = async (v, source) => { await plotLine(v); await answerRows([[v]], source); };
    slider.addEventListener("change", () => { box.value = slider.value; go(Number(slider.value), "slider"); });
    box.addEventListener("change", () => { slider.value = box.value; go(Number(box.value), "box"); });
    return go(Number(slider.value), "slider");
  }
  show("rows", true);
  const example = JSON.stringify([card.mean.map(() => 0)].map((r) => (card.input_shape.length === 1 ? r : r.map(() => new Array(card.input_shape[1]).fill(0)))));
  $("rows-json").value = example;
  $("run-rows").addEventListener("click", async () => {
    let rows;
    try {
      rows = JSON.parse($("rows-json").value);
      if (!Array.isArray(rows[0]) && card.input_shape.length === 1 && rows.length === card.input_shape[0]) rows = [rows];
    } catch (e) {
      render("local", { error: `not JSON: ${e.message}` });
      return;
    }
    await answerRows(rows, "json");
  });
}

// ---- named inputs: every input by name, as JSON; every output shown by name

const TYPED = { FP32: ["float32", Float32Array], FP64: ["float64", Float64Array], INT32: ["int32", Int32Array],
  INT64: ["int64", BigInt64Array], BOOL: ["bool", Uint8Array] };

function depth(v) {
  let d = 0;
  for (; Array.isArray(v); v = v[0]) d++;
  return d;
}

function shapeOf(v) {
  const s = [];
  for (; Array.isArray(v); v = v[0]) s.push(v.length);
  return s;
}

async function runNamed(inputs) {
  const sig = state.card.signature, feeds = {};
  for (const t of sig.inputs) {
    if (!(t.name in inputs)) throw new Error(`missing input '${t.name}'`);
    const v = depth(inputs[t.name]) === t.shape.length - 1 ? [inputs[t.name]] : inputs[t.name]; // one example, or several
    if (!TYPED[t.datatype]) throw new Error(`input '${t.name}': ${t.datatype} does not run in a browser`);
    const [type, Typed] = TYPED[t.datatype], flat = v.flat(Infinity);
    if (t.range && flat.some((x) => x < t.range[0] || x > t.range[1])) throw new Error(`input '${t.name}': a value is outside ${t.range[0]}..${t.range[1]}`);
    const data = type === "int64" ? BigInt64Array.from(flat, (x) => BigInt(Math.trunc(x))) : Typed.from(flat, Number);
    feeds[t.name] = new ort.Tensor(type, data, shapeOf(v));
  }
  const out = await state.session.run(feeds);
  return Object.fromEntries(sig.outputs.map((t) => [t.name, { shape: out[t.name].dims, data: Array.from(out[t.name].data, Number) }]));
}

function namedInputs() {
  const sig = state.card.signature;
  if (sig.process || sig.text) {
    // the model's own step, or its tokenizer, is Python (docs/export.md): no browser runs it, so none runs here
    show("image-try", false);
    show("tensor-try", false);
    show("server", false);
    const takes = sig.text ? [{ name: "text", datatype: "BYTES" }, ...(sig.text.pairs ? [{ name: "text_pair", datatype: "BYTES" }] : [])]
      : sig.process.inputs.length ? sig.process.inputs : sig.inputs;
    const step = sig.text ? `its tokenizer (${sig.text.tokenizer})` : `its own step (${sig.process.file})`;
    $("local").querySelector(".result").textContent =
      `This model runs ${step} in Python around the network, which a browser cannot: ` +
      `send ${takes.map((t) => `${t.name} (${t.datatype})`).join(", ")} to the OIP server (torchship serve start --runtime oip).`;
    return;
  }
  show("image-try", false);
  show("tensor-try", true);
  show("rows", true);
  show("server", false); // the relay speaks images and rows; ask the OIP server itself (README: Any model)
  $("rows-label").textContent = "Inputs as JSON, by name: one example each, or a list of them";
  const example = {};
  for (const t of sig.inputs) {
    const shape = t.shape.slice(1).map((d) => (typeof d === "number" ? d : Math.min(Math.max(sig.dims[d][0], 8), sig.dims[d][1])));
    const value = t.mask ? 1 : t.range ? Math.round((t.range[0] + t.range[1]) / 2) : 0;
    example[t.name] = shape.reduceRight((inner, n) => Array.from({ length: n }, () => inner), value);
  }
  $("rows-json").value = JSON.stringify(example);
  const go = async (source) => {
    let inputs, answer;
    try {
      inputs = JSON.parse($("rows-json").value);
      answer = { outputs: await runNamed(inputs) };
    } catch (e) {
      answer = { error: e instanceof SyntaxError ? `not JSON: ${e.message}` : `could not run the model: ${e.message}` };
    }
    state.last = { source, input: inputs, answer, remote: null, done: true };
    const box = $("local").querySelector(".result");
    if (answer.error) box.replaceChildren(el("p", answer.error, "error"));
    else box.replaceChildren(...Object.entries(answer.outputs).map(([n, o]) => el("p", `${n} [${o.shape.join(", ")}]: ${o.data.slice(0, 12).map((x) => +x.toPrecision(5)).join(", ")}${o.data.length > 12 ? ", ..." : ""}`, "value")));
  };
  $("run-rows").addEventListener("click", () => go("json"));
  return go("example");
}

async function main() {
  state.card = await json("card.json");
  describe(state.card);
  proof(await json("equivalence.json"));
  const present = (await json("figures.json")) || [];
  figure("curves", "curves-section", "curves.png", present);
  figure("loadtest", "load-section", "loadtest.png", present);
  $("server-form").addEventListener("submit", (e) => e.preventDefault());
  ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
  ort.env.wasm.numThreads = 1; // threads would need cross-origin isolation; one is plenty for one image
  state.session = await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
  $("use-server").addEventListener("change", (e) => {
    if (!e.target.checked) $("remote").querySelector(".result").textContent = "Off.";
  });
  if (state.card.input_kind === "named") {
    await namedInputs();
  } else if (state.card.input_kind === "tensor") {
    $("remote").querySelector("h3 small").textContent = "(the relay's server)";
    await tensorInputs();
  } else {
    $("local").querySelector(".result").textContent = "Ready: draw or drop an image.";
    pad();
    dropZone();
  }
  state.ready = true;
}

main().catch((e) => {
  state.errors.push(String(e));
  $("local").querySelector(".result").replaceChildren(el("p", `the page could not start: ${e.message}`, "error"));
});
