// femtogpt serve's page: runs, live curves, streaming samples, and what the
// model computes for a text. Plain JavaScript, drawn on canvases by the small
// functions below; everything comes from this server (femtogpt/app/serve.py).
"use strict";

const state = { runs: [], selected: null, metrics: {}, samples: {}, analysis: null,
                analyzedText: "", controller: null };
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ helpers

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const value = await response.json();
  if (!response.ok) throw new Error(value.error || response.statusText);
  return value;
}

function fmt(x, digits) { return x === undefined || x === null ? "—" : Number(x).toFixed(digits); }

// Reads a text/event-stream body: calls onEvent(name, data) for each event.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

// ------------------------------------------------------------------ runs

function renderRuns() {
  const list = $("runs");
  list.textContent = "";
  state.runs.forEach((run) => {
    const li = document.createElement("li");
    li.dataset.run = run.id;
    if (run.id === state.selected) li.className = "selected";
    const live = run.modified && Date.now() / 1000 - run.modified < 120;
    const model = run.model || {};
    li.innerHTML = `<b></b> ${live ? '<span class="live">● training</span>' : ""}<br>
      <span class="muted"></span>`;
    li.querySelector("b").textContent = run.name;
    li.querySelector(".muted").textContent =
      `${run.tokenizer || "?"} · ${model.n_layer || "?"}×${model.n_embd || "?"} · ` +
      `${run.parameters ? (run.parameters / 1e6).toFixed(2) + "M" : "?"} params · ` +
      // a run from before --dtype trained in fp32
      `${(run.config || {}).dtype || "fp32"} · ` +
      (run.sampling_dtype && run.sampling_dtype !== "fp32" ?
        `samples in ${run.sampling_dtype} · ` : "") +
      `step ${run.iter ?? "—"} · best val ${fmt(run.best_val_loss, 4)} ` +
      `(${fmt(run.best_val_bpc, 3)} bits/char)` + (run.problem ? ` · ${run.problem}` : "");
    li.onclick = () => select(run.id);
    list.appendChild(li);
  });
}

function renderSummary() {
  const run = state.runs.find((r) => r.id === state.selected);
  if (!run) return;
  $("run-title").textContent = run.name;
  const rows = state.metrics[run.id] || [];
  const last = rows[rows.length - 1];
  const cfg = run.config || {};
  let left = "";
  if (last && cfg.max_iters && last.iter > 0 && last.iter < cfg.max_iters) {
    const seconds = (cfg.max_iters - last.iter) * last.elapsed_s / last.iter;
    left = ` · about ${Math.round(seconds)} s left`;
  }
  $("run-summary").textContent = `${run.name}${cfg.data ? " on " + cfg.data : ""} · ` +
    (last ? `step ${last.iter} of ${cfg.max_iters ?? "?"} · ` +
      `${Math.round(last.tokens_per_s || 0).toLocaleString()} tokens/s${left}` : "no evaluations yet");
  const model = run.model || {};
  fillSelect($("layer"), model.n_layer || 1);
  fillSelect($("head"), model.n_head || 1);
}

function fillSelect(select, n) {
  if (select.options.length === n) return;
  select.textContent = "";
  for (let i = 0; i < n; i++) select.add(new Option(String(i), String(i)));
}

async function select(id) {
  state.selected = id;
  renderRuns();
  if (!state.metrics[id]) state.metrics[id] = await api(`/api/runs/${id}/metrics`);
  renderSummary();
  drawCharts();
  renderSamples();
}

function renderSamples() {
  const samples = state.samples[state.selected] || [];
  $("eval-samples").textContent = samples.map((s) => `— step ${s.iter} —\n${s.text}`).join("\n\n")
    || "(a sample appears here at each new evaluation of a run that is training)";
}

// ------------------------------------------------------------------ charts

