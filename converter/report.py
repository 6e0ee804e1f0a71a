"""The conversion report a person reads: Markdown beside report.json in the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["write_markdown"]

_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc")


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


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
        detail = a.get("reason") or ""
        if a["outcome"] == "won":
            detail = f"{a['bytes']} bytes, agreement with float {a['agreement']:.4f}"
            if a.get("ops"):
                detail += f"; ops {', '.join(a['ops'])}"
        lines.append(f"- `{a['strategy']}` ({a['title']}): **{a['outcome']}**"
                     + (f" — {detail}" if detail else ""))  # fmt: skip
    return lines


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
    lines += ["", f"Agreement with float: {agree}" if agree else _wrapped(report), ""]
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
    lines += _strategies(report.get("litert") or {})
    onnx = report.get("onnx") or {}
    if "route" in onnx:
        lines += ["", f"ONNX export: {onnx['route']}, opset {onnx['opset']}."]
    if "scheme" in onnx:
        lines.append(f"ONNX int8: {onnx['scheme']}.")
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
