"""The gateway's store: the writer of devices and results, each result exactly once, in
SQLite by default or in PostgreSQL (``Store("postgresql://...")``) with the same code
(gateway.db). What the dashboard reads is in gateway.read_models.

Results are idempotent by (site, device, seq): a resend after a lost ack is counted as a
duplicate and not stored again, also when several gateway workers share one PostgreSQL
database. Opening a store brings its schema up to date (numbered migrations: gateway.migrations).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.envelope import Envelope
from edge_agent.errors import one_line
from gateway import read_models
from gateway.db import Database, SQLiteDatabase, StoreError, connect
from gateway.migrations import SERIAL_TABLES, migrate

__all__ = ["Store"]

log = logging.getLogger("medge.gateway.store")

INSERT_ROWS = 200  # results per INSERT statement (18 values each: under SQLite's 32766)
_RESULT_COLUMNS = (
    "site, device, seq, kind, time, received, input, label, label_name, pred, pred_label,"
    " score, body, bundle, input_sha256, sealed, alert, raw"
)
_ROW_MARKS = "(" + ",".join("?" * 18) + ")"
# PostgreSQL: a whole batch in ONE statement of constant text (prepared once by psycopg), its
# values one array per column, run as its own transaction: one round trip, one commit. Results
# are inserted in key order, then their devices' rows: two workers storing overlapping
# batches (a resend) wait for each other in the same order, and never deadlock.
_PG_TYPES = "text text bigint text float8 float8 text bigint text bigint text float8 text text"
_PG_TYPES += " text bytea text bytea"
_PG_STORE = (
    "WITH batch AS (SELECT * FROM unnest("
    + ",".join(f"?::{t}[]" for t in _PG_TYPES.split())
    + f") AS b({_RESULT_COLUMNS})),"
    f" ins AS (INSERT INTO results ({_RESULT_COLUMNS}) SELECT {_RESULT_COLUMNS} FROM batch"
    " ORDER BY site, device, seq"
    " ON CONFLICT (site, device, seq) DO NOTHING RETURNING site, device, seq),"
    " new AS (SELECT site, device, count(*) AS n FROM ins GROUP BY site, device),"
    " total AS (SELECT site, device, count(*) AS n FROM batch GROUP BY site, device),"
    " touched AS (INSERT INTO devices (site, device, last_seen, stored, duplicates)"
    " SELECT site, device, ?, coalesce(new.n, 0), total.n - coalesce(new.n, 0)"
    " FROM total LEFT JOIN new USING (site, device) ORDER BY site, device"
    " ON CONFLICT (site, device) DO UPDATE SET last_seen=excluded.last_seen,"
    " stored=devices.stored+excluded.stored, duplicates=devices.duplicates+excluded.duplicates)"
    " SELECT site, device, seq FROM ins"
)


def _result_row(env: Envelope, now: float, raw: bytes | None) -> tuple[Any, ...]:
    """The values of one result, in _RESULT_COLUMNS' order."""
    b = env.body
    score = None
    if isinstance(b.get("scores"), list) and type(b.get("pred")) is int:
        scores, pred = b["scores"], b["pred"]
        score = _f(scores[pred]) if 0 <= pred < len(scores) else None
    return (
        env.site,
        env.device,
        env.seq,
        env.kind,
        float(env.time),  # a PostgreSQL array is of one type: never ints among floats
        float(now),
        _s(b.get("input")),
        _i(b.get("label")),
        _s(b.get("label_name")),
        _i(b.get("pred")),
        _s(b.get("pred_label")),
        score,
        json.dumps(b),
        _s(b.get("bundle")),
        _s(b.get("input_sha256")),
        env.sealed,
        env.alert,
        raw,
    )


T = TypeVar("T")

HISTORY_MAX_AGE_S = 24 * 3600.0  # telemetry history older than this is pruned
HISTORY_MAX_ROWS = 20_000  # and at most this many points per device
_PRUNE_EVERY = 200  # history inserts between two prunes


_RETRIES = 5  # a PostgreSQL transaction chosen as a deadlock victim is run again


