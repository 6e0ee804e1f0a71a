"""The conversion report a person reads: Markdown beside report.json in the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["write_markdown"]

_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc")


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    variants = report.get("variants") or [k for k in ("float", "litert-int8") if k in report]
    lines = [
        f"# Conversion report: {report['model']} for {report['profile']}",
        "",
        f"Evaluated on `{report['eval']['file']}` ({report['eval']['n']} samples, validation "
        f"data). Positive class: **{report.get('positive_label') or 'none'}**.",
        "",
        "| metric | " + " | ".join(variants) + " | largest drop |",
        "|---|" + "---|" * (len(variants) + 1),
    ]
    for m in _METRICS:
        vals = [report[v].get(m) for v in variants]
        if all(v is None for v in vals):
            continue
        drops = [vals[0] - v for v in vals[1:] if None not in (vals[0], v)]
        drop = max(drops) if drops else None
        lines.append(f"| {m} | " + " | ".join(_fmt(v) for v in vals) + f" | {_fmt(drop)} |")
    agree = ", ".join(f"{k} {v:.4f}" for k, v in report["agreement"].items())
    lines += ["", f"Agreement with float: {agree}", ""]
    labels = report["labels"]
    for v in variants:
        lines += [
            f"## Confusion matrix, {v} (rows: truth, columns: prediction)",
            "",
            "| | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for name, row in zip(labels, report[v]["confusion"], strict=True):
            lines.append(f"| {name} | " + " | ".join(str(c) for c in row) + " |")
        lines.append("")
    lines += [
        "## Size and latency",
        "",
        "| artifact | bytes | p50 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    for k, b in report["size_bytes"].items():
        lat = report["latency_ms"].get(k, {})
        lines.append(f"| {k} | {b} | {_fmt(lat.get('p50'))} | {_fmt(lat.get('p99'))} |")
    onnx = report.get("onnx") or {}
    if "route" in onnx:
        lines += ["", f"ONNX export: {onnx['route']}, opset {onnx['opset']}."]
    if "scheme" in onnx:
        lines.append(f"ONNX int8: {onnx['scheme']}.")
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
