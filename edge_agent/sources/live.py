"""One base for the live sensor sources (UDP, MQTT, serial): their shared settings, the loop
that turns what the transport receives into checked samples, and those checks.

A live source is only its transport: :meth:`LiveSource.open`, :meth:`~LiveSource.close`,
:meth:`~LiveSource.receive` (one datagram, message or line, or None after ``POLL_S`` without
data), :meth:`~LiveSource.units` (the parts of it that are parsed one by one) and
:meth:`~LiveSource.parse` (the rows of one part). The loop here does the rest, the same way
for each: a malformed part is dropped and counted (``malformed``, first one logged), sequence
numbers (``lost``), clock gaps (flagged on the next sample as ``meta['gap']``), NaN/inf
(``nan``), ``idle_timeout_s`` and ``limit``; the problems are summed up in one line at the end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from edge_agent.ports import Port
from edge_agent.sources.base import Problems, Sample, SourceSettings
from edge_agent.sources.imu import ClockCheck, finite
from edge_agent.window import WindowSettings

__all__ = [
    "END",
    "POLL_S",
    "CsvTime",
    "FeedFormat",
    "LiveSettings",
    "LiveSource",
    "Row",
    "SampleChecks",
]

Row = tuple[np.ndarray, float | None, int | None, int | None]  # values, t, label, seq

POLL_S = 0.2  # how long one receive waits: the stream sees ``stop`` at least this often
END = object()  # what receive returns when the transport has ended (a serial read failed)

# The fields whose default differs between sources, as types that carry their checks and
# description: a source changes only the default (``format: FeedFormat = "csv"``).
FeedFormat = Annotated[
    Literal["json", "csv"], Field(description="Format of each message (serial: of each line).")
]
CsvTime = Annotated[bool, Field(description="CSV lines start with the time (s).")]


class LiveSettings(SourceSettings):
    """The settings every live sensor source shares; a source adds its transport's (address,
    port, ...) and may change a default (``format``, ``csv_time``)."""

    format: FeedFormat = "json"
    fields: list[str] = Field(
        default=["x", "y", "z"], min_length=1, description="Channel names, in order."
    )
    csv_time: CsvTime = False
    rate_hz: float = Field(
        default=0.0, ge=0, description="Nominal rate for gap checks on 't'; 0: no checks."
    )
    gap_periods: float = Field(default=5.0, gt=1, description="A gap is this many periods.")
    idle_timeout_s: float | None = Field(
        default=None, gt=0, description="End the stream after this long without data."
    )
    limit: int | None = Field(default=None, ge=1, description="Stop after this many samples.")
    window: WindowSettings | None = Field(
        default=None, description="Emit (length, C) windows instead of single samples."
    )


class SampleChecks:
    """Sequence numbers (missing ones counted as ``lost``), clock gaps and backward steps
    (flagged on the next sample as ``meta['gap']``), NaN/inf (dropped, counted as ``nan``).

    ``what``: what a sample is called in problem lines (``sample``, ``line``)."""

    def __init__(
        self,
        name: str,
        problems: Problems,
        rate_hz: float,
        gap_periods: float,
        what: str = "sample",
    ) -> None:
        self.name, self.problems, self.what = name, problems, what
        self.clock = ClockCheck(problems, rate_hz, gap_periods)
        self.n, self.gap = 0, False
        self.last_seq: int | None = None

    def sample(
        self,
        values: np.ndarray,
        t: float | None,
        label: int | None,
        seq: int | None,
        number: int | None = None,
    ) -> Sample | None:
        """The checked sample, or None when it is dropped (and counted). ``number``: its
        number in the id and problem lines (default: how many samples were checked)."""
        self.n += 1
        k = self.n if number is None else number
        if seq is not None:
            if self.last_seq is not None and seq > self.last_seq + 1:
                lost = seq - self.last_seq - 1
                self.problems.add("lost", f"%d {self.what}(s) lost", lost, every=False, count=lost)
            self.last_seq = seq
        self.gap = self.clock.step(t) or self.gap
        if not finite(self.problems, values, f"{self.what} {k}"):
            return None
        meta: dict[str, Any] = {"gap": True} if self.gap else {}
        if seq is not None:
            meta["seq"] = seq
        self.gap = False
        ts = t if t is not None else time.time()
        return Sample(f"{self.name}#{k}", values, label, ts, meta)


class LiveSource:
    """The loop of a live sensor source; a subclass is its transport.

    ``unit``: what one parsed part is called in problem lines (``message``, ``line``);
    ``numbered_by_unit``: a sample's id counts parts received (UDP: one sample a line, a
    malformed line keeps its number) rather than samples checked."""

    unit: ClassVar[str] = "message"
    numbered_by_unit: ClassVar[bool] = False
    log: ClassVar[logging.Logger] = logging.getLogger("medge.agent.source")

    def __init__(self, cfg: LiveSettings, name: str) -> None:
        self.cfg, self.name = cfg, name
        self._problems = Problems(name, self.log)
        self.ports: list[Port[Any]] = []  # the queues between its threads (telemetry)

    @property
    def errors(self) -> dict[str, int]:
        return self._problems.snapshot()

    # -- the transport: what a subclass implements ---------------------------------------
    def open(self) -> Any:
        """Start receiving (idempotent)."""

    def close(self) -> None:
        """Stop receiving and let go of the transport."""

    def receive(self, timeout: float) -> Any:
        """One received item, None after ``timeout`` without data, or :data:`END`."""
        raise NotImplementedError

    def units(self, raw: Any) -> Iterable[Any]:
        """The parts of one received item, parsed one by one."""
        return (raw,)

    def parse(self, unit: Any) -> list[Row]:
        """The rows of one part; ValueError (KeyError, TypeError, UnicodeDecodeError) when
        it is malformed."""
        raise NotImplementedError

    def __enter__(self) -> Any:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop ------------------------------------------------------------------------
    def stream(self, stop: threading.Event) -> Iterator[Sample]:
        c = self.cfg
        self.open()
        what = "line" if self.numbered_by_unit else "sample"
        checks = SampleChecks(self.name, self._problems, c.rate_hz, c.gap_periods, what)
        emitted, n, last_data = 0, 0, time.monotonic()
        try:
            while not stop.is_set():
                raw = self.receive(POLL_S)
                if raw is END:
                    return
                if raw is None:
                    idle = time.monotonic() - last_data
                    if c.idle_timeout_s is not None and idle >= c.idle_timeout_s:
                        self.log.info("%s: no data for %.1f s; stream ends", self.name, idle)
                        return
                    continue
                last_data = time.monotonic()
                for unit in self.units(raw):
                    n += 1
                    try:
                        rows = self.parse(unit)
                    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                        self._problems.add("malformed", f"{self.unit} %d: %s", n, exc, every=False)
                        continue
                    for values, t, label, seq in rows:
                        number = n if self.numbered_by_unit else None
                        sample = checks.sample(values, t, label, seq, number)
                        if sample is None:
                            continue
                        yield sample
                        emitted += 1
                        if c.limit is not None and emitted >= c.limit:
                            return
        finally:
            self.close()
            self._problems.summary()
