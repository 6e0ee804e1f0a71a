"""The gateway store on both engines, with the same code: a SQLite file and a database on a
real PostgreSQL server started for the session (tests/pg.py). Migrations, exactly-once under
two concurrent workers, exact round trips, and the SQL other modules pass in."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pg import new_database

from edge_agent.envelope import Envelope
from gateway import Store, read_models
from gateway.alerts import list_alerts, open_alert
from gateway.db import Database, StoreError, connect
from gateway.migrations import MIGRATIONS as _MIGRATIONS
from gateway.migrations import SERIAL_TABLES as _SERIAL_TABLES

SITE = "ward-a"
LATEST = len(_MIGRATIONS)


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """A store location that does not exist yet: a SQLite file, or a fresh PostgreSQL
    database on the session's server."""
    if request.param == "sqlite":
        return tmp_path / "gw.sqlite"
    return new_database(request.getfixturevalue("postgres_url"))


def _env(seq: int, device: str = "us-01", **body: Any) -> Envelope:
    return Envelope("result", SITE, device, seq, 1_795_000_000.0 + seq, body)


def _together(work: Callable[..., None], runs: list[tuple[Any, ...]], join_s: float) -> None:
    """``work(*args)`` for each ``args`` of ``runs``, each in its own thread, all started at
    once (a barrier); any exception in one fails the test."""
    start = threading.Barrier(len(runs))
    errors: list[BaseException] = []

    def run(*args: Any) -> None:
        try:
            start.wait(10)
            work(*args)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=args) for args in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_s)
    assert errors == []


