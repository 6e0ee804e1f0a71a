"""The accuracy-budget search (artifacts are run and scored by converter.scoring).

``--budget sensitivity=0.005,auc=0.005`` asks for the cheapest artifact whose metrics drop
from the float model's by no more than that. The search (converter.litert calls
:func:`search`) tries, in order, each rung made in its own child process
(``python -m converter.child.litert variant JOB``):

1. full int8 (the conversion strategy that won, converter.strategies);
2. ``float-head``: full int8 with only the final softmax/sigmoid kept float — an int8 softmax
   has 256 levels, so close scores tie (AUC, thresholds); one float op costs almost nothing;
3. ``mixed``: full int8 with the layers of most quantization error kept in float, found with
   LiteRT's QuantizationDebugger (per-layer SNR, the worst fifth of the layers);
4. ``int16x8``: 16-bit activations, 8-bit weights;
5. ``fp16``: float16 weights;
6. ``fp32``.

The first that meets every budgeted metric wins; the report lists what was tried, what each
scored and why the winner won. When none meets it the conversion fails in one line and no
bundle is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.errors import ConversionError
from converter.profiles import PROFILE_INFO, cost_rank
from converter.scoring import Scored
from converter.stream_eval import EVENT_METRICS

__all__ = [
    "LOWER_IS_BETTER",
    "RUNGS",
    "TASK_METRICS",
    "BudgetOutcome",
    "Rung",
    "append_markdown",
    "budget_metrics",
    "describe",
    "float_extras",
    "misses",
    "rungs",
    "search",
]

TASK_METRICS = {
    "classification": ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc"),
    "segmentation": ("dice", "iou", "hd95"),
    "image_to_image": ("psnr", "ssim"),
    "regression": ("mae", "rmse", "pearson_r"),
}
LOWER_IS_BETTER = {"hd95", "mae", "rmse"}  # a drop in these is a rise


@dataclass(frozen=True)
class Rung:
    key: str
    precision: str
    title: str


RUNGS = (
    Rung("float-head", "int8", "full int8, the final softmax/sigmoid kept float"),
    Rung("mixed", "int8", "full int8, the layers with the most quantization error kept float"),
    Rung("int16x8", "int16x8", "16-bit activations, 8-bit weights"),
    Rung("fp16", "fp16", "float16 weights, float compute"),
    Rung("fp32", "fp32", "float32"),
)


@dataclass
class BudgetOutcome:
    rung: str  # "int8" (the first artifact) or a Rung key
    precision: str
    path: Path
    scored: Scored
    attempts: list[dict[str, Any]] = field(default_factory=list)
    per_layer: list[dict[str, Any]] = field(default_factory=list)


def budget_metrics(task: str, event_rules: list[str]) -> tuple[str, ...]:
    """What ``--budget`` may name: the task's metrics, and each event rule's."""
    events = tuple(f"event_{r}_{m}" for r in event_rules for m in EVENT_METRICS)
    return TASK_METRICS[task] + events


def rungs(keys: list[str] | None) -> tuple[Rung, ...]:
    """The fallback rungs named by ``keys`` (None: all; [] or ["none"]: int8 only)."""
    if keys is None:
        return RUNGS
    names = [k for k in keys if k != "none"]
    known = {r.key: r for r in RUNGS}
    bad = [k for k in names if k not in known]
    if bad:
        raise ConversionError(f"unknown fallback '{bad[0]}' (one of {', '.join(known)}, none)")
    return tuple(r for r in RUNGS if r.key in names)


def misses(budget: dict[str, float], ref: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """The budgeted metrics ``got`` loses more of than allowed, as 'metric dropped D > A'."""
    out = []
    for metric, allowed in budget.items():
        a, b = ref.get(metric), got.get(metric)
        if a is None or b is None:
            raise ConversionError(f"budget metric '{metric}' is undefined on this data")
        rise_is_worse = metric in LOWER_IS_BETTER or metric.endswith("_false_alarms_per_hour")
        drop = (b - a) if rise_is_worse else (a - b)
        if math.isinf(a) and math.isinf(b):
            drop = 0.0
        if drop > allowed + 1e-12:
            out.append(f"{metric} dropped {drop:.4f} > {allowed}")
    return out


def _attempt(
    rung: str,
    precision: str,
    path: Path | None,
    scored: Scored | None,
    budget: dict[str, float],
    ref: dict[str, Any],
) -> dict[str, Any]:
    rec: dict[str, Any] = {"rung": rung, "precision": precision}
    if scored is None or path is None:
        return rec
    missed = misses(budget, ref, scored.metrics)
    rec.update(
        bytes=path.stat().st_size,
        p50_ms=round(scored.p50_ms, 4),
        metrics={m: scored.metrics.get(m) for m in budget},
        met=not missed,
        reason="; ".join(missed) if missed else "meets every budgeted metric",
    )
    return rec


def by_cost(rungs: tuple[Rung, ...], profile: str) -> tuple[Rung, ...]:
    """The rungs cheapest first on ``profile`` (converter.profiles: which kernels are fast
    on its CPU); rungs of one class keep the ladder's order (float-head before mixed)."""
    return tuple(sorted(rungs, key=lambda r: cost_rank(profile, r.precision)))


