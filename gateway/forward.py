"""Fog -> cloud forwarding with the device's no-loss rule (docs/forwarding.md).

The fog gateway puts the original device message of every result and event it has stored into
its own outbox on disk (SQLite WAL, synchronous=FULL) *before* it acknowledges the device, and
publishes it on the cloud broker under the same topic (the cloud mirrors the tree). A message
leaves this outbox only when the cloud gateway acknowledges on ``medge/v1/<site>/<device>/ack``
of the cloud broker that it has stored (site, device, seq) — never on the broker's PUBACK.
Unacknowledged messages go again after ``resend_after`` seconds and after every reconnect;
the cloud store is idempotent by (site, device, seq), so a resend is never stored twice.

State and telemetry are forwarded too, so the cloud dashboard shows the fleet: the outbox keeps
only the *latest* of each per device (a newer one replaces an older one not yet sent), sends it
once, and forgets nothing else; the cloud does not acknowledge them (the next one replaces a
lost one). :func:`backfill` queues results already stored, e.g. those stored before forwarding
was turned on.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import paho.mqtt.client as mqtt

from edge_agent.durable_queue import DurableQueue, priority
from edge_agent.envelope import decode_ack
from edge_agent.errors import MedgeError
from edge_agent.mqtt_session import MqttSession
from edge_agent.reasons import Reason
from edge_agent.topics import ROOT, parse, topic
from gateway.outbox_lock import OutboxLock

if TYPE_CHECKING:
    from gateway.store import Store

__all__ = ["ForwardOutbox", "Forwarder", "Forwarding", "backfill", "parse_since"]

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
CREATE TABLE IF NOT EXISTS latest (
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    kind TEXT NOT NULL,
    seq INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (site, device, kind)
);
"""
_COLUMNS = ("site", "device", "seq", "priority", "topic", "payload", "created")


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
        self._q = DurableQueue(
            self.path,
            _SCHEMA,
            "forward",
            ("site", "device", "seq"),
            "priority, created",
            timeout=30,
        )
        self._lock, self._db = self._q.lock, self._q.db  # also for the table `latest`

    def __enter__(self) -> ForwardOutbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put_many(self, items: list[tuple[str, str, int, str, str, bytes]]) -> None:
        """Store (site, device, seq, kind, topic, payload) durably in one transaction; what is
        already queued stays as it is (a device's resend)."""
        now = time.time()
        self._q.put_many(
            _COLUMNS,
            [(s, d, q, priority(k), t, p, now) for s, d, q, k, t, p in items],
            " ON CONFLICT DO NOTHING",
        )

    def due(self, resend_after: float, limit: int = 200) -> list[Forwarding]:
        """Messages never sent, or sent more than ``resend_after`` seconds ago without an ack."""
        rows = self._q.due("site, device, seq, topic, payload", resend_after, limit)
        return [Forwarding(s, d, int(q), t, bytes(p)) for s, d, q, t, p in rows]

    def mark_sent(self, items: list[Forwarding]) -> None:
        self._q.mark_sent([(f.site, f.device, f.seq) for f in items])

    def ack(self, site: str, device: str, seqs: list[int]) -> int:
        """Forget what the cloud has stored; returns how many were still here."""
        return len(self._q.delete([(site, device, s) for s in seqs]))

    def put_latest(
        self, site: str, device: str, kind: str, seq: int, topic: str, payload: bytes
    ) -> bool:
        """Keep this state/telemetry message as the device's latest of its kind, to be sent
        once; False if a newer one is already here."""
        with self._lock:
            before = self._db.total_changes
            self._db.execute(
                "INSERT INTO latest (site, device, kind, seq, topic, payload) VALUES (?,?,?,?,?,?)"
                " ON CONFLICT (site, device, kind) DO UPDATE SET seq=excluded.seq,"
                " topic=excluded.topic, payload=excluded.payload, sent=0"
                " WHERE excluded.seq > latest.seq",
                (site, device, kind, seq, topic, payload),
            )
            return self._db.total_changes > before

    def due_latest(self, limit: int = 200) -> list[Forwarding]:
        """Latest state/telemetry messages not sent yet."""
        with self._lock:
            rows = self._db.execute(
                "SELECT site, device, seq, topic, payload FROM latest WHERE sent=0 LIMIT ?",
                (limit,),
            ).fetchall()
        return [Forwarding(s, d, int(q), t, bytes(p)) for s, d, q, t, p in rows]

    def mark_latest_sent(self, items: list[Forwarding]) -> None:
        """Sent; one replaced meanwhile by a newer message stays due."""
        with self._lock:
            self._db.executemany(
                "UPDATE latest SET sent=1 WHERE site=? AND device=? AND seq=?",
                [(f.site, f.device, f.seq) for f in items],
            )

    def latest_pending(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM latest WHERE sent=0").fetchone()[0])

    def unsend_all(self) -> None:
        self._q.unsend_all()

    def depth(self) -> int:
        return self._q.count()

    def close(self) -> None:
        self._q.close()


class Forwarder:
    """Pumps a ForwardOutbox to the cloud broker and deletes on the cloud gateway's acks.

    Started and stopped by the Gateway that owns it; it never blocks the fog gateway: while
    the cloud is unreachable, messages wait on disk. Its MQTT side is an
    :class:`~edge_agent.mqtt_session.MqttSession` (back-off, the message boundary)."""

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
        self.session = MqttSession(
            "forwarder",
            host,
            port,
            protocol=protocol,
            client_id=client_id,
            tls=tls,
            subscriptions=[(f"{ROOT}/+/+/ack", 1)],
            on_message=self._on_message,
            on_reject=self._on_reject,
            on_connect=self._on_connect,
            reconnect_min_s=0.5,
            reconnect_max_s=5.0,
            logger=log,
        )
        self._pump = threading.Thread(target=self._run_pump, name="forward-pump", daemon=True)
        self._file_lock = OutboxLock(outbox.path, "forward outbox")

    def __enter__(self) -> Forwarder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Forwarder:
        """Start sending; MedgeError when another process sends from the same outbox."""
        self._file_lock.acquire()
        self.session.start()
        self._pump.start()
        return self

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        if self._pump.ident is not None:  # started (a start refused by the lock did not)
            self._pump.join(timeout=5)
        self.session.stop()
        self._file_lock.release()

    @property
    def connected(self) -> bool:
        return self.session.connected

    def workers(self) -> dict[str, threading.Thread | None]:
        """The threads that must stay alive while forwarding (for a Supervisor)."""
        return {"forward-pump": self._pump, "forward-mqtt": self.session.thread}

    def put_many(self, items: list[tuple[str, str, int, str, str, bytes]]) -> None:
        """Queue (site, device, seq, kind, topic, original message) on disk, then wake the pump.
        Returns only once committed: the caller acknowledges the device after this."""
        self.outbox.put_many(items)
        self._wake.set()

    def put_latest(
        self, site: str, device: str, kind: str, seq: int, topic: str, payload: bytes
    ) -> bool:
        """Queue a device's newest state/telemetry message (replacing an unsent older one)."""
        queued = self.outbox.put_latest(site, device, kind, seq, topic, payload)
        if queued:
            self._wake.set()
        return queued

    # -- paho callbacks (network thread) ---------------------------------------------------
    def _on_connect(self, _client: mqtt.Client) -> None:
        self.outbox.unsend_all()  # anything in flight on the old connection goes again
        self._wake.set()

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        # any exception here rejects this ack only (the session's boundary, _on_reject)
        parts = parse(msg.topic)
        seqs = decode_ack(cast(bytes, msg.payload))  # received: bytes, typed bytes | bytearray
        self.acked += self.outbox.ack(parts.site, parts.device, seqs)

    def _on_reject(self, _msg: mqtt.MQTTMessage, _reason: Reason, _exc: BaseException) -> None:
        self.bad_acks += 1

    # -- the pump --------------------------------------------------------------------------
    def _run_pump(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=min(0.5, self.resend_after / 2))
            self._wake.clear()
            while self.session.connected and not self._stop.is_set():
                batch = self.outbox.due(self.resend_after)
                if not batch:
                    break
                sent = self._publish(batch)
                self.outbox.mark_sent(sent)
                if len(sent) < len(batch):
                    break
            if self.session.connected and not self._stop.is_set():
                latest = self.outbox.due_latest()
                self.outbox.mark_latest_sent(self._publish(latest))

    def _publish(self, batch: list[Forwarding]) -> list[Forwarding]:
        sent = []
        for f in batch:
            if self.session.publish(f.topic, f.payload, qos=1).rc != mqtt.MQTT_ERR_SUCCESS:
                break
            sent.append(f)
        self.published += len(sent)
        return sent


def parse_since(text: str, now: float | None = None) -> float:
    """A point in time for ``--backfill``: ``all``, seconds ago with a unit (``90s``, ``30m``,
    ``24h``, ``7d``), an ISO 8601 date/time (UTC unless it says), or a Unix time."""
    now = time.time() if now is None else now
    t = text.strip()
    if t == "all":
        return 0.0
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(t) > 1 and t[-1] in units and t[:-1].replace(".", "", 1).isdigit():
        return now - float(t[:-1]) * units[t[-1]]
    try:
        return float(t)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(t)
    except ValueError as exc:
        raise MedgeError(
            f"--backfill {text!r}: use all, 90s/30m/24h/7d, an ISO date/time or a Unix time"
        ) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def backfill(store: Store, outbox: ForwardOutbox, since: float, page: int = 1000) -> int:
    """Queue every result/event the store received at or after ``since`` for the cloud (its
    original message: ``raw``, or ``sealed`` in end-to-end mode); returns how many. Rows
    already queued stay as they are; the cloud acknowledges what it already has as a
    duplicate. Rows stored without their original message (before store migration 6) cannot
    be forwarded: counted in one log line."""
    queued = missing = 0
    last = 0
    while True:
        rows = store.query(
            "SELECT id, site, device, seq, kind, raw, sealed FROM results "
            "WHERE id > ? AND received >= ? ORDER BY id LIMIT ?",
            (last, since, page),
        )
        if not rows:
            break
        last = int(rows[-1]["id"])
        items = []
        for r in rows:
            message = r["raw"] if r["raw"] is not None else r["sealed"]
            if message is None:
                missing += 1
                continue
            items.append(
                (
                    r["site"],
                    r["device"],
                    int(r["seq"]),
                    r["kind"],
                    topic(r["site"], r["device"], r["kind"]),
                    bytes(message),
                )
            )
        if items:
            outbox.put_many(items)
        queued += len(items)
    if missing:
        log.warning(
            "backfill: %d stored result(s) have no original message to forward "
            "(stored before the gateway kept one)",
            missing,
        )
    log.info(
        "backfill: %d result(s) since %s queued for the cloud",
        queued,
        dt.datetime.fromtimestamp(since, dt.timezone.utc).isoformat(),
    )
    return queued
