// medge dashboard: a result's detail panel (GET api/results/{id}) and its device's events of
// the last hour (GET api/events). A row of the live results opens it (click, Enter or Space);
// Escape, the Close button or a click outside closes it. All data goes into the page as text
// or as attributes set one by one, never as HTML; images only as data: URLs of plain base64.
"use strict";

(() => {
  const { DASH, $, isNum, clockTime, el, svgEl } = window.medgeDom;
  const B64 = /^[A-Za-z0-9+/]+={0,2}$/;
  const B64_MAX = 22000;     // the server allows a PNG of 16 KiB
  const BOX = 256;           // the image's longest side on screen, px
  const TIMELINE_MIN = 60;

  const state = { opener: null, token: 0 };
  const stamp = (t) => (isNum(t) ? new Date(t * 1000).toLocaleString() : DASH);
  const text = (v) => (typeof v === "string" && v ? v : null);

  function pngUrl(b64) {
    return typeof b64 === "string" && b64.length <= B64_MAX && B64.test(b64)
      ? `data:image/png;base64,${b64}` : null;
  }

  function image(cls, src, alt, width, height) {
    const img = document.createElement("img");
    img.className = cls;
    img.alt = alt;
    img.width = width;
    img.height = height;
    img.decoding = "async";
    img.src = src;  // a property: checked base64 of a PNG
    return img;
  }

  // -- the image: input thumbnail, CAM over it, the outline and the ellipse over both ------------
  function sizeOf(r, thumb) {
    if (thumb && isNum(r.thumbnail.width) && isNum(r.thumbnail.height)) {
      return [r.thumbnail.width, r.thumbnail.height];
    }
    if (r.mask) return [r.mask.size[1], r.mask.size[0]];
    return [1, 1];
  }

  function outline(r, width, height, blank) {
    const [mh, mw] = r.mask ? r.mask.size : [height, width];
    const svg = svgEl("svg", {
      class: "detail-outline", viewBox: `0 0 ${mw} ${mh}`, preserveAspectRatio: "none",
      role: "img", "aria-label": "Segmentation outline",
    });
    if (blank) svg.append(svgEl("rect", { x: 0, y: 0, width: mw, height: mh, class: "blank" }));
    const points = r.mask ? r.mask.contour.filter((p) => isNum(p[0]) && isNum(p[1])) : [];
    if (points.length >= 2) {  // vertices are pixels: through their centres
      svg.append(svgEl("polygon", {
        class: "contour", points: points.map(([x, y]) => `${x + 0.5},${y + 0.5}`).join(" "),
      }));
    }
    const e = r.ellipse;
    if (e && [...e.center, ...e.axes, e.angle].every(isNum)) {
      const cx = e.center[0] + 0.5;
      const cy = e.center[1] + 0.5;
      svg.append(svgEl("ellipse", {
        class: "fit-ellipse", cx, cy, rx: e.axes[0] / 2, ry: e.axes[1] / 2,
        transform: `rotate(${e.angle} ${cx} ${cy})`,
      }));
    }
    return svg;
  }

  function figure(r) {
    const thumb = r.thumbnail ? pngUrl(r.thumbnail.png) : null;
    const cam = r.cam ? pngUrl(r.cam.png) : null;
    if (!thumb && !cam && !r.mask && !r.ellipse) {
      return el("p", { cls: "muted detail-noimage", text: "No image with this result." });
    }
    const [w, h] = sizeOf(r, thumb);
    const k = BOX / Math.max(w, h, 1);
    const dw = Math.max(Math.round(w * k), 1);
    const dh = Math.max(Math.round(h * k), 1);
    const stack = el("div", { cls: "detail-image" });
    if (thumb) stack.append(image("detail-thumb", thumb, "Input image (thumbnail)", dw, dh));
    const camLabel = r.cam && text(r.cam.label) ? r.cam.label : "predicted class";
    if (cam) {
      stack.append(image(thumb ? "detail-cam overlay" : "detail-cam", cam,
        `Class activation map: ${camLabel}`, dw, dh));
    }
    if (r.mask || r.ellipse) {
      const svg = outline(r, w, h, !thumb && !cam);
      svg.setAttribute("width", dw);
      svg.setAttribute("height", dh);
      stack.append(svg);
    }
    const parts = [stack];
    if (cam && thumb) {  // the heatmap can be hidden to see the input
      const box = el("input");
      box.type = "checkbox";
      box.checked = true;
      box.id = "detail-cam-toggle";
      box.addEventListener("change", () => {
        stack.querySelector(".detail-cam").hidden = !box.checked;
      });
      const label = el("label", { cls: "detail-toggle" }, [box, ` Heatmap (${camLabel})`]);
      label.htmlFor = box.id;
      parts.push(label);
    }
    return el("figure", { cls: "detail-figure" }, parts);
  }

  // -- scores: a bar per class, the predicted, positive and true classes marked -----------------
  function scores(r) {
    const classes = Array.isArray(r.classes) ? r.classes : [];
    if (!classes.length) {
      return el("p", { cls: "muted", text: r.mask ? "" : "No class scores with this result." });
    }
    const positive = text(r.positive_label);
    const rows = classes.map((c) => {
      const name = text(c.name) ?? `class ${c.index}`;
      const marks = [];
      const predicted = c.index === r.pred;
      const isPositive = positive !== null && c.name === positive;
      if (predicted) marks.push(el("span", { cls: "badge badge-pred", text: "predicted" }));
      if (isPositive) marks.push(el("span", { cls: "badge badge-pos", text: "positive" }));
      if (c.index === r.label) marks.push(el("span", { cls: "badge badge-truth", text: "ground truth" }));
      const v = isNum(c.score) ? Math.min(Math.max(c.score, 0), 1) : 0;
      const bar = svgEl("svg", { class: "score-bar", viewBox: "0 0 100 10",
        preserveAspectRatio: "none", "aria-hidden": "true" });
      bar.append(svgEl("rect", { x: 0, y: 0, width: 100, height: 10, class: "track" }),
        svgEl("rect", { x: 0, y: 0, width: (v * 100).toFixed(2), height: 10, class: "fill" }));
      const cls = `class-row${predicted ? " predicted" : ""}${isPositive ? " positive" : ""}`;
      return el("tr", { cls, data: { index: c.index } }, [
        el("th", { cls: "class-name", text: name, title: name }),
        el("td", { cls: "class-bar" }, [bar]),
        el("td", { cls: "num class-score", text: isNum(c.score) ? `${(c.score * 100).toFixed(1)}%` : DASH }),
        el("td", { cls: "class-marks" }, marks),
      ]);
    });
    const table = el("table", { cls: "scores" }, [el("caption", { text: "Class scores" }),
      el("tbody", {}, rows)]);
    return table;
  }

  // -- facts -------------------------------------------------------------------------------
  function facts(r) {
    const model = r.model && typeof r.model === "object" ? r.model : {};
    const truth = r.label_name ?? (isNum(r.label) ? `class ${r.label}` : null);
    const pred = r.pred_label ?? (isNum(r.pred) ? `class ${r.pred}` : null);
    const items = [
      ["Model", model.name], ["Version", model.version], ["Bundle", r.bundle],
      ["Device", `${r.site}/${r.device}`], ["Seq", r.seq], ["Time", stamp(r.time)],
      ["Received", stamp(r.received)], ["Input", r.input], ["Prediction", pred],
      ["Ground truth", truth ?? "none given"],
      ["Latency", isNum(r.latency_ms) ? `${r.latency_ms.toFixed(2)} ms` : null],
      ["Input SHA-256", typeof r.input_sha256 === "string" ? r.input_sha256.slice(0, 16) : null],
    ];
    if (r.mask) {
      items.push(["Area", isNum(r.mask.area_frac) ? `${(r.mask.area_frac * 100).toFixed(1)}% of the image` : null],
        ["Components", r.mask.components]);
    }
    if (r.event && typeof r.event === "object") {
      const e = r.event;
      items.push(["Event", e.event], ["State", e.state],
        ["Duration", isNum(e.duration_s) ? `${e.duration_s.toFixed(1)} s` : null],
        ["Peak score", isNum(e.peak) ? e.peak.toFixed(3) : null]);
    }
    const dl = el("dl", { cls: "facts" });
    for (const [name, value] of items) {
      if (value === null || value === undefined || value === "") continue;
      const key = name.toLowerCase().replace(/[^a-z0-9]+/g, "-");
      dl.append(el("dt", { text: name }), el("dd", { text: value, data: { fact: key } }));
    }
    return dl;
  }

  // -- the device's events of the last hour ------------------------------------------------
  function duration(s) {
    if (s < 60) return `${s.toFixed(1)} s`;
    return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  }

  function timeline(data) {
    const box = $("detail-timeline");
    const events = Array.isArray(data.events) ? data.events : [];
    if (!events.length) {
      box.replaceChildren(el("p", { cls: "muted", text: "No events from this device in the last hour." }));
      return;
    }
    const W = 600; const H = 44; const L = 8; const R = 8; const Y = 10; const BAR = 14;
    const since = data.since; const until = data.now;
    const x = (t) => L + ((Math.min(Math.max(t, since), until) - since)
      / Math.max(until - since, 1)) * (W - L - R);
    const svg = svgEl("svg", { class: "timeline", viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": `Events in the last ${TIMELINE_MIN} minutes`, "data-events": events.length });
    svg.append(
      svgEl("line", { x1: L, y1: Y + BAR + 4, x2: W - R, y2: Y + BAR + 4, class: "axis" }),
      svgEl("text", { x: L, y: H - 2, class: "tick" }, `-${TIMELINE_MIN} min`),
      svgEl("text", { x: W - R, y: H - 2, class: "tick", "text-anchor": "end" }, "now"),
    );
    const list = el("ul", { cls: "event-list" });
    for (const e of events) {
      if (!isNum(e.time)) continue;
      const name = text(e.event) ?? "event";
      const ended = isNum(e.duration_s);
      const end = ended ? e.time + e.duration_s : until;
      const g = svgEl("g", { class: `tl-event${ended ? "" : " ongoing"}${e.alert ? " alerting" : ""}`,
        "data-event": name });
      const span = ended ? duration(e.duration_s) : "ongoing";
      g.append(
        svgEl("title", {}, `${name} at ${clockTime(e.time)} (${span})`),
        svgEl("rect", { x: x(e.time), y: Y, width: Math.max(x(end) - x(e.time), 2), height: BAR,
          class: "span" }),
        svgEl("line", { x1: x(e.time), y1: Y - 4, x2: x(e.time), y2: Y + BAR + 4, class: "start" }),
      );
      svg.append(g);
      const peak = isNum(e.peak) ? ` · peak ${e.peak.toFixed(2)}` : "";
      list.append(el("li", { cls: "event-item", data: { event: name } }, [
        el("strong", { text: name }), ` · ${clockTime(e.time)} · ${span}${peak}`,
      ]));
    }
    box.replaceChildren(svg, list);
  }

  // -- opening and closing -----------------------------------------------------------------
  async function fetchJson(url) {
    const response = await fetch(url, { cache: "no-store" });
    if (response.status === 401) {
      window.location.assign("login");
      throw new Error("signed out");
    }
    if (!response.ok) {
      let why = `HTTP ${response.status}`;
      try {
        const body = await response.json();
        if (body && typeof body.error === "string") why = body.error;
      } catch (err) {
        // not JSON: the status says it
      }
      throw new Error(why);
    }
    return response.json();
  }

  function render(r) {
    const kind = r.kind === "event" ? "Event" : "Result";
    $("detail-title").textContent = `${kind} ${r.id} · ${r.site}/${r.device} · seq ${r.seq}`;
    $("detail-body").replaceChildren(figure(r), el("div", { cls: "detail-side" }, [scores(r), facts(r)]));
    $("detail").dataset.id = String(r.id);
  }

  async function open(id, opener) {
    const dialog = $("detail");
    const token = ++state.token;
    state.opener = opener;
    $("detail-title").textContent = `Result ${id}`;
    $("detail-body").replaceChildren(el("p", { cls: "muted", text: "Loading…" }));
    $("detail-timeline").replaceChildren();
    if (!dialog.open) dialog.showModal();
    $("detail-close").focus();
    try {
      const r = await fetchJson(`api/results/${encodeURIComponent(id)}`);
      if (token !== state.token) return;
      render(r);
      const device = `${r.site}/${r.device}`;
      const events = await fetchJson(
        `api/events?device=${encodeURIComponent(device)}&minutes=${TIMELINE_MIN}`);
      if (token === state.token) timeline(events);
    } catch (err) {
      if (token !== state.token || err.message === "signed out") return;
      const where = $("detail-body").childElementCount > 1 ? "detail-timeline" : "detail-body";
      $(where).replaceChildren(el("p", { cls: "error", text: `Could not load: ${err.message}` }));
    }
  }

  function rowOf(target) {
    const row = target instanceof Element ? target.closest("tr.result") : null;
    return row && row.dataset.id && !row.classList.contains("unreadable") ? row : null;
  }

  document.addEventListener("DOMContentLoaded", () => {
    const dialog = $("detail");
    const rows = $("results-body");
    if (!dialog || !rows) return;
    rows.addEventListener("click", (e) => {
      const row = rowOf(e.target);
      if (row) open(row.dataset.id, row);
    });
    rows.addEventListener("keydown", (e) => {
      const row = rowOf(e.target);
      if (row && (e.key === "Enter" || e.key === " ")) {
        e.preventDefault();
        open(row.dataset.id, row);
      }
    });
    $("detail-close").addEventListener("click", () => dialog.close());
    dialog.addEventListener("click", (e) => {  // outside the panel: on the backdrop
      if (e.target === dialog) dialog.close();
    });
    dialog.addEventListener("close", () => {
      // the close event is queued: a result opened again before it is handled (Escape, then
      // Enter on the next row at once) keeps its pending load and its id
      if (dialog.open) return;
      state.token++;
      delete dialog.dataset.id;
      if (state.opener && state.opener.isConnected) state.opener.focus();
      state.opener = null;
    });
  });
})();
