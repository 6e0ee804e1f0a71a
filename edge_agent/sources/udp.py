"""A live sensor over UDP: each datagram holds one or more lines, JSON or CSV, one sample a line.

JSON: ``{"values": [x, y, z]}`` or the ``fields`` as keys (``{"x": .., "y": .., "z": ..}``),
with optional ``"t"`` (seconds), ``"label"`` and ``"seq"`` (a counter: missing numbers are
counted as ``lost``). CSV: the ``fields`` in order, preceded by the time when ``csv_time``.
A malformed line, a sample of the wrong size or with NaN/inf is dropped and counted; gaps in
``t`` are counted and flagged on the next sample, as for file replay (see ``imu``).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from pydantic import Field

from edge_agent.errors import SourceError
from edge_agent.sources.base import Problems, Sample, SourceSettings
from edge_agent.sources.imu import ClockCheck, finite
from edge_agent.window import WindowSettings

__all__ = ["UdpSettings", "UdpSource", "parse_line"]

log = logging.getLogger("medge.agent.source.udp")


class UdpSettings(SourceSettings):
    kind: Literal["udp"] = Field(default="udp", description="Source plug-in: live UDP sensor.")
    host: str = Field(default="127.0.0.1", description="Address to listen on (0.0.0.0: all).")
    port: int = Field(ge=0, le=65535, description="UDP port to listen on (0: any free port).")
    format: Literal["json", "csv"] = Field(default="json", description="Line format.")
    fields: list[str] = Field(
        default=["x", "y", "z"], min_length=1, description="Channel names, in order."
    )
    csv_time: bool = Field(default=False, description="CSV lines start with the time (s).")
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


def parse_line(
    line: str, fmt: str, fields: list[str], csv_time: bool = False
) -> tuple[np.ndarray, float | None, int | None, int | None]:
    """(values, t, label, seq) of one line; ValueError when malformed or the wrong size."""
    if fmt == "csv":
        parts = [p.strip() for p in line.split(",")]
        t = float(parts.pop(0)) if csv_time else None
        values = np.array([float(p) for p in parts], np.float32)
        label = seq = None
    else:
        obj: Any = json.loads(line)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        raw = obj["values"] if "values" in obj else [obj[k] for k in fields]
        values = np.array([float(v) for v in raw], np.float32)
        t = float(obj["t"]) if obj.get("t") is not None else None
        label = int(obj["label"]) if obj.get("label") is not None else None
        seq = int(obj["seq"]) if obj.get("seq") is not None else None
    if values.shape != (len(fields),):
        raise ValueError(f"{values.size} values, expected {len(fields)}")
    return values, t, label, seq


class UdpSource:
    """Binds on :meth:`open` (or on first :meth:`stream`); ``address`` is where it listens."""

    def __init__(self, cfg: UdpSettings) -> None:
        self.cfg = cfg
        self.name = f"udp:{cfg.port}"
        self._problems = Problems(self.name, log)
        self._sock: socket.socket | None = None
        self.address: tuple[str, int] | None = None

    @property
    def errors(self) -> dict[str, int]:
        return self._problems.snapshot()

    def open(self) -> tuple[str, int]:
        if self._sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind((self.cfg.host, self.cfg.port))
            except OSError as exc:
                sock.close()
                raise SourceError(f"cannot listen on udp {self.cfg.host}:{self.cfg.port}") from exc
            sock.settimeout(0.2)
            self._sock, self.address = sock, sock.getsockname()[:2]
            self.name = f"udp:{self.address[1]}"
            self._problems.name = self.name
        assert self.address is not None
        return self.address

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> UdpSource:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(self, stop: threading.Event) -> Iterator[Sample]:
        c = self.cfg
        self.open()
        assert self._sock is not None
        clock = ClockCheck(self._problems, c.rate_hz, c.gap_periods)
        emitted, last_data, last_seq, n, gap = 0, time.monotonic(), None, 0, False
        try:
            while not stop.is_set():
                try:
                    data, _peer = self._sock.recvfrom(65535)
                except TimeoutError:
                    idle = time.monotonic() - last_data
                    if c.idle_timeout_s is not None and idle >= c.idle_timeout_s:
                        log.info("%s: no data for %.1f s; stream ends", self.name, idle)
                        return
                    continue
                last_data = time.monotonic()
                for line in data.decode("utf-8", errors="replace").splitlines():
                    if not line.strip():
                        continue
                    n += 1
                    try:
                        values, t, label, seq = parse_line(line, c.format, c.fields, c.csv_time)
                    except (ValueError, KeyError, TypeError) as exc:
                        self._problems.add("malformed", "line %d: %s", n, exc, every=False)
                        continue
                    if seq is not None:
                        if last_seq is not None and seq > last_seq + 1:
                            k = seq - last_seq - 1
                            self._problems.add("lost", "%d line(s) lost", k, every=False, count=k)
                        last_seq = seq
                    gap = clock.step(t) or gap
                    if not finite(self._problems, values, f"line {n}"):
                        continue
                    meta: dict[str, Any] = {"gap": True} if gap else {}
                    if seq is not None:
                        meta["seq"] = seq
                    ts = t if t is not None else time.time()
                    yield Sample(f"{self.name}#{n}", values, label, ts, meta)
                    gap = False
                    emitted += 1
                    if c.limit is not None and emitted >= c.limit:
                        return
        finally:
            self.close()
            self._problems.summary()
