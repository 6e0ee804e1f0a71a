"""Progress of a long conversion: one line per step, live on a terminal.

Conversion runs for tens of seconds to minutes (each strategy, each budget attempt, the ONNX
export and quantization, evaluating every artifact). ``medge convert`` enables a live display
(rich) when standard error is a terminal; otherwise each step is logged when it ends, with its
duration. Library callers get log lines only.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["disable", "enable", "step"]

log = logging.getLogger("medge.convert")

_state: dict[str, Any] = {"live": None}  # a started rich.progress.Progress while enabled


def enable(live: bool | None = None) -> None:
    """Show steps live on standard error (default: when it is a terminal and rich is there)."""
    if live is None:
        live = sys.stderr.isatty()
    if not live or _state["live"] is not None:
        return
    try:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    except ImportError:  # rich comes with the convert extra; without it: log lines
        return
    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    bar.start()
    _state["live"] = bar


def disable() -> None:
    bar, _state["live"] = _state["live"], None
    if bar is not None:
        bar.stop()


@contextmanager
def step(what: str) -> Iterator[None]:
    """One step of the conversion: shown while it runs, its time logged when it ends."""
    t0 = time.monotonic()
    bar = _state["live"]
    task = bar.add_task(what, total=1) if bar is not None else None
    ok = False
    try:
        yield
        ok = True
    finally:
        seconds = time.monotonic() - t0
        if task is not None:
            mark = "[green]done[/]" if ok else "[red]failed[/]"
            bar.update(task, completed=1, description=f"{what} {mark}")
        log.info("%s: %s in %.1f s", what, "done" if ok else "failed", seconds)
