"""What a benchmark script hands to ``medge bench`` besides what it prints: its figures, each
with what it is compared with, and series (memory over time, say) to plot.

``medge bench`` runs each script of bench/ as its own process with the environment variable
``MEDGE_BENCH_DATA`` set to a file of its own; the calls below merge into that JSON file, and
``medge bench`` reads it back after the script ends, stores it in bench.json under the
benchmark's name, lists the figures in docs/benchmarks.md beside their anchors and plots them.
Run by hand (the variable unset), every call here does nothing: a script prints as it always
did. A script of bench/ is run with bench/ as its first import path, so, in any of them::

    from bench_data import figure, record, series

    # a figure and what it is compared with; met is judged from target and better (or given)
    figure("seal x25519", 6.7, "us", target=18.8, better="lower", anchor="release 62caf5d")
    figure("first result stored", 0.59, "s", target=2.0, met=0.59 < 2.0, anchor="target < 2 s")
    figure("message size", 765, "B")  # no anchor: listed, never judged

    # x/y lists; the series of one ``plot`` share a PNG (OUT/plots/<bench>_<plot>.png)
    series("agent", [0, 15, 30], [83.0, 83.1, 83.2], plot="memory", x_unit="s", y_unit="MB")

    # anything else worth keeping in bench.json, merged under its name
    record("config", n=300, repeat=1)

The file holds one JSON object:

- ``figures``: a list of {name, value, unit, target, better, anchor, met}. ``value`` is a
  number; ``target`` the number it is judged against (None if none); ``better`` "lower" or
  "higher" (which side of the target meets it); ``anchor`` the words that say what it is
  compared with (from target and better when not given); ``met`` True / False, or None where
  there is nothing to be judged against. A figure with a non-zero target also goes into the
  benchmark's bar chart as value / target.
- ``series``: {name: {x, y, x_unit, y_unit, plot}}.
- any other name given to ``record``: an object of its keyword arguments.

Call ``figure`` as soon as a figure is known, not only at the end: a script that fails later
still hands over what it measured (and ``medge bench`` still records it as failed). Values
must be finite numbers (numpy scalars are fine); a NaN raises rather than writing a figure no
one can judge.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["ENV", "figure", "record", "series"]

ENV = "MEDGE_BENCH_DATA"
RESERVED = ("figures", "series")


def _path() -> Path | None:
    where = os.environ.get(ENV)
    return Path(where) if where else None


def _load(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    return json.loads(text) if text.strip() else {}


def _plain(x: Any) -> Any:
    """numpy scalars (anything with .item()) as Python numbers, for json."""
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON: {type(x).__name__}")


def _update(change: Any) -> None:
    path = _path()
    if path is None:
        return
    data = _load(path)
    change(data)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_plain, allow_nan=False) + "\n")
    os.replace(tmp, path)  # the reader never sees half a file


def _number(name: str, value: Any) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"figure {name!r}: {value!r} is not a finite number")
    return v


def figure(
    name: str,
    value: float,
    unit: str = "",
    *,
    target: float | None = None,
    better: str | None = None,
    anchor: str | None = None,
    met: bool | None = None,
) -> None:
    """One figure and what it is compared with (see the module's docstring)."""
    if better not in (None, "lower", "higher"):
        raise ValueError(f"figure {name!r}: better is 'lower' or 'higher', not {better!r}")
    v = _number(name, value)
    t = None if target is None else _number(name, target)
    if met is None and t is not None and better is not None:
        met = v <= t if better == "lower" else v >= t
    if anchor is None and t is not None:
        side = {"lower": "<= ", "higher": ">= "}.get(better or "", "")
        anchor = f"target {side}{t:g} {unit}".strip()
    entry = {
        "name": name,
        "value": v,
        "unit": unit,
        "target": t,
        "better": better,
        "anchor": anchor or "",
        "met": None if met is None else bool(met),
    }
    _update(lambda d: d.setdefault("figures", []).append(entry))


def series(
    name: str,
    x: Iterable[float],
    y: Iterable[float],
    *,
    plot: str = "series",
    x_unit: str = "",
    y_unit: str = "",
) -> None:
    """A named x/y series; the series of one ``plot`` are drawn in one PNG."""
    xs, ys = [float(v) for v in x], [float(v) for v in y]
    if len(xs) != len(ys):
        raise ValueError(f"series {name!r}: {len(xs)} x for {len(ys)} y")
    entry = {"x": xs, "y": ys, "x_unit": x_unit, "y_unit": y_unit, "plot": plot}
    _update(lambda d: d.setdefault("series", {}).__setitem__(name, entry))


def record(name: str, **data: Any) -> None:
    """Anything else worth keeping, merged into the object under ``name``."""
    if name in RESERVED:
        raise ValueError(f"{name!r}: use figure() or series()")
    _update(lambda d: d.setdefault(name, {}).update(data))
