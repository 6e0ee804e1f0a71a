"""The PNG plots of a ``medge bench`` run, written beside bench.json (OUT/plots/).

Two kinds, from what each benchmark handed over through bench/bench_data.py:

- ``<bench>_<plot>.png``: its series, one PNG per ``plot`` name (the soak's memory over time:
  ``soak_memory.png``), one panel per y unit;
- ``<bench>_figures.png``: each figure with a non-zero target as value / target, a bar per
  figure, a line at 1 (the target), green where met, red where not, grey where not judged.

matplotlib is the ``bench`` extra, imported here only (never by the device's packages), through
its object API on the Agg canvas: no display, no pyplot state. Without it, every plot is listed
as not made, with the reason, and the run's JSON and Markdown are written all the same.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from medge.bench_suite import Outcome, Run

__all__ = ["NO_MATPLOTLIB", "copy_plots", "make_plots", "planned"]

NO_MATPLOTLIB = "matplotlib is not installed (pip install 'medge[bench]')"
MET_COLOUR = {True: "#2a9d6f", False: "#d62828", None: "#9a9a9a"}


def planned(run: Run) -> list[dict[str, Any]]:
    """The plots this run's data calls for: bench, file (a name), title, kind, group."""
    plans = []
    for o in run.outcomes:
        groups = dict.fromkeys(s.get("plot") or "series" for s in _series(o).values())
        for g in groups:
            plans.append(
                {
                    "bench": o.name,
                    "file": f"{_slug(o.name)}_{_slug(g)}.png",
                    "title": f"{o.name}: {g}",
                    "kind": "series",
                    "group": g,
                }
            )
        if _ratios(o.figures):
            plans.append(
                {
                    "bench": o.name,
                    "file": f"{_slug(o.name)}_figures.png",
                    "title": f"{o.name}: figures as a ratio to their targets",
                    "kind": "figures",
                    "group": None,
                }
            )
    return plans


def make_plots(run: Run, out_dir: Path) -> list[dict[str, Any]]:
    """Draw every planned plot into ``out_dir``; each entry says whether it was made, and why
    not where it was not (matplotlib missing, or the error drawing it raised)."""
    plans = planned(run)
    if not plans:
        return []
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # not there, or there and broken: say which
        missing = (exc.name or "").split(".")[0] == "matplotlib"
        why = NO_MATPLOTLIB if missing else f"matplotlib does not import: {exc}"
        return [{**p, "made": False, "why": why} for p in plans]
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = {o.name: o for o in run.outcomes}
    done = []
    for p in plans:
        o = outcomes[p["bench"]]
        try:
            fig = Figure(layout="constrained")
            if p["kind"] == "series":
                _draw_series(fig, o, p["group"], p["title"])
            else:
                _draw_ratios(fig, o.figures, p["title"])
            fig.savefig(out_dir / p["file"], format="png", dpi=100)
        except (ValueError, TypeError, KeyError, ArithmeticError, OSError, RuntimeError) as exc:
            done.append({**p, "made": False, "why": f"{type(exc).__name__}: {exc}"})
        else:
            done.append({**p, "made": True, "why": None})
    return done


def copy_plots(plots: list[dict[str, Any]], src: Path, dst: Path) -> None:
    """The plots made into ``dst`` (docs/benchmarks/ beside docs/benchmarks.md); a PNG there
    from an earlier run that this one did not make is removed, so the folder shows this run."""
    dst.mkdir(parents=True, exist_ok=True)
    made = {p["file"] for p in plots if p["made"]}
    for old in dst.glob("*.png"):
        if old.name not in made:
            old.unlink()
    for name in sorted(made):
        shutil.copyfile(src / name, dst / name)


def _series(o: Outcome) -> dict[str, dict[str, Any]]:
    s = o.data.get("series", {})
    return s if isinstance(s, dict) and not o.data_error else {}


def _ratios(figures: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
    """(figure, value / target) for the figures a ratio says something about."""
    out = []
    for f in figures:
        t = f.get("target")
        if t and math.isfinite(t) and math.isfinite(f["value"]):
            out.append((f, f["value"] / t))
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "_", name.lower()).strip("_") or "plot"


def _draw_series(fig: Figure, o: Outcome, group: str, title: str) -> None:
    chosen = {k: s for k, s in _series(o).items() if (s.get("plot") or "series") == group}
    units = list(dict.fromkeys(s.get("y_unit", "") for s in chosen.values()))
    fig.set_size_inches(8, 1.2 + 2.8 * len(units))
    axes = fig.subplots(len(units), 1, squeeze=False)[:, 0]
    for ax, unit in zip(axes, units, strict=True):
        for name, s in chosen.items():
            if s.get("y_unit", "") == unit:
                dots = "o" if len(s["x"]) <= 60 else None  # a dot per sample while they show
                ax.plot(s["x"], s["y"], marker=dots, markersize=3, label=name)
        ax.set_ylabel(unit or "value")
        ys = [v for s in chosen.values() if s.get("y_unit", "") == unit for v in s["y"]]
        if ys and min(ys) >= 0:  # from zero: a step of 4 MB looks like 4 MB, not a cliff
            ax.set_ylim(0, 1.15 * max(ys) or 1.0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    x_units = {s.get("x_unit", "") for s in chosen.values()} - {""}
    axes[-1].set_xlabel(", ".join(sorted(x_units)) or "x")
    fig.suptitle(title)


def _draw_ratios(fig: Figure, figures: list[dict[str, Any]], title: str) -> None:
    pairs = _ratios(figures)
    fig.set_size_inches(8, 1.4 + 0.35 * len(pairs))
    ax = fig.subplots()
    names = [f"{f['name']} ({_reading(f)})" for f, _ in pairs]
    ratios = [r for _, r in pairs]
    ys = list(range(len(pairs)))[::-1]
    ax.barh(ys, ratios, color=[MET_COLOUR[f.get("met")] for f, _ in pairs])
    ax.set_yticks(ys, names, fontsize="small")
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    positive = [r for r in ratios if r > 0]
    if len(positive) == len(ratios) and max(positive) / min(positive) > 50:
        ax.set_xscale("log")
    for y, r in zip(ys, ratios, strict=True):
        ax.annotate(
            f"{r:.3f}" if abs(r) < 10 else f"{r:.1f}",
            (r, y),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
        )
    ax.set_xlabel("value / target (1 = at the target)")
    ax.set_title(title)


def _reading(f: dict[str, Any]) -> str:
    """How a bar is read against the line at 1."""
    side = {"lower": "<= 1 meets", "higher": ">= 1 meets"}.get(f.get("better") or "")
    if side:
        return side
    return {True: "met", False: "not met", None: "not judged"}[f.get("met")]
