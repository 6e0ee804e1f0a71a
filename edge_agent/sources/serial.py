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
from typing import Any, Literal

from pydantic import Field

from edge_agent.errors import SourceError
from edge_agent.sources.base import require
from edge_agent.sources.feed import CsvTime, FeedFormat, FeedSettings, QueueSize, feed_port
from edge_agent.sources.live import END, LiveSource, Row
from edge_agent.sources.udp import parse_line

__all__ = ["SerialSettings", "SerialSource"]

log = logging.getLogger("medge.agent.source.serial")


class SerialSettings(FeedSettings):
    """The port and its speed; the rest is :class:`FeedSettings`, here reading CSV lines that
    start with the time, with a deeper queue."""

    kind: Literal["serial"] = Field(default="serial", description="Source plug-in: serial line.")
    port: str = Field(description="Serial device, e.g. /dev/ttyUSB0 or /dev/ttyACM0.")
    baudrate: int = Field(default=115200, gt=0, description="Line speed in baud.")
    format: FeedFormat = "csv"
    csv_time: CsvTime = True
    queue: QueueSize = 4096


class SerialSource(LiveSource):
    """Opens the port and starts its reader thread at the start of :meth:`stream`; the loop and
    its checks are :class:`~edge_agent.sources.live.LiveSource`'s."""

    unit = "line"
    log = log

    def __init__(self, cfg: SerialSettings) -> None:
        self.cfg: SerialSettings = cfg
        super().__init__(cfg, f"serial:{cfg.port}")
        self._feed = feed_port(self.name, cfg.queue, cfg.block_s, self._problems)
        self.ports = [self._feed]
        self._port: Any = None
        self._reader: threading.Thread | None = None
        self._halt = threading.Event()
        self.opened = threading.Event()
        """Set once the port is open: what the line carried before that is gone."""

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
                self._feed.put(END)

    def open(self) -> None:
        if self._port is not None:
            return
        self._port = self._open()
        self.opened.set()
        self._halt = threading.Event()
        self._reader = threading.Thread(
            target=self._read, args=(self._port, self._halt), daemon=True, name=self.name
        )
        self._reader.start()

    def close(self) -> None:
        if self._port is None:
            return
        self._halt.set()
        if self._reader is not None:
            self._reader.join(timeout=2)
        self._port.close()
        self._port, self._reader = None, None

    def receive(self, timeout: float) -> Any:
        return self._feed.get(timeout)

    def parse(self, unit: bytes) -> list[Row]:
        c = self.cfg
        return [parse_line(unit.decode("utf-8").strip(), c.format, c.fields, c.csv_time)]
