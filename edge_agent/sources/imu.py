"""Inertial sensor replay: WISDM-style text files, plain or gzip, one (C,) sample per time step.

A line is ``[row,]subject,activity,timestamp_ns,x,y,z;`` (the WISDM 2019 watch files carry the
leading row number in some files only). The label is the activity letter's index in
``activities``. A sample with NaN/inf is dropped and counted; a timestamp gap of more than
``gap_periods`` sample periods, or a clock that goes back, is counted and flagged on the next
sample (``meta['gap']``) so that windowing can start afresh. Make windows with ``window``.
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from edge_agent.errors import SourceError
from edge_agent.sources.base import Problems, Sample, SourceSettings, pace
from edge_agent.window import WindowSettings

__all__ = ["WISDM_ACTIVITIES", "ClockCheck", "ImuSettings", "ImuSource", "parse_wisdm_line"]

log = logging.getLogger("medge.agent.source.imu")

# A walking, B jogging, C stairs, D sitting, E standing, F typing, G teeth, H soup, I chips,
# J pasta, K drinking, L sandwich, M kicking, O catch, P dribbling, Q writing, R clapping, S folding
WISDM_ACTIVITIES = "ABCDEFGHIJKLMOPQRS"


class ImuSettings(SourceSettings):
    kind: Literal["imu"] = Field(default="imu", description="Source plug-in: IMU file replay.")
    path: Path = Field(description="WISDM-style text file (.txt or .txt.gz).")
    rate_hz: float = Field(default=20.0, gt=0, description="Nominal sampling rate (gap checks).")
    gap_periods: float = Field(
        default=5.0, gt=1, description="A step longer than this many periods is a gap."
    )
    realtime: bool = Field(
        default=False, description="Replay at the recorded timestamps; false: as fast as can."
    )
    activities: str = Field(
        default=WISDM_ACTIVITIES, description="Activity letters; the label is the index."
    )
    loop: bool = Field(default=False, description="Start again at the end of the file.")
    limit: int | None = Field(default=None, ge=1, description="Stop after this many samples.")
    window: WindowSettings | None = Field(
        default=None, description="Emit (length, C) windows instead of single samples."
    )


def parse_wisdm_line(line: str) -> tuple[str, int, np.ndarray]:
    """(activity, timestamp ns, values) of one line; ValueError when malformed."""
    f = line.strip().rstrip(";").split(",")
    if len(f) not in (6, 7):
        raise ValueError(f"{len(f)} fields, expected 6 or 7")
    f = f[-6:]
    return f[1].strip(), int(f[2]), np.array([float(v) for v in f[3:]], np.float32)


class ClockCheck:
    """Counts timestamp gaps and backward steps; True when the next sample starts afresh."""

    def __init__(self, problems: Problems, rate_hz: float, gap_periods: float) -> None:
        self.problems, self.limit = problems, gap_periods / rate_hz if rate_hz > 0 else None
        self.last: float | None = None

    def step(self, t: float | None) -> bool:
        if t is None:
            return False
        last, self.last = self.last, t
        if last is None or self.limit is None:
            return False
        dt = t - last
        if dt <= 0:
            self.problems.add("backwards", "clock went back %.3f s", -dt, every=False)
            return True
        if dt > self.limit:
            self.problems.add("gap", "gap of %.3f s in the samples", dt, every=False)
            return True
        return False


def finite(problems: Problems, values: np.ndarray, where: str) -> bool:
    """False (and counted) when a sample holds NaN or inf."""
    if np.isfinite(values).all():
        return True
    problems.add("nan", "non-finite sample at %s dropped", where, every=False)
    return False


class ImuSource:
    def __init__(self, cfg: ImuSettings) -> None:
        if not cfg.path.is_file():
            raise SourceError(f"{cfg.path}: no such file")
        self.cfg = cfg
        self.name = cfg.path.name.removesuffix(".gz").removesuffix(".txt")
        self._problems = Problems(self.name, log)

    @property
    def errors(self) -> dict[str, int]:
        return self._problems.snapshot()

    def _lines(self) -> Iterator[str]:
        opener = gzip.open if self.cfg.path.suffix == ".gz" else open
        try:
            with opener(self.cfg.path, "rt", encoding="utf-8", errors="replace") as f:
                yield from f
        except (OSError, EOFError) as exc:  # a cut gzip ends the file here
            self._problems.add("read", "file ends early (%s)", exc)

    def stream(self, stop: threading.Event) -> Iterator[Sample]:
        c, emitted = self.cfg, 0
        try:
            while not stop.is_set():
                clock = ClockCheck(self._problems, c.rate_hz, c.gap_periods)
                start, t0, gap = time.monotonic(), None, False
                for n, line in enumerate(self._lines(), start=1):
                    if stop.is_set():
                        return
                    if not line.strip():
                        continue
                    try:
                        act, ts, values = parse_wisdm_line(line)
                    except ValueError as exc:
                        self._problems.add("malformed", "line %d: %s", n, exc, every=False)
                        continue
                    t = ts / 1e9
                    gap = clock.step(t) or gap
                    if not finite(self._problems, values, f"line {n}"):
                        continue
                    if c.realtime:
                        t0 = t if t0 is None or gap else t0
                        if gap:  # resynchronise instead of sleeping through a gap
                            start = time.monotonic()
                        if not pace(stop, start, t - t0):
                            return
                    label = c.activities.find(act)
                    meta = {"activity": act, "gap": True} if gap else {"activity": act}
                    yield Sample(f"{self.name}#{n}", values, label if label >= 0 else None, t, meta)
                    gap = False
                    emitted += 1
                    if c.limit is not None and emitted >= c.limit:
                        return
                if not c.loop:
                    return
        finally:
            self._problems.summary()