def _not_tried(rungs: tuple[Rung, ...], winner: str, profile: str) -> list[dict[str, Any]]:
    return [
        {
            "rung": r.key,
            "precision": r.precision,
            "met": None,
            "reason": f"not tried: {winner} met the budget and is cheaper on {profile}",
        }
        for r in rungs
    ]


def search(
    budget: dict[str, float],
    ref: dict[str, Any],
    first: tuple[str, Path, Scored],
    make: Callable[[Rung], tuple[Path, list[dict[str, Any]]]],
    evaluate: Callable[[Path], Scored],
    rungs: tuple[Rung, ...] = RUNGS,
    profile: str = "x86",
) -> BudgetOutcome:
    """Walk the rungs from ``first`` (the full-int8 artifact, evaluated), cheapest first on
    ``profile`` (:func:`by_cost`), until one meets ``budget``: the first that does is the
    cheapest that does. ``make(rung)`` writes that rung's artifact in a child process and
    returns it with the per-layer errors it measured (or raises ConversionError, recorded as
    failed). ``rungs``: those the search may fall back to (all by default); the attempts
    name the rungs left untried and why."""
    precision, path, scored = first
    attempts = [_attempt("int8", precision, path, scored, budget, ref)]
    per_layer: list[dict[str, Any]] = []
    ordered = by_cost(rungs, profile)
    if attempts[0]["met"]:
        attempts += _not_tried(ordered, "int8", profile)
        return BudgetOutcome("int8", precision, path, scored, attempts)
    for i, rung in enumerate(ordered):
        try:
            got, layers = make(rung)
        except ConversionError as exc:
            attempts.append(
                {
                    "rung": rung.key,
                    "precision": rung.precision,
                    "met": False,
                    "reason": f"failed: {exc}",
                }
            )
            continue
        per_layer = layers or per_layer
        s = evaluate(got)
        attempts.append(_attempt(rung.key, rung.precision, got, s, budget, ref))
        if attempts[-1]["met"]:
            attempts += _not_tried(ordered[i + 1 :], rung.key, profile)
            return BudgetOutcome(rung.key, rung.precision, got, s, attempts, per_layer)
    tried = "; ".join(f"{a['rung']}: {a.get('reason', 'not made')}" for a in attempts)
    wanted = ", ".join(f"{k}={v}" for k, v in budget.items())
    raise ConversionError(
        f"accuracy budget not met by any artifact ({wanted}) — {tried}; no bundle written"
    )


