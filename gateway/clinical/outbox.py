"""The fog gateway's durable outbox towards the clinical systems (a PACS, a FHIR server).

The gateway writer puts every stored row that an output takes here, in the same spirit as the
forward outbox (gateway.forward): on disk (SQLite WAL, synchronous=FULL, mode 0600) *before* it
acknowledges the device, so nothing a device sent is lost to a PACS or EHR outage. One row per
(target, site, device, seq); a device's resend changes nothing. An item leaves only when its
receiver has stored it (:meth:`ClinicalOutbox.delete`), or is *parked* with the reason when
sending it again cannot help (a source blob that does not open, an object the PACS refuses):
parked items stay for an operator to read and, once the cause is fixed, :meth:`unpark`.

Send order per target: events before results (as the device outbox), then by the device's
message time. ``next_try`` holds an item back after a failure that may pass (back-off).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.durable_queue import DurableQueue, priority
from edge_agent.errors import MedgeError

__all__ = ["ClinicalItem", "ClinicalOutbox", "ParkedItem", "TargetSummary"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clinical (
    target TEXT NOT NULL,
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    priority INTEGER NOT NULL,
    time REAL NOT NULL,
    bundle TEXT,
    body TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    parked TEXT,
    last_error TEXT,
    PRIMARY KEY (target, site, device, seq)
);
CREATE INDEX IF NOT EXISTS clinical_order ON clinical (target, parked, priority, time);
"""
_COLUMNS = (
    "target",
    "site",
    "device",
    "seq",
    "kind",
    "priority",
    "time",
    "bundle",
    "body",
    "created",
)
_ITEM = "target, site, device, seq, kind, time, bundle, body"
_ORDER = "priority, time, site, device, seq"
_KEY = "target=? AND site=? AND device=? AND seq=?"


@dataclass(frozen=True)
class ClinicalItem:
    """One stored row for one output. ``time``: the device's message time; ``bundle``: the
    bundle id that made it (for an event, the device's bundle when it was stored)."""

    target: str  # "pacs" | "fhir"
    site: str
    device: str
    seq: int
    kind: str  # "result" | "event"
    time: float
    bundle: str | None
    body: dict[str, Any]

    @property
    def key(self) -> tuple[str, str, str, int]:
        return self.target, self.site, self.device, self.seq

    @property
    def name(self) -> str:
        return f"{self.kind} {self.site}/{self.device}/{self.seq}"


@dataclass(frozen=True)
class ParkedItem:
    """An item that will not be sent again until an operator unparks it, and why."""

    item: ClinicalItem
    reason: str
    attempts: int


@dataclass(frozen=True)
class TargetSummary:
    """One target's state, for an operator: how many items wait and are parked, when the
    oldest waiting one was queued, and the next one to send with its attempts so far, when it
    may be tried (``next_try``, epoch seconds; 0: now) and the last error it met."""

    target: str
    waiting: int
    parked: int
    oldest_queued: float | None = None  # None: nothing waits
    next_item: ClinicalItem | None = None
    attempts: int = 0
    next_try: float = 0.0
    last_error: str | None = None


def _item(row: Any) -> ClinicalItem:
    target, site, device, seq, kind, t, bundle, body = row
    return ClinicalItem(target, site, device, int(seq), kind, float(t), bundle, json.loads(body))