def _versions(target: str | Path) -> list[int]:
    db = connect(target)
    try:
        return [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY version")]
    finally:
        db.close()


def _tables(db: Database) -> set[str]:
    sql = (
        "SELECT name FROM sqlite_master WHERE type='table'"
        if db.dialect == "sqlite"
        else "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
    )
    return {r[0] for r in db.execute(sql)}


def _old_store(target: str | Path, version: int) -> None:
    """A store as a gateway of schema ``version`` left it, with one result in it."""
    db = connect(target, _SERIAL_TABLES)
    try:
        with db.transaction():
            db.execute(db.ddl("CREATE TABLE schema_version (version INTEGER)"))
            for number, sql in enumerate(_MIGRATIONS[:version], start=1):
                for statement in filter(str.strip, sql.split(";")):
                    db.execute(db.ddl(statement))
                db.execute("INSERT INTO schema_version VALUES (?)", (number,))
            db.execute(
                "INSERT INTO results (site, device, seq, kind, time, received, body) "
                "VALUES (?,?,?,?,?,?,?)",
                (SITE, "us-01", 7, "result", 1.5, 2.5, '{"pred": 1}'),
            )
    finally:
        db.close()


def test_migrations_are_numbered_recorded_and_applied_once(target: str | Path) -> None:
    with Store(target) as store:
        assert store.schema_version == LATEST
        assert store.add_result(_env(1))
    for _ in range(2):  # a restart applies nothing again and keeps the data
        with Store(target) as store:
            assert store.schema_version == LATEST
            assert read_models.result_count(store) == 1
    assert _versions(target) == list(range(1, LATEST + 1))


def test_an_old_store_is_migrated_in_place(target: str | Path) -> None:
    _old_store(target, 3)
    assert _versions(target) == [1, 2, 3]
    with Store(target) as store:
        assert store.schema_version == LATEST
        [old] = read_models.results(store)
        assert (old["seq"], old["time"], old["received"]) == (7, 1.5, 2.5)
        assert store.query("SELECT sealed, raw, alert FROM results") == [
            {"sealed": None, "raw": None, "alert": None}
        ]
        assert store.add_results([(_env(7), None), (_env(8), b"x")]) == [False, True]
        assert read_models.sealed_results(store) == []
    assert _versions(target) == list(range(1, LATEST + 1))


def test_a_failing_migration_leaves_nothing_half_done(target: str | Path) -> None:
    """Migration 4 creates alerts, then telemetry_history: if the second fails, the first is
    rolled back with it, the version stays 3, and the error says which migration."""
    _old_store(target, 3)
    db = connect(target)
    try:
        db.execute("CREATE TABLE telemetry_history (id INTEGER)")  # in the way of migration 4
    finally:
        db.close()
    with pytest.raises(StoreError, match=r"schema migration 4 failed") as err:
        Store(target)
    assert "\n" not in str(err.value), "one line"
    assert _versions(target) == [1, 2, 3]
    db = connect(target)
    try:
        assert "alerts" not in _tables(db), "migration 4 applied nothing"
        db.execute("DROP TABLE telemetry_history")
    finally:
        db.close()
    with Store(target) as store:
        assert store.schema_version == LATEST
        assert read_models.result_count(store) == 1


def test_workers_starting_together_migrate_once(target: str | Path) -> None:
    def open_store() -> None:
        with Store(target) as store:
            assert store.schema_version == LATEST

    _together(open_store, [()] * 4, join_s=60)
    assert _versions(target) == list(range(1, LATEST + 1))


def test_two_workers_store_each_seq_once(
    target: str | Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two gateway workers (two Store instances, two threads) store overlapping batches of
    three devices, in opposite orders: every (device, seq) is stored exactly once, the two
    workers' "new" answers add up, the duplicates are counted, and no transaction ever
    deadlocks (PostgreSQL would have to abort and retry it)."""
    devices = ["us-01", "us-02", "us-03"]
    plan = {
        "a": [(d, s) for s in range(0, 200) for d in devices],
        "b": [(d, s) for s in range(299, 99, -1) for d in reversed(devices)],
    }
    batch = {"a": 7, "b": 5}
    news: dict[str, list[bool | None]] = {"a": [], "b": []}
    Store(target).close()  # migrated once; the workers race on data only

    def worker(name: str) -> None:
        with Store(target) as store:
            items = plan[name]
            for i in range(0, len(items), batch[name]):
                part = [(_env(s, d, pred=s % 2), None) for d, s in items[i : i + batch[name]]]
                news[name] += store.add_results(part)

    _together(worker, [(n,) for n in plan], join_s=120)
    assert sum(news["a"]) + sum(news["b"]) == 3 * 300, "each (device, seq) new exactly once"
    with Store(target) as store:
        for d in devices:
            seqs = [r["seq"] for r in read_models.results(store, limit=1000, device=d)]
            assert sorted(seqs) == list(range(300)), f"{d}: every seq once"
        counters = {d["device"]: (d["stored"], d["duplicates"]) for d in read_models.devices(store)}
    assert counters == dict.fromkeys(devices, (300, 100))
    assert [r.message for r in caplog.records if "retried" in r.message] == []


def test_values_round_trip_exactly(target: str | Path) -> None:
    sealed = bytes(range(256)) * 3  # every byte value, NUL included
    env = Envelope(
        "event",
        SITE,
        "us-01",
        2**40 + 3,
        1_795_655_870.123456789,
        {
            "pred": 1,
            "scores": [0.1, 0.9000000000000001],
            "label": 0,
            "input": "img#3",
            "label_name": "benign",
            "pred_label": "malignant",
            "bundle": "breast-cnn@abc",
            "input_sha256": "ab" * 32,
        },
        sealed=sealed,
        alert="fall",
    )
    with Store(target) as store:
        assert store.add_result(env, received=1_795_655_871.000000123, raw=None)
        [row] = read_models.results(store)
        assert row["seq"] == 2**40 + 3
        assert row["time"] == 1_795_655_870.123456789, "a double, not a 4-byte real"
        assert row["received"] == 1_795_655_871.000000123
        assert row["score"] == 0.9000000000000001
        assert (row["kind"], row["label"], row["pred"]) == ("event", 0, 1)
        assert (row["label_name"], row["pred_label"]) == ("benign", "malignant")
        assert (row["bundle"], row["input_sha256"]) == ("breast-cnn@abc", "ab" * 32)
        assert read_models.sealed_results(store) == [(row["id"], sealed)]
        assert store.query("SELECT alert, raw FROM results") == [{"alert": "fall", "raw": None}]
        assert store.add_result(_env(1), raw=b"\x00raw\xff")
        assert store.query("SELECT raw FROM results WHERE seq = ?", (1,)) == [
            {"raw": b"\x00raw\xff"}
        ]


def test_sql_written_by_other_modules_runs_unchanged(target: str | Path) -> None:
    """Raw SQLite-dialect SQL through query() and transaction(): ``?`` outside literals
    only, ``%`` in LIKE, rows by position and name, lastrowid, executemany, rollback."""
    with Store(target) as store:
        store.set_state(SITE, "us-01", "online", 10.0, "b1")
        rows = store.query(
            "SELECT count(*) AS n, '?%' AS lit FROM devices WHERE site LIKE 'ward%' AND device = ?",
            ("us-01",),
        )
        assert rows == [{"n": 1, "lit": "?%"}]
        ids = []
        with store.transaction() as db:
            for rule in ("r1", "r2"):
                cur = db.execute(
                    "INSERT INTO alerts (site, device, rule, severity, message, opened, updated)"
                    " VALUES (?,?,?,?,?,?,?)",
                    (SITE, "us-01", rule, "warning", "m", 1.0, 1.0),
                )
                ids.append(cur.lastrowid)
            db.executemany("UPDATE alerts SET count=? WHERE id=?", [(5, i) for i in ids])
            row = db.execute("SELECT * FROM alerts WHERE id=?", (ids[1],)).fetchone()
            assert (row[0], row["rule"], row["count"]) == (ids[1], "r2", 5)
            assert dict(row)["state"] == "open"
        assert ids[0] is not None and ids[1] == ids[0] + 1

        def fail_midway() -> None:
            with store.transaction() as db:
                db.execute("UPDATE alerts SET state='resolved'")
                raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError):
            fail_midway()
        assert [r["state"] for r in store.query("SELECT state FROM alerts")] == ["open"] * 2
        assert store.query("SELECT sum(count) AS s FROM alerts") == [{"s": 10}]


def test_results_per_minute_floors_each_time(target: str | Path) -> None:
    with Store(target) as store:
        for seq, received in ((1, 60.0), (2, 119.9), (3, 179.99)):
            store.add_result(_env(seq), received=received)
        assert read_models.results_per_minute(store, SITE, "us-01", 0.0) == [
            {"minute": 60, "count": 2},
            {"minute": 120, "count": 1},
        ]


def test_telemetry_history_and_replay_seqs(target: str | Path) -> None:
    with Store(target) as store:
        assert store.advance(SITE, "us-01", "telemetry", 5)
        assert not store.advance(SITE, "us-01", "telemetry", 5), "a replay is not newer"
        assert not store.advance(SITE, "us-01", "telemetry", 4)
        store.set_telemetry(
            SITE, "us-01", {"fps": 2.5, "results": 3, "latency_ms": {"total": {"p50": 4.25}}}
        )
        [point] = read_models.telemetry_history(store, SITE, "us-01", 0.0)
        assert (point["fps"], point["latency_p50"], point["results"]) == (2.5, 4.25, 3)
        [dev] = read_models.devices(store)
        assert dev["telemetry"]["fps"] == 2.5 and dev["last_telemetry_seq"] == 5
        store.count_rejected(SITE, "us-01", "bad signature")
        store.count_rejected(None, None, "unknown device")
        assert read_models.devices(store)[0]["rejected"] == 1
        rejects = [a["detail"] for a in read_models.audit(store, "reject")]
        assert rejects == ["unknown device", "bad signature"]


def test_alert_transactions_run_one_at_a_time_across_workers(target: str | Path) -> None:
    """gateway.alerts reads, then inserts or updates, in one transaction: two workers
    raising the same alert at once must give one open alert counted by both, never a
    second insert that breaks the one-open-alert index."""
    Store(target).close()

    def worker() -> None:
        with Store(target) as store:
            for _ in range(40):
                open_alert(store, SITE, "us-01", "silent", "warning", "silent", now=time.time())

    _together(worker, [()] * 2, join_s=120)
    with Store(target) as store:
        [alert] = list_alerts(store)
    assert (alert["state"], alert["count"]) == ("open", 80)


@pytest.mark.parametrize(
    "poison",
    [
        {"pred": 2**64},  # a typed column (BIGINT/INTEGER) cannot hold it
        {"input": "ward\ud800"},  # a lone surrogate: not encodable as UTF-8 for a TEXT column
        {"label": -(2**70), "scores": [0.5]},
    ],
    ids=["int-beyond-64-bits", "lone-surrogate", "negative-overflow"],
)
def test_one_poisoned_row_is_refused_and_the_rest_of_its_batch_stored(
    target: str | Path, poison: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A row the database refuses (built directly, as an older gateway without the body
    schema, or another ingest path, would hand it over) fails only itself: the good results
    of several devices in the same batch are stored in the same call, the bad one is None,
    named in one log line (device and seq) and counted; a duplicate is still a duplicate."""
    caplog.set_level("ERROR", logger="medge.gateway.store")
    with Store(target) as store:
        assert store.add_results([(_env(1, "us-02", pred=1), None)], 1.0) == [True]
        items = [
            (_env(1, "us-01", pred=0, scores=[0.9, 0.1]), b"raw-1"),
            (_env(2, "us-02", pred=1), None),
            (_env(7, "us-03", **poison), b"raw-poison"),
            (_env(1, "us-04", pred=0), None),
            (_env(1, "us-02", pred=1), None),  # a resend: duplicate
        ]
        assert store.add_results(items, 2.0) == [True, True, None, True, False]
        assert store.refused == 1
        stored = {(r["device"], r["seq"]) for r in read_models.results(store, limit=10)}
        assert stored == {("us-01", 1), ("us-02", 1), ("us-02", 2), ("us-04", 1)}
        devices = {d["device"]: d for d in read_models.devices(store)}
        assert (devices["us-02"]["stored"], devices["us-02"]["duplicates"]) == (2, 1)
        assert devices["us-01"]["stored"] == devices["us-04"]["stored"] == 1
        assert devices.get("us-03", {"stored": 0})["stored"] == 0
        lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(lines) == 1 and "ward-a/us-03 seq 7" in lines[0] and "\n" not in lines[0]
        # the caller (gateway.service) audits the refusal with reason "store"
        store.count_rejected(SITE, "us-03", "store")
        assert [a["detail"] for a in read_models.audit(store, "reject")] == ["store"]
        # the normal path is still one batch, and the store keeps working
        assert store.add_results([(_env(3, "us-02", pred=0), None)], 3.0) == [True]
        assert store.add_results([(_env(7, "us-03", pred=0), None)], 4.0) == [True]


def test_a_broken_store_still_raises_rather_than_refusing_rows(target: str | Path) -> None:
    """Only a refused VALUE makes a row None; a database that cannot store anything (here its
    results table is gone) fails the call: the writer retries and nothing is acknowledged,
    never every row turned into a rejection."""
    with Store(target) as store:
        with store.transaction() as db:
            db.execute("DROP TABLE results")
        with pytest.raises(Exception, match="results") as failed:
            store.add_results([(_env(1), None), (_env(2), None)], 1.0)
        assert not isinstance(failed.value, (OverflowError, UnicodeError, ValueError, TypeError))
        assert store.refused == 0
