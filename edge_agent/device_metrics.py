"""The device's Prometheus endpoint: the text exposition format (version 0.0.4) from a tiny
stdlib HTTP server in a thread, so the device needs no prometheus_client.

Every family has its ``# HELP`` and ``# TYPE`` line; label values are escaped (backslash,
double quote, newline) and HELP text too (backslash, newline). ``GET /metrics`` (or ``/``)
returns the exposition; ``GET /healthz`` the JSON of a health callable (the agent's
:meth:`~edge_agent.supervisor.Supervisor.health`: each worker's liveness, the age of the last
sent and acknowledged message), 200 when all are alive, 503 otherwise; anything else is a
404. See docs/device.md for the metric names.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_agent.errors import MedgeError

__all__ = ["Family", "Health", "MetricsServer", "escape_help", "escape_label", "healthz", "render"]

log = logging.getLogger("medge.agent.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


@dataclass
class Family:
    """One metric family: name, type (gauge, counter, summary, untyped), help, samples as
    (suffix, labels, value) — the suffix is "" or e.g. "_sum", "_count", "_total"."""

    name: str
    type: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float | None, suffix: str = "", **labels: Any) -> Family:
        if value is not None:
            self.samples.append((suffix, {k: str(v) for k, v in labels.items()}, float(value)))
        return self


def render(families: Iterable[Family]) -> str:
    """The text exposition of ``families`` (a family without samples is left out)."""
    lines: list[str] = []
    for f in families:
        if not f.samples:
            continue
        # a counter's samples end in _total, and so does its family name in the text format
        head = f.name + "_total" if f.type == "counter" else f.name
        lines.append(f"# HELP {head} {escape_help(f.help)}")
        lines.append(f"# TYPE {head} {f.type}")
        for suffix, labels, value in f.samples:
            lab = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            lines.append(
                f"{f.name}{suffix}{{{lab}}} {_number(value)}"
                if lab
                else f"{f.name}{suffix} {_number(value)}"
            )
    return "\n".join(lines) + "\n"


Health = Callable[[], tuple[bool, dict[str, Any]]]  # (all alive, JSON body)


def healthz(health: Health | None) -> tuple[int, bytes]:
    """Status and JSON body of ``GET /healthz`` (503 when a worker is dead or asking fails)."""
    if health is None:
        return 200, b'{"status": "ok", "workers": {}}'
    try:
        ok, body = health()
    except Exception as exc:  # a health check must answer, and say why it cannot
        log.warning("healthz: asking the workers failed: %s", exc)
        ok, body = False, {"status": "failing", "error": type(exc).__name__}
    return (200 if ok else 503), json.dumps(body, sort_keys=True).encode()


class MetricsServer:
    """Serves ``collect()`` rendered on every scrape, and ``health()`` on /healthz. Use as a
    context manager."""

    def __init__(
        self,
        collect: Callable[[], Iterable[Family]],
        host: str,
        port: int,
        health: Health | None = None,
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    status, answer = healthz(health)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
                if path not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics and /healthz here")
                    return
                try:
                    body = render(collect()).encode()
                except Exception as exc:  # a scrape must never take the agent down
                    outer.errors += 1
                    log.warning("metrics: collecting failed: %s", exc)
                    self.send_error(500, "collecting metrics failed")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes are not news
                pass

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise MedgeError(f"metrics endpoint cannot listen on {host}:{port}: {exc}") from exc
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        self.errors = 0
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )

    def __enter__(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()


def device_families(agent: Any, outbox: Any, link: Any) -> list[Family]:
    """The agent's metrics (``agent``: an :class:`edge_agent.Agent`, its outbox and link)."""
    from edge_agent.telemetry import cpu_seconds, rss_bytes, temperature_c

    stats = agent.stats
    p = "medge_agent_"
    fams = [
        Family(p + "fps", "gauge", "Results per second over the last 5 s.").add(stats.fps()),
        Family(p + "results", "counter", "Results produced since start.").add(
            stats.results, "_total"
        ),
    ]
    lat = Family(
        p + "stage_latency_seconds", "summary", "Per-stage latency (quantiles: recent window)."
    )
    for s in stats.latencies():
        for q, v in s.quantiles.items():
            lat.add(v, stage=s.stage, quantile=_number(q))
        lat.add(s.sum_s, "_sum", stage=s.stage)
        lat.add(s.count, "_count", stage=s.stage)
    fams.append(lat)
    errors = Family(p + "errors", "counter", "Samples rejected, by pipeline stage.")
    for stage, n in sorted(dict(stats.errors).items()):
        errors.add(n, "_total", stage=stage)
    fams.append(errors)
    drops = Family(
        p + "drops", "counter", "Messages or samples dropped, by edge of the pipeline and reason."
    )
    for reason, n in sorted(outbox.drops.items()):
        drops.add(n, "_total", edge="outbox", reason=reason)
    source_errors = dict(getattr(agent.source, "errors", {}) or {})
    ports = list(getattr(agent.source, "ports", None) or [])  # edge_agent.ports: its queues
    counted = {p.reason for p in ports}
    for reason, n in sorted(source_errors.items()):
        if "drop" in reason and reason not in counted:
            drops.add(n, "_total", edge="source", reason=reason)
    for port in sorted(ports, key=lambda p: p.reason):
        drops.add(port.drops, "_total", edge="source", reason=port.reason)
    fams.append(drops)
    src = Family(p + "source_problems", "counter", "Problems of the source, by kind.")
    for kind, n in sorted(source_errors.items()):
        src.add(n, "_total", kind=kind)
    fams.append(src)
    fams += [
        Family(p + "outbox_depth", "gauge", "Messages not yet acknowledged by the gateway.").add(
            outbox.depth()
        ),
        Family(p + "outbox_bytes", "gauge", "Bytes of the stored messages (the quota's unit).").add(
            outbox.size_bytes()
        ),
        Family(p + "mqtt_connected", "gauge", "1 while connected to the broker.").add(
            1 if link.connected else 0
        ),
        Family(p + "mqtt_connects", "counter", "Successful broker connections.").add(
            link.connects, "_total"
        ),
        Family(p + "published", "counter", "Messages published from the outbox.").add(
            link.published, "_total"
        ),
        Family(p + "acked", "counter", "Messages the gateway acknowledged as stored.").add(
            link.acked, "_total"
        ),
        Family("process_cpu_seconds", "counter", "User and system CPU time, seconds.").add(
            cpu_seconds(), "_total"
        ),
        Family("process_resident_memory_bytes", "gauge", "Resident memory, bytes.").add(
            rss_bytes()
        ),
        Family("medge_device_temperature_celsius", "gauge", "SoC temperature.").add(
            temperature_c()
        ),
    ]
    rejected = Family(
        p + "messages_rejected",
        "counter",
        "Messages from the gateway (ack, cmd) rejected, by reason code.",
    )
    for reason, n in sorted((getattr(link, "rejected", None) or {}).items()):
        rejected.add(n, "_total", reason=reason)
    fams.append(rejected)
    b = agent.bundle
    info = Family(p + "bundle_info", "gauge", "The bundle running now (value 1).")
    info.add(
        1,
        bundle=b.id,
        name=b.manifest.name,
        version=str(b.manifest.version),
        runtime=agent.cfg.runtime,
    )
    fams.append(info)
    return fams
