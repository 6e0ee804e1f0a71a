"""What the dashboard (and the demo summary, the cloud tier, tests) read from the gateway's
store: plain functions over a :class:`~gateway.store.Store`, which writes.

Each function runs read-only SQL through :meth:`Store.query` (the SQLite dialect, ``?``
placeholders; gateway.db runs it on PostgreSQL too) and shapes rows for a reader: the fleet
(:func:`devices`), the result feed (:func:`results`), the charts (:func:`telemetry_history`,
:func:`results_per_minute`), the audit log (:func:`audit`), the alert panel's order
(:func:`alerts`; gateway.alerts.list_alerts decodes the rows), one result with its body and the
class names its bundle's results have used (:func:`result`, :func:`class_names`, the detail
panel), a device's recent events (:func:`device_events`, the timeline). Nothing here writes.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from gateway.alert_rules import SEVERITIES

if TYPE_CHECKING:
    from gateway.store import Store

__all__ = [
    "alerts",
    "audit",
    "cam_bodies",
    "class_names",
    "device_events",
    "devices",
    "result",
    "result_count",
    "results",
    "results_per_minute",
    "sealed_results",
    "telemetry_history",
]

log = logging.getLogger("medge.gateway.store")  # the lines the store used to write

_RESULT_COLUMNS = (
    "id, site, device, seq, kind, time, received, input, label, label_name, pred, pred_label, "
    "score, bundle, input_sha256"
)
_BAD_ROWS_MAX = 10_000
_bad_rows: set[tuple[str, str, str]] = set()  # (store, site, device) whose bad row was logged


def devices(store: Store) -> list[dict[str, Any]]:
    """Every device, by site and name, its telemetry decoded; a row whose telemetry cannot be
    shown gets ``telemetry: None`` and an ``error``, said once per device in the log."""
    out = []
    for d in store.query("SELECT * FROM devices ORDER BY site, device"):
        d["telemetry"], why = _telemetry(d["telemetry"])
        if why is not None:  # one bad row (e.g. written before bodies had a schema)
            d["error"] = why
            key = (store.location, d["site"], d["device"])
            if key not in _bad_rows and len(_bad_rows) < _BAD_ROWS_MAX:
                _bad_rows.add(key)  # one line per device, not one per page poll
                log.warning("store %s: %s/%s %s", *key, why)
        out.append(d)
    return out


def results(
    store: Store,
    after_id: int = 0,
    limit: int = 100,
    site: str | None = None,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """Results with id > after_id, oldest first; with after_id=0, the newest ``limit``."""
    where: list[str] = ["id > ?"]
    args: list[object] = [after_id]
    if site:
        where.append("site = ?")
        args.append(site)
    if device:
        where.append("device = ?")
        args.append(device)
    order = "ASC" if after_id else "DESC"
    rows = store.query(
        f"SELECT {_RESULT_COLUMNS} FROM results WHERE {' AND '.join(where)} "
        f"ORDER BY id {order} LIMIT ?",
        (*args, limit),
    )
    return rows if after_id else rows[::-1]


def cam_bodies(store: Store, first_id: int, last_id: int) -> list[dict[str, Any]]:
    """``id`` and ``body`` of the results in [first_id, last_id] whose body mentions a CAM
    thumbnail (the others are not read)."""
    return store.query(
        "SELECT id, body FROM results WHERE id >= ? AND id <= ? AND CAST(body AS TEXT) LIKE ?",
        (first_id, last_id, '%"cam"%'),
    )


def result(store: Store, result_id: int) -> dict[str, Any] | None:
    """One result or event row with its stored ``body`` (JSON text), or None."""
    rows = store.query(f"SELECT {_RESULT_COLUMNS}, body FROM results WHERE id = ?", (result_id,))
    return rows[0] if rows else None


def class_names(
    store: Store, site: str, device: str, bundle: str, around_id: int, span: int = 2000
) -> dict[int, str]:
    """Class index -> name, as the device's results of ``bundle`` named their predicted class
    and their ground truth, among the ``span`` rows on either side of ``around_id`` (a result
    body carries the names of those two classes only)."""
    window = (site, device, around_id - span, around_id + span, bundle)
    where = "site=? AND device=? AND id >= ? AND id <= ? AND bundle=?"
    rows = store.query(
        f"SELECT DISTINCT pred AS i, pred_label AS name FROM results WHERE {where} "
        f"AND pred IS NOT NULL AND pred_label IS NOT NULL UNION "
        f"SELECT DISTINCT label AS i, label_name AS name FROM results WHERE {where} "
        "AND label IS NOT NULL AND label_name IS NOT NULL",
        (*window, *window),
    )
    names: dict[int, str] = {}
    for r in sorted(rows, key=lambda r: (r["i"], r["name"])):
        names.setdefault(int(r["i"]), str(r["name"]))
    return names


def device_events(
    store: Store, site: str, device: str, since: float, limit: int = 500
) -> list[dict[str, Any]]:
    """The device's event messages (kind ``event``: starts, ends, updates) received after
    ``since``, oldest first (at most the newest ``limit``), with their ``body`` (JSON text)."""
    rows = store.query(
        "SELECT id, seq, time, received, body FROM results "
        "WHERE site=? AND device=? AND received > ? AND kind = 'event' "
        "ORDER BY id DESC LIMIT ?",
        (site, device, since, limit),
    )
    return rows[::-1]


def result_count(store: Store, site: str | None = None, device: str | None = None) -> int:
    sql, args = "SELECT count(*) AS n FROM results", []
    if site and device:
        sql, args = sql + " WHERE site=? AND device=?", [site, device]
    return int(store.query(sql, args)[0]["n"])


def sealed_results(store: Store, after_id: int = 0, limit: int = 500) -> list[tuple[int, bytes]]:
    """End-to-end messages kept for the cloud, oldest first: (id, the whole message)."""
    rows = store.query(
        "SELECT id, sealed FROM results WHERE sealed IS NOT NULL AND id > ? ORDER BY id LIMIT ?",
        (after_id, limit),
    )
    return [(int(r["id"]), bytes(r["sealed"])) for r in rows]


def telemetry_history(
    store: Store, site: str, device: str, since: float, limit: int = 2000
) -> list[dict[str, Any]]:
    """Telemetry points of a device received after ``since``, oldest first (at most the
    newest ``limit``)."""
    rows = store.query(
        "SELECT time, fps, latency_p50, results, cpu_percent, outbox_depth "
        "FROM telemetry_history WHERE site=? AND device=? AND time > ? "
        "ORDER BY time DESC LIMIT ?",
        (site, device, since, limit),
    )
    return rows[::-1]


def results_per_minute(store: Store, site: str, device: str, since: float) -> list[dict[str, Any]]:
    """Results and events stored per minute of receipt since ``since`` (minutes with none
    are absent), oldest first."""
    return store.query(
        f"SELECT {store.floor_int('received / 60')} * 60 AS minute, count(*) AS count "
        "FROM results WHERE site=? AND device=? AND received > ? "
        "GROUP BY minute ORDER BY minute",
        (site, device, since),
    )


def audit(store: Store, action: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The newest audit rows first, of one ``action`` or of all."""
    sql = "SELECT * FROM audit" + (" WHERE action=?" if action else "")
    return store.query(sql + " ORDER BY id DESC LIMIT ?", (action, limit) if action else (limit,))


def alerts(store: Store, limit: int = 100, resolved: bool = True) -> list[dict[str, Any]]:
    """Alert rows as stored (``detail`` still JSON text): open ones first (most severe, then
    newest), then acknowledged ones, then (with ``resolved``) the newest resolved ones;
    ``limit`` rows in all."""
    rank = " ".join(f"WHEN '{s}' THEN {i}" for i, s in enumerate(SEVERITIES))
    where = "" if resolved else "WHERE state != 'resolved'"
    return store.query(
        f"SELECT * FROM alerts {where} ORDER BY "
        "CASE state WHEN 'open' THEN 0 WHEN 'acknowledged' THEN 1 ELSE 2 END, "
        f"CASE WHEN state = 'open' THEN CASE severity {rank} ELSE 9 END ELSE 0 END, "
        "id DESC LIMIT ?",
        (limit,),
    )


def _telemetry(text: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """A stored telemetry column as an object, or (None, why it cannot be shown)."""
    if not text:
        return None, None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return None, f"telemetry unreadable ({type(exc).__name__})"
    if not isinstance(value, dict):
        return None, f"telemetry is a {type(value).__name__}, not an object"
    return value, None