function drawChart(canvas, series) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = { l: 48, r: 12, t: 10, b: 28 };
  ctx.clearRect(0, 0, W, H);
  const points = series.flatMap((s) => s.points);
  canvas.dataset.points = String(series.length ? series[0].points.length : 0);
  if (!points.length) { ctx.fillStyle = "#999"; ctx.fillText("no evaluations yet", W / 2 - 40, H / 2); return; }
  let [x0, x1] = [Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...points.map((p) => p[1])), Math.max(...points.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => pad.l + (x - x0) / (x1 - x0) * (W - pad.l - pad.r);
  const Y = (y) => H - pad.b - (y - y0) / (y1 - y0) * (H - pad.t - pad.b);
  ctx.strokeStyle = "#ccc"; ctx.fillStyle = "#666"; ctx.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4, x = x0 + (x1 - x0) * i / 4;
    ctx.beginPath(); ctx.moveTo(pad.l, Y(y)); ctx.lineTo(W - pad.r, Y(y)); ctx.stroke();
    ctx.fillText(y.toFixed(2), 4, Y(y) + 4);
    ctx.fillText(String(Math.round(x)), X(x) - 10, H - 8);
  }
  series.forEach((s, k) => {
    ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 2;
    ctx.beginPath();
    s.points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    s.points.forEach(([x, y]) => { ctx.beginPath(); ctx.arc(X(x), Y(y), 2.5, 0, 7); ctx.fill(); });
    ctx.fillText(s.name, W - pad.r - 60, pad.t + 12 + 14 * k);
  });
  ctx.lineWidth = 1;
}

function drawCharts() {
  const rows = state.metrics[state.selected] || [];
  const pts = (key) => rows.filter((r) => r[key] !== undefined).map((r) => [r.iter, r[key]]);
  drawChart($("loss-chart"), [{ name: "train", color: "#36c", points: pts("train_loss") },
                              { name: "val", color: "#c63", points: pts("val_loss") }]);
  drawChart($("bpc-chart"), [{ name: "val bpc", color: "#393", points: pts("val_bpc") }]);
}

// ------------------------------------------------------------------ live updates

async function live() {
  try {
    const response = await fetch("/api/live");
    $("status").textContent = "live";
    await readEvents(response, (name, data) => {
      if (name === "metrics" || name === "reset") {
        if (name === "reset") state.metrics[data.run] = data.rows;
        else if (state.metrics[data.run]) state.metrics[data.run].push(...data.rows);
        if (data.run === state.selected) { drawCharts(); renderSummary(); }
      } else if (name === "info") {
        state.runs = state.runs.map((r) => (r.id === data.id ? data : r));
        renderRuns();
        if (data.id === state.selected) renderSummary();
      } else if (name === "sample") {
        (state.samples[data.run] = state.samples[data.run] || []).unshift(data);
        if (data.run === state.selected) renderSamples();
      }
    });
  } catch (err) { /* the server went away */ }
  $("status").textContent = "disconnected: reconnecting…";
  setTimeout(live, 2000);
}

// ------------------------------------------------------------------ sampling

async function generate(prompt) {
  if (state.controller) state.controller.abort();
  const controller = state.controller = new AbortController();
  $("sample-error").textContent = "";
  $("output-prompt").textContent = "";
  $("output-text").textContent = "";
  $("output").dataset.done = "false";
  $("generate").disabled = true; $("stop").disabled = false;
  const number = (id) => ($(id).value === "" ? null : Number($(id).value));
  const body = { prompt, temperature: number("temperature"), top_k: number("top-k"),
                 top_p: number("top-p"), max_new_tokens: number("max-tokens"), seed: number("seed") };
  try {
    const response = await fetch(`/api/runs/${state.selected}/sample`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) throw new Error((await response.json()).error);
    await readEvents(response, (name, data) => {
      if (name === "prompt") $("output-prompt").textContent = data.text;
      else if (name === "token") $("output-text").textContent += data.text;
      else if (name === "error") $("sample-error").textContent = data.error;
      else if (name === "done") $("output").dataset.done = "true";
    });
  } catch (err) {
    if (err.name !== "AbortError") $("sample-error").textContent = err.message;
  } finally {
    if (state.controller === controller) state.controller = null;
    $("generate").disabled = false; $("stop").disabled = true;
  }
}

// ------------------------------------------------------------------ inside the model

