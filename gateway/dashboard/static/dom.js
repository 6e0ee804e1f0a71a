// medge dashboard: the small DOM helpers every script of the page shares (app.js, rules.js,
// rollouts.js, detail.js). Loaded first. Text goes in as textContent, attributes one by one.
"use strict";

window.medgeDom = (() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const DASH = "—";
  const $ = (id) => document.getElementById(id);
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const clockTime = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });

  // el("td", { cls, text, title, colSpan, data: {k: v} }, [children])
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

  // svgEl("rect", { x: 0, class: "fill" }, "title text or null")
  function svgEl(tag, attrs = {}, content = null) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (content !== null) node.textContent = content;
    return node;
  }

  return Object.freeze({ DASH, $, isNum, clockTime, el, svgEl });
})();
