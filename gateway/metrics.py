"""Prometheus metrics of a gateway, served in the text format by ``medge gateway run
--metrics-port``.

Counters are kept as messages pass, here only: ``Gateway.stats`` is read from them (each
:class:`~gateway.service.Gateway` has its own registry, so several gateways in one process do
not mix); gauges that describe the fleet
(devices online, seconds since each device was last heard, open alerts) are read from the store
at each scrape, so they are right even when several workers share one database.

- ``medge_gateway_messages_received_total``: messages that arrived, any kind, any fate
- ``medge_gateway_messages_stored_total{kind}``: results/events stored (the first time)
- ``medge_gateway_duplicates_total``: results/events already stored (acknowledged again)
- ``medge_gateway_messages_rejected_total{reason}``: rejections by reason code, every
  :class:`~edge_agent.reasons.Reason` value shown (at 0 until it happens); ``rate_limit``:
  over a device's flood limit, not acknowledged, resent by the device
- ``medge_gateway_cam_dropped_total{reason}``: CAM thumbnails removed from result bodies
  before storing (``not_png``, ``too_large``, ``malformed``)
- ``medge_gateway_retained_known_total``: retained state messages the broker delivered again
  (on every subscribe: a gateway or broker restart) that the store already has: not replays,
  neither rejected nor audited
- ``medge_gateway_store_down_dropped_total``: messages neither stored nor acknowledged while
  the store did not answer (PostgreSQL restarting); the devices send them again
- ``medge_gateway_limits_announced_total``: flood limits told to devices that came online
- ``medge_gateway_rate_limited_total{traffic}``: messages over a device's flood limit: ``live``
  (sent within 30 s of their making: a flood) or ``backlog`` (older: a device draining what it
  held while cut off, too fast)
- ``medge_gateway_forward_latest_total{kind}``: state/telemetry queued for the cloud
- ``medge_gateway_acks_total``: acknowledgements published
- ``medge_gateway_alerts_raised_total{rule,severity}``: alerts opened by this gateway
- ``medge_gateway_store_write_seconds{kind}``: store commit latency (histogram)
- ``medge_gateway_store_batch_results``: results per store commit, as the writer's adaptive
  batching formed them (histogram; 1 when idle, more under load)
- ``medge_gateway_alerts_open{severity}``: alerts open, not yet acknowledged
- ``medge_gateway_devices{state}``, ``medge_gateway_devices_online``: the fleet
- ``medge_gateway_device_last_seen_age_seconds{site,device}``: seconds since a device spoke

The same HTTP server answers ``GET /healthz`` (no login) with the JSON of a health callable
(e.g. :meth:`edge_agent.supervisor.Supervisor.health`): 200 when every worker is alive, 503
otherwise.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_agent.errors import MedgeError
from edge_agent.reasons import Reason
from gateway.store import Store

__all__ = [
    "ClinicalMetrics",
    "GatewayMetrics",
    "Health",
    "MetricsServer",
    "RolloutMetrics",
    "healthz_response",
]

log = logging.getLogger("medge.gateway.metrics")

WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)

Health = Callable[[], tuple[bool, dict[str, Any]]]  # (all alive, JSON body)


def healthz_response(health: Health | None) -> tuple[int, bytes]:
    """The status and JSON body of ``GET /healthz``: 200 when ``health`` says all is alive,
    503 otherwise (or when asking fails)."""
    if health is None:
        return 200, b'{"status": "ok", "workers": {}}'
    try:
        ok, body = health()
    except Exception as exc:  # a health check must answer, and say why it cannot
        log.warning("healthz: asking the workers failed: %s", exc)
        ok, body = False, {"status": "failing", "error": type(exc).__name__}
    return (200 if ok else 503), json.dumps(body, sort_keys=True).encode()


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
            "medge_gateway_messages_received",
            "Messages that arrived, of any kind and fate.",
            registry=reg,
        )
        self.stored = pc.Counter(
            "medge_gateway_messages_stored",
            "Results and events stored (the first time).",
            ["kind"],
            registry=reg,
        )
        self.duplicates = pc.Counter(
            "medge_gateway_duplicates",
            "Results and events already stored, acknowledged again.",
            registry=reg,
        )
        self.rejected = pc.Counter(
            "medge_gateway_messages_rejected",
            "Messages rejected, by reason code.",
            ["reason"],
            registry=reg,
        )
        self.acks = pc.Counter(
            "medge_gateway_acks", "Acknowledgements published to devices.", registry=reg
        )
        self.alerts_raised = pc.Counter(
            "medge_gateway_alerts_raised",
            "Alerts opened by this gateway.",
            ["rule", "severity"],
            registry=reg,
        )
        self.store_write = pc.Histogram(
            "medge_gateway_store_write_seconds",
            "Time to commit one message to the store.",
            ["kind"],
            buckets=WRITE_BUCKETS,
            registry=reg,
        )
        self.store_batch = pc.Histogram(
            "medge_gateway_store_batch_results",
            "Results and events per store commit.",
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        self.cam_dropped = pc.Counter(
            "medge_gateway_cam_dropped",
            "CAM thumbnails removed from result bodies, by reason.",
            ["reason"],
            registry=reg,
        )
        self.retained_known = pc.Counter(
            "medge_gateway_retained_known",
            "Retained state messages delivered again that the store already has.",
            registry=reg,
        )
        self.store_down_dropped = pc.Counter(
            "medge_gateway_store_down_dropped",
            "Messages not stored nor acknowledged while the store did not answer (resent).",
            registry=reg,
        )
        self.limits_announced = pc.Counter(
            "medge_gateway_limits_announced",
            "Flood limits announced to devices that came online (retained on .../limits).",
            registry=reg,
        )
        self.rate_limited = pc.Counter(
            "medge_gateway_rate_limited",
            "Messages over a device's flood limit, by traffic: live, or a backlog being drained.",
            ["traffic"],
            registry=reg,
        )
        self.forward_latest = pc.Counter(
            "medge_gateway_forward_latest",
            "State and telemetry messages queued for the cloud (latest per device).",
            ["kind"],
            registry=reg,
        )
        for reason in Reason:  # every code shows, at 0 until it happens
            self.rejected.labels(reason.value)
        if store is not None:
            reg.register(_FleetCollector(store, clock))

    def totals(self) -> dict[str, int]:
        """The gateway's counts, summed from these counters (the only place they are kept):
        what :class:`~gateway.service.GatewayStats` shows."""

        def total(counter: Any, **match: str) -> int:
            return int(
                sum(
                    s.value
                    for family in counter.collect()
                    for s in family.samples
                    if s.name.endswith("_total")
                    and all(s.labels.get(k) == v for k, v in match.items())
                )
            )

        return {
            "received": total(self.received),
            "stored": total(self.stored),
            "duplicates": total(self.duplicates),
            "rejected": total(self.rejected),
            "acks": total(self.acks),
            "rate_limited": total(self.rejected, reason=Reason.RATE_LIMIT.value),
            "store_refused": total(self.rejected, reason=Reason.STORE.value),
        }

    def reject(self, reason: Reason) -> None:
        self.rejected.labels(Reason(reason).value).inc()

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
            "SELECT severity, count(*) AS n FROM alerts WHERE state='open' GROUP BY severity"
        )
        by_severity = {r["severity"]: r["n"] for r in alerts}
        open_ = GaugeMetricFamily(
            "medge_gateway_alerts_open", "Alerts open (not yet acknowledged).", labels=["severity"]
        )
        for severity in SEVERITIES:
            open_.add_metric([severity], by_severity.get(severity, 0))
        yield open_
        states: dict[str, int] = {"online": 0, "offline": 0, "stopped": 0, "unknown": 0}
        for d in devices:
            states[d["state"]] = states.get(d["state"], 0) + 1
        fleet = GaugeMetricFamily(
            "medge_gateway_devices", "Known devices by state.", labels=["state"]
        )
        for state, n in sorted(states.items()):
            fleet.add_metric([state], n)
        yield fleet
        yield GaugeMetricFamily(
            "medge_gateway_devices_online", "Devices whose state is online.", value=states["online"]
        )
        age = GaugeMetricFamily(
            "medge_gateway_device_last_seen_age_seconds",
            "Seconds since a device's last accepted message.",
            labels=["site", "device"],
        )
        for d in devices:
            if d["last_seen"] is not None:
                age.add_metric([d["site"], d["device"]], max(0.0, now - d["last_seen"]))
        yield age


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """``GET /metrics`` (Prometheus text) and ``GET /healthz`` (JSON, no login) over HTTP from
    a background thread: ``with MetricsServer(m, port=0, health=sup.health) as s: s.url``;
    ``port=0`` picks a free port."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        host: str = "127.0.0.1",
        port: int = 0,
        health: Health | None = None,
    ) -> None:
        self.metrics, self.host, self.port, self.health = metrics, host, port, health
        self.url = ""
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> MetricsServer:
        outer = self
        pc = _prometheus()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    status, body = healthz_response(outer.health)
                    kind = "application/json"
                elif path in ("/metrics", "/"):
                    status, body = 200, pc.generate_latest(outer.metrics.registry)
                    kind = pc.CONTENT_TYPE_LATEST
                else:
                    self.send_error(404, "only /metrics and /healthz here")
                    return
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes are not news
                pass

        try:
            server_class = _Server6 if ":" in self.host else ThreadingHTTPServer
            self._server = server_class((self.host, self.port), Handler)
        except OSError as exc:
            raise MedgeError(f"metrics: cannot listen on {self.host}:{self.port}: {exc}") from exc
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="gateway-metrics", daemon=True
        )
        self._thread.start()
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}/metrics"
        log.info("metrics on %s", self.url)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None


