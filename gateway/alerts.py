"""Alerts: what the gateway raises from what devices send, and from their silence.

Three rules (:class:`AlertRules`, in gateway.alert_rules with the rules file), evaluated by
the gateway as messages arrive and by a watchdog thread for silence:

- ``event:<kind>`` — the start of an event the device's bundle marks ``alert: true`` (the body's
  ``alert``; where the body is not readable, the clear header's ``alert``, which the agent sets
  for exactly those), at the severity its rule gives (the body's ``severity``) unless the
  site's rules override it for that kind (or ignore the kind). More events of that kind from
  the same device while its alert is still open add to the alert's ``count``; once a person
  acknowledges it, the next event opens a new alert. An event alert ends when it is
  acknowledged.
- ``silent`` — no authenticated message of any kind from a device for ``silence_after`` seconds
  (counted from the gateway's start at the earliest); resolved when the device speaks again.
  Devices whose last state is ``offline`` or ``stopped`` are not watched: the ``offline``
  alert covers the first, and a device that was stopped on purpose is not missing.
- ``offline`` — a device's state became ``offline``: its Last Will, sent by the broker when
  the connection was lost without a goodbye (power, network, crash). Of lower severity than a
  clinical event by default (warning); resolved when the device says ``online``. A clean stop
  says ``stopped`` and raises nothing.

Every alert is a row of the store's ``alerts`` table: ``open`` -> ``acknowledged`` (who and
when; also written to the audit log as ``ack-alert``) -> ``resolved`` (the condition ended).
A unique index keeps at most one open alert per (site, device, rule), also when several
gateway workers share one database.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from edge_agent.envelope import Envelope
from edge_agent.errors import one_line
from gateway import read_models
from gateway.alert_rules import SEVERITIES, AlertError, AlertRules, check_severity, rules_json
from gateway.db import Database
from gateway.store import Store

__all__ = [
    "SEVERITIES",
    "AlertEngine",
    "AlertError",
    "AlertRules",
    "UnknownAlert",
    "acknowledge",
    "current_rules",
    "list_alerts",
    "open_alert",
    "record_rules",
    "resolve_alerts",
]

log = logging.getLogger("medge.gateway.alerts")

_ACTIVE = ("open", "acknowledged")  # states of an alert whose condition has not ended
RULES_ACTION = "alert-rules"  # the audit action that records the rules a gateway runs with


class UnknownAlert(AlertError):
    """No alert has that id."""


_severity = check_severity


# -- the alerts table ------------------------------------------------------------------------
def open_alert(
    store: Store,
    site: str,
    device: str,
    rule: str,
    severity: str,
    message: str,
    detail: dict[str, Any] | None = None,
    now: float | None = None,
    active: tuple[str, ...] = _ACTIVE,
) -> tuple[int, bool]:
    """Open an alert for a condition, unless one in an ``active`` state exists: then that one
    counts once more. Returns (alert id, whether it is new)."""
    now = time.time() if now is None else now
    with store.transaction() as db:
        return _open(db, site, device, rule, severity, message, detail, now, active)


def _open(
    db: Database,
    site: str,
    device: str,
    rule: str,
    severity: str,
    message: str,
    detail: dict[str, Any] | None,
    now: float,
    active: tuple[str, ...],
) -> tuple[int, bool]:
    marks = ",".join("?" * len(active))
    row = db.execute(
        f"SELECT id FROM alerts WHERE site=? AND device=? AND rule=? AND state IN ({marks}) "
        "ORDER BY id DESC LIMIT 1",
        (site, device, rule, *active),
    ).fetchone()
    if row is not None:
        db.execute(
            "UPDATE alerts SET count=count+1, updated=?, detail=coalesce(?, detail) WHERE id=?",
            (now, _detail(detail), row[0]),
        )
        return int(row[0]), False
    cur = db.execute(
        "INSERT INTO alerts (site, device, rule, severity, message, detail, opened, updated)"
        " VALUES (?,?,?,?,?,?,?,?)",
        (site, device, rule, _severity(severity), message, _detail(detail), now, now),
    )
    return int(cur.lastrowid or 0), True


def resolve_alerts(
    store: Store, site: str, device: str, rule: str, now: float | None = None
) -> list[int]:
    """End every active alert of a condition; returns their ids."""
    now = time.time() if now is None else now
    with store.transaction() as db:
        ids = [
            int(r[0])
            for r in db.execute(
                "SELECT id FROM alerts WHERE site=? AND device=? AND rule=? "
                "AND state IN ('open','acknowledged')",
                (site, device, rule),
            )
        ]
        db.executemany(
            "UPDATE alerts SET state='resolved', resolved_at=?, updated=? WHERE id=?",
            [(now, now, i) for i in ids],
        )
    return ids


def acknowledge(store: Store, alert_id: int, user: str, now: float | None = None) -> dict[str, Any]:
    """A person has seen an open alert: record who and when, in the alert and in the audit log
    (action ``ack-alert``). Raises AlertError if there is no such open alert."""
    now = time.time() if now is None else now
    with store.transaction() as db:
        row = db.execute("SELECT * FROM alerts WHERE id=?", (alert_id,)).fetchone()
        if row is None:
            raise UnknownAlert(f"no alert {alert_id}")
        if row["state"] != "open":
            raise AlertError(f"alert {alert_id} is {row['state']}, not open")
        db.execute(
            "UPDATE alerts SET state='acknowledged', acked_by=?, acked_at=?, updated=? WHERE id=?",
            (user, now, now, alert_id),
        )
        db.execute(
            "INSERT INTO audit (time, site, device, action, detail) VALUES (?,?,?,?,?)",
            (
                now,
                row["site"],
                row["device"],
                "ack-alert",
                f"alert {alert_id} ({row['rule']}: {row['message']}) acknowledged by {user}"[:500],
            ),
        )
        out = dict(db.execute("SELECT * FROM alerts WHERE id=?", (alert_id,)).fetchone())
    return _row(out)


def list_alerts(store: Store, limit: int = 100, resolved: bool = True) -> list[dict[str, Any]]:
    """Open alerts first (most severe, then newest), then acknowledged ones, then (with
    ``resolved``) the newest resolved ones; ``limit`` rows in all, each detail decoded."""
    return [_row(r) for r in read_models.alerts(store, limit, resolved)]


def record_rules(store: Store, rules: AlertRules, now: float | None = None) -> bool:
    """Write the rules a gateway runs with to the audit log (action ``alert-rules``) unless the
    newest such record already says the same; True if written."""
    now = time.time() if now is None else now
    text = rules_json(rules)
    with store.transaction() as db:
        row = db.execute(
            "SELECT detail FROM audit WHERE action=? ORDER BY id DESC LIMIT 1", (RULES_ACTION,)
        ).fetchone()
        if row is not None and row[0] == text:
            return False
        db.execute(
            "INSERT INTO audit (time, site, device, action, detail) VALUES (?,?,?,?,?)",
            (now, None, None, RULES_ACTION, text),
        )
    return True


def current_rules(store: Store) -> dict[str, Any] | None:
    """The rules the gateway last recorded (with ``recorded``: when), or None if none has."""
    rows = store.query(
        "SELECT time, detail FROM audit WHERE action=? ORDER BY id DESC LIMIT 1", (RULES_ACTION,)
    )
    if not rows:
        return None
    out: dict[str, Any] = json.loads(rows[0]["detail"])
    out["recorded"] = rows[0]["time"]
    return out


def _detail(detail: dict[str, Any] | None) -> str | None:
    return None if detail is None else json.dumps(detail, allow_nan=False, default=str)


def _row(row: dict[str, Any]) -> dict[str, Any]:
    """An alert row with its detail decoded; a detail that does not decode (an old or damaged
    row) becomes an ``error`` marker on that row alone, logged once per alert."""
    raw = row.get("detail")
    try:
        row["detail"] = json.loads(raw) if raw else None
    except (ValueError, TypeError, RecursionError) as exc:
        row["detail"] = None
        row["error"] = f"detail unreadable ({type(exc).__name__})"
        if row.get("id") not in _BAD_DETAIL:
            _BAD_DETAIL.add(row.get("id"))
            log.error(
                "alert %s: detail is not readable JSON (%s); shown without it",
                row.get("id"),
                type(exc).__name__,
            )
    return row


_BAD_DETAIL: set[Any] = set()  # alert ids whose unreadable detail was already logged


# -- the rules -------------------------------------------------------------------------------
class AlertEngine:
    """Evaluates the rules: call :meth:`on_envelope` for every accepted message; the silence
    watchdog runs in a thread between :meth:`start` and :meth:`stop`.

    ``on_raise(alert)`` is called with each newly opened alert (e.g. to count it)."""

    def __init__(
        self,
        store: Store,
        rules: AlertRules | None = None,
        on_raise: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.rules = rules or AlertRules()
        self._on_raise = on_raise
        self._clock = clock
        self._started = clock()
        self._silent: set[tuple[str, str]] = set()  # devices with an active silent alert
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> AlertEngine:
        if self._thread is None:
            record_rules(self.store, self.rules, self._clock())
            self._started = self._clock()
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._watch, name="medge-alert-watchdog", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def thread(self) -> threading.Thread | None:
        """The silence watchdog's thread while started (for supervision)."""
        return self._thread

    @property
    def interval(self) -> float:
        """How often the watchdog looks: a quarter of the silence period, at most 1 s."""
        return min(1.0, max(0.05, self.rules.silence_after / 4))

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check_silence()
            except Exception:  # the watchdog must outlive a bad moment of the database
                log.exception("silence check failed")

    # -- rules -----------------------------------------------------------------------------
    def on_envelope(self, env: Envelope, new: bool = True) -> int | None:
        """Evaluate an accepted message (``new``: not a duplicate); the id of an alert it
        newly opened, if any."""
        key = (env.site, env.device)
        with self._lock:  # the watchdog opens silent alerts under this lock too
            if key in self._silent:
                self._silent.discard(key)
                resolve_alerts(self.store, env.site, env.device, "silent", self._clock())
        if env.kind == "event" and new:
            return self._event(env)
        if env.kind == "state":
            state = env.body.get("state")
            if state == "offline":
                return self._raise(
                    env.site,
                    env.device,
                    "offline",
                    self.rules.offline_severity,
                    f"{env.site}/{env.device} went offline",
                    {"seq": env.seq, "time": env.time, "bundle": env.body.get("bundle")},
                )
            if state == "online":
                resolve_alerts(self.store, env.site, env.device, "offline", self._clock())
        return None

    def _event(self, env: Envelope) -> int | None:
        body = env.body
        kind = body.get("event")
        if isinstance(kind, str):
            # as the agent's outbox marks the clear header: the start of an event whose rule
            # says alert (a message without ``alert`` is an alert, the manifest's default)
            raising = body.get("alert") is not False and body.get("state", "start") == "start"
        else:  # a relay that cannot read the body: the clear header says it
            kind, raising = env.alert, env.alert is not None
        if not raising or not isinstance(kind, str):
            return None
        kind = one_line(kind, 64)
        severity, source = self.rules.event_severity(kind, body.get("severity"))
        if severity is None:  # the site's rules ignore this kind
            return None
        if source == "default" and "severity" in body:
            log.warning(
                "%s/%s seq %d: event %s names an unknown severity %s; raised as %s",
                env.site,
                env.device,
                env.seq,
                kind,
                one_line(repr(body["severity"]), 40),
                severity,
            )
        score = body.get("score", body.get("peak"))
        shown = f" (score {score:.2f})" if isinstance(score, (int, float)) else ""
        detail = {
            "seq": env.seq,
            "time": env.time,
            "event": kind,
            "score": score,
            "input": body.get("input"),
            "bundle": body.get("bundle"),
            "severity_from": source,
        }
        return self._raise(
            env.site,
            env.device,
            f"event:{kind}",
            severity,
            f"{kind} on {env.site}/{env.device}{shown}",
            detail,
            active=("open",),
        )

    def check_silence(self, now: float | None = None) -> list[int]:
        """Open a silent alert for each device not heard from for ``silence_after`` seconds,
        resolve those that spoke since; returns the ids of newly opened alerts."""
        now = self._clock() if now is None else now
        devices = self.store.query("SELECT site, device, state, last_seen FROM devices")
        active = {
            (r["site"], r["device"]): r["opened"]
            for r in self.store.query(
                "SELECT site, device, max(opened) AS opened FROM alerts "
                "WHERE rule='silent' AND state IN ('open','acknowledged') GROUP BY site, device"
            )
        }
        opened: list[int] = []
        for d in devices:
            key = (d["site"], d["device"])
            if key in active:
                if (d["last_seen"] or 0.0) > active[key]:  # it spoke (maybe to another worker)
                    with self._lock:
                        self._silent.discard(key)
                        resolve_alerts(self.store, *key, "silent", now)
                else:
                    with self._lock:
                        self._silent.add(key)
                continue
            if self._silent_for(d["state"], d["last_seen"], now) is not None:
                alert = self._raise_silent(key, now)
                if alert is not None:
                    opened.append(alert)
        return opened

    def _silent_for(self, state: str | None, last_seen: float | None, now: float) -> float | None:
        """Seconds a device has been silent, if that is at least ``silence_after`` (counted
        from the gateway's start at the earliest); None if it is not silent, offline or stopped."""
        silent = now - max(last_seen or 0.0, self._started)
        watched = state not in ("offline", "stopped")
        return silent if watched and silent >= self.rules.silence_after else None

    def _raise_silent(self, key: tuple[str, str], now: float) -> int | None:
        site, device = key
        after = self.rules.silence_after
        message = f"{site}/{device} silent for {after:g} s"
        # Checked again and opened in one transaction, under the lock that on_envelope takes
        # to resolve: a message stored meanwhile either prevents the alert or resolves it.
        with self._lock, self.store.transaction() as db:
            row = db.execute(
                "SELECT state, last_seen FROM devices WHERE site=? AND device=?", key
            ).fetchone()
            if row is None or self._silent_for(row["state"], row["last_seen"], now) is None:
                return None
            detail = {"last_seen": row["last_seen"], "silence_after": after}
            alert_id, new = _open(
                db,
                site,
                device,
                "silent",
                self.rules.silent_severity,
                message,
                detail,
                now,
                _ACTIVE,
            )
            self._silent.add(key)
        if new:
            self._announce(alert_id, site, device, "silent", self.rules.silent_severity, message)
            return alert_id
        return None

    def _raise(
        self,
        site: str,
        device: str,
        rule: str,
        severity: str,
        message: str,
        detail: dict[str, Any],
        active: tuple[str, ...] = _ACTIVE,
        now: float | None = None,
    ) -> int | None:
        now = self._clock() if now is None else now
        alert_id, new = open_alert(
            self.store, site, device, rule, severity, message, detail, now, active
        )
        if not new:
            return None
        self._announce(alert_id, site, device, rule, severity, message)
        return alert_id

    def _announce(
        self, alert_id: int, site: str, device: str, rule: str, severity: str, message: str
    ) -> None:
        log.warning("alert %d (%s): %s", alert_id, severity, message)
        if self._on_raise is not None:
            self._on_raise(
                {
                    "id": alert_id,
                    "site": site,
                    "device": device,
                    "rule": rule,
                    "severity": severity,
                    "message": message,
                }
            )
