"""Pipeline statistics and device health, as plain numbers for the ``telemetry`` topic."""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "STAGES",
    "PipelineStats",
    "StageLatency",
    "cpu_seconds",
    "device_health",
    "rss_bytes",
    "temperature_c",
]

STAGES = ("preprocess", "infer", "decode", "total")


class PipelineStats:
    """Counters and recent per-stage latencies. Thread-safe."""

    def __init__(self, window: int = 1000) -> None:
        self._lock = threading.Lock()
        self._window = window
        self._lat: dict[str, deque[float]] = {s: deque(maxlen=window) for s in STAGES}
        self._done: deque[float] = deque(maxlen=window)
        self._sum = dict.fromkeys(STAGES, 0.0)  # seconds, since start (Prometheus summaries)
        self._count = dict.fromkeys(STAGES, 0)
        self.results = 0
        self.errors: dict[str, int] = {}
        # what the event trackers met that is not an error but changes what they report:
        # windows whose time went back (a looped recording, a clock reset), onsets
        # suppressed by a rule's refractory time
        self.events: dict[str, int] = {}
        # results with and without the input thumbnail and CAM (edge_agent.pictures)
        self.pictures: dict[str, int] = {}
        self.started = time.time()

    def record(self, **seconds: float) -> None:
        with self._lock:
            for stage, s in seconds.items():
                if stage not in self._lat:  # a stage a newer pipeline times
                    self._lat[stage] = deque(maxlen=self._window)
                    self._sum[stage], self._count[stage] = 0.0, 0
                self._lat[stage].append(s * 1000.0)
                self._sum[stage] += s
                self._count[stage] += 1
            self._done.append(time.monotonic())
            self.results += 1

    def error(self, stage: str) -> int:
        with self._lock:
            self.errors[stage] = self.errors.get(stage, 0) + 1
            return self.errors[stage]

    def event_note(self, what: str, n: int = 1) -> int:
        """Count ``n`` of ``what`` (``time_resets``, ``suppressed``); the total so far."""
        with self._lock:
            self.events[what] = self.events.get(what, 0) + n
            return self.events[what]

    def picture_note(self, what: str) -> None:
        """Count one result ``made`` with pictures or ``capped`` (left without)."""
        with self._lock:
            self.pictures[what] = self.pictures.get(what, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = {s: {"p50": _pct(v, 50), "p99": _pct(v, 99)} for s, v in self._lat.items() if v}
            return {
                "fps": round(_fps(self._done), 2),
                "latency_ms": lat,
                "results": self.results,
                "errors": dict(self.errors),
                **({"events": dict(self.events)} if self.events else {}),
                **({"pictures": dict(self.pictures)} if self.pictures else {}),
                "uptime_s": round(time.time() - self.started, 1),
            }

    def fps(self) -> float:
        with self._lock:
            return _fps(self._done)

    def latencies(self, quantiles: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[StageLatency]:
        """Per stage: quantiles (seconds) over the recent window, sum and count since start."""
        with self._lock:
            out = []
            for s, v in self._lat.items():
                arr = np.fromiter(v, float) / 1000.0 if v else None
                qs = {q: float(np.quantile(arr, q)) if arr is not None else None for q in quantiles}
                out.append(StageLatency(s, qs, self._sum[s], self._count[s]))
            return out


@dataclass(frozen=True)
class StageLatency:
    stage: str
    quantiles: dict[float, float | None]
    sum_s: float
    count: int


def _fps(done: deque[float]) -> float:
    now = time.monotonic()
    recent = [t for t in done if now - t <= 5.0]
    return (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 else 0.0


def _pct(values: deque[float], q: float) -> float:
    return round(float(np.percentile(np.fromiter(values, float), q)), 3)


class _CpuMeter:
    def __init__(self) -> None:
        self._last = (time.monotonic(), _cpu_seconds())

    def percent(self) -> float:
        now, cpu = time.monotonic(), _cpu_seconds()
        (t0, c0), self._last = self._last, (now, cpu)
        return round(100.0 * (cpu - c0) / max(now - t0, 1e-6), 1)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process since it started."""
    t = os.times()
    return t.user + t.system


_cpu_seconds = cpu_seconds


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux /proc), None where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _rss_mb() -> float | None:
    b = rss_bytes()
    return None if b is None else round(b / 2**20, 1)


def temperature_c() -> float | None:
    """SoC temperature from thermal zone 0 (Raspberry Pi, Jetson), None where absent."""
    try:
        return round(int(Path("/sys/class/thermal/thermal_zone0/temp").read_text()) / 1000.0, 1)
    except (OSError, ValueError):
        return None


_cpu = _CpuMeter()


def device_health() -> dict[str, Any]:
    """CPU (of this process, since the last call), resident memory, temperature if known."""
    return {"cpu_percent": _cpu.percent(), "rss_mb": _rss_mb(), "temperature_c": temperature_c()}
