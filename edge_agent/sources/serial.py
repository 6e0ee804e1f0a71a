"""A live sensor on a serial line (USB CDC, UART): one sample a line, JSON or CSV as for the
UDP source. Needs pyserial, imported only when this source is used
(``pip install 'medge[serial]'``).

A reader thread reads lines into a bounded queue (back-pressure, then a counted ``overflow``:
see ``sources.feed``); malformed lines, NaN/inf, lost sequence numbers and clock gaps are
counted as for UDP.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from edge_agent.errors import SourceError
from edge_agent.sources.base import Problems, Sample, require
from edge_agent.sources.feed import (
    CsvTime,
    FeedFormat,
    FeedSettings,
    QueueSize,
    SampleChecks,
    feed_port,
)
from edge_agent.sources.udp import parse_line

__all__ = ["SerialSettings", "SerialSource"]

log = logging.getLogger("medge.agent.source.serial")

_EOF = object()


class SerialSettings(FeedSettings):
    """The port and its speed; the rest is :class:`FeedSettings`, here reading CSV lines that
    start with the time, with a deeper queue."""

    kind: Literal["serial"] = Field(default="serial", description="Source plug-in: serial line.")
    port: str = Field(description="Serial device, e.g. /dev/ttyUSB0 or /dev/ttyACM0.")
    baudrate: int = Field(default=115200, gt=0, description="Line speed in baud.")
    format: FeedFormat = "csv"
    csv_time: CsvTime = True
    queue: QueueSize = 4096


class SerialSource:
    def __init__(self, cfg: SerialSettings) -> None:
        self.cfg = cfg
        self.name = f"serial:{cfg.port}"
        self._problems = Problems(self.name, log)
        self._feed = feed_port(self.name, cfg.queue, cfg.block_s, self._problems)
        self.opened = threading.Event()
        """Set once the port is open: what the line carried before that is gone."""

    @property
    def errors(self) -> dict[str, int]:
        return self._problems.snapshot()

    def _open(self) -> Any:
        serial = require("serial", "serial")
        try:
            return serial.Serial(self.cfg.port, self.cfg.baudrate, timeout=0.2)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise SourceError(f"{self.name}: cannot open ({exc})") from exc

    def _read(self, port: Any, stop: threading.Event) -> None:
        buf = b""
        try:
            while not stop.is_set():
                chunk = port.read(4096)
                if not chunk:
                    continue
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._feed.put(line)
        except Exception as exc:  # any read failure ends the stream, told once
            self._problems.add("read", "serial read failed: %s", exc)
        finally:
            if not stop.is_set():
                self._feed.put(_EOF)

    def stream(self, stop: threading.Event) -> Iterator[Sample]:
        c = self.cfg
        port = self._open()
        self.opened.set()
        halt = threading.Event()
        reader = threading.Thread(target=self._read, args=(port, halt), daemon=True, name=self.name)
        reader.start()
        checks = SampleChecks(self.name, self._problems, c.rate_hz, c.gap_periods)
        emitted, idle, n = 0, 0.0, 0
        try:
            while not stop.is_set():
                raw = self._feed.get(timeout=0.2)
                if raw is _EOF:
                    return
                if raw is None:
                    idle += 0.2
                    if c.idle_timeout_s is not None and idle >= c.idle_timeout_s:
                        log.info("%s: no data for %.1f s; stream ends", self.name, idle)
                        return
                    continue
                idle, n = 0.0, n + 1
                try:
                    line = raw.decode("utf-8").strip()
                    values, t, label, seq = parse_line(line, c.format, c.fields, c.csv_time)
                except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                    self._problems.add("malformed", "line %d: %s", n, exc, every=False)
                    continue
                sample = checks.sample(values, t, label, seq)
                if sample is None:
                    continue
                yield sample
                emitted += 1
                if c.limit is not None and emitted >= c.limit:
                    return
        finally:
            halt.set()
            reader.join(timeout=2)
            port.close()
            self._problems.summary()
