"""Inertial sensor replay: WISDM-style text files, plain or gzip, one (C,) sample per time step.

A line is ``[row,]subject,activity,timestamp_ns,x,y,z;`` (the WISDM 2019 watch files carry the
leading row number in some files only). The label is the activity letter's index in
``activities``. A sample with NaN/inf is dropped and counted; a timestamp gap of more than
``gap_periods`` sample periods, or a clock that goes back, is counted and flagged on the next
sample (``meta['gap']``) so that windowing can start afresh. Make windows with ``window``.

With ``gyro`` set, the accelerometer file (``path``) and the gyroscope file of the same
recording are read together (:func:`read_track`, :func:`pair_runs`): each is cut into runs at
its own gaps and backward steps (counted, the gyroscope's as ``gyro_gap`` ...), runs of the two
that overlap in time are paired in file order, and both are linearly interpolated onto one clock
of ``rate_hz`` over the overlap; a sample is then ``(ax, ay, az, gx, gy, gz)``. Input samples
outside the overlap are counted as ``unpaired``; each run after the first starts with
``meta['gap']``, so a window never spans a gap in either stream.
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from edge_agent.errors import SourceError
from edge_agent.sources.base import Problems, Sample, SourceSettings, mark_pass, pace
from edge_agent.window import WindowSettings

__all__ = [
    "WISDM_ACTIVITIES",
    "ClockCheck",
    "ImuSettings",
    "ImuSource",
    "Run",
    "Track",
    "pair_runs",
    "parse_wisdm_line",
    "read_track",
]

log = logging.getLogger("medge.agent.source.imu")

# A walking, B jogging, C stairs, D sitting, E standing, F typing, G teeth, H soup, I chips,
# J pasta, K drinking, L sandwich, M kicking, O catch, P dribbling, Q writing, R clapping, S folding
WISDM_ACTIVITIES = "ABCDEFGHIJKLMOPQRS"


class ImuSettings(SourceSettings):
    kind: Literal["imu"] = Field(default="imu", description="Source plug-in: IMU file replay.")
    path: Path = Field(
        description="WISDM-style text file (.txt or .txt.gz); with `gyro`, the accelerometer."
    )
    gyro: Path | None = Field(
        default=None,
        description="The gyroscope file of the same recording: samples become 6 channels "
        "(ax, ay, az, gx, gy, gz), both streams interpolated onto one `rate_hz` clock over "
        "their overlap. None: `path` alone, 3 channels as recorded.",
    )
    rate_hz: float = Field(
        default=20.0,
        gt=0,
        description="Nominal sampling rate (gap checks; with `gyro` the output rate).",
    )
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


@dataclass(frozen=True)
class Track:
    """One file's finite samples in file order: times (s), (n, 3) values, activity letters,
    and the indices that start a new continuous run (0 first, then one after each gap)."""

    t: np.ndarray
    v: np.ndarray
    act: list[str]
    starts: list[int]

    def runs(self) -> list[slice]:
        ends = [*self.starts[1:], len(self.t)]
        return [slice(a, b) for a, b in zip(self.starts, ends, strict=True) if b > a]


def read_track(
    lines: Iterable[str], problems: Problems, rate_hz: float, gap_periods: float
) -> Track:
    """A :class:`Track` of WISDM lines; malformed and non-finite lines dropped and counted,
    gaps and backward steps counted (:class:`ClockCheck`) and made run starts."""
    clock = ClockCheck(problems, rate_hz, gap_periods)
    t: list[float] = []
    v: list[np.ndarray] = []
    act: list[str] = []
    starts, pending = [0], False
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            a, ts, values = parse_wisdm_line(line)
        except ValueError as exc:
            problems.add("malformed", "line %d: %s", n, exc, every=False)
            continue
        pending = clock.step(ts / 1e9) or pending
        if not finite(problems, values, f"line {n}"):
            continue
        if pending and t:
            starts.append(len(t))
        pending = False
        t.append(ts / 1e9)
        v.append(values)
        act.append(a)
    values_ = np.stack(v) if v else np.zeros((0, 3), np.float32)
    return Track(np.asarray(t, np.float64), values_, act, starts)


@dataclass(frozen=True)
class Run:
    """One stretch where both streams are continuous, on the common clock."""

    t: np.ndarray  # (n,) seconds, 1 / rate_hz apart
    v: np.ndarray  # (n, 6) float32: accelerometer x, y, z, then gyroscope x, y, z
    act: list[str]  # the accelerometer's activity at or before each time


def _overlap(a: Track, ra: slice, g: Track, rg: slice) -> tuple[float, float]:
    return max(a.t[ra.start], g.t[rg.start]), min(a.t[ra.stop - 1], g.t[rg.stop - 1])


def _interp(t: np.ndarray, tt: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.stack([np.interp(tt, t, v[:, k]) for k in range(v.shape[1])], axis=1)


def pair_runs(
    accel: Track, gyro: Track, rate_hz: float, problems: Problems | None = None
) -> Iterator[Run]:
    """The two tracks' runs intersected in file order (a gap in either stream ends a run),
    each stretch linearly interpolated onto one ``rate_hz`` clock that starts where both
    streams are there; samples of either stream outside every stretch are counted as
    ``unpaired`` when the tracks are done."""
    ra, rg = accel.runs(), gyro.runs()
    used = [np.zeros(len(accel.t), bool), np.zeros(len(gyro.t), bool)]
    i = j = 0
    while i < len(ra) and j < len(rg):
        lo, hi = _overlap(accel, ra[i], gyro, rg[j])
        if hi < lo:  # no overlap: drop the run the other stream has no partner for
            if i + 1 < len(ra) and np.subtract(*_overlap(accel, ra[i + 1], gyro, rg[j])) <= 0:
                i += 1
            elif j + 1 < len(rg) and np.subtract(*_overlap(accel, ra[i], gyro, rg[j + 1])) <= 0:
                j += 1
            else:
                i, j = i + 1, j + 1
            continue
        ta, tg = accel.t[ra[i]], gyro.t[rg[j]]
        tt = lo + np.arange(int(np.floor((hi - lo) * rate_hz + 1e-6)) + 1) / rate_hz
        v = np.hstack([_interp(ta, tt, accel.v[ra[i]]), _interp(tg, tt, gyro.v[rg[j]])])
        at = np.clip(np.searchsorted(ta, tt, side="right") - 1, 0, len(ta) - 1) + ra[i].start
        used[0][ra[i]] |= (ta >= lo) & (ta <= hi)
        used[1][rg[j]] |= (tg >= lo) & (tg <= hi)
        yield Run(tt, v.astype(np.float32), [accel.act[k] for k in at])
        ends = ta[-1] <= hi, tg[-1] <= hi  # the run(s) that end here; the other goes on
        i, j = i + ends[0], j + ends[1]
    left = int((~used[0]).sum() + (~used[1]).sum())
    if problems is not None and left:
        problems.add("unpaired", "%d samples without the other stream", left, count=left)


class ImuSource:
    def __init__(self, cfg: ImuSettings) -> None:
        for path in (cfg.path, cfg.gyro):
            if path is not None and not path.is_file():
                raise SourceError(f"{path}: no such file")
        self.cfg = cfg
        self.name = cfg.path.name.removesuffix(".gz").removesuffix(".txt")
        self._problems = Problems(self.name, log)
        self._gyro = Problems(f"{self.name} (gyroscope)", log)

    @property
    def errors(self) -> dict[str, int]:
        """Problems by kind; the gyroscope file's with a ``gyro_`` prefix."""
        gyro = {f"gyro_{k}": n for k, n in self._gyro.snapshot().items()}
        return {**self._problems.snapshot(), **gyro}

    def _lines(self, path: Path, problems: Problems) -> Iterator[str]:
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                yield from f
        except (OSError, EOFError) as exc:  # a cut gzip ends the file here
            problems.add("read", "file ends early (%s)", exc)

    def stream(self, stop: threading.Event) -> Iterator[Sample]:
        c, emitted, passes = self.cfg, 0, 0
        try:
            while not stop.is_set():
                samples = self._paired(stop) if c.gyro is not None else self._single(stop)
                for k, sample in enumerate(samples):
                    yield mark_pass(sample, passes) if passes and k == 0 else sample
                    emitted += 1
                    if c.limit is not None and emitted >= c.limit:
                        return
                if not c.loop or stop.is_set():
                    return
                passes += 1
        finally:
            self._problems.summary()
            self._gyro.summary()

    def _sample(self, sid: str, values: np.ndarray, act: str, t: float, gap: bool) -> Sample:
        label = self.cfg.activities.find(act)
        meta = {"activity": act, "gap": True} if gap else {"activity": act}
        return Sample(f"{self.name}#{sid}", values, label if label >= 0 else None, t, meta)

    def _single(self, stop: threading.Event) -> Iterator[Sample]:
        c = self.cfg
        clock = ClockCheck(self._problems, c.rate_hz, c.gap_periods)
        start, t0, gap = time.monotonic(), None, False
        for n, line in enumerate(self._lines(c.path, self._problems), start=1):
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
            yield self._sample(str(n), values, act, t, gap)
            gap = False

    def _paired(self, stop: threading.Event) -> Iterator[Sample]:
        c = self.cfg
        assert c.gyro is not None
        accel = read_track(
            self._lines(c.path, self._problems), self._problems, c.rate_hz, c.gap_periods
        )
        gyro = read_track(self._lines(c.gyro, self._gyro), self._gyro, c.rate_hz, c.gap_periods)
        n = 0
        for r, run in enumerate(pair_runs(accel, gyro, c.rate_hz, self._problems)):
            start = time.monotonic()
            for k in range(len(run.t)):
                if stop.is_set() or (c.realtime and not pace(stop, start, run.t[k] - run.t[0])):
                    return
                n += 1
                t = float(run.t[k])
                yield self._sample(str(n), run.v[k], run.act[k], t, gap=r > 0 and k == 0)