# -- clinical outputs (gateway.clinical.sender) ----------------------------------------------


class ClinicalMetrics:
    """Counters and gauges of the clinical outbox and its senders, by target (``pacs``,
    ``fhir``), in ``registry`` (a gateway's :attr:`GatewayMetrics.registry`, or a new one):

    - ``medge_gateway_clinical_sent_total{target}``: items the receiver stored
    - ``medge_gateway_clinical_retried_total{target}``: failed tries that may pass (tried again)
    - ``medge_gateway_clinical_parked_total{target}``: items set aside with a reason
    - ``medge_gateway_clinical_skipped_objects_total``: a result's SEG or SC not built (the SR
      went without it)
    - ``medge_gateway_clinical_waiting_items{target}``,
      ``medge_gateway_clinical_parked_items{target}``: items in the outbox now, as the sender
      last saw them
    """

    TARGETS = ("pacs", "fhir")

    def __init__(self, registry: Any | None = None) -> None:
        pc = _prometheus()
        self.registry = registry if registry is not None else pc.CollectorRegistry()
        reg = self.registry

        def counter(name: str, text: str) -> Any:
            return pc.Counter(f"medge_gateway_clinical_{name}", text, ["target"], registry=reg)

        self.sent = counter("sent", "Clinical items the receiver stored.")
        self.retried = counter("retried", "Failed tries of clinical items that may pass.")
        self.parked = counter("parked", "Clinical items set aside with a reason.")
        self.skipped_objects = pc.Counter(
            "medge_gateway_clinical_skipped_objects",
            "SEG or SC objects of a result not built (its SR went without them).",
            registry=reg,
        )
        self.waiting_now = pc.Gauge(
            "medge_gateway_clinical_waiting_items",
            "Clinical items waiting.",
            ["target"],
            registry=reg,
        )
        self.parked_now = pc.Gauge(
            "medge_gateway_clinical_parked_items",
            "Clinical items parked.",
            ["target"],
            registry=reg,
        )
        for target in self.TARGETS:  # every target shows, at 0 until it happens
            for metric in (self.sent, self.retried, self.parked):
                metric.labels(target)


