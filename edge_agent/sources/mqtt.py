"""A live sensor over MQTT: a wearable publishes raw samples to the fog broker, on
``medge/v1/<site>/<device>/sensor/<name>`` (docs/topics.md), and this source subscribes.

A payload is JSON: one sample ``{"t": 12.30, "values": [x, y, z]}`` (optional ``seq``,
``label``), a list of such objects, or a compact batch ``{"t0": 12.30, "dt": 0.05,
"values": [[x, y, z], ...]}`` (or ``"t": [..]`` with one time per row; optional ``seq`` of the
first row); with ``format: csv``, lines as for the UDP source. Bad payloads, NaN/inf, lost
sequence numbers and clock gaps are counted as for UDP. The receiving thread and the stream
share a bounded queue: back-pressure, then a counted ``overflow`` (see ``sources.feed``).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from edge_agent.sources.feed import FeedSettings, feed_port
from edge_agent.sources.live import LiveSource, Row
from edge_agent.sources.udp import parse_line
from edge_agent.topics import ROOT, check_name

__all__ = ["MqttSensorSettings", "MqttSensorSource", "parse_payload", "sensor_topic"]

log = logging.getLogger("medge.agent.source.mqtt")


class MqttSensorSettings(FeedSettings):
    """Broker, topic and credentials; the rest (format, fields, queue, ...) and its defaults
    are :class:`FeedSettings`."""

    kind: Literal["mqtt"] = Field(default="mqtt", description="Source plug-in: MQTT sensor topic.")
    host: str = Field(default="127.0.0.1", description="Broker host (the fog node's).")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port.")
    protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT protocol version.")
    site: str = Field(description="Site of the wearable's topic.")
    device: str = Field(description="The wearable's device name in the topic.")
    sensor: str = Field(description="Sensor name, the topic's last level (e.g. 'accel').")
    username: str | None = Field(default=None, description="Broker user name, if it asks.")
    password_file: Path | None = Field(default=None, description="File holding the password.")
    tls_ca: Path | None = Field(default=None, description="CA file: connect with TLS.")
    tls_cert: Path | None = Field(default=None, description="Client certificate (TLS).")
    tls_key: Path | None = Field(default=None, description="Client key (TLS).")


def sensor_topic(site: str, device: str, sensor: str) -> str:
    """``medge/v1/<site>/<device>/sensor/<name>``."""
    parts = (check_name("site", site), check_name("device", device), check_name("sensor", sensor))
    return f"{ROOT}/{parts[0]}/{parts[1]}/sensor/{parts[2]}"


def _one(obj: dict[str, Any], fields: list[str]) -> Row:
    raw = obj["values"] if "values" in obj else [obj[k] for k in fields]
    values = np.array([float(v) for v in raw], np.float32)
    if values.shape != (len(fields),):
        raise ValueError(f"{values.size} values, expected {len(fields)}")
    t = float(obj["t"]) if obj.get("t") is not None else None
    label = int(obj["label"]) if obj.get("label") is not None else None
    seq = int(obj["seq"]) if obj.get("seq") is not None else None
    return values, t, label, seq


def parse_payload(payload: bytes, fmt: str, fields: list[str], csv_time: bool = False) -> list[Row]:
    """Every sample of one message; ValueError (KeyError, TypeError) when it is malformed."""
    text = payload.decode("utf-8")
    if fmt == "csv":
        return [parse_line(ln, "csv", fields, csv_time) for ln in text.splitlines() if ln.strip()]
    obj: Any = json.loads(text)
    if isinstance(obj, list):
        return [_one(o, fields) for o in obj]
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object or list")
    rows = obj.get("values")
    if not (isinstance(rows, list) and rows and isinstance(rows[0], list)):
        return [_one(obj, fields)]
    values = np.array([[float(v) for v in r] for r in rows], np.float32)
    if values.ndim != 2 or values.shape[1] != len(fields):
        raise ValueError(f"batch of shape {values.shape}, expected (n, {len(fields)})")
    n = len(values)
    if isinstance(obj.get("t"), list):
        times: list[float | None] = [float(t) for t in obj["t"]]
        if len(times) != n:
            raise ValueError(f"{len(times)} times for {n} rows")
    elif obj.get("t0") is not None and obj.get("dt") is not None:
        t0, dt = float(obj["t0"]), float(obj["dt"])
        times = [t0 + i * dt for i in range(n)]
    else:
        times = [None] * n
    seq0 = int(obj["seq"]) if obj.get("seq") is not None else None
    label = int(obj["label"]) if obj.get("label") is not None else None
    return [(values[i], times[i], label, seq0 + i if seq0 is not None else None) for i in range(n)]


class MqttSensorSource(LiveSource):
    """Connects and subscribes on :meth:`open` (or on first :meth:`stream`); the loop and its
    checks are :class:`~edge_agent.sources.live.LiveSource`'s."""

    unit = "message"
    log = log

    def __init__(self, cfg: MqttSensorSettings) -> None:
        self.cfg: MqttSensorSettings = cfg
        self.topic = sensor_topic(cfg.site, cfg.device, cfg.sensor)
        super().__init__(cfg, f"mqtt:{cfg.device}/{cfg.sensor}")
        self._feed = feed_port(self.name, cfg.queue, cfg.block_s, self._problems)
        self.ports = [self._feed]
        self._client: Any = None
        self.subscribed = threading.Event()

    @property
    def errors(self) -> dict[str, int]:
        found = self._problems.snapshot()
        session = self._client
        if session is not None and session.denied:  # the broker refused the subscription
            found["denied"] = found.get("denied", 0) + session.denied
        return found

    def open(self) -> None:
        """Start the session: it connects (a broker that is not up yet is retried with
        back-off, one warning line) and subscribes on every connect."""
        if self._client is not None:
            return
        from edge_agent.mqtt_session import MqttSession

        c = self.cfg
        pw = c.password_file.read_text().strip() if c.password_file else None
        tls = (c.tls_ca, c.tls_cert, c.tls_key) if c.tls_ca is not None else None
        self._client = MqttSession(
            self.name,
            c.host,
            c.port,
            protocol=c.protocol,
            keepalive=30,
            tls=tls,
            username=c.username,
            password=pw if c.username is not None else None,
            subscriptions=[(self.topic, 1)],
            on_message=lambda msg: self._feed.put(msg.payload),  # bounded: back-pressure
            on_subscribed=self.subscribed.set,
            logger=log,
        ).start()

    @property
    def rejected(self) -> dict[str, int]:
        """Messages whose handling failed, by reason code (malformed payloads are counted by
        the stream as ``malformed`` problems instead)."""
        return self._client.rejected if self._client is not None else {}

    def close(self) -> None:
        if self._client is not None:
            self._client.stop()
            self._client = None

    def __enter__(self) -> MqttSensorSource:
        self.open()
        return self

    def receive(self, timeout: float) -> bytes | None:
        payload: bytes | None = self._feed.get(timeout)
        return payload

    def parse(self, unit: bytes) -> list[Row]:
        c = self.cfg
        return parse_payload(unit, c.format, c.fields, c.csv_time)
