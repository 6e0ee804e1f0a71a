"""The conversion report a person reads: Markdown and one self-contained HTML page beside
report.json in the bundle. docs/report.md says what every number means."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["render_html", "write_html", "write_markdown"]

_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc")
_SEG = ("dice", "iou", "hd95", "hc_mae_mm", "hc_mae_mm_reference")  # hc: head circumference
_IMG = ("psnr", "ssim")
_REG = ("mae", "rmse", "pearson_r", "bias", "loa_low", "loa_high")  # converter.regression
_OTHER = ("output_snr_db",)  # of each artifact's raw output against the float model's
_LOWER_IS_BETTER = {"hd95", "hc_mae_mm", "hc_mae_mm_reference", "mae", "rmse"}
_NO_DROP = {"bias", "loa_low", "loa_high"}  # signed: neither way is a loss
_EVENT_KEYS = ("sensitivity", "precision", "specificity", "false_alarms_per_hour", "tp", "fp", "fn")
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _ci(m: dict[str, Any], key: str) -> Sequence[float] | None:
    """The 95% interval of ``key``: ``m["ci"][key]`` (classification) or ``m[key + "_ci"]``."""
    ci = (m.get("ci") or {}).get(key) or m.get(f"{key}_ci")
    return ci if isinstance(ci, list | tuple) and len(ci) == 2 else None


def _with_ci(m: dict[str, Any], key: str) -> str:
    ci = _ci(m, key)
    return _fmt(m.get(key)) + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


def _variants(report: dict[str, Any]) -> list[str]:
    return report.get("variants") or [k for k in ("float", "litert-int8") if k in report]


def _metric_rows(report: dict[str, Any]) -> list[tuple[str, list[Any], Any]]:
    """(metric, per-variant values, largest drop from the first variant) for each metric that
    any variant has; for hd95 (lower is better) a drop is a rise."""
    variants = _variants(report)
    rows = []
    for m in (*_METRICS, *_SEG, *_IMG, *_REG, *_OTHER):
        vals = [_section(report, v).get(m) for v in variants]
        if all(v is None for v in vals):
            continue
        if m in _NO_DROP:
            rows.append((m, vals, None))
            continue
        sign = -1.0 if m in _LOWER_IS_BETTER else 1.0
        first = vals[0]
        drops = [
            sign * (first - v)
            for v in vals[1:]
            if first is not None and v is not None and math.isfinite(first - v)
        ]
        rows.append((m, vals, max(drops) if drops else None))
    return rows


def _section(report: dict[str, Any], variant: str) -> dict[str, Any]:
    """One variant's metrics: its own dict, plus its optional segmentation and image sections."""
    merged = dict(report.get(variant) or {})
    for sec in ("segmentation", "image"):
        merged.update((report.get(sec) or {}).get(variant) or {})
    snr = (report.get("output_snr_db") or {}).get(variant)
    if snr is not None:
        merged["output_snr_db"] = snr
    return merged


def _wrapped(report: dict[str, Any]) -> str:
    w = report.get("wrapped") or {}
    return (
        f"Wrapped as it is: a ready {w.get('source_format', '?')} model run by the agent's "
        f"{w.get('runtime', '?')} runtime ({w.get('precision', '?')}); there is no float model "
        "to compare with."
    )


def _strategies(litert: dict[str, Any]) -> list[str]:
    """One line per LiteRT conversion strategy: which won, why the others did not."""
    if not litert.get("attempts"):
        return []
    lines = ["", f"## LiteRT conversion: strategy `{litert['strategy']}` won", ""]
    for a in litert["attempts"]:
        lines.append(
            f"- `{a['strategy']}` ({a['title']}): **{a['outcome']}**"
            + (f" — {_attempt_detail(a)}" if _attempt_detail(a) else "")
        )
    return lines