class ClinicalOutbox:
    """The clinical outbox file. Thread-safe: the writer puts, one sender thread per target
    takes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._q = DurableQueue(
            self.path, _SCHEMA, "clinical", ("target", "site", "device", "seq"), _ORDER, timeout=30
        )

    @classmethod
    def open_existing(cls, path: Path) -> ClinicalOutbox:
        """Open an outbox that is already there (an operator's command, beside a running
        gateway): MedgeError when ``path`` is missing, unreadable or not a clinical outbox.
        Creates nothing, not even the table in some other SQLite file."""
        path = Path(path)
        if not path.is_file():
            raise MedgeError(
                f"clinical outbox {path} does not exist (a gateway with outputs: creates it "
                "when it starts)"
            )
        try:
            uri = f"{path.resolve().as_uri()}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
                found = db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='clinical'"
                ).fetchone()
        except sqlite3.Error as exc:
            raise MedgeError(f"clinical outbox {path}: cannot read it ({exc})") from exc
        if found is None:
            raise MedgeError(f"{path} is not a clinical outbox (it has no 'clinical' table)")
        try:
            return cls(path)
        except sqlite3.Error as exc:
            raise MedgeError(f"clinical outbox {path}: cannot open it ({exc})") from exc

    def __enter__(self) -> ClinicalOutbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put_many(self, items: list[ClinicalItem]) -> None:
        """Store ``items`` durably in one transaction; one already queued stays as it is."""
        if not items:
            return
        now = time.time()
        rows = [
            (
                i.target,
                i.site,
                i.device,
                i.seq,
                i.kind,
                priority(i.kind),
                i.time,
                i.bundle,
                json.dumps(i.body, separators=(",", ":"), allow_nan=False),
                now,
            )
            for i in items
        ]
        self._q.put_many(_COLUMNS, rows, " ON CONFLICT DO NOTHING")

    def due(self, target: str, limit: int = 1) -> list[ClinicalItem]:
        """The first ``limit`` waiting (not parked) items of ``target``, in send order, whether
        held back or not (:meth:`hold_until` says until when)."""
        with self._q.lock:
            rows = self._q.db.execute(
                f"SELECT {_ITEM} FROM clinical WHERE target=? AND parked IS NULL"
                f" ORDER BY {_ORDER} LIMIT ?",
                (target, limit),
            ).fetchall()
        return [_item(r) for r in rows]

    def hold_until(self, target: str) -> float:
        """When the first waiting item of ``target`` may be tried (0: now, or none waits)."""
        with self._q.lock:
            row = self._q.db.execute(
                f"SELECT next_try FROM clinical WHERE target=? AND parked IS NULL"
                f" ORDER BY {_ORDER} LIMIT 1",
                (target,),
            ).fetchone()
        return float(row[0]) if row else 0.0

    def delete(self, items: list[ClinicalItem]) -> int:
        """The receiver has them: forget them; returns how many were still here."""
        return len(self._q.delete([i.key for i in items]))

    def retry_later(self, items: list[ClinicalItem], error: str, next_try: float) -> None:
        """One more failed attempt of each, not before ``next_try`` (epoch seconds)."""
        self._update("attempts=attempts+1, next_try=?, last_error=?", (next_try, error), items)

    def park(self, items: list[ClinicalItem], reason: str) -> None:
        """Sending these again cannot help: keep them aside with the reason."""
        self._update("attempts=attempts+1, parked=?, last_error=?", (reason, reason), items)

    def _update(self, sets: str, values: tuple[Any, ...], items: list[ClinicalItem]) -> None:
        if not items:
            return
        with self._q.transaction() as db:
            db.executemany(
                f"UPDATE clinical SET {sets} WHERE {_KEY}", [(*values, *i.key) for i in items]
            )

    def depth(self) -> dict[str, int]:
        """Items waiting (not parked), per target."""
        return self._counts("parked IS NULL")

    def parked_count(self) -> dict[str, int]:
        """Items parked, per target."""
        return self._counts("parked IS NOT NULL")

    def _counts(self, where: str) -> dict[str, int]:
        with self._q.lock:
            rows = self._q.db.execute(
                f"SELECT target, count(*) FROM clinical WHERE {where} GROUP BY target"
            ).fetchall()
        return {t: int(n) for t, n in rows}

    def parked(self, target: str | None = None, limit: int = 1000) -> list[ParkedItem]:
        """Parked items (of ``target``, or all), in send order, with their reason."""
        with self._q.lock:
            rows = self._q.db.execute(
                f"SELECT {_ITEM}, parked, attempts FROM clinical WHERE parked IS NOT NULL"
                f" AND (? IS NULL OR target=?) ORDER BY target, {_ORDER} LIMIT ?",
                (target, target, limit),
            ).fetchall()
        return [ParkedItem(_item(r[:8]), str(r[8]), int(r[9])) for r in rows]

    def summary(self) -> list[TargetSummary]:
        """Per target that has an item (waiting or parked), by target name: counts, when the
        oldest waiting item was queued, and the next to send with its attempts and last error.
        Reads only; one consistent snapshot."""
        with self._q.lock:
            db = self._q.db
            db.execute("BEGIN")  # one read transaction: the counts and the heads agree
            try:
                rows = db.execute(
                    "SELECT target, sum(parked IS NULL), sum(parked IS NOT NULL),"
                    " min(CASE WHEN parked IS NULL THEN created END)"
                    " FROM clinical GROUP BY target ORDER BY target"
                ).fetchall()
                heads = {
                    t: db.execute(
                        f"SELECT {_ITEM}, attempts, next_try, last_error FROM clinical"
                        f" WHERE target=? AND parked IS NULL ORDER BY {_ORDER} LIMIT 1",
                        (t,),
                    ).fetchone()
                    for t, *_ in rows
                }
            finally:
                db.execute("COMMIT")
        out = []
        for target, waiting, parked, oldest in rows:
            counts = (str(target), int(waiting), int(parked))
            head = heads[target]
            if head is None:
                out.append(TargetSummary(*counts))
                continue
            attempts, next_try, error = head[8:]
            out.append(
                TargetSummary(
                    *counts, float(oldest), _item(head[:8]), int(attempts), float(next_try), error
                )
            )
        return out

    def unpark(self, target: str | None = None) -> int:
        """Make parked items (of ``target``, or all) wait to be sent again, at once; returns
        how many. For an operator, once the cause is fixed."""
        with self._q.transaction() as db:
            cur = db.execute(
                "UPDATE clinical SET parked=NULL, next_try=0 WHERE parked IS NOT NULL"
                " AND (? IS NULL OR target=?)",
                (target, target),
            )
            return int(cur.rowcount)

    def close(self) -> None:
        self._q.close()
