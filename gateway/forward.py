"""Fog -> cloud forwarding with the device's no-loss rule (docs/forwarding.md).

The fog gateway puts the original device message of every result and event it has stored into
its own outbox on disk (SQLite WAL, synchronous=FULL) *before* it acknowledges the device, and
publishes it on the cloud broker under the same topic (the cloud mirrors the tree). A message
leaves this outbox only when the cloud gateway acknowledges on ``medge/v1/<site>/<device>/ack``
of the cloud broker that it has stored (site, device, seq) — never on the broker's PUBACK.
Unacknowledged messages go again after ``resend_after`` seconds and after every reconnect;
the cloud store is idempotent by (site, device, seq), so a resend is never stored twice.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.envelope import decode_ack
from edge_agent.errors import EnvelopeError
from edge_agent.outbox import durable_sqlite
from edge_agent.topics import ROOT, parse

__all__ = ["ForwardOutbox", "Forwarder", "Forwarding"]

log = logging.getLogger("medge.gateway.forward")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS forward (
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    last_sent REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (site, device, seq)
);
CREATE INDEX IF NOT EXISTS forward_order ON forward (priority, created);
"""
_PRIORITY = {"event": 0, "result": 1}


@dataclass(frozen=True)
class Forwarding:
    site: str
    device: str
    seq: int
    topic: str
    payload: bytes


class ForwardOutbox:
    """The fog gateway's persistent queue towards the cloud, keyed by (site, device, seq).
    Thread-safe; one file per gateway worker."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = durable_sqlite(self.path, timeout=30)
        self._db.executescript(_SCHEMA)

    def __enter__(self) -> ForwardOutbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put_many(self, items: list[tuple[str, str, int, str, str, bytes]]) -> None:
        """Store (site, device, seq, kind, topic, payload) durably in one transaction; what is
        already queued stays as it is (a device's resend)."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO forward (site, device, seq, priority, topic, payload, created)"
                    " VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                    [(s, d, q, _PRIORITY.get(k, 1), t, p, now) for s, d, q, k, t, p in items],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def due(self, resend_after: float, limit: int = 200) -> list[Forwarding]:
        """Messages never sent, or sent more than ``resend_after`` seconds ago without an ack."""
        cutoff = time.time() - resend_after
        with self._lock:
            rows = self._db.execute(
                "SELECT site, device, seq, topic, payload FROM forward "
                "WHERE last_sent IS NULL OR last_sent <= ? ORDER BY priority, created LIMIT ?",
                (cutoff, limit),
            ).fetchall()
        return [Forwarding(s, d, int(q), t, bytes(p)) for s, d, q, t, p in rows]

    def mark_sent(self, items: list[Forwarding]) -> None:
        now = time.time()
        with self._lock:
            self._db.executemany(
                "UPDATE forward SET last_sent=?, attempts=attempts+1 "
                "WHERE site=? AND device=? AND seq=?",
                [(now, f.site, f.device, f.seq) for f in items],
            )

    def ack(self, site: str, device: str, seqs: list[int]) -> int:
        """Forget what the cloud has stored; returns how many were still here."""
        with self._lock:
            before = self._db.total_changes
            self._db.executemany(
                "DELETE FROM forward WHERE site=? AND device=? AND seq=?",
                [(site, device, s) for s in seqs],
            )
            return self._db.total_changes - before

    def unsend_all(self) -> None:
        with self._lock:
            self._db.execute("UPDATE forward SET last_sent=NULL")

    def depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM forward").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Forwarder:
    """Pumps a ForwardOutbox to the cloud broker and deletes on the cloud gateway's acks.

    Started and stopped by the Gateway that owns it; it never blocks the fog gateway: while
    the cloud is unreachable, messages wait on disk."""

    def __init__(
        self,
        outbox: ForwardOutbox,
        host: str,
        port: int,
        protocol: str = "5",
        client_id: str = "medge-forwarder",
        resend_after: float = 10.0,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.outbox = outbox
        self.host, self.port = host, port
        self.resend_after = resend_after
        self.published = 0
        self.acked = 0
        self.bad_acks = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._connected = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=5)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        if tls is not None:
            ca, cert, key = tls
            self._client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        self._pump = threading.Thread(target=self._run_pump, name="forward-pump", daemon=True)

    def __enter__(self) -> Forwarder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Forwarder:
        self._client.connect_async(self.host, self.port, keepalive=10)
        self._client.loop_start()
        self._pump.start()
        return self

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        self._pump.join(timeout=5)
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def put_many(self, items: list[tuple[str, str, int, str, str, bytes]]) -> None:
        """Queue (site, device, seq, kind, topic, original message) on disk, then wake the pump.
        Returns only once committed: the caller acknowledges the device after this."""
        self.outbox.put_many(items)
        self._wake.set()

    # -- paho callbacks (network thread) ---------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if rc.is_failure:
            log.error("cloud broker refused the forwarder: %s", rc)
            return
        client.subscribe(f"{ROOT}/+/+/ack", qos=1)
        self.outbox.unsend_all()  # anything in flight on the old connection goes again
        self._connected.set()
        self._wake.set()
        log.info("forwarding to %s:%d", self.host, self.port)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("lost the cloud broker (%s); will reconnect", rc)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            parts = parse(msg.topic)
            seqs = decode_ack(msg.payload)
        except EnvelopeError as exc:
            self.bad_acks += 1
            log.warning("bad cloud ack on %s ignored: %s", msg.topic, exc)
            return
        self.acked += self.outbox.ack(parts.site, parts.device, seqs)

    # -- the pump --------------------------------------------------------------------------
    def _run_pump(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=min(0.5, self.resend_after / 2))
            self._wake.clear()
            while self._connected.is_set() and not self._stop.is_set():
                batch = self.outbox.due(self.resend_after)
                if not batch:
                    break
                sent = []
                for f in batch:
                    if self._client.publish(f.topic, f.payload, qos=1).rc != mqtt.MQTT_ERR_SUCCESS:
                        break
                    sent.append(f)
                self.outbox.mark_sent(sent)
                self.published += len(sent)
                if len(sent) < len(batch):
                    break
