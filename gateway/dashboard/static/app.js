// medge dashboard: alerts, devices, charts and live results, from /api/* and the /api/stream
// event source. All data goes into the page as text (textContent), never as HTML.
"use strict";

(() => {
  const MAX_ROWS = 200;
  const RETRY_MS = 3000;
  const CHART_MS = 5000;    // how often the charts are read again
  const CHART_MIN = 60;     // the charts' window, minutes
  const { DASH, $, isNum, clockTime, el, svgEl } = window.medgeDom;

  const state = {
    skew: 0,          // server clock minus ours, seconds
    lastId: 0,        // newest result id shown or seen
    shown: new Set(), // result ids in the feed
    queue: [],        // results waiting to be drawn
    flushTimer: null,
    source: null,
    stored: null,     // results stored, all devices together
    live: false,      // true once the first load is drawn: later rows are highlighted
    baseTitle: "",    // the page's title without the open-alert count
    chartTimer: null,
    chartKeys: "",    // the devices the charts were drawn for
  };

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

  function noteServerTime(response) {
    const t = parseFloat(response.headers.get("X-Server-Time"));
    if (Number.isFinite(t)) state.skew = t - Date.now() / 1000;
  }

  // A 401 means the session ended (logout elsewhere, expiry, server restart): sign in again.
  function checkSession(response) {
    if (response.status === 401) {
      window.location.assign("login");
      throw new Error("signed out");
    }
    return response;
  }

  // What a failed API call said: the server's one-line {"error": ...}, else the HTTP status.
  async function failure(response) {
    try {
      const body = await response.json();
      if (body && typeof body.error === "string") return body.error;
    } catch (err) {
      // not JSON: the status says it
    }
    return `HTTP ${response.status}`;
  }

  // A section whose data could not be read says so: never an empty-looking table.
  function showError(section, message) {
    const node = $(`${section}-error`);
    node.textContent = message ? `Could not load ${section}: ${message}` : "";
    node.hidden = !message;
    if (message && $(`${section}-empty`)) $(`${section}-empty`).hidden = true;
  }

  // -- alerts ----------------------------------------------------------------------------
  function alertState(a) {
    if (a.state === "acknowledged") {
      return `acknowledged by ${a.acked_by || "?"} ${isNum(a.acked_at) ? clockTime(a.acked_at) : ""}`;
    }
    if (a.state === "resolved") {
      const by = a.acked_by ? ` (ack. ${a.acked_by})` : "";
      return `resolved ${isNum(a.resolved_at) ? clockTime(a.resolved_at) : ""}${by}`;
    }
    return "open";
  }

  function alertRow(a) {
    if (a.error) {  // one alert the server could not send: shown as such, never dropped
      return el("tr", { cls: "alert alert-unreadable", data: { alertId: a.id ?? "" } }, [
        el("td", { cls: "row-error", text: `alert ${a.id ?? "?"}: ${a.error}`, colSpan: 7 }),
      ]);
    }
    const action = el("td", { cls: "action" });
    if (a.state === "open") {
      const button = el("button", { cls: "ack", text: "Acknowledge" });
      button.type = "button";
      button.addEventListener("click", () => acknowledge(a.id, button));
      action.append(button);
    }
    return el("tr", {
      cls: `alert alert-${a.state} sev-${a.severity}`,
      data: { alertId: a.id, state: a.state, severity: a.severity, rule: a.rule },
    }, [
      el("td", {}, [el("span", { cls: `sev sev-badge-${a.severity}`, text: a.severity })]),
      el("td", { cls: "message", text: a.message }),
      el("td", { cls: "device", text: `${a.site}/${a.device}` }),
      el("td", { cls: "since" }, [
        el("span", { cls: "ago", text: ago(a.opened), title: stamp(a.opened),
          data: { t: isNum(a.opened) ? a.opened : "" } }),
      ]),
      el("td", { cls: "num count", text: a.count ?? 1 }),
      el("td", { cls: "alert-state", text: alertState(a) }),
      action,
    ]);
  }

  function renderAlerts(list) {
    showError("alerts", "");
    $("alerts-body").replaceChildren(...list.map(alertRow));
    $("alerts-empty").hidden = list.length > 0;
    const open = list.filter((a) => a.state === "open");
    const critical = open.filter((a) => a.severity === "critical").length;
    const acked = list.filter((a) => a.state === "acknowledged").length;
    $("alerts-summary").textContent =
      `${open.length} open${critical ? ` (${critical} critical)` : ""} · ${acked} acknowledged`;
    document.title = `${open.length ? `(${open.length}) ` : ""}${state.baseTitle}`;
  }

  async function acknowledge(id, button) {
    button.disabled = true;
    try {
      const response = checkSession(await fetch(`api/alerts/${id}/ack`, {
        method: "POST", cache: "no-store", headers: { "Content-Type": "application/json" },
      }));
      if (!response.ok && response.status !== 409) throw new Error(await failure(response));
      const alerts = checkSession(await fetch("api/alerts", { cache: "no-store" }));
      if (alerts.ok) renderAlerts(await alerts.json());
      else showError("alerts", await failure(alerts));
    } catch (err) {
      button.disabled = false;
      button.title = `Not acknowledged: ${err.message}`;
    }
  }

  // -- charts ----------------------------------------------------------------------------
  // One small chart: a line (points of [time, value]) or bars (one per minute).
  function chart(kind, label, points, since, until, digits) {
    const W = 300; const H = 96; const L = 40; const R = 6; const T = 8; const B = 16;
    const values = points.map((p) => p[1]).filter(isNum);
    const top = Math.max(...values, 0) * 1.15 || 1;
    const x = (t) => L + ((t - since) / Math.max(until - since, 1)) * (W - L - R);
    const y = (v) => T + (1 - v / top) * (H - T - B);
    const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: `chart chart-${kind}`,
      role: "img", "aria-label": label, "data-points": values.length });
    svg.append(
      svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }),
      svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }),
      svgEl("text", { x: L - 4, y: T + 8, class: "tick", "text-anchor": "end" },
        top.toFixed(digits)),
      svgEl("text", { x: L - 4, y: H - B, class: "tick", "text-anchor": "end" }, "0"),
      svgEl("text", { x: L, y: H - 3, class: "tick" }, `-${CHART_MIN} min`),
      svgEl("text", { x: W - R, y: H - 3, class: "tick", "text-anchor": "end" }, "now"),
    );
    if (!values.length) {
      svg.append(svgEl("text", { x: (L + W) / 2, y: H / 2, class: "nodata",
        "text-anchor": "middle" }, "no data yet"));
    } else if (kind === "bars") {
      const width = Math.max(((W - L - R) / CHART_MIN) - 1, 1);
      for (const [t, v] of points) {
        svg.append(svgEl("rect", { x: x(t), y: y(v), width, height: H - B - y(v),
          class: "bar" }, null));
      }
    } else {
      const drawn = points.filter((p) => isNum(p[1]));
      const coords = drawn.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
      const [lt, lv] = drawn[drawn.length - 1];
      svg.append(svgEl("polyline", { points: coords, class: "line" }),
        svgEl("circle", { cx: x(lt).toFixed(1), cy: y(lv).toFixed(1), r: 2.5, class: "dot" }));
    }
    const last = values.length ? values[values.length - 1].toFixed(digits) : DASH;
    return el("figure", { cls: `chart-box chart-${label.split(" ")[0].toLowerCase()}` }, [
      el("figcaption", {}, [el("span", { text: label }), el("strong", { text: last })]),
      svg,
    ]);
  }

  function renderCharts(history) {
    const box = $("charts");
    const names = Object.keys(history.devices).sort();
    $("charts-empty").hidden = names.length > 0;
    const cards = names.map((name) => {
      const h = history.devices[name];
      const tel = h.telemetry;
      const perMin = h.results_per_minute.map((r) => [r.minute, r.count]);
      return el("div", { cls: "device-charts", data: { device: name } }, [
        el("h3", { text: name }),
        el("div", { cls: "chart-row" }, [
          chart("line", "FPS", tel.map((p) => [p.time, p.fps]), history.since, history.now, 1),
          chart("line", "Latency p50 (ms)", tel.map((p) => [p.time, p.latency_p50]),
            history.since, history.now, 2),
          chart("bars", "Results per minute", perMin, history.since, history.now, 0),
        ]),
      ]);
    });
    box.replaceChildren($("charts-empty"), ...cards);
  }

  function scheduleCharts(delay) {
    if (state.chartTimer !== null) clearTimeout(state.chartTimer);
    state.chartTimer = setTimeout(loadCharts, delay);
  }

  async function loadCharts() {
    state.chartTimer = null;
    try {
      const response = checkSession(
        await fetch(`api/history?minutes=${CHART_MIN}`, { cache: "no-store" }));
      if (response.ok) {
        const history = await response.json();
        state.chartKeys = Object.keys(history.devices).sort().join(" ");
        showError("charts", "");
        renderCharts(history);
      } else {
        showError("charts", await failure(response));  // the next round tries again
      }
    } catch (err) {
      showError("charts", err.message);  // the next round tries again
    }
    if (state.chartTimer === null) scheduleCharts(CHART_MS);
  }

  // -- devices ---------------------------------------------------------------------------
  function deviceRow(d) {
    if (d.error && !d.state) {  // a row the server could not send at all
      return el("tr", { cls: "device-unreadable", data: { device: `${d.site}/${d.device}` } }, [
        el("td", { cls: "site", text: d.site }),
        el("td", { cls: "device", text: d.device }),
        el("td", { cls: "row-error", text: d.error, colSpan: 12 }),
      ]);
    }
    const t = d.telemetry && typeof d.telemetry === "object" ? d.telemetry : {};
    const total = (t.latency_ms && t.latency_ms.total) || {};
    const st = ["online", "offline", "stopped"].includes(d.state) ? d.state : "unknown";
    const badge = el("span", {
      cls: `state state-${st}`, text: st,
      title: isNum(d.state_since) ? `${st} since ${stamp(d.state_since)}` : "",
    });
    const num = (cls, text, extra = "") => el("td", { cls: `num ${cls} ${extra}`.trim(), text });
    const dup = d.duplicates || 0;
    const outbox = t.outbox_depth;
    const marker = d.error ? [" ", el("span", { cls: "row-error", text: `⚠ ${d.error}` })] : [];
    return el("tr", { data: { device: `${d.site}/${d.device}`, state: st } }, [
      el("td", { cls: "site", text: d.site }),
      el("td", { cls: "device", text: d.device }),
      el("td", {}, [badge, ...marker]),
      el("td", { cls: "bundle", text: d.bundle || DASH, title: d.bundle || "" }),
      num("stored", d.stored ?? 0),
      num("duplicates", dup, dup > 0 ? "warn" : ""),
      num("fps", fixed(t.fps, 1)),
      num("latency", fixed(total.p50, 2)),
      num("cpu", fixed(t.cpu_percent, 1)),
      num("memory", fixed(t.rss_mb, 0)),
      num("temperature", fixed(t.temperature_c, 1)),
      num("outbox", isNum(outbox) ? outbox : DASH, isNum(outbox) && outbox > 0 ? "warn" : ""),
      checksCell(t),
      el("td", { cls: "seen" }, [
        el("span", { cls: "ago", text: ago(d.last_seen), title: stamp(d.last_seen),
          data: { t: isNum(d.last_seen) ? d.last_seen : "" } }),
      ]),
    ]);
  }

  // What the device's latest telemetry says about its model: the input checks (drift and
  // signal quality: which are in warning), a shadow run's agreement with the current model,
  // and the float check's agreement of the quantized model with its fp32 twin.
  const obj = (v) => (v && typeof v === "object" && !Array.isArray(v) ? v : null);
  const agreementText = (part) => (isNum(part.agreement) ? part.agreement.toFixed(3) : DASH);

  function checksCell(t) {
    const cell = el("td", { cls: "checks" });
    const inputs = obj(t.inputs);
    if (inputs && inputs.watched === false) {  // the bundle has no reference, or watching is off
      cell.append(el("div", { cls: "check-line" }, [
        el("span", {
          cls: "check-badge inputs check-off",
          text: "inputs not watched",
          title: typeof inputs.why === "string" ? inputs.why : "inputs not watched",
        }),
      ]));
    } else if (inputs) {
      const states = obj(inputs.state) || {};
      const warned = Object.keys(states).filter((k) => states[k] === "warning").sort();
      const count = isNum(inputs.warning) ? inputs.warning : warned.length;
      const bad = count > 0 || warned.length > 0;
      cell.append(el("div", { cls: "check-line" }, [
        el("span", {
          cls: `check-badge inputs ${bad ? "check-warn" : "check-ok"}`,
          text: bad ? `⚠ inputs: ${warned.join(", ") || `${count} warning`}` : "inputs ok",
          title: "input drift and signal quality (telemetry inputs)",
          data: { warning: count },
        }),
      ]));
    }
    const shadow = obj(t.shadow);
    if (shadow) {
      const samples = isNum(shadow.samples) ? shadow.samples : 0;
      const bundle = typeof shadow.bundle === "string" ? shadow.bundle : "";
      cell.append(el("div", { cls: "check-line shadow", title: bundle ? `candidate ${bundle}` : "" }, [
        el("span", { cls: "shadow-agreement", text: `shadow ${agreementText(shadow)} (n=${samples})` }),
        el("span", { cls: "shadow-bundle", text: bundle, title: bundle }),
      ]));
    }
    const float = obj(t.float_check);
    if (float) {
      const samples = isNum(float.samples) ? float.samples : 0;
      cell.append(el("div", { cls: "check-line float-check",
        text: `float check ${agreementText(float)} (n=${samples})`,
        title: "agreement of the quantized model with its float (fp32) artifact" }));
    }
    if (!cell.childNodes.length) cell.textContent = DASH;
    return cell;
  }

  function renderDevices(list) {
    showError("devices", "");
    const body = $("devices-body");
    if (!list.length) {
      body.replaceChildren(el("tr", { cls: "placeholder" }, [
        el("td", { text: "No devices have reported yet.", colSpan: 14 }),
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
    const keys = list.map((d) => `${d.site}/${d.device}`).sort().join(" ");
    if (keys !== state.chartKeys) scheduleCharts(100);  // a new device: its charts now
  }

  // -- results ---------------------------------------------------------------------------
  function resultRow(r) {
    if (r.error) {  // a row the server could not send: said in its place
      return el("tr", { cls: "result unreadable", data: { id: r.id, verdict: "unlabelled" } }, [
        el("td", { cls: "device", text: `${r.site}/${r.device}` }),
        el("td", { cls: "row-error", text: r.error, colSpan: 6 }),
      ]);
    }
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
    const row = el("tr", { cls: `result ${verdict}`, data: { id: r.id, verdict } }, [
      el("td", { cls: "time", text: clockTime(r.time), title: stamp(r.time) }),
      el("td", { cls: "device", text: `${r.site}/${r.device}` }),
      el("td", { cls: "input", text: r.input || DASH, title: r.input || "" }),
      camCell(r.cam),
      pred,
      el("td", { cls: "truth", text: truth }),
      mark,
    ]);
    row.tabIndex = 0;  // detail.js opens its detail panel (click, Enter or Space)
    row.setAttribute("aria-haspopup", "dialog");
    return row;
  }

  // The class activation map a device sent with a result, as a small image. The server has
  // checked it is a small PNG; only plain base64 goes into the data: URL, set as a property.
  const B64 = /^[A-Za-z0-9+/]+={0,2}$/;
  function camCell(cam) {
    const cell = el("td", { cls: "cam" });
    if (!cam || typeof cam.png !== "string" || !B64.test(cam.png) || cam.png.length > 22000) {
      cell.textContent = DASH;
      return cell;
    }
    const label = typeof cam.label === "string" && cam.label ? cam.label : "predicted class";
    const img = document.createElement("img");
    img.className = "cam-thumb";
    img.alt = `Class activation map: ${label}`;
    img.title = `Where the model looked for "${label}"`;
    img.width = 48;
    img.height = 48;
    img.decoding = "async";
    img.src = `data:image/png;base64,${cam.png}`;
    cell.append(img);
    return cell;
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
    $("results-empty").hidden = n > 0 || !$("results-error").hidden;
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
    source.addEventListener("alerts", (e) => renderAlerts(JSON.parse(e.data)));
    source.addEventListener("result", (e) => queueResults([JSON.parse(e.data)]));
    source.addEventListener("devices-error", (e) => showError("devices", JSON.parse(e.data).error));
    source.addEventListener("alerts-error", (e) => showError("alerts", JSON.parse(e.data).error));
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (e.g. the server answered with an error): start again,
        // unless the session ended.
        setConnection("down", "disconnected");
        fetch("api/me", { cache: "no-store" }).then(checkSession).catch(() => {});
        setTimeout(connect, RETRY_MS);
      } else {
        setConnection("connecting", "reconnecting…");
      }
    });
  }

  // Each panel is loaded on its own: one failing API call shows its error where its data
  // would be, and never hides what the others returned (an open alert above all).
  async function load() {
    const panels = [
      ["alerts", "api/alerts", renderAlerts],
      ["devices", "api/devices", renderDevices],
      ["results", `api/results?limit=${MAX_ROWS}`, (rows) => { queueResults(rows); flushResults(); }],
    ];
    const outcomes = await Promise.all(panels.map(async ([name, url, render]) => {
      try {
        const response = checkSession(await fetch(url, { cache: "no-store" }));
        if (!response.ok) throw new Error(await failure(response));
        noteServerTime(response);
        render(await response.json());
        showError(name, "");
        return true;
      } catch (err) {
        if (err.message === "signed out") throw err;
        showError(name, err.message);
        return false;
      }
    })).catch(() => null);
    if (outcomes === null) return;  // signed out: the login page is loading
    if (!outcomes.every(Boolean)) {
      setConnection("down", "gateway error");
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
    state.baseTitle = document.title;
    tick();
    setInterval(tick, 1000);
    load();
    scheduleCharts(0);
  });
})();