async function analyzeText(text) {
  $("analyze-error").textContent = "";
  try {
    state.analysis = await api(`/api/runs/${state.selected}/analyze`, { text });
    state.analyzedText = text;
  } catch (err) {
    $("analyze-error").textContent = err.message;
    return;
  }
  const a = state.analysis;
  $("analyze-summary").textContent = a.mean_loss === null ? "" :
    `mean loss ${fmt(a.mean_loss, 3)} nats per token, ${fmt(a.bits_per_char, 3)} bits per character`;
  const box = $("tokens");
  box.textContent = "";
  const worst = Math.max(1e-9, ...a.tokens.map((t) => t.loss || 0));
  a.tokens.forEach((t, i) => {
    const span = document.createElement("span");
    span.textContent = t.text;
    span.dataset.index = i;
    const shade = t.loss === null ? 0 : Math.min(1, t.loss / worst);
    span.style.background = `rgba(220, 60, 30, ${0.08 + 0.7 * shade})`;
    span.title = t.loss === null ? "first token" : `loss ${t.loss.toFixed(3)} nats`;
    span.onclick = () => showNext(i);
    box.appendChild(span);
  });
  showNext(a.tokens.length - 1);
  drawAttention();
}

function showNext(i) {
  const a = state.analysis;
  document.querySelectorAll("#tokens span").forEach((s) => s.classList.toggle("chosen", Number(s.dataset.index) === i));
  $("next-title").textContent = `after “${a.tokens[i].text}”, the model expects:`;
  const list = $("next");
  list.textContent = "";
  a.tokens[i].next.forEach((n) => {
    const li = document.createElement("li");
    li.textContent = `${JSON.stringify(n.text)}  ${(100 * n.p).toFixed(1)}%`;
    li.title = "continue from this choice";
    li.onclick = () => {
      const prefix = a.tokens.slice(0, i + 1).map((t) => t.text).join("");
      $("prompt").value = prefix + n.text;
      generate($("prompt").value);
    };
    list.appendChild(li);
  });
}

async function drawAttention() {
  const canvas = $("attention");
  const ctx = canvas.getContext("2d");
  if (!state.analysis) return;
  let att;
  try {
    att = await api(`/api/runs/${state.selected}/attention`, {
      text: state.analyzedText, layer: Number($("layer").value || 0), head: Number($("head").value || 0) });
  } catch (err) { $("analyze-error").textContent = err.message; return; }
  const T = att.tokens.length, label = 70;
  const cell = Math.max(2, Math.floor((canvas.width - label) / Math.max(T, 1)));
  canvas.height = label + cell * T + 2;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "10px monospace"; ctx.fillStyle = "#333";
  let cells = 0;
  att.matrix.forEach((row, i) => {
    ctx.fillStyle = "#333";
    if (cell >= 8) ctx.fillText(JSON.stringify(att.tokens[i]).slice(0, 9), 0, label + cell * i + cell - 2);
    row.forEach((p, j) => {
      ctx.fillStyle = `rgba(30, 70, 200, ${Math.sqrt(p)})`;
      ctx.fillRect(label + cell * j, label + cell * i, cell - (cell > 4 ? 1 : 0), cell - (cell > 4 ? 1 : 0));
      cells++;
    });
  });
  canvas.dataset.cells = String(cells);
  canvas.dataset.layer = $("layer").value; canvas.dataset.head = $("head").value;
}

// ------------------------------------------------------------------ start

$("sample-form").onsubmit = (e) => { e.preventDefault(); generate($("prompt").value); };
$("stop").onclick = () => { if (state.controller) state.controller.abort(); };
$("analyze-form").onsubmit = (e) => { e.preventDefault(); analyzeText($("analyze-text").value); };
$("analyze-output").onclick = () => {
  const text = $("output-prompt").textContent + $("output-text").textContent;
  $("analyze-text").value = text;
  analyzeText(text);
};
$("layer").onchange = drawAttention;
$("head").onchange = drawAttention;

(async () => {
  state.runs = await api("/api/runs");
  renderRuns();
  if (state.runs.length) await select(state.runs[0].id);
  live();
})();
