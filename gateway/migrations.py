"""The store's schema as numbered migrations, and the runner that brings a database up to date.

Migration N is ``MIGRATIONS[N - 1]``: SQL statements in the SQLite dialect (``gateway.db``
translates them for PostgreSQL). The numbers applied are recorded in ``schema_version``; each
migration runs in one transaction, DDL included, so a failed one leaves nothing half done, and
one migrator at a time: gateway workers starting together migrate once. Migrations are only
ever appended: a released number never changes.
"""

from __future__ import annotations

import logging

from gateway.db import Database, StoreError

__all__ = ["MIGRATIONS", "SERIAL_TABLES", "migrate"]

log = logging.getLogger("medge.gateway.store")  # the store says what it migrated

MIGRATIONS: list[str] = [
    # 1: devices and results
    """
    CREATE TABLE devices (
        site TEXT NOT NULL,
        device TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'unknown',
        state_since REAL,
        last_seen REAL,
        bundle TEXT,
        telemetry TEXT,
        stored INTEGER NOT NULL DEFAULT 0,
        duplicates INTEGER NOT NULL DEFAULT 0,
        rejected INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (site, device)
    );
    CREATE TABLE results (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        site TEXT NOT NULL,
        device TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        time REAL NOT NULL,
        received REAL NOT NULL,
        input TEXT,
        label INTEGER,
        label_name TEXT,
        pred INTEGER,
        pred_label TEXT,
        score REAL,
        body TEXT NOT NULL,
        UNIQUE (site, device, seq)
    );
    CREATE INDEX results_device ON results (site, device, id);
    """,
    # 2: replay protection for the kinds that are not stored by seq; audit log
    """
    ALTER TABLE devices ADD COLUMN last_state_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE devices ADD COLUMN last_telemetry_seq INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,
        site TEXT,
        device TEXT,
        action TEXT NOT NULL,
        detail TEXT
    );
    """,
    # 3: audit links of each result: the exact bundle and input that produced it
    """
    ALTER TABLE results ADD COLUMN bundle TEXT;
    ALTER TABLE results ADD COLUMN input_sha256 TEXT;
    """,
    # 4: alerts (gateway.alerts) and telemetry history (dashboard charts)
    """
    CREATE TABLE alerts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        site TEXT NOT NULL,
        device TEXT NOT NULL,
        rule TEXT NOT NULL,
        severity TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'open',
        message TEXT NOT NULL,
        detail TEXT,
        count INTEGER NOT NULL DEFAULT 1,
        opened REAL NOT NULL,
        updated REAL NOT NULL,
        acked_by TEXT,
        acked_at REAL,
        resolved_at REAL
    );
    CREATE UNIQUE INDEX alerts_one_open ON alerts (site, device, rule) WHERE state = 'open';
    CREATE INDEX alerts_state ON alerts (state, id);
    CREATE TABLE telemetry_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        site TEXT NOT NULL,
        device TEXT NOT NULL,
        time REAL NOT NULL,
        fps REAL,
        latency_p50 REAL,
        results INTEGER,
        cpu_percent REAL,
        outbox_depth INTEGER
    );
    CREATE INDEX telemetry_history_device ON telemetry_history (site, device, time);
    CREATE INDEX results_received ON results (site, device, received);
    """,
    # 5: end-to-end mode: the whole sealed message, kept for the cloud; the clear alert field
    """
    ALTER TABLE results ADD COLUMN sealed BLOB;
    ALTER TABLE results ADD COLUMN alert TEXT;
    """,
    # 6: the original device message of every default-mode result (end-to-end ones are in
    # `sealed`), so a cloud tier can verify the device itself (gateway.forward)
    """
    ALTER TABLE results ADD COLUMN raw BLOB;
    """,
    # 7: device groups and staged rollouts (gateway.groups, gateway.rollout_store)
    """
    CREATE TABLE device_groups (
        name TEXT NOT NULL,
        site TEXT NOT NULL,
        device TEXT NOT NULL,
        added REAL NOT NULL,
        PRIMARY KEY (name, site, device)
    );
    CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        group_name TEXT NOT NULL,
        bundle TEXT NOT NULL,
        archive TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        plan TEXT NOT NULL,
        status TEXT NOT NULL,
        stage INTEGER NOT NULL DEFAULT 0,
        phase TEXT NOT NULL,
        reason TEXT,
        gate_values TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        stage_since REAL NOT NULL
    );
    CREATE INDEX rollouts_status ON rollouts (status, id);
    CREATE TABLE rollout_devices (
        rollout INTEGER NOT NULL,
        site TEXT NOT NULL,
        device TEXT NOT NULL,
        position INTEGER NOT NULL,
        stage INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        reason TEXT,
        previous TEXT,
        update_mark INTEGER,
        switched REAL,
        cmd TEXT,
        cmd_sent REAL,
        cmd_conn REAL,
        cmd_mark INTEGER,
        sends INTEGER NOT NULL DEFAULT 0,
        issued_ms INTEGER NOT NULL DEFAULT 0,
        since REAL NOT NULL,
        PRIMARY KEY (rollout, site, device)
    );
    CREATE INDEX rollout_devices_device ON rollout_devices (site, device);
    """,
    # 8: leases: which gateway worker drives the rollouts (gateway.rollout)
    """
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        until REAL NOT NULL
    );
    """,
]

SERIAL_TABLES = ("results", "audit", "alerts", "telemetry_history", "rollouts")  # id is an identity


def migrate(db: Database, location: str) -> None:
    """Apply the migrations this database lacks, each in one transaction (DDL included, on
    both engines), one migrator at a time; StoreError names the migration that failed."""
    number = 0
    try:
        while True:
            with db.transaction(exclusive=True) as tx:
                tx.execute(tx.ddl("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)"))
                row = tx.execute("SELECT max(version) FROM schema_version").fetchone()
                number = (row[0] or 0) + 1
                if number > len(MIGRATIONS):
                    return
                for statement in filter(str.strip, MIGRATIONS[number - 1].split(";")):
                    tx.execute(tx.ddl(statement))
                tx.execute("INSERT INTO schema_version VALUES (?)", (number,))
            log.info("store %s: schema migrated to version %d", location, number)
    except Exception as exc:
        raise StoreError(
            f"store {location}: schema migration {number} failed, nothing of it "
            f"applied: {_first_line(exc)}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
