"""Prometheus metrics of a gateway, served in the text format by ``medge gateway run
--metrics-port``.

Counters are kept as messages pass (each :class:`~gateway.service.Gateway` has its own
registry, so several gateways in one process do not mix); gauges that describe the fleet
(devices online, seconds since each device was last heard, open alerts) are read from the store
at each scrape, so they are right even when several workers share one database.

- ``medge_gateway_messages_received_total``: messages that arrived, any kind, any fate
- ``medge_gateway_messages_stored_total{kind}``: results/events stored (the first time)
- ``medge_gateway_duplicates_total``: results/events already stored (acknowledged again)
- ``medge_gateway_messages_rejected_total{reason}``: rejections by reason class (``REASONS``,
  and ``rate_limit``: over a device's flood limit, not acknowledged, resent by the device)
- ``medge_gateway_cam_dropped_total{reason}``: CAM thumbnails removed from result bodies
  before storing (``not_png``, ``too_large``, ``malformed``)
- ``medge_gateway_forward_latest_total{kind}``: state/telemetry queued for the cloud
- ``medge_gateway_acks_total``: acknowledgements published
- ``medge_gateway_alerts_raised_total{rule,severity}``: alerts opened by this gateway
- ``medge_gateway_store_write_seconds{kind}``: store commit latency (histogram)
- ``medge_gateway_alerts_open{severity}``: alerts open, not yet acknowledged
- ``medge_gateway_devices{state}``, ``medge_gateway_devices_online``: the fleet
- ``medge_gateway_device_last_seen_age_seconds{site,device}``: seconds since a device spoke
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from edge_agent.errors import MedgeError
from gateway.store import Store

__all__ = ["REASONS", "GatewayMetrics", "MetricsServer", "reason_class"]

log = logging.getLogger("medge.gateway.metrics")

# reason class -> fragments of the rejection messages (edge_agent.envelope, gateway.site,
# gateway.service) that belong to it; the first class with a matching fragment wins
REASONS: dict[str, tuple[str, ...]] = {
    "topic": ("topic '", "name '", "unknown topic kind"),
    "size": ("exceeds",),
    "unknown_key": ("unknown key id", "does not match key"),
    "device": ("unknown device", "revoked", "expired", "not from the site ca", "not valid yet",
               "names another device", "not of this site", "no ecdsa key"),
    "signature": ("not signed by that device",),
    "authentication": ("fails authentication", "cannot be opened"),
    "header_mismatch": ("does not match topic",),
    "clock": ("ahead of the gateway's clock",),
    "replay": ("not newer than the last one",),
    "malformed": ("json", "envelope", "field ", "must be", "not supported", "base64",
                  "is not online/offline"),
}
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def reason_class(why: str) -> str:
    """The class of a rejection message (a label with few values), ``other`` if none fits."""
    low = why.lower()
    for name, fragments in REASONS.items():
        if any(f in low for f in fragments):
            return name
    return "other"


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - the gateway extra installs it
        raise MedgeError(
            "gateway metrics need prometheus_client: pip install 'medge[gateway]'"
        ) from exc
    return prometheus_client


class GatewayMetrics:
    """The counters a gateway updates, and the fleet gauges read from ``store`` at scrape."""

    def __init__(self, store: Store | None = None, clock: Callable[[], float] = time.time):
        pc = _prometheus()
        self.registry = pc.CollectorRegistry()
        reg = self.registry
        self.received = pc.Counter(
            "medge_gateway_messages_received", "Messages that arrived, of any kind and fate.",
            registry=reg)
        self.stored = pc.Counter(
            "medge_gateway_messages_stored", "Results and events stored (the first time).",
            ["kind"], registry=reg)
        self.duplicates = pc.Counter(
            "medge_gateway_duplicates", "Results and events already stored, acknowledged again.",
            registry=reg)
        self.rejected = pc.Counter(
            "medge_gateway_messages_rejected", "Messages rejected, by reason class.",
            ["reason"], registry=reg)
        self.acks = pc.Counter(
            "medge_gateway_acks", "Acknowledgements published to devices.", registry=reg)
        self.alerts_raised = pc.Counter(
            "medge_gateway_alerts_raised", "Alerts opened by this gateway.",
            ["rule", "severity"], registry=reg)
        self.store_write = pc.Histogram(
            "medge_gateway_store_write_seconds", "Time to commit one message to the store.",
            ["kind"], buckets=WRITE_BUCKETS, registry=reg)
        self.cam_dropped = pc.Counter(
            "medge_gateway_cam_dropped", "CAM thumbnails removed from result bodies, by reason.",
            ["reason"], registry=reg)
        self.forward_latest = pc.Counter(
            "medge_gateway_forward_latest",
            "State and telemetry messages queued for the cloud (latest per device).",
            ["kind"], registry=reg)
        for reason in (*REASONS, "rate_limit", "other"):  # every class shows, at 0 until then
            self.rejected.labels(reason)
        if store is not None:
            reg.register(_FleetCollector(store, clock))

    def reject(self, why: str) -> None:
        self.rejected.labels(reason_class(why)).inc()

    def alert(self, alert: dict[str, Any]) -> None:
        rule = str(alert["rule"]).split(":", 1)[0]  # event:fall -> event (few label values)
        self.alerts_raised.labels(rule, alert["severity"]).inc()

    def exposition(self) -> bytes:
        """All metrics in the Prometheus text format."""
        return bytes(_prometheus().generate_latest(self.registry))


class _FleetCollector:
    """Gauges computed from the store when scraped."""

    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self.store, self.clock = store, clock

    def describe(self) -> list[Any]:
        return []  # computed at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from gateway.alerts import SEVERITIES

        now = self.clock()
        devices = self.store.query("SELECT site, device, state, last_seen FROM devices")
        alerts = self.store.query(
            "SELECT severity, count(*) AS n FROM alerts WHERE state='open' GROUP BY severity")
        by_severity = {r["severity"]: r["n"] for r in alerts}
        open_ = GaugeMetricFamily("medge_gateway_alerts_open",
                                  "Alerts open (not yet acknowledged).", labels=["severity"])
        for severity in SEVERITIES:
            open_.add_metric([severity], by_severity.get(severity, 0))
        yield open_
        states: dict[str, int] = {"online": 0, "offline": 0, "unknown": 0}
        for d in devices:
            states[d["state"]] = states.get(d["state"], 0) + 1
        fleet = GaugeMetricFamily("medge_gateway_devices", "Known devices by state.",
                                  labels=["state"])
        for state, n in sorted(states.items()):
            fleet.add_metric([state], n)
        yield fleet
        yield GaugeMetricFamily("medge_gateway_devices_online",
                                "Devices whose state is online.", value=states["online"])
        age = GaugeMetricFamily("medge_gateway_device_last_seen_age_seconds",
                                "Seconds since a device's last accepted message.",
                                labels=["site", "device"])
        for d in devices:
            if d["last_seen"] is not None:
                age.add_metric([d["site"], d["device"]], max(0.0, now - d["last_seen"]))
        yield age


class MetricsServer:
    """``GET /metrics`` over HTTP from a background thread: ``with MetricsServer(m, port=0) as
    s: s.url``; ``port=0`` picks a free port."""

    def __init__(self, metrics: GatewayMetrics, host: str = "127.0.0.1", port: int = 0) -> None:
        self.metrics, self.host, self.port = metrics, host, port
        self.url = ""
        self._server: Any = None
        self._thread: Any = None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> MetricsServer:
        try:
            self._server, self._thread = _prometheus().start_http_server(
                self.port, self.host, self.metrics.registry)
        except OSError as exc:
            raise MedgeError(f"metrics: cannot listen on {self.host}:{self.port}: {exc}") from exc
        self.port = int(self._server.server_port)
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}/metrics"
        log.info("metrics on %s", self.url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None
