"""The disk-backed outbox: a message is on disk before it is sent, and leaves only when the
gateway acknowledges that it has stored it (never on the broker's PUBACK).

SQLite in WAL mode with synchronous=FULL. Messages are stored sealed (encrypted envelopes), so
the outbox on disk holds no readable patient-derived data. The epoch counter of the sealer lives
here too, so a restart always starts a fresh epoch key.

Group commit: with ``batch_max > 1`` routine results wait in memory and are sealed and written
by a flusher thread in one transaction (one fsync) per batch, which closes after ``batch_max``
results or ``batch_ms`` milliseconds, whichever comes first (``batch_ms`` 0: as soon as the
flusher is free, so an idle device commits each result at once and a busy one commits what
arrived during the last commit). Only committed rows are ever
published (the link reads the table), so "on disk before it is published" holds and a crash
loses nothing that was published; it can lose at most the last open batch, which nobody has
seen. An event never waits: it commits at once, together with whatever is buffered.

Quota: ``max_messages`` / ``max_bytes`` (payload + topic bytes). When a commit goes over, the
oldest routine results that were never sent are dropped (``quota``: certainly not at the
gateway), then, only if that is not enough, the oldest sent but not yet acknowledged
(``quota_sent``: each may have been stored; counted apart so that the counts add up against
the gateway's store); events never are. When only events remain, new results are refused
(``refused``). All are counted in :attr:`Outbox.drops` by reason and said in one warning line.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.durable_queue import DurableQueue, priority
from edge_agent.envelope import Envelope, Sealer
from edge_agent.errors import MedgeError
from edge_agent.topics import topic

__all__ = ["Outbox", "Pending"]

log = logging.getLogger("medge.agent.outbox")

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
_SIZE = "length(payload) + length(topic)"
_COLUMNS = ("seq", "priority", "topic", "payload", "created")


@dataclass(frozen=True)
class Pending:
    seq: int
    topic: str
    payload: bytes
    attempts: int


class Outbox:
    """Persistent queue of one device's outgoing envelopes. Thread-safe."""

    def __init__(
        self,
        path: str | Path,
        site: str,
        device: str,
        *,
        batch_max: int = 1,
        batch_ms: float = 50.0,
        max_messages: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        """``batch_max`` 1: every put commits at once (no flusher thread)."""
        self.path = Path(path)
        self.site, self.device = site, device
        self.batch_max, self.batch_ms = max(1, batch_max), batch_ms
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._seq_lock = threading.Lock()  # sequence numbers, in order
        self._q = DurableQueue(self.path, _SCHEMA, "outbox", ("seq",), "priority, seq")
        self._lock, self._db = self._q.lock, self._q.db  # the database and its lock
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', 1)")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', 0)")
        self._next = self._meta("next_seq")
        n, size = self._db.execute(
            f"SELECT count(*), coalesce(sum({_SIZE}), 0) FROM outbox"
        ).fetchone()
        self._count, self._bytes = int(n), int(size)
        self.sealer: Sealer | None = None
        self.status_sealer: Sealer | None = None  # end-to-end mode: state/telemetry to the gateway
        self.on_commit: Callable[[], None] | None = None  # e.g. wake the link's pump
        self.drops: dict[str, int] = {}
        self._topics: dict[str, str] = {}
        self.commits = 0
        self._over = False  # in a quota episode (one warning line per episode)
        self._in_flight: list[int] = []  # what the link took from due() and is publishing
        self._buf: list[Envelope] = []
        self._buf_since = 0.0
        self._cond = threading.Condition()
        self._closing = False
        self._flusher: threading.Thread | None = None
        if self.batch_max > 1:
            self._flusher = threading.Thread(
                target=self._run_flusher, name=f"outbox-{device}", daemon=True
            )
            self._flusher.start()

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0])

    def next_epoch(self) -> int:
        """Persist and return the next epoch number (for the sealer)."""
        with self._lock:
            self._db.execute("UPDATE meta SET value=value+1 WHERE key='epoch'")
            return self._meta("epoch")

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

    # -- writing ---------------------------------------------------------------------------
    def put(self, kind: str, body: dict[str, Any], at: float | None = None) -> Envelope:
        """Assign the next sequence number and store the envelope durably: at once for an event
        (or without batching), else with the next group commit."""
        event = body.get("event") if kind == "event" else None
        # the clear alert field marks the start of an alerting event (a tracker's end message
        # and rules with alert: false carry none), so a relay raises one alert per event
        raising = body.get("alert") is not False and body.get("state", "start") == "start"
        alert = event if isinstance(event, str) and raising else None
        with self._seq_lock:
            seq = self._next
            self._next += 1
        env = Envelope(kind, self.site, self.device, seq, at or time.time(), body, alert=alert)
        if self._flusher is None or kind == "event":
            with self._cond:
                batch, self._buf = self._buf, []
                self._cond.notify_all()
            self._commit([*batch, env])
            return env
        with self._cond:
            while len(self._buf) >= 4 * self.batch_max and not self._closing:
                self._cond.wait(1.0)  # back-pressure: the disk is slower than the model
            if not self._buf:
                self._buf_since = time.monotonic()
                self._cond.notify_all()  # the flusher starts the batch's clock
            self._buf.append(env)
            if len(self._buf) >= self.batch_max:
                self._cond.notify_all()
        return env

    def flush(self) -> None:
        """Commit whatever is buffered now."""
        with self._cond:
            batch, self._buf = self._buf, []
            self._cond.notify_all()
        if batch:
            self._commit(batch)

    def _run_flusher(self) -> None:
        while True:
            with self._cond:
                while not self._closing:
                    if len(self._buf) >= self.batch_max:
                        break
                    if self._buf:
                        left = self._buf_since + self.batch_ms / 1000.0 - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    else:
                        self._cond.wait()
                n = len(self._buf) if self._closing else self.batch_max
                batch, self._buf = self._buf[:n], self._buf[n:]
                self._cond.notify_all()
                closing = self._closing and not self._buf
            if batch:
                try:
                    self._commit(batch)
                except (sqlite3.Error, MedgeError) as exc:
                    self._count_drop("commit_failed", len(batch))
                    log.error("%s: outbox commit of %d failed: %s", self.device, len(batch), exc)
            if closing:
                return

    def _commit(self, envs: list[Envelope]) -> None:
        """Seal (outside the database lock: a key rotation takes it) and write in one
        transaction, then enforce the quota in the same transaction."""
        rows = []
        now = time.time()
        for env in envs:
            try:
                payload = self._seal(env)
            except MedgeError as exc:
                if len(envs) == 1:
                    raise
                self._count_drop("seal", 1)
                log.warning("%s: message %d not sealed, dropped: %s", self.device, env.seq, exc)
                continue
            t = self._topics.get(env.kind) or self._topics.setdefault(
                env.kind, topic(self.site, self.device, env.kind)
            )
            rows.append((env.seq, priority(env.kind), t, payload, now))
        if not rows:
            return
        with self._lock:
            with self._q.transaction() as db:
                self._q.insert(db, _COLUMNS, rows)
                db.execute(
                    "UPDATE meta SET value=max(value, ?) WHERE key='next_seq'",
                    (max(r[0] for r in rows) + 1,),
                )
                added = sum(len(r[2]) + len(r[3]) for r in rows)
                dropped = self._enforce_quota(len(rows), added, min(r[0] for r in rows))
            self._count += len(rows) - dropped[0]
            self._bytes += added - dropped[1]
            self.commits += 1
        if self.on_commit is not None:
            self.on_commit()

    def _enforce_quota(self, added_n: int, added_b: int, first_new: int) -> tuple[int, int]:
        """Inside the commit: drop the oldest routine results while over the quota. Returns
        (messages, bytes) removed."""
        n, b = self._count + added_n, self._bytes + added_b
        if not self._over_quota(n, b):
            if self._over:
                log.info("%s: outbox back under its quota", self.device)
            self._over = False
            return 0, 0
        victims: list[int] = []
        old = sent = new = freed = 0
        # oldest first: those never sent (not at the gateway), then those sent or being sent
        # but not yet acknowledged (maybe stored), then this commit's own (refused)
        flying = self._in_flight
        cur = self._db.execute(
            f"SELECT seq, {_SIZE}, attempts > 0 OR seq IN ({','.join('?' * len(flying))}) "
            "FROM outbox WHERE priority >= 1 "
            "ORDER BY CASE WHEN seq >= ? THEN 2 WHEN attempts > 0 THEN 1 "
            f"WHEN seq IN ({','.join('?' * len(flying))}) THEN 1 ELSE 0 END, seq",
            (*flying, first_new, *flying),
        )
        for seq, size, attempts in cur:
            if not self._over_quota(n - len(victims), b - freed):
                break
            victims.append(seq)
            freed += size
            if seq >= first_new:
                new += 1
            elif attempts:
                sent += 1
            else:
                old += 1
        cur.close()
        for i in range(0, len(victims), 500):
            chunk = victims[i : i + 500]
            self._db.execute(
                f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(chunk))})", chunk
            )
        if not self._over:
            log.warning(
                "%s: outbox over its quota (%s): dropping the oldest routine results, "
                "keeping every event (counted in telemetry outbox_drops)",
                self.device,
                self._quota_text(),
            )
        if new and "refused" not in self.drops:
            log.warning(
                "%s: outbox holds only events and is full: refusing new results",
                self.device,
            )
        self._over = True
        self._count_drop("quota", old)
        self._count_drop("quota_sent", sent)
        self._count_drop("refused", new)
        return len(victims), freed

    def _over_quota(self, n: int, b: int) -> bool:
        return (self.max_messages is not None and n > self.max_messages) or (
            self.max_bytes is not None and b > self.max_bytes
        )

    def _quota_text(self) -> str:
        parts = []
        if self.max_messages is not None:
            parts.append(f"{self.max_messages} messages")
        if self.max_bytes is not None:
            parts.append(f"{self.max_bytes / 2**20:.1f} MiB")
        return ", ".join(parts)

    def _count_drop(self, reason: str, n: int) -> None:
        if n:
            self.drops[reason] = self.drops.get(reason, 0) + n

    # -- the link's side -------------------------------------------------------------------
    def due(self, resend_after: float, limit: int = 100, now: float | None = None) -> list[Pending]:
        """Messages never sent, or sent longer than ``resend_after`` seconds ago without an ack.
        What it returns is in flight until the next :meth:`mark_sent`: the link publishes it
        from memory, so the quota counts one it drops meanwhile as sent (``quota_sent``: it may
        be stored), not as never sent."""
        rows = self._q.due("seq, topic, payload, attempts", resend_after, limit, now)
        with self._lock:
            self._in_flight = [r[0] for r in rows]
        return [Pending(*r) for r in rows]

    def mark_sent(self, seqs: list[int], now: float | None = None) -> None:
        """Record ``seqs`` as published; what the last :meth:`due` gave is no longer in
        flight."""
        with self._lock:
            self._q.mark_sent([(s,) for s in seqs], now)
            self._in_flight = []

    def ack(self, seqs: list[int]) -> int:
        """Forget what the receiver has stored; returns how many were still here."""
        with self._lock:
            rows = self._q.delete([(s,) for s in seqs], returning=_SIZE)
            self._count -= len(rows)
            self._bytes -= sum(r[0] for r in rows)
        return len(rows)

    def reserve_seq(self) -> int:
        """A fresh sequence number for a message that does not go through the outbox
        (telemetry, state): it is never reused, so (device, seq) stays unique."""
        with self._seq_lock:
            seq = self._next
            self._next += 1
            with self._lock:
                self._db.execute(
                    "UPDATE meta SET value=max(value, ?) WHERE key='next_seq'", (self._next,)
                )
        return seq

    def unsend_all(self) -> None:
        """Mark everything as never sent, e.g. after a reconnect."""
        self._q.unsend_all()

    def depth(self) -> int:
        """Messages not yet acknowledged: on disk, plus a batch not yet committed."""
        with self._cond:
            buffered = len(self._buf)
        with self._lock:
            return self._count + buffered

    def size_bytes(self) -> int:
        """Bytes of the stored messages (payload + topic), what ``max_bytes`` counts."""
        with self._lock:
            return self._bytes

    def next_seq(self) -> int:
        with self._seq_lock:
            return self._next

    def close(self) -> None:
        if self._flusher is not None:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._flusher.join(timeout=30)
            self._flusher = None
        self.flush()
        self._q.close()
