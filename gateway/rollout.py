"""The driver of staged rollouts, in the running gateway (docs/rollouts.md).

:class:`RolloutDriver` is one thread that looks at the store every ``poll_s`` seconds: for each
rollout that is running, paused or aborting it reads what the devices answered (their
``update`` events, the bundle their state and telemetry say they run, the ``shadow`` section
of their telemetry), moves devices and stages on, and publishes the signed commands owed to
online devices through the gateway's MQTT session. All of its state is in the store
(gateway.rollout_store), so a gateway restarted mid-rollout goes on where it was: a command
is recorded as sent only once it is published, and is sent again when the device comes
online again without having answered it (commands are idempotent on the device).

One driver acts at a time on a store: each pass first takes or renews the store's
``rollout-driver`` lease (table ``leases``) for ``lease_s``. Another gateway worker whose
``gateway.yaml`` also has a ``rollouts:`` section stands by, says so once, and takes over
when the holder stops (it gives the lease back) or stops renewing it (dead: after ``lease_s``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_agent.errors import one_line
from gateway.alerts import open_alert, resolve_alerts
from gateway.ota import command
from gateway.rollout_pass import RolloutPass
from gateway.rollout_store import ACTIVE, rollouts
from gateway.store import Store

__all__ = ["RolloutDriver"]

log = logging.getLogger("medge.gateway.rollout")

Publish = Callable[[str, bytes], bool]  # (topic, payload) -> published (QoS 1, acknowledged)

LEASE = "rollout-driver"  # the row of the leases table the drivers take turns on
PAUSED_RULE = "rollout_paused"  # the alert a rollout the driver paused raises


class RolloutDriver:
    """Drives every active rollout of ``store``. ``publish``: publish one command (the
    gateway's session; True once the broker has it); ``key``: the site's bundle signer;
    ``url_for``: the URL devices fetch an archive of the bundles folder by (the
    BundleServer's ``url``). Use as a context manager, or call :meth:`tick` yourself."""

    def __init__(
        self,
        store: Store,
        publish: Publish,
        key: ed25519.Ed25519PrivateKey,
        url_for: Callable[[str], str],
        poll_s: float = 1.0,
        metrics: Any | None = None,
        clock: Callable[[], float] = time.time,
        lease_s: float | None = None,
        on_alert: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """``lease_s``: how long a pass's hold on the lease lasts (default 10 poll periods, at
        least 10 s): a standby driver takes over that long after the holder died.
        ``on_alert``: called with each alert this driver raises (the gateway's metrics)."""
        self.store, self.publish, self.key, self.url_for = store, publish, key, url_for
        self.poll_s, self.metrics, self.clock = poll_s, metrics, clock
        self.lease_s = lease_s if lease_s is not None else max(10.0, 10 * poll_s)
        self.on_alert = on_alert
        # who holds the lease: this host and process, and this driver among its restarts
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.driving: bool | None = None  # None until the first pass asked
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error = ""

    def __enter__(self) -> RolloutDriver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> RolloutDriver:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rollout-driver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.driving:
            self.release()

    def release(self) -> None:
        """Give the lease back, so a standby driver takes over at its next pass."""
        try:
            with self.store.transaction() as db:
                db.execute("DELETE FROM leases WHERE name=? AND holder=?", (LEASE, self.holder))
            self._driving(False, "")
        except Exception as exc:  # it lapses by itself after lease_s
            log.error(
                "rollouts: giving the lease back failed (it lapses in %g s): %s",
                self.lease_s,
                one_line(str(exc)),
            )

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
                self._last_error = ""
            except Exception as exc:  # the store is down, a row is odd: said once, tried again
                if self.metrics is not None:
                    self.metrics.pass_failures.inc()  # every one counted, said once per reason
                why = one_line(f"{type(exc).__name__}: {exc}")
                if why != self._last_error:
                    log.error(
                        "rollouts: a pass failed (tried again every %g s): %s", self.poll_s, why
                    )
                self._last_error = why
            self._stop.wait(self.poll_s)

    # -- one pass --------------------------------------------------------------------------
    def hold(self) -> bool:
        """Take or renew the lease; True while this driver holds it. The holder is who the
        store says after the upsert, which takes the row only when it is this driver's or has
        lapsed (the row's lock orders two drivers that ask at once)."""
        now = self.clock()
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO leases (name, holder, until) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET holder=excluded.holder, until=excluded.until "
                "WHERE leases.holder=excluded.holder OR leases.until<?",
                (LEASE, self.holder, now + self.lease_s, now),
            )
            row = db.execute("SELECT holder, until FROM leases WHERE name=?", (LEASE,)).fetchone()
        mine = row is not None and row["holder"] == self.holder
        self._driving(
            mine, "" if mine or row is None else f"{row['holder']} until {row['until']:.0f}"
        )
        return mine

    def _driving(self, mine: bool, other: str) -> None:
        """Say once when this driver starts or stops driving, and keep the gauge."""
        if mine != self.driving:
            if mine:
                log.info("rollouts: this gateway drives the rollouts (lease %s)", self.holder)
            elif other:
                log.warning(
                    "rollouts: another gateway worker drives the rollouts (lease held by %s); "
                    "this one stands by and takes over if it stops",
                    other,
                )
            self.driving = mine
        if self.metrics is not None:
            self.metrics.driving.set(1 if mine else 0)

    def tick(self) -> None:
        """One pass over the active rollouts (running, paused, aborting), oldest first, if
        this driver holds the lease."""
        if not self.hold():
            return
        active = rollouts(self.store, status=ACTIVE)
        for r in sorted(active, key=lambda r: int(r["id"])):
            RolloutPass(self, r).run()  # updates r["status"] as it changes it
        if self.metrics is not None:
            self.metrics.set_active(active)

    def command(self, site: str, device: str, cmd: str, issued_ms: int, **fields: Any) -> bytes:
        """A command signed with the site's bundle signer."""
        return command(self.key, site, device, cmd, issued_ms, **fields)

    def send(self, where: str, payload: bytes, cmd: str) -> bool:
        """Publish one command; False (said in a line) when the broker did not take it."""
        try:
            ok = self.publish(where, payload)
        except Exception as exc:  # not connected, timed out: tried again next pass
            ok = False
            log.warning("rollouts: %s on %s not published: %s", cmd, where, one_line(str(exc)))
        if ok and self.metrics is not None:
            self.metrics.command(cmd)
        return ok

    def alert_paused(self, rid: int, site: str, reason: str) -> None:
        """A warning alert on the dashboard for a rollout this driver paused (a gate failed,
        a device refused or rolled back): half a group runs the new bundle until someone acts.
        Its device is ``rollout-ID``; it resolves once the rollout no longer is paused."""
        message = one_line(f"rollout {rid} paused: {reason}", 500)
        try:
            alert_id, new = open_alert(
                self.store,
                site,
                f"rollout-{rid}",
                PAUSED_RULE,
                "warning",
                message,
                {"rollout": rid, "reason": reason},
                self.clock(),
            )
        except Exception as exc:  # the pause stands, in the audit log and the status
            log.error(
                "rollouts: the alert for paused rollout %d failed: %s", rid, one_line(str(exc))
            )
            return
        if new:
            log.warning("alert %d (warning): %s", alert_id, message)
            if self.on_alert is not None:
                self.on_alert(
                    {
                        "id": alert_id,
                        "site": site,
                        "device": f"rollout-{rid}",
                        "rule": PAUSED_RULE,
                        "severity": "warning",
                        "message": message,
                    }
                )

    def clear_paused(self, rid: int, site: str) -> None:
        """Resolve the paused alert of a rollout that runs, aborts or ended again."""
        device = f"rollout-{rid}"
        active = self.store.query(
            "SELECT id FROM alerts WHERE site=? AND device=? AND rule=? "
            "AND state IN ('open','acknowledged')",
            (site, device, PAUSED_RULE),
        )
        if active:
            ids = resolve_alerts(self.store, site, device, PAUSED_RULE, self.clock())
            log.info("rollouts: rollout %d no longer paused: alert(s) %s resolved", rid, ids)

    def audit(
        self, rid: int, text: str, site: str | None = None, device: str | None = None
    ) -> None:
        """One log line and one audit row (action ``rollout``)."""
        who = f" {site}/{device}" if device else ""
        log.info("rollout %d%s: %s", rid, who, text)
        self.store.add_audit("rollout", f"rollout {rid}: {text}", site, device)
