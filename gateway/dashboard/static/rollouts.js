// medge dashboard: the staged rollouts (/api/rollouts), read every 5 s. One block per rollout:
// its status, stage and phase, a line per gate of its current stage, and its devices in a
// <details> that stays open across refreshes. All data goes in as text (textContent).
"use strict";

(() => {
  const REFRESH_MS = 5000;
  const { DASH, $, isNum, el } = window.medgeDom;
  const STATUSES = ["running", "paused", "aborting", "completed", "aborted"];
  const OPS = { ">=": "≥", "<=": "≤", ">": ">", "<": "<" };
  const MEASURES = {  // how each measure is named and how many decimals its value gets
    agreement: ["agreement", 3],
    dice: ["Dice", 3],
    alerts_per_hour: ["alerts/h", 1],
    shadow_p99_ms: ["shadow p99 ms", 1],
  };
  const opened = new Set();  // rollout ids whose device list is open
  let last = "";             // the list last drawn: nothing is redrawn while it is the same

  function gateLine(g, r) {
    const [name, digits] = MEASURES[g.measure] || [String(g.measure), 2];
    const value = isNum(g.value) ? g.value.toFixed(digits) : DASH;
    const mark = { pass: "✓", fail: "✗" }[g.verdict] || "not measured";
    let text = `${name} ${value} ${OPS[g.op] || g.op} ${g.threshold} ${mark}`;
    if (g.verdict === "fail" && r.status === "paused" && typeof r.reason === "string"
        && r.reason.includes(g.gate)) {
      text += ` — paused: ${r.reason}`;
    }
    const cls = g.verdict === "pass" ? "pass" : g.verdict === "fail" ? "fail" : "unmeasured";
    return el("li", { cls: `gate gate-${cls}`, text, title: `${g.gate} (${g.phase})`,
      data: { measure: g.measure, verdict: g.verdict } });
  }

  function command(d) {
    if (!d.command) return DASH;
    return `${d.command} (${isNum(d.command_sent) ? "sent" : "waiting for it to come online"})`;
  }

  function shadowText(s) {
    if (!s || typeof s !== "object") return DASH;
    const agreement = isNum(s.agreement) ? s.agreement.toFixed(3) : DASH;
    return `${agreement} (${isNum(s.samples) ? s.samples : 0} samples)`;
  }

  function devices(r) {
    const list = Array.isArray(r.devices) ? r.devices : [];
    const counts = r.counts && typeof r.counts === "object" ? r.counts : {};
    const parts = Object.entries(counts).filter(([, n]) => n > 0).map(([s, n]) => `${n} ${s}`);
    const box = el("details", { cls: "rollout-devices" }, [
      el("summary", { text: `${list.length} device${list.length === 1 ? "" : "s"}`
        + (parts.length ? `: ${parts.join(" · ")}` : "") }),
    ]);
    box.open = opened.has(r.id);
    box.addEventListener("toggle", () => {
      if (box.open) opened.add(r.id); else opened.delete(r.id);
    });
    const names = (r.stages || []).map((s) => s.name);
    const head = el("tr", {}, ["Device", "Stage", "State", "Command owed", "Shadow agreement",
      "Running"].map((h) => el("th", { text: h })));
    const rows = list.map((d) => el("tr", { data: { device: `${d.site}/${d.device}`,
      state: d.state } }, [
      el("td", { cls: "device", text: `${d.site}/${d.device}` }),
      el("td", { cls: "stage", text: names[d.stage] ?? d.stage }),
      el("td", { cls: "dev-state", text: d.state, title: d.reason || "" }),
      el("td", { cls: "command", text: command(d) }),
      el("td", { cls: "shadow", text: shadowText(d.shadow) }),
      el("td", { cls: "bundle", text: d.running || DASH, title: d.running || "" }),
    ]));
    box.append(el("table", { cls: "grid rollout-device-table" }, [
      el("thead", {}, [head]), el("tbody", {}, rows),
    ]));
    return box;
  }

  function rolloutBlock(r) {
    if (r.error) {
      return el("div", { cls: "rollout", data: { rolloutId: r.id ?? "" } }, [
        el("p", { cls: "row-error", text: `rollout ${r.id ?? "?"}: ${r.error}` }),
      ]);
    }
    const st = STATUSES.includes(r.status) ? r.status : "unknown";
    const total = (r.stages || []).length;
    const at = Math.min(r.stage + 1, total);
    const stage = st === "completed"
      ? `stage ${total}/${total} · done`
      : `stage ${at}/${total} ${r.stage_name ?? ""} · ${r.phase}`;
    const gates = Array.isArray(r.gates) ? r.gates : [];
    const block = el("div", { cls: `rollout rollout-${st}`,
      data: { rolloutId: r.id, status: st } }, [
      el("div", { cls: "rollout-head" }, [
        el("span", { cls: `rollout-status rs-${st}`, text: st }),
        el("span", { cls: "rollout-id", text: `#${r.id}` }),
        el("span", { cls: "rollout-bundle", text: r.bundle, title: r.bundle }),
        el("span", { cls: "muted", text: "→" }),
        el("span", { cls: "rollout-group", text: `group ${r.group}` }),
        el("span", { cls: "rollout-stage", text: stage }),
      ]),
    ]);
    if (gates.length) block.append(el("ul", { cls: "rollout-gates" }, gates.map((g) => gateLine(g, r))));
    const told = gates.some((g) => g.verdict === "fail" && typeof r.reason === "string"
      && r.reason.includes(g.gate));
    if (r.reason && !(told && st === "paused")) {
      block.append(el("p", { cls: "rollout-reason", text: `${st}: ${r.reason}` }));
    }
    block.append(devices(r));
    return block;
  }

  function render(list) {
    $("rollouts").replaceChildren(...list.map(rolloutBlock));
    $("rollouts-empty").hidden = list.length > 0;
    const active = list.filter((r) => ["running", "paused", "aborting"].includes(r.status));
    $("rollouts-summary").textContent = list.length
      ? `${active.length} active · ${list.length - active.length} finished` : "";
  }

  function showError(message) {
    const node = $("rollouts-error");
    node.textContent = message ? `Could not load rollouts: ${message}` : "";
    node.hidden = !message;
  }

  async function load() {
    if (!$("rollouts")) return;
    try {
      const response = await fetch("api/rollouts", { cache: "no-store" });
      if (response.status === 401) {  // the session ended: app.js sends the page to login
        showError("signed out");
        return;
      }
      const text = await response.text();
      if (!response.ok) {
        let why = `HTTP ${response.status}`;
        try { why = JSON.parse(text).error || why; } catch (err) { /* not JSON */ }
        throw new Error(why);
      }
      showError("");
      const list = JSON.parse(text).rollouts || [];
      const seen = JSON.stringify(list);
      if (seen === last) return;
      last = seen;
      render(list);
    } catch (err) {
      showError(err.message);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    load();
    setInterval(load, REFRESH_MS);
  });
})();
