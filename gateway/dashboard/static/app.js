// medge dashboard: devices and live results, from /api/* and the /api/stream event source.
// All data goes into the page as text (textContent), never as HTML.
"use strict";

(() => {
  const MAX_ROWS = 200;
  const RETRY_MS = 3000;
  const DASH = "—";

  const state = {
    skew: 0,          // server clock minus ours, seconds
    lastId: 0,        // newest result id shown or seen
    shown: new Set(), // result ids in the feed
    queue: [],        // results waiting to be drawn
    flushTimer: null,
    source: null,
    stored: null,     // results stored, all devices together
    live: false,      // true once the first load is drawn: later rows are highlighted
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, opts = {}, children = []) {
    const node = document.createElement(tag);
    if (opts.cls) node.className = opts.cls;
    if (opts.text !== undefined && opts.text !== null) node.textContent = String(opts.text);
    if (opts.title) node.title = opts.title;
    if (opts.colSpan) node.colSpan = opts.colSpan;
    if (opts.data) for (const [k, v] of Object.entries(opts.data)) node.dataset[k] = String(v);
    for (const child of children) node.append(child);
    return node;
  }

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const fixed = (v, digits) => (isNum(v) ? v.toFixed(digits) : DASH);
  const now = () => Date.now() / 1000 + state.skew;

  function ago(t) {
    if (!isNum(t)) return "never";
    const s = Math.max(0, now() - t);
    if (s < 60) return `${Math.floor(s)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  const stamp = (t) => (isNum(t) ? new Date(t * 1000).toLocaleString() : "");
  const clockTime = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });

  function noteServerTime(response) {
    const t = parseFloat(response.headers.get("X-Server-Time"));
    if (Number.isFinite(t)) state.skew = t - Date.now() / 1000;
  }

  // -- devices ---------------------------------------------------------------------------
  function deviceRow(d) {
    const t = d.telemetry || {};
    const total = (t.latency_ms && t.latency_ms.total) || {};
    const st = d.state === "online" || d.state === "offline" ? d.state : "unknown";
    const badge = el("span", {
      cls: `state state-${st}`, text: st,
      title: isNum(d.state_since) ? `${st} since ${stamp(d.state_since)}` : "",
    });
    const num = (cls, text, extra = "") => el("td", { cls: `num ${cls} ${extra}`.trim(), text });
    const dup = d.duplicates || 0;
    const outbox = t.outbox_depth;
    return el("tr", { data: { device: `${d.site}/${d.device}`, state: st } }, [
      el("td", { cls: "site", text: d.site }),
      el("td", { cls: "device", text: d.device }),
      el("td", {}, [badge]),
      el("td", { cls: "bundle", text: d.bundle || DASH, title: d.bundle || "" }),
      num("stored", d.stored ?? 0),
      num("duplicates", dup, dup > 0 ? "warn" : ""),
      num("fps", fixed(t.fps, 1)),
      num("latency", fixed(total.p50, 2)),
      num("cpu", fixed(t.cpu_percent, 1)),
      num("memory", fixed(t.rss_mb, 0)),
      num("temperature", fixed(t.temperature_c, 1)),
      num("outbox", isNum(outbox) ? outbox : DASH, isNum(outbox) && outbox > 0 ? "warn" : ""),
      el("td", { cls: "seen" }, [
        el("span", { cls: "ago", text: ago(d.last_seen), title: stamp(d.last_seen),
          data: { t: isNum(d.last_seen) ? d.last_seen : "" } }),
      ]),
    ]);
  }

  function renderDevices(list) {
    const body = $("devices-body");
    if (!list.length) {
      body.replaceChildren(el("tr", { cls: "placeholder" }, [
        el("td", { text: "No devices have reported yet.", colSpan: 13 }),
      ]));
    } else {
      body.replaceChildren(...list.map(deviceRow));
    }
    const online = list.filter((d) => d.state === "online").length;
    const stored = list.reduce((sum, d) => sum + (d.stored || 0), 0);
    $("devices-summary").textContent =
      `${list.length} device${list.length === 1 ? "" : "s"} · ${online} online`;
    state.stored = stored;
    updateCounter();
  }

  // -- results ---------------------------------------------------------------------------
  function resultRow(r) {
    const hasPred = r.pred !== null && r.pred !== undefined;
    const hasLabel = r.label !== null && r.label !== undefined;
    const predText = r.pred_label ?? (hasPred ? `class ${r.pred}` : r.kind);
    const pred = el("td", { cls: "pred" }, [el("span", { cls: "pred-label", text: predText })]);
    if (isNum(r.score)) {
      pred.append(" ", el("span", { cls: "score", text: `${(r.score * 100).toFixed(1)}%` }));
    }
    const truth = r.label_name ?? (hasLabel ? `class ${r.label}` : DASH);
    let mark = el("td", { cls: "check", text: DASH });
    let verdict = "unlabelled";
    if (hasPred && hasLabel) {
      verdict = r.pred === r.label ? "correct" : "wrong";
      mark = el("td", { cls: "check" }, [
        el("span", { cls: `mark mark-${verdict}`,
          text: verdict === "correct" ? "✓ correct" : "✗ wrong" }),
      ]);
    }
    return el("tr", { cls: `result ${verdict}`, data: { id: r.id, verdict } }, [
      el("td", { cls: "time", text: clockTime(r.time), title: stamp(r.time) }),
      el("td", { cls: "device", text: `${r.site}/${r.device}` }),
      el("td", { cls: "input", text: r.input || DASH, title: r.input || "" }),
      pred,
      el("td", { cls: "truth", text: truth }),
      mark,
    ]);
  }

  function queueResults(rows) {
    state.queue.push(...rows);
    if (state.flushTimer === null) state.flushTimer = setTimeout(flushResults, 30);
  }

  function flushResults() {
    state.flushTimer = null;
    const rows = state.queue.splice(0).sort((a, b) => a.id - b.id).slice(-MAX_ROWS);
    const body = $("results-body");
    const fresh = document.createDocumentFragment();
    for (const r of rows) {
      if (state.shown.has(r.id)) continue;
      state.shown.add(r.id);
      state.lastId = Math.max(state.lastId, r.id);
      const row = resultRow(r);
      if (state.live) row.classList.add("new");
      fresh.prepend(row);
    }
    body.prepend(fresh);
    while (body.children.length > MAX_ROWS) {
      state.shown.delete(Number(body.lastElementChild.dataset.id));
      body.lastElementChild.remove();
    }
    updateCounter();
  }

  function updateCounter() {
    const rows = $("results-body").children;
    const n = rows.length;
    let labelled = 0;
    let correct = 0;
    for (const row of rows) {
      if (row.dataset.verdict === "correct") { labelled++; correct++; }
      else if (row.dataset.verdict === "wrong") labelled++;
    }
    const of = isNum(state.stored) && state.stored > n ? ` of ${state.stored} stored` : "";
    $("result-count").textContent = `${n} shown${of}`;
    $("accuracy").textContent = labelled
      ? ` · ${((100 * correct) / labelled).toFixed(1)}% correct (${labelled} labelled)` : "";
    $("results-empty").hidden = n > 0;
  }

  // -- live updates ----------------------------------------------------------------------
  function setConnection(kind, text) {
    const node = $("connection");
    node.className = `conn conn-${kind}`;
    node.textContent = text;
  }

  function connect() {
    const source = new EventSource(`api/stream?after=${state.lastId}`);
    state.source = source;
    source.addEventListener("open", () => setConnection("live", "live"));
    source.addEventListener("devices", (e) => renderDevices(JSON.parse(e.data)));
    source.addEventListener("result", (e) => queueResults([JSON.parse(e.data)]));
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (e.g. the server answered with an error): start again.
        setConnection("down", "disconnected");
        setTimeout(connect, RETRY_MS);
      } else {
        setConnection("connecting", "reconnecting…");
      }
    });
  }

  async function load() {
    try {
      const [devices, results] = await Promise.all([
        fetch("api/devices", { cache: "no-store" }),
        fetch(`api/results?limit=${MAX_ROWS}`, { cache: "no-store" }),
      ]);
      if (!devices.ok || !results.ok) throw new Error(`HTTP ${devices.status}/${results.status}`);
      noteServerTime(devices);
      renderDevices(await devices.json());
      queueResults(await results.json());
      flushResults();
    } catch (err) {
      setConnection("down", "gateway unreachable");
      setTimeout(load, RETRY_MS);
      return;
    }
    state.live = true;
    connect();
  }

  function tick() {
    $("clock").textContent = clockTime(now());
    for (const node of document.querySelectorAll(".ago")) {
      const t = parseFloat(node.dataset.t);
      node.textContent = ago(Number.isFinite(t) ? t : null);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    tick();
    setInterval(tick, 1000);
    load();
  });
})();
