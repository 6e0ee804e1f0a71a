"""What the live sensor sources (MQTT, serial) share: a bounded queue between the thread that
receives and the stream that yields, and the checks every received sample goes through.

Queue policy: sensor samples are never dropped silently. A full queue blocks the receiver
(back-pressure) for up to ``block_s``; only then is the message dropped, counted as
``overflow`` in the source's errors (telemetry's ``source_errors``) and told in one log line.
"""

from __future__ import annotations

import queue
import time
from typing import Any

import numpy as np

from edge_agent.sources.base import Problems, Sample
from edge_agent.sources.imu import ClockCheck, finite

__all__ = ["BoundedFeed", "SampleChecks"]


class BoundedFeed:
    """A bounded queue of received items; :meth:`put` applies the policy above."""

    def __init__(self, size: int, block_s: float, problems: Problems) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=size)
        self.size, self.block_s, self.problems = size, block_s, problems

    def put(self, item: Any, count: int = 1) -> bool:
        """Queue ``item``; False when it was dropped (``count`` added to overflow)."""
        try:
            self._q.put(item, timeout=self.block_s)
        except queue.Full:
            self.problems.add(
                "overflow",
                "queue of %d full for %g s: %d message(s) dropped",
                self.size,
                self.block_s,
                count,
                every=False,
                count=count,
            )
            return False
        return True

    def get(self, timeout: float) -> Any | None:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def depth(self) -> int:
        return self._q.qsize()


class SampleChecks:
    """Sequence numbers (missing ones counted as ``lost``), clock gaps and backward steps
    (flagged on the next sample as ``meta['gap']``), NaN/inf (dropped, counted as ``nan``)."""

    def __init__(self, name: str, problems: Problems, rate_hz: float, gap_periods: float) -> None:
        self.name, self.problems = name, problems
        self.clock = ClockCheck(problems, rate_hz, gap_periods)
        self.n, self.last_seq, self.gap = 0, None, False

    def sample(
        self, values: np.ndarray, t: float | None, label: int | None, seq: int | None
    ) -> Sample | None:
        """The checked sample, or None when it is dropped (and counted)."""
        self.n += 1
        if seq is not None:
            if self.last_seq is not None and seq > self.last_seq + 1:
                k = seq - self.last_seq - 1
                self.problems.add("lost", "%d sample(s) lost", k, every=False, count=k)
            self.last_seq = seq
        self.gap = self.clock.step(t) or self.gap
        if not finite(self.problems, values, f"sample {self.n}"):
            return None
        meta: dict[str, Any] = {"gap": True} if self.gap else {}
        if seq is not None:
            meta["seq"] = seq
        self.gap = False
        ts = t if t is not None else time.time()
        return Sample(f"{self.name}#{self.n}", values, label, ts, meta)
