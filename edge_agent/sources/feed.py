"""What the live sensor sources (MQTT, serial) share: their common settings, a bounded queue
between the thread that receives and the stream that yields, and the checks every received
sample goes through.

Queue policy (a ``block_then_drop`` port, ``edge_agent.ports``): sensor samples are never
dropped silently. A full queue blocks the receiver (back-pressure) for up to ``block_s``;
only then is the message dropped, counted as ``overflow`` in the source's errors (telemetry's
``source_errors``) and told in one log line.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from edge_agent.ports import Port
from edge_agent.sources.base import Problems, Sample, SourceSettings
from edge_agent.sources.imu import ClockCheck, finite
from edge_agent.window import WindowSettings

__all__ = ["CsvTime", "FeedFormat", "FeedSettings", "QueueSize", "SampleChecks", "feed_port"]

# The fields whose default differs between sources, as types that carry their checks and
# description: a source changes only the default (``queue: QueueSize = 4096``).
FeedFormat = Annotated[
    Literal["json", "csv"], Field(description="Format of each message (serial: of each line).")
]
CsvTime = Annotated[bool, Field(description="CSV lines start with the time (s).")]
QueueSize = Annotated[
    int, Field(ge=1, description="Messages (serial: lines) held between receiver and model.")
]


class FeedSettings(SourceSettings):
    """The settings every live sensor feed shares; a source adds its own (connection, kind) and
    may change a default. Defaults here are the MQTT source's; serial reads CSV with times."""

    format: FeedFormat = "json"
    fields: list[str] = Field(
        default=["x", "y", "z"], min_length=1, description="Channel names, in order."
    )
    csv_time: CsvTime = False
    rate_hz: float = Field(
        default=0.0, ge=0, description="Nominal rate for gap checks on 't'; 0: no checks."
    )
    gap_periods: float = Field(default=5.0, gt=1, description="A gap is this many periods.")
    queue: QueueSize = 1000
    block_s: float = Field(
        default=2.0,
        gt=0,
        description="A full queue blocks the receiver this long, then drops "
        "the message (line) and counts it as 'overflow'.",
    )
    idle_timeout_s: float | None = Field(
        default=None, gt=0, description="End the stream after this long without data."
    )
    limit: int | None = Field(default=None, ge=1, description="Stop after this many samples.")
    window: WindowSettings | None = Field(
        default=None, description="Emit (length, C) windows instead of single samples."
    )


def feed_port(name: str, size: int, block_s: float, problems: Problems) -> Port[Any]:
    """The ``block_then_drop`` port between a feed's receiving thread and its stream: a drop
    is counted as ``overflow`` among the source's problems."""

    def dropped(n: int) -> None:
        problems.add(
            "overflow",
            "queue of %d full for %g s: %d message(s) dropped",
            size,
            block_s,
            n,
            every=False,
            count=n,
        )

    return Port(f"{name}:feed", size, "block_then_drop", block_s, "overflow", dropped)


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