class Store:
    """One database connection; safe to share between threads of one process. Open one per
    process (the gateway writes, dashboards read): SQLite's WAL lets them work side by side;
    on PostgreSQL any number of gateway workers and dashboards share one database.

    ``target``: a file path or ``sqlite:///path`` (SQLite), or ``postgresql://user@host/db``."""

    def __init__(self, target: str | Path) -> None:
        self._lock = threading.Lock()
        self._db: Database = connect(target, SERIAL_TABLES, timeout=30)
        self.dialect = self._db.dialect
        self.location = self._db.location  # for log lines: no password
        self.path: Path | None = self._db.path if isinstance(self._db, SQLiteDatabase) else None
        self._history_inserts: dict[tuple[str, str], int] = {}  # per device, for pruning
        self.refused = 0  # result rows the database refused (add_results returned None)
        try:
            migrate(self._db, self.location)
        except StoreError:
            self.close()
            raise

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, work: Callable[[Database], T]) -> T:
        """Run ``work`` in one transaction under the store's lock; run it again if PostgreSQL
        picked it as a deadlock (or serialization) victim."""
        with self._lock:
            for attempt in range(1, _RETRIES + 1):
                try:
                    with self._db.transaction() as db:
                        return work(db)
                except BaseException as exc:
                    if attempt == _RETRIES or not self._db.retryable(exc):
                        raise
                    log.warning(
                        "store %s: %s; transaction retried", self.location, type(exc).__name__
                    )
        raise AssertionError("unreachable")

    def _store_pg(self, items: Sequence[tuple[Envelope, bytes | None]], now: float) -> list[bool]:
        """_store_batch on PostgreSQL: one statement (_PG_STORE), its own transaction, one
        round trip, under the store's lock. Run again if chosen as a deadlock victim, and
        once more on a new connection when the old one was found lost (the server restarted
        since the last batch): storing is idempotent, a result already stored is a duplicate."""
        rows = [_result_row(env, now, raw) for env, raw in items]
        args = [*(list(column) for column in zip(*rows, strict=True)), now]
        with self._lock:
            relost = False
            for attempt in range(1, _RETRIES + 1):
                try:
                    stored = self._db.execute(_PG_STORE, args, binary=True).fetchall()
                    return _news(items, {(str(r[0]), str(r[1]), int(r[2])) for r in stored})
                except BaseException as exc:
                    again = self._db.lost(exc) and not relost
                    relost = relost or again
                    if attempt == _RETRIES or not (again or self._db.retryable(exc)):
                        raise
                    log.warning(
                        "store %s: %s (%s); batch retried%s",
                        self.location,
                        type(exc).__name__,
                        _first_line(exc),
                        " on a new connection" if again else "",
                    )
        raise AssertionError("unreachable")

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT max(version) FROM schema_version").fetchone()[0])

    # -- writes (gateway) ------------------------------------------------------------------
    def _touch(self, db: Database, site: str, device: str, now: float) -> None:
        db.execute(
            "INSERT INTO devices (site, device, last_seen) VALUES (?,?,?) "
            "ON CONFLICT (site, device) DO UPDATE SET last_seen=excluded.last_seen",
            (site, device, now),
        )

    def add_result(
        self, env: Envelope, received: float | None = None, raw: bytes | None = None
    ) -> bool | None:
        """Store a result or event once; False (and a duplicate counted) if already stored,
        None if the database refused it (see add_results).
        ``raw``: the original device message (default mode; end-to-end keeps ``env.sealed``)."""
        return self.add_results([(env, raw)], received)[0]

    def add_results(
        self, items: Sequence[tuple[Envelope, bytes | None]], received: float | None = None
    ) -> list[bool | None]:
        """add_result for several (envelope, raw) in ONE transaction (one fsync): what the
        gateway's writer does with what arrived within a few milliseconds. Per item: True
        (stored), False (a duplicate) or None: the database refused this one row (a value
        its column cannot hold); said in one line naming device and seq, counted in
        ``refused``, and the rest of the batch is stored in the same call (the batch is
        rolled back and stored row by row). The caller does not acknowledge a refused row
        and audits it (reason ``store``). Any other failure (the database is down) raises."""
        if not items:
            return []
        now = received or time.time()
        try:
            return list[bool | None](self._store(items, now))
        except Exception as exc:
            if not self._db.row_refused(exc):
                raise
            batch_error = exc
        out: list[bool | None] = []
        for item in items:
            try:
                out.append(self._store([item], now)[0])
            except Exception as exc:
                if not self._db.row_refused(exc):
                    raise
                env = item[0]
                self.refused += 1
                log.error(
                    "store %s refused %s of %s/%s seq %d (%s: %s); %d refused so far",
                    self.location,
                    env.kind,
                    env.site,
                    env.device,
                    env.seq,
                    type(exc).__name__,
                    _first_line(exc),
                    self.refused,
                )
                out.append(None)
        if None not in out:  # the batch failed, yet every row alone went in: say so
            log.warning(
                "store %s: a batch failed (%s) but each row was stored alone",
                self.location,
                _first_line(batch_error),
            )
        return out

    def _store(self, items: Sequence[tuple[Envelope, bytes | None]], now: float) -> list[bool]:
        """Store a batch in one transaction: whether each result was new."""
        if self.dialect == "postgresql":
            return self._store_pg(items, now)
        return self._write(lambda db: self._store_batch(db, items, now))

    def _store_batch(
        self, db: Database, items: Sequence[tuple[Envelope, bytes | None]], now: float
    ) -> list[bool]:
        # Device rows first, in one global order: two workers storing overlapping batches
        # then wait for each other at the first device they share, and never deadlock on
        # the results' unique key (PostgreSQL; SQLite has a single writer anyway).
        keys = sorted({(env.site, env.device) for env, _ in items})
        for site, device in keys:
            self._touch(db, site, device, now)
        news = self._insert_results(db, items, now)
        counts = dict.fromkeys(keys, 0)  # new results per device; the rest are duplicates
        totals = dict.fromkeys(keys, 0)
        for (env, _), new in zip(items, news, strict=True):
            counts[(env.site, env.device)] += new
            totals[(env.site, env.device)] += 1
        db.executemany(
            "UPDATE devices SET stored=stored+?, duplicates=duplicates+? WHERE site=? AND device=?",
            [(counts[k], totals[k] - counts[k], *k) for k in keys],
        )
        return news

    def _insert_results(
        self, db: Database, items: Sequence[tuple[Envelope, bytes | None]], now: float
    ) -> list[bool]:
        """Insert the batch's results in multi-row statements (one round trip per
        INSERT_ROWS results, not one per result: PostgreSQL pays a network round trip for
        each); whether each was new comes back from RETURNING. A result that is already
        stored, or twice in this batch, is new only the first time."""
        stored: set[tuple[str, str, int]] = set()
        for start in range(0, len(items), INSERT_ROWS):
            rows = [_result_row(env, now, raw) for env, raw in items[start : start + INSERT_ROWS]]
            values = ",".join([_ROW_MARKS] * len(rows))
            cur = db.execute(
                f"INSERT INTO results ({_RESULT_COLUMNS}) VALUES {values}"
                " ON CONFLICT (site, device, seq) DO NOTHING RETURNING site, device, seq",
                [v for row in rows for v in row],
            )
            stored.update((str(r[0]), str(r[1]), int(r[2])) for r in cur.fetchall())
        return _news(items, stored)

    def set_state(
        self, site: str, device: str, state: str, at: float, bundle: str | None = None
    ) -> None:
        def work(db: Database) -> None:
            self._touch(db, site, device, time.time())
            db.execute(
                "UPDATE devices SET state=?, state_since=?, bundle=coalesce(?, bundle) "
                "WHERE site=? AND device=?",
                (state, at, bundle, site, device),
            )

        self._write(work)

    def set_telemetry(self, site: str, device: str, body: dict[str, Any]) -> None:
        """The device's latest telemetry, and a point of its bounded history (for charts)."""
        now = time.time()
        latency = body.get("latency_ms")
        total = latency.get("total") if isinstance(latency, dict) else None
        p50 = total.get("p50") if isinstance(total, dict) else None

        def work(db: Database) -> None:
            self._touch(db, site, device, now)
            db.execute(
                "UPDATE devices SET telemetry=?, bundle=coalesce(?, bundle) "
                "WHERE site=? AND device=?",
                (json.dumps(body), _s(body.get("bundle")), site, device),
            )
            db.execute(
                "INSERT INTO telemetry_history (site, device, time, fps, latency_p50, results,"
                " cpu_percent, outbox_depth) VALUES (?,?,?,?,?,?,?,?)",
                (
                    site,
                    device,
                    now,
                    _f(body.get("fps")),
                    _f(p50),
                    _i(body.get("results")),
                    _f(body.get("cpu_percent")),
                    _i(body.get("outbox_depth")),
                ),
            )
            if self._history_inserts.get((site, device), 0) % _PRUNE_EVERY == 0:
                self._prune_history(db, site, device, now)

        self._write(work)
        key = (site, device)
        self._history_inserts[key] = self._history_inserts.get(key, 0) + 1

    def _prune_history(self, db: Database, site: str, device: str, now: float) -> None:
        db.execute(
            "DELETE FROM telemetry_history WHERE time < ? OR (site=? AND device=? AND id <= "
            "(SELECT id FROM telemetry_history WHERE site=? AND device=? "
            "ORDER BY id DESC LIMIT 1 OFFSET ?))",
            (now - HISTORY_MAX_AGE_S, site, device, site, device, HISTORY_MAX_ROWS),
        )

    def count_rejected(self, site: str | None, device: str | None, reason: str | None) -> None:
        """Count a rejection against a registered device (never create one from a rejected
        message) and, unless ``reason`` is None (the caller paces audit rows), write it to
        the audit log."""
        if reason is None and not (site and device):
            return

        def work(db: Database) -> None:
            if site and device:
                db.execute(
                    "UPDATE devices SET rejected=rejected+1 WHERE site=? AND device=?",
                    (site, device),
                )
            if reason is not None:
                db.execute(
                    "INSERT INTO audit (time, site, device, action, detail) VALUES (?,?,?,?,?)",
                    (time.time(), site, device, "reject", reason[:500]),
                )

        self._write(work)

    def add_audit(
        self, action: str, detail: str, site: str | None = None, device: str | None = None
    ) -> None:
        """Write one line to the audit log (logins, acknowledgements, ...)."""
        self._write(
            lambda db: db.execute(
                "INSERT INTO audit (time, site, device, action, detail) VALUES (?,?,?,?,?)",
                (time.time(), site, device, action, detail[:500]),
            )
        )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Database]:
        """The connection inside one transaction (ROLLBACK on error), under the store's lock:
        for the modules that own tables of their own (gateway.alerts). Such transactions run
        one at a time across every process on the database (SQLite: BEGIN IMMEDIATE;
        PostgreSQL: an advisory lock), so read-then-write logic in them stays correct. SQL
        is written for SQLite, ``?`` placeholders; rows read by position or by name."""
        with self._lock, self._db.transaction(exclusive=True) as db:
            yield db

    def answers(self) -> bool:
        """Whether the database answers a trivial read now (a lost connection is opened
        again): False while a PostgreSQL server is down or restarting."""
        try:
            self.query("SELECT 1")
        except Exception:
            return False
        return True

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of one read-only statement (SQLite dialect, ``?`` placeholders), as dicts."""
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def advance(self, site: str, device: str, kind: str, seq: int) -> bool:
        """Record ``seq`` as the newest ``kind`` (state/telemetry) message of a device; False if
        it is not newer than the last one (a replay or a stale message)."""
        column = {"state": "last_state_seq", "telemetry": "last_telemetry_seq"}[kind]

        def work(db: Database) -> bool:
            # the row must exist; last_seen is not touched: a stale replay is not the device
            # speaking (set_state/set_telemetry touch it once the message is accepted)
            db.execute(
                "INSERT INTO devices (site, device) VALUES (?,?) ON CONFLICT DO NOTHING",
                (site, device),
            )
            cur = db.execute(
                f"UPDATE devices SET {column}=? WHERE site=? AND device=? AND {column} < ?",
                (seq, site, device, seq),
            )
            return cur.rowcount == 1

        return self._write(work)

    # -- reads: gateway.read_models (kept here for the callers that read through a Store) --
    def floor_int(self, expr: str) -> str:
        """SQL for the integer floor of a non-negative REAL expression, in this dialect."""
        return self._db.floor_int(expr)

    def devices(self) -> list[dict[str, Any]]:
        return read_models.devices(self)

    def results(
        self,
        after_id: int = 0,
        limit: int = 100,
        site: str | None = None,
        device: str | None = None,
    ) -> list[dict[str, Any]]:
        return read_models.results(self, after_id, limit, site, device)

    def result_count(self, site: str | None = None, device: str | None = None) -> int:
        return read_models.result_count(self, site, device)

    def sealed_results(self, after_id: int = 0, limit: int = 500) -> list[tuple[int, bytes]]:
        return read_models.sealed_results(self, after_id, limit)

    def telemetry_history(
        self, site: str, device: str, since: float, limit: int = 2000
    ) -> list[dict[str, Any]]:
        return read_models.telemetry_history(self, site, device, since, limit)

    def audit(self, action: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return read_models.audit(self, action, limit)


def _news(
    items: Sequence[tuple[Envelope, bytes | None]], stored: set[tuple[str, str, int]]
) -> list[bool]:
    """Per item, whether it was new: among the keys the INSERT returned (``stored``), and
    not already earlier in the same batch."""
    news, seen = [], set()
    for env, _ in items:
        key = (env.site, env.device, env.seq)
        news.append(key in stored and key not in seen)
        seen.add(key)
    return news


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return one_line(text.splitlines()[0] if text else type(exc).__name__, 200)


def _s(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _i(v: Any) -> int | None:
    return v if type(v) is int else None


def _f(v: Any) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < float("inf")
    return float(v) if ok else None
