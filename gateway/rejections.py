"""What the gateway does with a message it refuses, beyond the metric: the device is charged
every time, the audit log gets a row in pace (a flood of garbage must not become a flood of
rows; the next row says how many were folded into it, and at stop one row per fold not yet
written), and a message over a device's flood limit is logged once per device and interval,
told apart as ``live`` traffic or a ``backlog`` being drained.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import TYPE_CHECKING

from edge_agent.errors import one_line
from edge_agent.reasons import Reason

if TYPE_CHECKING:
    from edge_agent.mqtt_session import RejectLog
    from gateway.limits import DeviceLimiter
    from gateway.metrics import GatewayMetrics
    from gateway.store import Store

__all__ = ["BACKLOG_AGE_S", "Rejections", "traffic_of"]

log = logging.getLogger("medge.gateway")

BACKLOG_AGE_S = 30.0  # a message made longer ago than this is a backlog being drained
_TIME = re.compile(rb'"time":(-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)')


def traffic_of(payload: bytes, now: float | None = None) -> str:
    """``backlog`` when the clear header says the message was made over BACKLOG_AGE_S ago,
    else ``live``. Read without opening the message (a flood costs no crypto): the canonical
    header puts ``time`` near the end, so only the last 256 bytes are searched; a message
    that does not say is ``live``."""
    m = _TIME.search(payload, max(0, len(payload) - 256))
    if m is None:
        return "live"
    try:
        made = float(m.group(1))
    except ValueError:
        return "live"
    return "backlog" if (now or time.time()) - made > BACKLOG_AGE_S else "live"


class Rejections:
    """The audit rows and log lines of one gateway's refusals (the counting is the caller's:
    ``metrics.reject``). ``audit_interval``: seconds between two audit rows of one (site,
    device, reason); ``log_interval``: seconds between two rate-limit lines of one device."""

    def __init__(
        self, store: Store, metrics: GatewayMetrics, limiter: DeviceLimiter, rejects: RejectLog
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.limiter = limiter
        self.rejects = rejects  # the MQTT session's per-reason log pacing and counts
        self.audit_interval = 10.0
        self.log_interval = 10.0
        self._lock = threading.Lock()
        self._audited: dict[tuple[str | None, str | None, str], list[float]] = {}
        self._limited: dict[tuple[str, str], list[float]] = {}  # -> [since last line, its time]

    def audit(self, site: str | None, device: str | None, reason: str) -> None:
        """Charge the device (every time) and write an audit row (in pace)."""
        key = (site, device, reason)
        now = time.monotonic()
        with self._lock:
            slot = self._audited.get(key)
            due = slot is None or now - slot[0] >= self.audit_interval
            folded = int(slot[1]) if slot is not None and due else 0
            if due:
                if len(self._audited) >= self.limiter.max_keys:
                    self._audited.clear()  # only audit pacing is lost
                self._audited[key] = [now, 0.0]
            else:
                slot[1] += 1  # type: ignore[index]
        detail = reason if not folded else f"{reason} (+{folded} since the last row)"
        self.store.count_rejected(site, device, detail if due else None)

    def flush(self) -> None:
        """At stop, one audit row per (device, reason) whose rejections were folded and not
        yet written: the audit log adds up to every rejection."""
        with self._lock:
            folded = [(k, int(slot[1])) for k, slot in self._audited.items() if slot[1]]
            self._audited.clear()
        for (site, device, reason), n in folded:
            try:
                self.store.add_audit("reject", f"{reason} (+{n} folded, at stop)", site, device)
            except Exception as exc:  # the store is gone: say what the audit log lacks
                log.error(
                    "audit rows for %d folded rejection(s) not written at stop: %s",
                    n,
                    one_line(str(exc)),
                )

    def rate_limited(self, site: str, device: str, payload: bytes) -> None:
        """Count a message over the device's limit, as ``live`` traffic (a flood) or a
        ``backlog`` being drained; one log line per device and interval (a flood must not
        flood the log or the audit table)."""
        traffic = traffic_of(payload)
        self.metrics.rate_limited.labels(traffic).inc()
        with self._lock:
            if len(self._limited) >= self.limiter.max_keys and (site, device) not in self._limited:
                self._limited.clear()  # only log pacing is lost
            seen = self._limited.setdefault((site, device), [0.0, -1e18])
            seen[0] += 1
            now = time.monotonic()
            due = now - seen[1] >= self.log_interval
            if due:
                count, seen[0], seen[1] = int(seen[0]), 0.0, now
        self.metrics.reject(Reason.RATE_LIMIT)
        self.rejects.count(Reason.RATE_LIMIT)
        if due:
            log.warning(
                "rate limit: %s/%s sends more than %g msg/s (burst %g); %d message(s) rejected "
                "unacknowledged (the device resends them; this one %s); next report in %g s",
                site,
                device,
                self.limiter.rate,
                self.limiter.burst,
                count,
                f"from a backlog, made over {BACKLOG_AGE_S:g} s ago"
                if traffic == "backlog"
                else "live",
                self.log_interval,
            )
