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
from typing import Any, Literal

import numpy as np
from pydantic import Field

from edge_agent.errors import SourceError
from edge_agent.sources.live import POLL_S, LiveSettings, LiveSource, Row

__all__ = ["UdpSettings", "UdpSource", "parse_line"]

log = logging.getLogger("medge.agent.source.udp")


class UdpSettings(LiveSettings):
    """Where to listen; the rest is :class:`~edge_agent.sources.live.LiveSettings`."""

    kind: Literal["udp"] = Field(default="udp", description="Source plug-in: live UDP sensor.")
    host: str = Field(default="127.0.0.1", description="Address to listen on (0.0.0.0: all).")
    port: int = Field(ge=0, le=65535, description="UDP port to listen on (0: any free port).")
    format: Literal["json", "csv"] = Field(default="json", description="Line format.")


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


class UdpSource(LiveSource):
    """Binds on :meth:`open` (or on first :meth:`stream`); ``address`` is where it listens.
    One sample a line; a sample's number counts every line received (malformed ones too)."""

    unit = "line"
    numbered_by_unit = True
    log = log

    def __init__(self, cfg: UdpSettings) -> None:
        self.cfg: UdpSettings = cfg
        super().__init__(cfg, f"udp:{cfg.port}")
        self._sock: socket.socket | None = None
        self.address: tuple[str, int] | None = None

    def open(self) -> tuple[str, int]:
        if self._sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind((self.cfg.host, self.cfg.port))
            except OSError as exc:
                sock.close()
                raise SourceError(f"cannot listen on udp {self.cfg.host}:{self.cfg.port}") from exc
            sock.settimeout(POLL_S)
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

    def receive(self, timeout: float) -> bytes | None:
        assert self._sock is not None
        try:
            data, _peer = self._sock.recvfrom(65535)
        except TimeoutError:
            return None
        return data

    def units(self, raw: bytes) -> list[str]:
        return [ln for ln in raw.decode("utf-8", errors="replace").splitlines() if ln.strip()]

    def parse(self, unit: str) -> list[Row]:
        c = self.cfg
        return [parse_line(unit, c.format, c.fields, c.csv_time)]
