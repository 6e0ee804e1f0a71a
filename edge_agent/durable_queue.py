"""The durable-queue core under both outboxes: the device's (:mod:`edge_agent.outbox`) and the
fog gateway's queue towards the cloud (:class:`gateway.forward.ForwardOutbox`).

- :func:`durable_sqlite` opens a file that must survive a power loss: WAL, synchronous=FULL,
  created mode 0600 (its -wal and -shm files take the same mode), explicit transactions;
- :func:`immediate` is the one write transaction: BEGIN IMMEDIATE (tried again a few times
  while another connection holds the write lock past the busy timeout), COMMIT, or ROLLBACK on
  any error;
- :class:`DurableQueue` is a table of messages keyed by its ``key`` columns, each with a
  ``priority``, ``topic``, ``payload``, ``last_sent`` and ``attempts``: put many in one
  transaction, read what is due for (re)sending, mark sent, delete on the receiver's ack,
  count, and mark everything unsent after a reconnect.

The queues keep their own tables (their layouts are on disk on devices and fog nodes and
never change); this module only runs the SQL they share.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PRIORITY",
    "DurableQueue",
    "begin_immediate",
    "durable_sqlite",
    "immediate",
    "priority",
]

PRIORITY = {"event": 0, "result": 1}  # lower goes first; any other kind counts as a result
_BEGIN_TRIES = 3  # BEGIN IMMEDIATE refused as busy after the connection's own busy timeout
_BEGIN_PAUSE_S = 0.05


def priority(kind: str) -> int:
    """The send order of a message kind: events before results."""
    return PRIORITY.get(kind, 1)


def durable_sqlite(path: Path, timeout: float = 5.0) -> sqlite3.Connection:
    """The one way medge opens a file that must survive a power loss: WAL, synchronous=FULL,
    autocommit (explicit transactions), usable from several threads behind the caller's lock.
    A new file is created mode 0600 (the outboxes and stores hold patient-derived data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout)
    _wal(db, timeout)
    db.execute("PRAGMA synchronous=FULL")
    return db


def _wal(db: sqlite3.Connection, timeout: float) -> None:
    """Switch to WAL. Switching takes an exclusive lock, and SQLite answers "database is
    locked" at once (no busy wait) when another connection opening the same new file holds
    one: several workers starting together. Tried again until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def begin_immediate(db: sqlite3.Connection, tries: int = _BEGIN_TRIES) -> None:
    """BEGIN IMMEDIATE: take SQLite's write lock now, so the transaction never fails half way
    for want of it; refused as busy past the connection's timeout, it is tried again, up to
    ``tries`` times in all."""
    for attempt in range(1, tries + 1):
        try:
            db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            busy = "locked" in str(exc) or "busy" in str(exc)
            if attempt >= tries or not busy:
                raise
            time.sleep(_BEGIN_PAUSE_S * attempt)


@contextlib.contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on ``db``: committed when the block ends, rolled back if it
    raises. The caller holds the lock that guards ``db``."""
    begin_immediate(db)
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class DurableQueue:
    """One queue table in a durable SQLite file. Thread-safe: every method takes :attr:`lock`
    (re-entrant, so an owner may hold it around several calls and its own bookkeeping)."""

    def __init__(
        self,
        path: str | Path,
        schema: str,
        table: str,
        key: Sequence[str],
        order: str,
        timeout: float = 5.0,
    ) -> None:
        """``schema``: the DDL of the file (``CREATE ... IF NOT EXISTS``), run on every open;
        ``key``: the columns that name one message; ``order``: the send order (ORDER BY)."""
        self.path = Path(path)
        self.table, self.key = table, tuple(key)
        self.lock = threading.RLock()
        self.db = durable_sqlite(self.path, timeout=timeout)
        self.db.executescript(schema)
        self._where = " AND ".join(f"{k}=?" for k in self.key)
        self._order = order

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside one write transaction, under :attr:`lock`."""
        with self.lock, immediate(self.db) as db:
            yield db

    def insert(
        self,
        db: sqlite3.Connection,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        conflict: str = "",
    ) -> None:
        """Insert ``rows`` inside the caller's transaction; ``conflict`` e.g.
        ``" ON CONFLICT DO NOTHING"``."""
        marks = ",".join("?" * len(columns))
        db.executemany(
            f"INSERT INTO {self.table} ({', '.join(columns)}) VALUES ({marks}){conflict}", rows
        )

    def put_many(
        self, columns: Sequence[str], rows: Iterable[Sequence[Any]], conflict: str = ""
    ) -> None:
        """Store ``rows`` durably in one transaction (one fsync)."""
        with self.transaction() as db:
            self.insert(db, columns, rows, conflict)

    def due(
        self, columns: str, resend_after: float, limit: int, now: float | None = None
    ) -> list[Any]:
        """Rows never sent, or sent longer than ``resend_after`` seconds ago without an ack,
        in send order."""
        cutoff = (now or time.time()) - resend_after
        with self.lock:
            return self.db.execute(
                f"SELECT {columns} FROM {self.table} WHERE last_sent IS NULL OR last_sent <= ?"
                f" ORDER BY {self._order} LIMIT ?",
                (cutoff, limit),
            ).fetchall()

    def mark_sent(self, keys: Iterable[Sequence[Any]], now: float | None = None) -> None:
        """Record one more attempt of each message named by ``keys``, sent now."""
        at = now or time.time()
        keys = list(keys)
        if not keys:
            return
        with self.transaction() as db:
            db.executemany(
                f"UPDATE {self.table} SET last_sent=?, attempts=attempts+1 WHERE {self._where}",
                [(at, *k) for k in keys],
            )

    def delete(self, keys: Iterable[Sequence[Any]], returning: str = "1") -> list[Any]:
        """Delete the messages named by ``keys`` (the receiver has stored them) in one
        transaction; returns ``returning`` of each one that was still here."""
        sql = f"DELETE FROM {self.table} WHERE {self._where} RETURNING {returning}"
        out: list[Any] = []
        keys = list(keys)
        if not keys:
            return out
        with self.transaction() as db:
            for k in keys:
                out += db.execute(sql, tuple(k)).fetchall()
        return out

    def count(self) -> int:
        with self.lock:
            return int(self.db.execute(f"SELECT count(*) FROM {self.table}").fetchone()[0])

    def unsend_all(self) -> None:
        """Mark everything as never sent, e.g. after a reconnect."""
        with self.lock:
            self.db.execute(f"UPDATE {self.table} SET last_sent=NULL")

    def close(self) -> None:
        with self.lock:
            self.db.close()
