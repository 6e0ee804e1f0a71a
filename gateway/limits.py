"""The flood limit per device: a token bucket per (site, device) (gateway.service uses it before
a message is opened; ``limits`` in gateway.yaml, docs/gateway-config.md)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["DeviceLimiter"]


class DeviceLimiter:
    """A token bucket per (site, device): ``rate`` messages per second, ``burst`` at once;
    ``rate <= 0`` turns limiting off. Thread-safe."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst = float(rate), max(float(burst), 1.0)
        self._clock = clock
        self.max_keys = 10_000  # devices tracked before refilled buckets are forgotten
        self._buckets: dict[tuple[str, str], list[float]] = {}  # key -> [tokens, last refill]
        self._lock = threading.Lock()

    def allow(self, site: str, device: str) -> bool:
        if self.rate <= 0:
            return True
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get((site, device))
            if bucket is None:
                if len(self._buckets) >= self.max_keys:
                    self._forget_full(now)
                bucket = self._buckets[(site, device)] = [self.burst, now]
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
            if bucket[0] >= 1.0:
                bucket[0] -= 1.0
                return True
            return False

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have refilled (forgetting them changes nothing), so names a
        client makes up on an open broker cannot grow the table without end."""
        refill = self.burst / self.rate
        self._buckets = {k: b for k, b in self._buckets.items() if now - b[1] < refill}
