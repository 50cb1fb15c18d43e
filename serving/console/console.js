// The gateway's console: models, live charts from /metrics, try sentiment and digits.
// Plain JavaScript, no dependencies, nothing loaded from elsewhere (works air-gapped).
"use strict";
(() => {
  const $ = (sel) => document.querySelector(sel);
  const POLL_MS = 3000;
  const HISTORY = 60; // points per chart (3 minutes at POLL_MS)
  const MODELS_EVERY = 3; // polls between reloads of /v1/models (states and labels change live)
  const COLORS = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777", "#4b5563"];
  const KEY_STORE = "classifier-console-api-key";
  const state = { key: sessionStorage.getItem(KEY_STORE) || "", needsKey: false, models: [], prev: null, history: [], timer: null, polls: 0 };

  // -- talking to the gateway --------------------------------------------------------
  class ApiError extends Error {
    constructor(status, code, message) { super(message); this.status = status; this.code = code; }
  }

  async function api(path, body) {
    const headers = {};
    if (state.key) headers.authorization = "Bearer " + state.key;
    const init = { headers };
    if (body !== undefined) {
      init.method = "POST";
      headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    const text = await r.text();
    if (!r.ok) {
      let code = "HTTP_" + r.status, message = text;
      try {
        const e = JSON.parse(text).error;
        if (e) { code = e.code || code; message = e.message || message; }
      } catch (_) { /* not JSON: keep the text */ }
      if (r.status === 401) askForKey(message);
      throw new ApiError(r.status, code, message);
    }
    return path === "/metrics" ? text : JSON.parse(text);
  }

  function show(message, kind) {
    const el = $("#message");
    el.textContent = message || "";
    el.dataset.kind = kind || "info";
    el.hidden = !message;
  }

  function askForKey(message) {
    state.needsKey = true;
    $("#key-form").hidden = false;
    show(message || "This gateway needs an API key.", "error");
    $("#api-key").focus();
  }

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "dataset") Object.assign(e.dataset, v);
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : String(c));
    return e;
  }

  const pct = (x) => (x === undefined || x === null ? "–" : (100 * x).toFixed(1) + " %");

  // -- models ---------------------------------------------------------------------------
  const isText = (m) => m.versions.some((v) => "token_ids" in ((v.signature || {}).inputs || {}));

  async function loadModels() {
    const { models } = await api("/v1/models");
    state.models = models;
    const body = $("#models tbody");
    body.replaceChildren();
    // Each cell names its column (data-label): on a phone the rows are cards that show it.
    const columns = [...document.querySelectorAll("#models thead th")].map((th) => th.textContent);
    for (const m of models) {
      for (const v of m.versions) {
        const card = v.card || {};
        const labels = el("td", {}, ...v.labels.map((l) => el("span", { class: "label-chip" }, l)));
        if (v.version === m.default_version) labels.append(el("span", { class: "label-chip" }, "default"));
        // The traffic file's split of requests that name no version (weighted canary, shadow scoring).
        const split = m.traffic || {};
        if (split.canary_version !== null && split.canary_version !== undefined) {
          const share = split.canary_version === v.version ? split.canary_percent
            : v.version === m.default_version ? 100 - split.canary_percent : null;
          if (share !== null && split.canary_percent > 0) {
            labels.append(el("span", { class: "label-chip traffic-chip", title: "share of requests that name no version" },
              `${+share.toFixed(2)}% of traffic`));
          }
          if (split.canary_version === v.version && split.shadow_percent > 0) {
            labels.append(el("span", { class: "label-chip traffic-chip", title: "share of the default version's requests also scored by this version, off the request path" },
              `shadow ${+split.shadow_percent.toFixed(2)}%`));
          }
        }
        body.append(el("tr", { dataset: { model: m.name, version: v.version } },
          el("td", {}, m.name), el("td", {}, v.version), el("td", { class: "state-" + v.state }, v.state), labels,
          el("td", {}, pct(card.test_accuracy)), el("td", {}, pct(card.whole_text_accuracy)),
          el("td", {}, pct(card.short_text_proxy_accuracy)),
          el("td", {}, card.test_ece === undefined ? "–" : card.test_ece.toFixed(3)),
          el("td", {}, card.parameters === undefined ? "–" : card.parameters.toLocaleString("en")),
          el("td", {}, (card.created || "–").slice(0, 10))));
        body.lastElementChild.querySelectorAll("td").forEach((td, i) => { td.dataset.label = columns[i]; });
      }
    }
    const textModels = models.filter(isText), imageModels = models.filter((m) => !isText(m));
    fillSelect($("#sentiment-model"), textModels.map((m) => [m.name, m.name]));
    fillVersions($("#sentiment-version"), textModels.find((m) => m.name === $("#sentiment-model").value));
    fillVersions($("#digits-version"), imageModels[0]);
  }

  function fillSelect(select, options) {
    const keep = select.value;
    select.replaceChildren(...options.map(([value, text]) => el("option", { value }, text)));
    if (options.some(([value]) => value === keep)) select.value = keep;
  }

  function fillVersions(select, model) {
    if (!model) return fillSelect(select, []);
    const options = [["", `default (v${model.default_version})`]];
    for (const [label, version] of Object.entries(model.labels || {})) options.push(["label:" + label, `${label} (v${version})`]);
    for (const v of model.versions) options.push(["v:" + v.version, `v${v.version} (${v.state})`]);
    fillSelect(select, options);
  }

  function versionFields(select) {
    const value = select.value;
    if (value.startsWith("label:")) return { version_label: value.slice(6) };
    if (value.startsWith("v:")) return { version: Number(value.slice(2)) };
    return {};
  }

  // -- live charts from /metrics --------------------------------------------------------
  function parseMetrics(text) {
    const out = [];
    for (const line of text.split("\n")) {
      if (!line || line[0] === "#") continue;
      const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/);
      if (!m) continue;
      const labels = {};
      for (const l of (m[2] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      }
      out.push({ name: m[1], labels, value: Number(m[3]) });
    }
    return out;
  }

  // Sum of the samples of ``name`` grouped by the labels ``by`` (joined with a space).
  function sumBy(samples, name, by) {
    const out = new Map();
    for (const s of samples) {
      if (s.name !== name) continue;
      const key = by.map((b) => s.labels[b]).join(" ");
      out.set(key, (out.get(key) || 0) + s.value);
    }
    return out;
  }

  function deltas(cur, prev) {
    const out = new Map();
    for (const [k, v] of cur) out.set(k, Math.max(0, v - (prev.get(k) || 0))); // a restart: counted from 0
    return out;
  }

  // histogram_quantile over the buckets' increase: linear within the bucket, as Prometheus does.
  function quantile(q, buckets) {
    const sorted = [...buckets].sort((a, b) => a[0] - b[0]);
    const total = sorted.length ? sorted[sorted.length - 1][1] : 0;
    if (!total) return null;
    const rank = q * total;
    let lower = 0, below = 0;
    for (const [le, count] of sorted) {
      if (count >= rank) {
        if (le === Infinity) return lower;
        return lower + (le - lower) * ((rank - below) / Math.max(count - below, 1e-12));
      }
      lower = le; below = count;
    }
    return lower;
  }

  function summarise(cur, prev, dt) {
    const models = new Set(state.models.map((m) => m.name));
    const charts = { rate: {}, latency: {}, batch: {}, queue: {} };
    const req = deltas(sumBy(cur, "classifier_requests_total", ["outcome"]), sumBy(prev, "classifier_requests_total", ["outcome"]));
    for (const [outcome, n] of req) charts.rate[outcome] = n / dt;
    const hist = deltas(sumBy(cur, "classifier_request_duration_seconds_bucket", ["model", "le"]),
      sumBy(prev, "classifier_request_duration_seconds_bucket", ["model", "le"]));
    const byModel = new Map();
    for (const [key, n] of hist) {
      const [model, le] = key.split(" ");
      if (!models.has(model)) continue;
      if (!byModel.has(model)) byModel.set(model, []);
      byModel.get(model).push([le === "+Inf" ? Infinity : Number(le), n]);
    }
    for (const [model, buckets] of byModel) {
      const p50 = quantile(0.5, buckets), p99 = quantile(0.99, buckets);
      charts.latency[model + " p50"] = p50 === null ? null : p50 * 1000;
      charts.latency[model + " p99"] = p99 === null ? null : p99 * 1000;
    }
    const sums = deltas(sumBy(cur, "classifier_batch_rows_sum", ["model"]), sumBy(prev, "classifier_batch_rows_sum", ["model"]));
    const counts = deltas(sumBy(cur, "classifier_batch_rows_count", ["model"]), sumBy(prev, "classifier_batch_rows_count", ["model"]));
    for (const [model, n] of counts) charts.batch[model] = n ? sums.get(model) / n : null;
    for (const [model, v] of sumBy(cur, "classifier_queue_rows", ["model"])) charts.queue[model] = v;
    return charts;
  }

  function readiness(samples) {
    const get = (name) => (samples.find((s) => s.name === name) || {}).value;
    const badge = $("#readiness");
    const draining = get("classifier_draining") === 1, ready = get("classifier_ready") === 1;
    badge.dataset.state = draining ? "draining" : ready ? "ready" : "not-ready";
    badge.textContent = draining ? "draining" : ready ? "ready" : "not ready";
  }

  async function poll() {
    if (state.needsKey && !state.key) return;
    if (++state.polls % MODELS_EVERY === 0) {
      loadModels().catch((e) => e.status !== 401 && show("models: " + e.message, "error"));
    }
    let samples;
    try {
      samples = parseMetrics(await api("/metrics"));
    } catch (e) {
      if (e.status !== 401) show("metrics: " + e.message, "error");
      return;
    }
    const now = performance.now() / 1000;
    readiness(samples);
    if (state.prev) {
      state.history.push({ t: now, charts: summarise(samples, state.prev.samples, now - state.prev.t) });
      if (state.history.length > HISTORY) state.history.shift();
      for (const name of ["rate", "latency", "batch", "queue"]) drawChart(name);
      $("#live-updated").textContent = "updated " + new Date().toLocaleTimeString();
    }
    state.prev = { t: now, samples };
  }

  function drawChart(name) {
    const canvas = $("#chart-" + name), ctx = canvas.getContext("2d");
    const W = canvas.width, H = canvas.height, L = 44, R = 8, T = 8, B = 20;
    const names = [...new Set(state.history.flatMap((p) => Object.keys(p.charts[name])))].sort();
    let max = 0;
    for (const p of state.history) for (const v of Object.values(p.charts[name])) if (v !== null && v > max) max = v;
    max = max > 0 ? max * 1.15 : 1;
    ctx.clearRect(0, 0, W, H);
    ctx.font = "11px system-ui, sans-serif";
    ctx.strokeStyle = "#e5e7eb"; ctx.fillStyle = "#667085"; ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = T + (H - T - B) * (1 - i / 4);
      ctx.beginPath(); ctx.moveTo(L, y); ctx.lineTo(W - R, y); ctx.stroke();
      const v = (max * i) / 4;
      ctx.fillText(v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2), 2, y + 4);
    }
    // The x axis spans the points there are (at least 30 s), up to HISTORY of them.
    const t1 = state.history[state.history.length - 1].t, span = Math.max(30, t1 - state.history[0].t);
    ctx.fillText(`-${Math.round(span)} s`, L, H - 4);
    ctx.fillText("now", W - R - 20, H - 4);
    const x = (t) => L + (W - L - R) * (1 - (t1 - t) / span), y = (v) => T + (H - T - B) * (1 - v / max);
    const legend = $("#legend-" + name);
    legend.replaceChildren();
    names.forEach((series, i) => {
      const color = COLORS[i % COLORS.length];
      ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.beginPath();
      let drawing = false;
      for (const p of state.history) {
        const v = p.charts[name][series];
        if (v === undefined || v === null) { drawing = false; continue; }
        if (drawing) ctx.lineTo(x(p.t), y(v)); else ctx.moveTo(x(p.t), y(v));
        drawing = true;
      }
      ctx.stroke();
      const last = state.history[state.history.length - 1].charts[name][series];
      const swatch = el("i"); swatch.style.background = color;
      legend.append(el("span", {}, swatch, `${series} ${last === undefined || last === null ? "–" : last.toFixed(last >= 100 ? 0 : 2)}`));
    });
    if (!names.length) ctx.fillText("no data yet", L + 8, T + 16);
    canvas.dataset.points = state.history.length;
    canvas.dataset.series = names.join(",");
  }

  // -- try sentiment ----------------------------------------------------------------------
  function bars(container, labels, probabilities, best) {
    container.replaceChildren();
    labels.forEach((label, i) => {
      const p = probabilities[i], fill = el("span");
      fill.style.width = (100 * p).toFixed(1) + "%";
      container.append(el("span", {}, label), el("div", { class: "bar" + (label === best ? " best" : ""), dataset: { label } }, fill),
        el("span", { class: "muted" }, p.toFixed(3)));
    });
  }

  function slotElements(slots) {
    return slots.map((s) => el("span", { class: "slot " + s.kind, title: `id ${s.id} (${s.kind})`, dataset: { kind: s.kind, id: s.id } }, s.token));
  }

  async function classifyText(event) {
    event.preventDefault();
    const text = $("#sentiment-text").value;
    const whole = $("#sentiment-whole").checked;
    const body = { texts: [text], model: $("#sentiment-model").value, explain: true, whole_text: whole,
      ...versionFields($("#sentiment-version")) };
    try {
      const r = await api("/v1/sentiment:predict", body);
      const p = r.predictions[0];
      show("");
      $("#sentiment-label").textContent = p.label;
      $("#sentiment-score").textContent = p.score.toFixed(3);
      $("#sentiment-model-used").textContent = `${r.model.name} v${r.model.version} · ${p.tokens} tokens, ${p.unknown_tokens} unknown`;
      const labels = Object.keys(p.probabilities);
      bars($("#sentiment-bars"), labels, labels.map((l) => p.probabilities[l]), p.label);
      $("#sentiment-slots").replaceChildren(...slotElements(p.explanation.slots));
      const windows = p.explanation.windows || [];
      const rows = $("#sentiment-windows tbody");
      rows.replaceChildren(...windows.map((w, i) => el("tr", {}, el("td", {}, i + 1), el("td", {}, w.label),
        el("td", {}, (w.probabilities.positive ?? Object.values(w.probabilities)[1]).toFixed(3)),
        el("td", {}, ...slotElements(w.slots.filter((s) => s.kind !== "pad"))))));
      $("#sentiment-windows").hidden = !whole;
      $("#sentiment-result").hidden = false;
    } catch (e) {
      show(`${e.code || "error"}: ${e.message}`, "error");
    }
  }

  // -- try digits --------------------------------------------------------------------------
  function setUpPad() {
    const pad = $("#digit-pad"), ctx = pad.getContext("2d");
    const clear = () => { ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, pad.width, pad.height); };
    clear();
    let drawing = false, drawn = false;
    const at = (e) => {
      const box = pad.getBoundingClientRect();
      return [(e.clientX - box.left) * (pad.width / box.width), (e.clientY - box.top) * (pad.height / box.height)];
    };
    pad.addEventListener("pointerdown", (e) => {
      drawing = true; drawn = true;
      pad.setPointerCapture(e.pointerId);
      ctx.strokeStyle = "#000"; ctx.lineWidth = 18; ctx.lineCap = "round"; ctx.lineJoin = "round";
      ctx.beginPath(); ctx.moveTo(...at(e)); ctx.lineTo(...at(e)); ctx.stroke();
    });
    pad.addEventListener("pointermove", (e) => {
      if (!drawing) return;
      ctx.lineTo(...at(e)); ctx.stroke();
    });
    const end = () => {
      if (!drawing) return;
      drawing = false;
      if (drawn) classifyDigit(pad);
    };
    pad.addEventListener("pointerup", end);
    pad.addEventListener("pointercancel", end);
    $("#digit-clear").addEventListener("click", () => { clear(); drawn = false; $("#digit-result").hidden = true; });
  }

  async function classifyDigit(pad) {
    const b64 = pad.toDataURL("image/png").split(",")[1];
    try {
      const r = await api("/v1/digits:predict", { images_b64: [b64], explain: true, ...versionFields($("#digits-version")) });
      const p = r.predictions[0];
      show("");
      $("#digit-label").textContent = p.label;
      $("#digit-score").textContent = p.score.toFixed(3);
      $("#digit-model-used").textContent = `${r.model.name} v${r.model.version}`;
      bars($("#digit-bars"), p.probabilities.map((_, i) => String(i)), p.probabilities, String(p.label));
      const seen = $("#digit-seen").getContext("2d"), img = seen.createImageData(28, 28);
      p.image.flat().forEach((v, i) => {
        const g = Math.max(0, Math.min(255, Math.round(v)));
        img.data.set([g, g, g, 255], i * 4);
      });
      seen.putImageData(img, 0, 0);
      $("#digit-result").hidden = false;
    } catch (e) {
      show(`${e.code || "error"}: ${e.message}`, "error");
    }
  }

  // -- start -------------------------------------------------------------------------------
  async function begin() {
    try {
      await loadModels();
    } catch (e) {
      if (e.status !== 401) show("models: " + e.message, "error");
      return;
    }
    show("");
    $("#key-form").hidden = !state.needsKey;
    if (!state.timer) {
      poll();
      state.timer = setInterval(poll, POLL_MS);
    }
  }

  async function start() {
    $("#key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      state.key = $("#api-key").value.trim();
      sessionStorage.setItem(KEY_STORE, state.key);
      begin();
    });
    $("#forget-key").addEventListener("click", () => {
      state.key = "";
      sessionStorage.removeItem(KEY_STORE);
      $("#api-key").value = "";
      askForKey("Key forgotten.");
    });
    $("#sentiment-form").addEventListener("submit", classifyText);
    $("#sentiment-model").addEventListener("change", () =>
      fillVersions($("#sentiment-version"), state.models.find((m) => m.name === $("#sentiment-model").value)));
    setUpPad();
    const config = await api("/console/config.json");
    state.needsKey = config.api_keys;
    if (state.needsKey && !state.key) return askForKey("This gateway needs an API key: type one above.");
    begin();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
