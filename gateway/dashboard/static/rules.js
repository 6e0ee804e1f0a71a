// medge dashboard: the gateway's alert rules (/api/alert-rules), as text, read every minute.
"use strict";

(() => {
  const { $ } = window.medgeDom;

  function row(what, value) {
    const tr = document.createElement("tr");
    for (const text of [what, value]) {
      const td = document.createElement("td");
      td.textContent = String(text);
      tr.append(td);
    }
    return tr;
  }

  async function load() {
    const body = $("rules-body");
    if (!body) return;
    try {
      const response = await fetch("api/alert-rules", { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const { rules } = await response.json();
      body.replaceChildren();
      $("rules-empty").hidden = rules !== null;
      if (rules === null) return;
      body.append(row("Events the bundle marks alert: true", `bundle's severity (default ${rules.default_severity})`));
      for (const [kind, severity] of Object.entries(rules.events || {})) {
        body.append(row(`Event ${kind}`, severity === "ignore" ? "ignored (recorded only)" : `${severity} (site rule)`));
      }
      body.append(row(`Silent for ${rules.silence_after} s`, rules.silent_severity));
      body.append(row("Device offline", rules.offline_severity));
      $("rules-summary").textContent = `recorded ${new Date(rules.recorded * 1000).toLocaleString()}`;
    } catch (err) {
      $("rules-summary").textContent = `could not read the rules (${err.message})`;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    load();
    setInterval(load, 60000);
  });
})();