def _attempt_detail(a: dict[str, Any]) -> str:
    if a["outcome"] != "won":
        return a.get("reason") or ""
    detail = f"{a['bytes']} bytes, agreement with float {a['agreement']:.4f}"
    if a.get("ops"):
        detail += f"; ops {', '.join(a['ops'])}"
    return detail


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    """The report as Markdown: the summary, then a section for each part the report has."""
    lines = [
        *_summary_md(report),
        *_vs_float(report),
        *_confusion_md(report),
        *_events_md(report.get("events") or {}),
        *_per_layer_md(report.get("per_layer_error") or []),
        *_size_md(report),
        *_strategies(report.get("litert") or {}),
        *_onnx_md(report.get("onnx") or {}),
        *_feature_stage_md(report.get("feature_stage") or {}),
        *_warnings_md(report.get("warnings")),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _summary_md(report: dict[str, Any]) -> list[str]:
    """The title, what was evaluated, the metric table with intervals, and the agreement."""
    variants = _variants(report)
    ev = report["eval"]
    lines = [
        f"# Conversion report: {report['model']} for {report['profile']}",
        "",
        f"Evaluated on `{ev['file']}` ({ev['n']} samples, validation data). Positive class: "
        f"**{report.get('positive_label') or 'none'}**. Under each metric: its 95% confidence "
        "interval (docs/report.md).",
        "",
        "| metric | " + " | ".join(variants) + " | largest drop |",
        "|---|" + "---|" * (len(variants) + 1),
    ]
    for m, vals, drop in _metric_rows(report):
        lines.append(f"| {m} | " + " | ".join(_fmt(v) for v in vals) + f" | {_fmt(drop)} |")
        cis = [_ci(_section(report, v), m) for v in variants]
        if any(cis):
            cells = " | ".join(f"{c[0]:.3f}–{c[1]:.3f}" if c else "" for c in cis)
            lines.append(f"| *95% CI* | {cells} | |")
    agree = ", ".join(f"{k} {v:.4f}" for k, v in (report.get("agreement") or {}).items())
    return [*lines, "", f"Agreement with float: {agree}" if agree else _wrapped(report), ""]


def _confusion_md(report: dict[str, Any]) -> list[str]:
    labels = report.get("labels") or []
    lines: list[str] = []
    for v in _variants(report):
        cm = (report.get(v) or {}).get("confusion")
        if not cm:
            continue
        lines += [
            f"## Confusion matrix, {v} (rows: truth, columns: prediction)",
            "",
            "| | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for name, row in zip(labels, cm, strict=True):
            lines.append(f"| {name} | " + " | ".join(str(c) for c in row) + " |")
        lines.append("")
    return lines


def _events_md(events: dict[str, Any]) -> list[str]:
    if not events:
        return []
    lines = ["## Event detection over recorded streams", "", _events_about(events), ""]
    lines += ["| variant | event | " + " | ".join(_EVENT_KEYS) + " |"]
    lines.append("|---|---|" + "---|" * len(_EVENT_KEYS))
    for v, rule, em in _event_rows(events):
        cells = " | ".join(_with_ci(em, k) for k in _EVENT_KEYS)
        lines.append(f"| {v} | {rule} | {cells} |")
    return [*lines, ""]


def _per_layer_md(layers: list[dict[str, Any]]) -> list[str]:
    if not layers:
        return []
    lines = ["## Per-layer error of the int8 model (SNR against float, worst first)", ""]
    lines += ["| layer | op | SNR dB | kept float |", "|---|---|---|---|"]
    for r in sorted(layers, key=_snr_key):
        kept = "yes" if r.get("kept_float") else "no"
        lines.append(f"| {r['layer']} | {r.get('op', '')} | {_fmt(r.get('snr_db'))} | {kept} |")
    return [*lines, ""]


def _size_md(report: dict[str, Any]) -> list[str]:
    lines = [
        "## Size and latency",
        "",
        "| artifact | bytes | p50 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    for k, b in report["size_bytes"].items():
        lat = report["latency_ms"].get(k, {})
        lines.append(f"| {k} | {b} | {_fmt(lat.get('p50'))} | {_fmt(lat.get('p99'))} |")
    return lines


def _onnx_md(onnx: dict[str, Any]) -> list[str]:
    lines = []
    if "route" in onnx:
        lines += ["", f"ONNX export: {onnx['route']}, opset {onnx['opset']}."]
    if "scheme" in onnx:
        lines.append(f"ONNX int8: {onnx['scheme']}.")
    if "skipped" in onnx:
        lines += ["", f"ONNX: {onnx['skipped']}."]
    return lines


def _feature_stage_md(stage: dict[str, Any]) -> list[str]:
    """A chained bundle: the split, and how close each part's converted form is to float."""
    if not stage:
        return []
    lines = [
        "",
        "## Feature stage",
        "",
        f"Split at `{stage['split_at']}`: {stage['frames']} frames of {stage['features']} "
        f"features each (the two parts differ from the whole model by at most "
        f"{stage['split_max_diff']:.2g}). The table above scores the pairs end to end.",
        "",
        "| feature model | MAE | Pearson r |",
        "|---|---|---|",
    ]
    for k, m in stage["feature_vs_float"].items():
        lines.append(f"| {k} | {_fmt(m.get('mae'))} | {_fmt(m.get('pearson_r'))} |")
    temporal = stage.get("temporal_on_float_features") or {}
    aucs = ", ".join(f"{k} {_fmt(m.get('auc'))}" for k, m in temporal.items())
    if aucs:
        lines += ["", f"Temporal model alone, on float features: AUC {aucs}."]
    return lines


def _warnings_md(warnings: list[str] | None) -> list[str]:
    return ["", "## Warnings", "", *[f"- {w}" for w in warnings]] if warnings else []


def _vs_float(report: dict[str, Any]) -> list[str]:
    """Regression: each artifact against float, in the measurement's units (Bland-Altman)."""
    rows = report.get("vs_float") or {}
    if not rows:
        return []
    lines = [
        "## Agreement with float (Bland-Altman, artifact - float)",
        "",
        "| artifact | bias | limits of agreement | Pearson r | largest difference |",
        "|---|---|---|---|---|",
    ]
    for k, r in rows.items():
        loa = f"{_fmt(r.get('loa_low'))} to {_fmt(r.get('loa_high'))}"
        lines.append(
            f"| {k} | {_fmt(r.get('bias'))} | {loa} | {_fmt(r.get('pearson_r'))} | "
            f"{_fmt(r.get('max_abs_diff'))} |"
        )
    return [*lines, ""]


def _snr_key(r: dict[str, Any]) -> float:
    v = r.get("snr_db")
    return math.inf if v is None else float(v)


# ---- HTML ----------------------------------------------------------------------------------

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}.ci{color:#666;font-size:.85em}
.cm td{min-width:3.5em;text-align:center}.bad{background:#fde2e2}.warn li{color:#8a4b00}
.grid{display:flex;flex-wrap:wrap;gap:1.5em}.note{color:#555}svg text{font:12px sans-serif}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _cell(m: dict[str, Any], key: str) -> str:
    ci = _ci(m, key)
    extra = f'<br><span class="ci">{ci[0]:.3f}–{ci[1]:.3f}</span>' if ci else ""
    return f"<td>{_e(_fmt(m.get(key)))}{extra}</td>"


def _table(head: list[str], rows: list[str]) -> str:
    th = "".join(f"<th{' class=l' if i == 0 else ''}>{_e(h)}</th>" for i, h in enumerate(head))
    return f"<table><tr>{th}</tr>{''.join(rows)}</table>"


def _summary_html(report: dict[str, Any]) -> list[str]:
    variants = _variants(report)
    rows = []
    for m, _, drop in _metric_rows(report):
        cells = "".join(_cell(_section(report, v), m) for v in variants)
        rows.append(f'<tr><td class="l">{_e(m)}</td>{cells}<td>{_e(_fmt(drop))}</td></tr>')
    agree = ", ".join(f"{k} {v:.4f}" for k, v in (report.get("agreement") or {}).items())
    note = f"Agreement with float: {agree}" if agree else _wrapped(report)
    return [
        "<h2>Summary (95% confidence intervals under each value)</h2>",
        _table(["metric", *variants, "largest drop"], rows),
        f'<p class="note">{_e(note)}</p>',
    ]


def _confusion_html(report: dict[str, Any]) -> list[str]:
    labels = report.get("labels") or []
    blocks = []
    for v in _variants(report):
        m = report.get(v) or {}
        cm = m.get("confusion")
        if not cm:
            continue
        rows = []
        for name, row in zip(labels, cm, strict=True):
            total = sum(row) or 1
            tds = "".join(
                f'<td style="background:rgba(31,119,180,{0.08 + 0.6 * c / total:.2f})">{c}</td>'
                for c in row
            )
            rows.append(f'<tr><th class="l">{_e(name)}</th>{tds}</tr>')
        head = "".join(f"<th>{_e(n)}</th>" for n in labels)
        blocks.append(
            f'<div><h3>{_e(v)}</h3><table class="cm"><tr><th class="l">truth \\ prediction</th>'
            f"{head}</tr>{''.join(rows)}</table>{_per_class_html(m, labels)}</div>"
        )
    if not blocks:
        return []
    return [
        "<h2>Confusion matrices and per-class metrics</h2>",
        '<div class="grid">',
        *blocks,
        "</div>",
    ]


def _per_class_html(m: dict[str, Any], labels: list[str]) -> str:
    pc = m.get("per_class") or {}
    rows = []
    for idx, c in sorted(pc.items(), key=lambda kv: int(kv[0])):
        name = labels[int(idx)] if int(idx) < len(labels) else idx
        cells = "".join(_cell(c, k) for k in ("precision", "recall", "f1", "support"))
        rows.append(f'<tr><td class="l">{_e(name)}</td>{cells}</tr>')
    return _table(["class", "precision", "recall", "F1", "support"], rows) if rows else ""


def roc_svg(curves: dict[str, dict[str, list[float]]], aucs: dict[str, Any]) -> str:
    """ROC curves as one inline SVG: a polyline per variant, the chance diagonal, a legend."""
    size, left, top = 300, 50, 15
    width, height = left + size + 190, top + size + 45
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="ROC curves">',
        f'<rect x="{left}" y="{top}" width="{size}" height="{size}" fill="none" stroke="#888"/>',
        f'<line x1="{left}" y1="{top + size}" x2="{left + size}" y2="{top}" stroke="#bbb" '
        'stroke-dasharray="4 4"/>',
    ]
    for t in (0.0, 0.5, 1.0):
        parts.append(
            f'<text x="{left + t * size}" y="{top + size + 16}" text-anchor="middle">{t:g}</text>'
        )
        parts.append(
            f'<text x="{left - 6}" y="{top + (1 - t) * size + 4}" text-anchor="end">{t:g}</text>'
        )
    parts.append(
        f'<text x="{left + size / 2}" y="{top + size + 36}" text-anchor="middle">'
        "1 − specificity (false positive rate)</text>"
    )
    parts.append(
        f'<text x="14" y="{top + size / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + size / 2})">sensitivity</text>'
    )
    for i, (variant, c) in enumerate(curves.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        pts = " ".join(
            f"{left + x * size:.1f},{top + (1 - y) * size:.1f}"
            for x, y in zip(c.get("fpr") or [], c.get("tpr") or [], strict=True)
        )
        # dashed every other curve, and each thinner than the one before: identical curves
        # (a lossless artifact) still show both
        dash = ' stroke-dasharray="6 3"' if i % 2 else ""
        wide = max(1.5, 4.0 - i)
        parts.append(
            f'<polyline data-variant="{_e(variant)}" points="{pts}" fill="none" '
            f'stroke="{colour}" stroke-width="{wide}"{dash}/>'
        )
        ly = top + 14 + 18 * i
        parts.append(
            f'<line x1="{left + size + 12}" y1="{ly - 4}" x2="{left + size + 36}" '
            f'y2="{ly - 4}" stroke="{colour}" stroke-width="2"{dash}/>'
        )
        a = aucs.get(variant)
        label = f"{variant} (AUC {_fmt(a)})" if a is not None else str(variant)
        parts.append(f'<text x="{left + size + 42}" y="{ly}">{_e(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _roc_html(report: dict[str, Any]) -> list[str]:
    curves = {v: c for v, c in (report.get("roc") or {}).items() if c and c.get("fpr")}
    if not curves:
        return []
    aucs = {v: (report.get(v) or {}).get("auc") for v in curves}
    pos = report.get("positive_label") or "the positive class"
    return [
        f"<h2>ROC curves for {_e(pos)}</h2>",
        roc_svg(curves, aucs),
    ]


def _layers_html(report: dict[str, Any]) -> list[str]:
    layers = report.get("per_layer_error") or []
    if not layers:
        return []
    rows = []
    for r in sorted(layers, key=_snr_key):
        snr = r.get("snr_db")
        bad = ' class="bad"' if snr is not None and snr < 20 else ""
        rows.append(
            f'<tr{bad}><td class="l">{_e(r.get("layer"))}</td><td class="l">{_e(r.get("op", ""))}'
            f"</td><td>{_e(_fmt(snr))}</td><td>{'yes' if r.get('kept_float') else 'no'}</td></tr>"
        )
    return [
        "<h2>Per-layer error of the quantized model (worst first)</h2>",
        '<p class="note">SNR of each layer\'s output against the float model on the evaluation '
        "data; under 20 dB is shaded.</p>",
        _table(["layer", "op", "SNR dB", "kept float"], rows),
    ]


def _event_rows(events: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (v, rule, m)
        for v, rules in (events.get("variants") or {}).items()
        for rule, m in rules.items()
    ]


def _events_about(events: dict[str, Any]) -> str:
    recs = events.get("recordings") or []
    n_events = sum(sum(r.get("events", {}).values()) for r in recs)
    skipped = sum(sum(r.get("skipped", {}).values()) for r in recs)
    return (
        f"{len(recs)} recording(s), {events.get('hours', 0):.3f} h, "
        f"{sum(r.get('windows', 0) for r in recs)} windows ({skipped} left out), "
        f"{n_events} annotated event(s); a detection matches an event it overlaps "
        f"(tolerance {events.get('tolerance_s', 0):g} s). Specificity is per window, over the "
        "windows away from every annotated event."
    )


def _events_html(report: dict[str, Any]) -> list[str]:
    events = report.get("events") or {}
    if not events:
        return []
    rows = [
        f'<tr><td class="l">{_e(v)}</td><td class="l">{_e(rule)}</td>'
        + "".join(_cell(m, k) for k in _EVENT_KEYS)
        + "</tr>"
        for v, rule, m in _event_rows(events)
    ]
    return [
        "<h2>Event detection over recorded streams</h2>",
        f"<p>{_e(_events_about(events))}</p>",
        _table(["variant", "event", *_EVENT_KEYS], rows),
    ]


def _size_html(report: dict[str, Any]) -> list[str]:
    rows = []
    for k, b in (report.get("size_bytes") or {}).items():
        lat = (report.get("latency_ms") or {}).get(k, {})
        rows.append(
            f'<tr><td class="l">{_e(k)}</td><td>{_e(b)}</td>'
            f"<td>{_e(_fmt(lat.get('p50')))}</td><td>{_e(_fmt(lat.get('p99')))}</td></tr>"
        )
    return ["<h2>Size and latency</h2>", _table(["artifact", "bytes", "p50 ms", "p99 ms"], rows)]


def _conversion_html(report: dict[str, Any]) -> list[str]:
    out = []
    litert = report.get("litert") or {}
    if litert.get("attempts"):
        out.append(f"<h2>LiteRT conversion: strategy {_e(litert.get('strategy'))} won</h2><ul>")
        for a in litert["attempts"]:
            detail = _attempt_detail(a)
            out.append(
                f"<li><code>{_e(a['strategy'])}</code> ({_e(a.get('title', ''))}): "
                f"<b>{_e(a['outcome'])}</b>{' — ' + _e(detail) if detail else ''}</li>"
            )
        out.append("</ul>")
    out += _budget_html(report)
    onnx = report.get("onnx") or {}
    if "route" in onnx:
        out.append(f"<p>ONNX export: {_e(onnx['route'])}, opset {_e(onnx.get('opset'))}.</p>")
    if "scheme" in onnx:
        out.append(f"<p>ONNX int8: {_e(onnx['scheme'])}.</p>")
    if report.get("warnings"):
        out += ['<h2>Warnings</h2><ul class="warn">']
        out += [f"<li>{_e(w)}</li>" for w in report["warnings"]]
        out.append("</ul>")
    return out


def _budget_html(report: dict[str, Any]) -> list[str]:
    """The accuracy-budget search and the float-artifact decisions, when the converter made them."""
    out = []
    budget = report.get("budget") or {}
    if budget.get("attempts"):
        wanted = ", ".join(f"{k}={v}" for k, v in (budget.get("budget") or {}).items())
        out += [
            f"<h2>Accuracy budget ({_e(wanted or 'none')}): {_e(budget.get('winner'))} won</h2>",
            f"<p>Why: {_e(budget.get('why'))}.</p><ul>",
        ]
        for a in budget["attempts"]:
            size = f", {a['bytes']} bytes, p50 {a.get('p50_ms')} ms" if "bytes" in a else ""
            met = {True: "met", False: "missed", None: "not tried"}[a.get("met", False)]
            out.append(
                f"<li><code>{_e(a.get('rung'))}</code> ({_e(a.get('precision'))}"
                f"{_e(size)}): <b>{met}</b> {_e(a.get('reason') or '')}</li>"
            )
        out.append("</ul>")
    floats = report.get("float_artifacts") or {}
    if floats:
        out.append("<h2>Float LiteRT artifacts beside the winner</h2><ul>")
        for p, d in floats.items():
            shipped = "shipped" if d.get("shipped") else "not shipped"
            out.append(f"<li>{_e(p)}: <b>{shipped}</b> — {_e(d.get('why', ''))}</li>")
        out.append("</ul>")
    return out


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG, no script, no links)."""
    title = f"Conversion report: {report.get('model', '?')} for {report.get('profile', '?')}"
    ev = report.get("eval") or {}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p>Evaluated on <code>{_e(ev.get('file', '?'))}</code> ({_e(ev.get('n', '?'))} "
        f"samples, validation data). Positive class: "
        f"<b>{_e(report.get('positive_label') or 'none')}</b>.</p>",
        *_summary_html(report),
        *_roc_html(report),
        *_confusion_html(report),
        *_events_html(report),
        *_layers_html(report),
        *_size_html(report),
        *_conversion_html(report),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_html(path: Path, report: dict[str, Any]) -> None:
    """Write :func:`render_html` of ``report`` to ``path`` (report.html in a bundle)."""
    Path(path).write_text(render_html(report), encoding="utf-8")