def describe(outcome: BudgetOutcome, budget: dict[str, float], profile: str) -> dict[str, Any]:
    """The report's ``budget`` section: what was tried, what each scored, which won and why,
    and the kernel ranking of the target profile that ordered the search."""
    info = PROFILE_INFO[profile]
    tried = [a for a in outcome.attempts if a.get("met") is not None]
    cheaper = [a["rung"] for a in tried if a["rung"] != outcome.rung]
    why = (
        f"full int8 meets the budget: the cheapest artifact on {profile}"
        if outcome.rung == "int8"
        else f"the cheapest rung on {profile} that meets the budget ({', '.join(cheaper)} did not)"
    )
    return {
        "budget": budget,
        "attempts": outcome.attempts,
        "winner": outcome.rung,
        "precision": outcome.precision,
        "why": why,
        "profile": {"name": profile, "cpu": info.cpu, "ranking": list(info.ranking),
                    "why": info.why},
    }  # fmt: skip


def float_extras(
    precision: str,
    winner: Scored,
    work: Path,
    evaluate: Callable[[Path], Scored],
    mode: str = "auto",
) -> tuple[list[tuple[str, Scored]], dict[str, Any]]:
    """The float LiteRT artifacts (fp16, fp32) that ship beside the winner, each evaluated,
    and the report's record of every decision. ``mode`` auto: both (the standard set: the
    winner, fp16, fp32 — the same files on any machine, whatever the timing); fp16/fp32: that
    one only; none: neither (not even made). Each one made is timed here against the winner
    (x86, XNNPACK, 1 thread), which says how it compares on this machine only."""
    if mode == "none":
        why = "--float-artifacts none: not made"
        return [], {p: {"shipped": False, "why": why} for p in ("fp16", "fp32") if p != precision}
    decisions: dict[str, Any] = {}
    ship: list[tuple[str, Scored]] = []
    for p in ("fp16", "fp32"):
        path = work / f"extra-{p}.tflite"
        if p == precision:
            continue
        if not path.exists():
            decisions[p] = {"shipped": False, "why": "the converter could not make it"}
            continue
        s = evaluate(path)
        speedup = winner.p50_ms / s.p50_ms if s.p50_ms else 0.0
        asked = mode in ("auto", p)
        timing = f"{speedup:.2f}x the speed of {precision} on this machine (XNNPACK, 1 thread)"
        why = (
            "--float-artifacts auto: fp16 and fp32 ship beside the winner"
            if mode == "auto"
            else f"--float-artifacts {mode}"
        )
        decisions[p] = {
            "bytes": path.stat().st_size,
            "p50_ms": round(s.p50_ms, 4),
            "speedup_vs_winner": round(speedup, 2),
            "shipped": asked,
            "why": f"{why}; {timing}",
        }
        if asked:
            ship.append((p, s))
    return ship, decisions


def append_markdown(path: Path, report: dict[str, Any]) -> None:
    """The budget search and the float-artifact decision, after report.py's sections."""
    lines = []
    budget = report.get("budget")
    if budget:
        wanted = ", ".join(f"{k}={v}" for k, v in budget["budget"].items())
        lines += [
            "",
            f"## Accuracy budget ({wanted}): `{budget['winner']}` won",
            "",
            f"Why: {budget['why']}.",
            "",
        ]
        prof = budget.get("profile")
        if prof:
            order = " < ".join(prof["ranking"])
            lines += [
                f"Tried cheapest first on `{prof['name']}` ({prof['cpu']}): {order} — "
                f"{prof['why']} (converter/profiles.py: from the kernels' coverage, not timed "
                "on that CPU).",
                "",
            ]
        for a in budget["attempts"]:
            size = f", {a['bytes']} bytes, p50 {a['p50_ms']} ms" if "bytes" in a else ""
            met = {True: "met", False: "missed", None: "not tried"}[a.get("met", False)]
            lines.append(
                f"- `{a['rung']}` ({a['precision']}{size}): **{met}** — {a.get('reason', '')}"
            )
    floats = report.get("float_artifacts")
    if floats:
        lines += ["", "## Float LiteRT artifacts beside the winner", ""]
        for p, d in floats.items():
            lines.append(f"- {p}: {'shipped' if d['shipped'] else 'not shipped'} — {d['why']}")
    if lines:
        with path.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