# -- staged rollouts (gateway.rollout) -------------------------------------------------------


_ROLLOUT_METRICS: weakref.WeakKeyDictionary[Any, RolloutMetrics] = weakref.WeakKeyDictionary()


class RolloutMetrics:
    """What the rollout driver does, in ``registry`` (a gateway's :attr:`GatewayMetrics.registry`,
    or a new one):

    - ``medge_gateway_rollouts{status}``: rollouts running, paused or aborting, as the driver
      last saw them
    - ``medge_gateway_rollout_commands_total{cmd}``: signed commands published to devices, by
      command (``shadow-bundle``, ``update-bundle``, ``shadow-stop``, ``rollback-bundle``)
    - ``medge_gateway_rollout_pass_failures_total``: driver passes that failed (the store not
      answering, a row it cannot read); each is tried again, the line is logged once per
      distinct reason, this counts every one
    - ``medge_gateway_rollout_driving``: 1 while this worker's driver holds the store's lease
      and drives the rollouts, 0 while another worker does (it stands by)
    """

    STATUSES = ("running", "paused", "aborting")
    COMMANDS = ("shadow-bundle", "update-bundle", "shadow-stop", "rollback-bundle")

    def __init__(self, registry: Any | None = None) -> None:
        pc = _prometheus()
        self.registry = registry if registry is not None else pc.CollectorRegistry()
        self.active = pc.Gauge(
            "medge_gateway_rollouts",
            "Rollouts the driver looks after, by status.",
            ["status"],
            registry=self.registry,
        )
        self.commands = pc.Counter(
            "medge_gateway_rollout_commands",
            "Signed rollout commands published to devices, by command.",
            ["cmd"],
            registry=self.registry,
        )
        self.pass_failures = pc.Counter(
            "medge_gateway_rollout_pass_failures",
            "Rollout driver passes that failed and were tried again.",
            registry=self.registry,
        )
        self.driving = pc.Gauge(
            "medge_gateway_rollout_driving",
            "1 while this worker drives the rollouts (holds the lease), 0 while it stands by.",
            registry=self.registry,
        )
        for status in self.STATUSES:  # every label shows, at 0 until it happens
            self.active.labels(status).set(0)
        for cmd in self.COMMANDS:
            self.commands.labels(cmd)

    @classmethod
    def of(cls, registry: Any) -> RolloutMetrics:
        """The rollout metrics of ``registry``, made on first use (a driver started again in
        the same gateway counts on)."""
        found = _ROLLOUT_METRICS.get(registry)
        if found is None:
            found = _ROLLOUT_METRICS[registry] = cls(registry)
        return found

    def set_active(self, rows: list[dict[str, Any]]) -> None:
        for status in self.STATUSES:
            self.active.labels(status).set(sum(r["status"] == status for r in rows))

    def command(self, cmd: str) -> None:
        self.commands.labels(cmd).inc()
