"""The disk-backed outbox: a message is on disk before it is sent, and leaves only when the
gateway acknowledges that it has stored it (never on the broker's PUBACK).

SQLite in WAL mode with synchronous=FULL; sequence numbers are assigned in the same transaction
that stores the message, so they survive restarts and never repeat. Messages are stored sealed
(encrypted envelopes), so the outbox on disk holds no readable patient-derived data. The epoch
counter of the sealer lives here too, so a restart always starts a fresh epoch key.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.envelope import Envelope, Sealer
from edge_agent.errors import MedgeError
from edge_agent.topics import topic

__all__ = ["Outbox", "Pending", "durable_sqlite"]

_PRIORITY = {"event": 0, "result": 1}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    priority INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    last_sent REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_order ON outbox (priority, seq);
"""


def durable_sqlite(path: Path, timeout: float = 5.0) -> sqlite3.Connection:
    """The one way medge opens a file that must survive a power loss: WAL, synchronous=FULL,
    autocommit (explicit transactions), usable from several threads behind the caller's lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


@dataclass(frozen=True)
class Pending:
    seq: int
    topic: str
    payload: bytes
    attempts: int


class Outbox:
    """Persistent queue of one device's outgoing envelopes. Thread-safe."""

    def __init__(self, path: str | Path, site: str, device: str) -> None:
        self.path = Path(path)
        self.site, self.device = site, device
        self._lock = threading.Lock()
        self._db = durable_sqlite(self.path)
        self._db.executescript(_SCHEMA)
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', 1)")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', 0)")
        self.sealer: Sealer | None = None
        self.status_sealer: Sealer | None = None  # end-to-end mode: state/telemetry to the gateway

    def next_epoch(self) -> int:
        """Persist and return the next epoch number (for the sealer)."""
        with self._lock:
            self._db.execute("UPDATE meta SET value=value+1 WHERE key='epoch'")
            return int(self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0])

    def _seal(self, env: Envelope) -> bytes:
        if self.sealer is None:
            raise MedgeError("outbox has no sealer: set outbox.sealer before putting messages")
        return self.sealer.seal(env)

    def make(self, kind: str, body: dict[str, Any]) -> bytes:
        """A sealed message with a fresh sequence number that does not go through the outbox
        (telemetry, state): the number is never reused, so (device, seq) stays unique."""
        env = Envelope(kind, self.site, self.device, self.reserve_seq(), time.time(), body)
        return self.status_sealer.seal(env) if self.status_sealer else self._seal(env)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, kind: str, body: dict[str, Any], at: float | None = None) -> Envelope:
        """Assign the next sequence number and store the envelope durably."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (seq,) = self._db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
                event = body.get("event") if kind == "event" else None
                env = Envelope(
                    kind,
                    self.site,
                    self.device,
                    seq,
                    at or time.time(),
                    body,
                    alert=event if isinstance(event, str) else None,
                )
                self._db.execute(
                    "INSERT INTO outbox (seq, priority, topic, payload, created) "
                    "VALUES (?,?,?,?,?)",
                    (
                        seq,
                        _PRIORITY.get(kind, 1),
                        topic(self.site, self.device, kind),
                        self._seal(env),
                        time.time(),
                    ),
                )
                self._db.execute("UPDATE meta SET value=? WHERE key='next_seq'", (seq + 1,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return env

    def due(self, resend_after: float, limit: int = 100, now: float | None = None) -> list[Pending]:
        """Messages never sent, or sent longer than ``resend_after`` seconds ago without an ack."""
        cutoff = (now or time.time()) - resend_after
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, attempts FROM outbox "
                "WHERE last_sent IS NULL OR last_sent <= ? ORDER BY priority, seq LIMIT ?",
                (cutoff, limit),
            ).fetchall()
        return [Pending(*r) for r in rows]

    def mark_sent(self, seqs: list[int], now: float | None = None) -> None:
        with self._lock:
            self._db.executemany(
                "UPDATE outbox SET last_sent=?, attempts=attempts+1 WHERE seq=?",
                [(now or time.time(), s) for s in seqs],
            )

    def ack(self, seqs: list[int]) -> int:
        """Forget what the receiver has stored; returns how many were still here."""
        with self._lock:
            before = self._db.total_changes
            self._db.executemany("DELETE FROM outbox WHERE seq=?", [(s,) for s in seqs])
            return self._db.total_changes - before

    def reserve_seq(self) -> int:
        """A fresh sequence number for a message that does not go through the outbox
        (telemetry, state): it is never reused, so (device, seq) stays unique."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            (seq,) = self._db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
            self._db.execute("UPDATE meta SET value=? WHERE key='next_seq'", (seq + 1,))
            self._db.execute("COMMIT")
        return int(seq)

    def unsend_all(self) -> None:
        """Mark everything as never sent, e.g. after a reconnect."""
        with self._lock:
            self._db.execute("UPDATE outbox SET last_sent=NULL")

    def depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def next_seq(self) -> int:
        with self._lock:
            return int(
                self._db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()[0]
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
