"""Pipeline statistics and device health, as plain numbers for the ``telemetry`` topic."""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PipelineStats", "device_health"]

STAGES = ("preprocess", "infer", "decode", "total")


class PipelineStats:
    """Counters and recent per-stage latencies. Thread-safe."""

    def __init__(self, window: int = 1000) -> None:
        self._lock = threading.Lock()
        self._lat: dict[str, deque[float]] = {s: deque(maxlen=window) for s in STAGES}
        self._done: deque[float] = deque(maxlen=window)
        self.results = 0
        self.errors: dict[str, int] = {}
        self.started = time.time()

    def record(self, **seconds: float) -> None:
        with self._lock:
            for stage, s in seconds.items():
                self._lat[stage].append(s * 1000.0)
            self._done.append(time.monotonic())
            self.results += 1

    def error(self, stage: str) -> int:
        with self._lock:
            self.errors[stage] = self.errors.get(stage, 0) + 1
            return self.errors[stage]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = {s: {"p50": _pct(v, 50), "p99": _pct(v, 99)} for s, v in self._lat.items() if v}
            now = time.monotonic()
            recent = [t for t in self._done if now - t <= 5.0]
            fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 else 0.0
            return {
                "fps": round(fps, 2),
                "latency_ms": lat,
                "results": self.results,
                "errors": dict(self.errors),
                "uptime_s": round(time.time() - self.started, 1),
            }


def _pct(values: deque[float], q: float) -> float:
    return round(float(np.percentile(np.fromiter(values, float), q)), 3)


class _CpuMeter:
    def __init__(self) -> None:
        self._last = (time.monotonic(), _cpu_seconds())

    def percent(self) -> float:
        now, cpu = time.monotonic(), _cpu_seconds()
        (t0, c0), self._last = self._last, (now, cpu)
        return round(100.0 * (cpu - c0) / max(now - t0, 1e-6), 1)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _rss_mb() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def _temperature_c() -> float | None:
    try:
        return round(int(Path("/sys/class/thermal/thermal_zone0/temp").read_text()) / 1000.0, 1)
    except (OSError, ValueError):
        return None


_cpu = _CpuMeter()


def device_health() -> dict[str, Any]:
    """CPU (of this process, since the last call), resident memory, temperature if known."""
    return {"cpu_percent": _cpu.percent(), "rss_mb": _rss_mb(), "temperature_c": _temperature_c()}
