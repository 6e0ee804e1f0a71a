"""The durable-queue core (edge_agent.durable_queue) and the two outboxes built on it: files
written by the code before the core existed open unchanged, and the core's own behaviour."""

from __future__ import annotations

import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from edge_agent.durable_queue import DurableQueue, begin_immediate, durable_sqlite, immediate
from edge_agent.outbox import Outbox
from gateway.forward import ForwardOutbox

# The DDL of the previous code, copied verbatim (edge_agent/outbox.py and gateway/forward.py
# at 3a24203): files on devices and fog nodes were written with it.
OLD_OUTBOX_DDL = """
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
OLD_FORWARD_DDL = """
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
TOPIC = "medge/v1/ward-a/us-01/result"


def _schema(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()


def _old_file(path: Path, ddl: str) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(ddl)
    db.commit()
    db.close()


def test_a_device_outbox_written_by_the_previous_code_opens_unchanged(
    tmp_path: Path,
    sealer,  # type: ignore[no-untyped-def]
) -> None:
    old = tmp_path / "old.sqlite"
    _old_file(old, OLD_OUTBOX_DDL)
    with sqlite3.connect(old) as db:
        db.executemany("INSERT INTO meta VALUES (?, ?)", [("next_seq", 8), ("epoch", 3)])
        db.executemany(
            "INSERT INTO outbox (seq, priority, topic, payload, created, last_sent, attempts)"
            " VALUES (?,?,?,?,?,?,?)",
            [(5, 1, TOPIC, b"five", 1.0, 2.0, 1), (7, 0, TOPIC, b"seven", 1.5, None, 0)],
        )
    before = _schema(old)
    with Outbox(old, "ward-a", "us-01") as box:
        box.sealer = sealer("us-01")
        assert box.depth() == 2
        assert box.size_bytes() == 2 * len(TOPIC) + len(b"five") + len(b"seven")
        assert [(p.seq, p.payload, p.attempts) for p in box.due(5.0, now=10.0)] == [
            (7, b"seven", 0),
            (5, b"five", 1),
        ]
        assert box.next_epoch() == 4
        assert box.put("result", {"i": 1}).seq == 8, "the sequence continues"
        assert box.ack([5, 7, 99]) == 2
        assert box.depth() == 1
    assert _schema(old) == before, "the new code changes no table of an existing file"

    new = tmp_path / "new.sqlite"
    Outbox(new, "ward-a", "us-01").close()
    fresh = tmp_path / "fresh-old.sqlite"
    _old_file(fresh, OLD_OUTBOX_DDL)
    assert _schema(new) == _schema(fresh), "a new file has the previous code's layout"


def test_a_forward_outbox_written_by_the_previous_code_opens_unchanged(tmp_path: Path) -> None:
    old = tmp_path / "forward.sqlite"
    _old_file(old, OLD_FORWARD_DDL)
    with sqlite3.connect(old) as db:
        db.executemany(
            "INSERT INTO forward (site, device, seq, priority, topic, payload, created,"
            " last_sent, attempts) VALUES (?,?,?,?,?,?,?,?,?)",
            [
                ("ward-a", "us-01", 1, 1, TOPIC, b"one", 1.0, None, 0),
                ("ward-a", "us-01", 2, 0, TOPIC, b"two", 2.0, None, 0),
            ],
        )
        db.execute(
            "INSERT INTO latest (site, device, kind, seq, topic, payload) VALUES (?,?,?,?,?,?)",
            ("ward-a", "us-01", "state", 3, TOPIC, b"state"),
        )
    before = _schema(old)
    with ForwardOutbox(old) as box:
        assert box.depth() == 2
        due = box.due(10.0)
        assert [(f.seq, f.payload) for f in due] == [(2, b"two"), (1, b"one")]
        box.mark_sent(due)
        assert box.due(3600) == []
        box.put_many([("ward-a", "us-01", 1, "result", TOPIC, b"resend")])  # already queued
        assert box.depth() == 2
        assert box.latest_pending() == 1
        assert box.ack("ward-a", "us-01", [1, 2, 2, 9]) == 2
        assert box.depth() == 0
    assert _schema(old) == before

    new = tmp_path / "new.sqlite"
    ForwardOutbox(new).close()
    fresh = tmp_path / "fresh-old.sqlite"
    _old_file(fresh, OLD_FORWARD_DDL)
    assert _schema(new) == _schema(fresh)


SCHEMA = """
CREATE TABLE IF NOT EXISTS q (
    k INTEGER PRIMARY KEY, priority INTEGER NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, last_sent REAL, attempts INTEGER NOT NULL DEFAULT 0
);
"""
COLUMNS = ("k", "priority", "topic", "payload")


def test_queue_operations(tmp_path: Path) -> None:
    q = DurableQueue(tmp_path / "q.sqlite", SCHEMA, "q", ("k",), "priority, k")
    q.put_many(COLUMNS, [(1, 1, "t", b"a"), (2, 0, "t", b"b"), (3, 1, "t", b"c")])
    assert [r[0] for r in q.due("k", 5.0, 10)] == [2, 1, 3]
    q.mark_sent([(2,), (1,)], now=100.0)
    q.mark_sent([])
    assert [r[0] for r in q.due("k", 5.0, 10, now=104.0)] == [3]
    assert [r[0] for r in q.due("k", 5.0, 10, now=105.0)] == [2, 1, 3]
    assert q.due("attempts", 5.0, 1, now=105.0) == [(1,)]
    q.unsend_all()
    assert len(q.due("k", 3600, 10)) == 3
    assert q.delete([(1,), (9,)], returning="length(payload)") == [(1,)]
    assert q.delete([]) == []
    assert q.count() == 2
    q.close()


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    q = DurableQueue(tmp_path / "q.sqlite", SCHEMA, "q", ("k",), "k")
    with pytest.raises(sqlite3.IntegrityError):
        q.put_many(COLUMNS, [(1, 1, "t", b"a"), (1, 1, "t", b"dup")])
    assert q.count() == 0

    def fail_half_way() -> None:
        with q.transaction() as db:
            q.insert(db, COLUMNS, [(5, 1, "t", b"x")])
            raise RuntimeError("the caller's work failed")

    with pytest.raises(RuntimeError):
        fail_half_way()
    assert q.count() == 0
    q.put_many(COLUMNS, [(1, 1, "t", b"a"), (1, 1, "t", b"dup")], " ON CONFLICT DO NOTHING")
    assert q.count() == 1
    q.close()


def test_busy_begin_is_tried_again(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    holder = durable_sqlite(path, timeout=0.01)
    holder.execute("CREATE TABLE t (x INTEGER)")
    waiter = durable_sqlite(path, timeout=0.01)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.06, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        with immediate(waiter) as db:  # busy at first: the writer holds the lock
            db.execute("INSERT INTO t VALUES (1)")
    finally:
        release.join()
    assert waiter.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    holder.close()
    waiter.close()


def test_a_new_file_is_durable_and_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "q.sqlite"
    db = durable_sqlite(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    db.execute("CREATE TABLE t (x INTEGER)")
    for name in ("q.sqlite", "q.sqlite-wal", "q.sqlite-shm"):
        assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name
    db.close()


def test_a_begin_tried_once_fails_at_once_when_busy(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    holder = durable_sqlite(path, timeout=0.01)
    waiter = durable_sqlite(path, timeout=0.01)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        begin_immediate(waiter, tries=1)
    holder.execute("ROLLBACK")
    holder.close()
    waiter.close()
