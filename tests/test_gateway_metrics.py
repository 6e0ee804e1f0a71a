"""Prometheus metrics of the gateway, scraped over real HTTP and parsed, after a known number of
messages through a real Mosquitto; and ``medge gateway run --metrics-port`` as a user runs it."""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from medge_process import start_medge, wait_serving
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families
from waiting import wait_for

from edge_agent.envelope import Envelope
from edge_agent.reasons import Reason
from edge_agent.topics import topic
from gateway import Gateway, Store
from gateway.broker import free_port
from gateway.metrics import GatewayMetrics, MetricsServer

SITE, DEVICE = "ward-a", "mx-01"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """sample name and sorted labels -> value, from the text format over HTTP."""
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback http
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_count_what_the_gateway_did(  # type: ignore[no-untyped-def]
    mosquitto, sealer, opener, tmp_path: Path
) -> None:
    mx = sealer(DEVICE)
    now = time.time()

    def env(kind: str, seq: int, body: dict[str, Any]) -> bytes:
        return mx.seal(Envelope(kind, SITE, DEVICE, seq, now, body))

    sends = [
        ("state", env("state", 1, {"state": "online"})),
        *[("result", env("result", seq, {"pred": 0, "scores": [0.9, 0.1]})) for seq in (2, 3, 4)],
        ("result", env("result", 2, {"pred": 0, "scores": [0.9, 0.1]})),  # a resend: duplicate
        ("event", env("event", 5, {"event": "fall", "score": 0.97})),  # -> a critical alert
        ("telemetry", env("telemetry", 6, {"fps": 5.0})),
        ("telemetry", env("telemetry", 6, {"fps": 5.0})),  # replayed: rejected
        ("result", b"\x00garbage"),  # malformed
        ("result", b'{"v": 2}'),  # malformed
        ("result", mx.seal(Envelope("result", SITE, DEVICE, 7, now + 3600, {}))),  # clock
    ]
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port) as gw,
        MetricsServer(gw.metrics, port=0) as server,
    ):
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.connect(mosquitto.host, mosquitto.port)
        c.loop_start()
        for kind, payload in sends:
            c.publish(topic(SITE, DEVICE, kind), payload, qos=1).wait_for_publish(5)
        wait_for(lambda: gw.stats.received == len(sends))
        c.loop_stop()
        c.disconnect()
        m = scrape(server.url)

    assert value(m, "medge_gateway_messages_received_total") == len(sends)
    assert value(m, "medge_gateway_messages_stored_total", kind="result") == 3
    assert value(m, "medge_gateway_messages_stored_total", kind="event") == 1
    assert value(m, "medge_gateway_duplicates_total") == 1
    assert value(m, "medge_gateway_acks_total") == 5
    rejected = {
        labels[0][1]: v
        for (name, labels), v in m.items()
        if name == "medge_gateway_messages_rejected_total"
    }
    assert rejected["malformed"] == 2
    assert rejected["replay"] == 1
    assert rejected["clock"] == 1
    assert sum(rejected.values()) == 4 == gw.stats.rejected
    assert value(m, "medge_gateway_alerts_raised_total", rule="event", severity="critical") == 1
    assert value(m, "medge_gateway_alerts_open", severity="critical") == 1
    assert value(m, "medge_gateway_alerts_open", severity="warning") == 0
    assert value(m, "medge_gateway_devices_online") == 1
    assert value(m, "medge_gateway_devices", state="online") == 1
    age = value(m, "medge_gateway_device_last_seen_age_seconds", site=SITE, device=DEVICE)
    assert 0 <= age < 10
    # one store write timed per stored/duplicate result, event, state and telemetry
    assert value(m, "medge_gateway_store_write_seconds_count", kind="result") == 4
    assert value(m, "medge_gateway_store_write_seconds_count", kind="event") == 1
    assert value(m, "medge_gateway_store_write_seconds_count", kind="telemetry") == 1
    assert value(m, "medge_gateway_store_write_seconds_bucket", kind="result", le="+Inf") == 4
    assert value(m, "medge_gateway_store_write_seconds_sum", kind="result") > 0
    # the writer's commits: 5 results and events (the duplicate too) in 1 to 5 batches
    assert value(m, "medge_gateway_store_batch_results_sum") == 5
    assert 1 <= value(m, "medge_gateway_store_batch_results_count") <= 5


def test_every_reason_code_shows_at_zero_and_counts_by_code() -> None:
    m = GatewayMetrics()
    m.reject(Reason.SIGNATURE)
    m.reject(Reason.HANDLER)

    def count(reason: Reason) -> float | None:
        return m.registry.get_sample_value(  # type: ignore[no-any-return]
            "medge_gateway_messages_rejected_total", {"reason": reason.value}
        )

    assert {r: count(r) for r in Reason} == {
        r: 1.0 if r in (Reason.SIGNATURE, Reason.HANDLER) else 0.0 for r in Reason
    }


def test_stats_are_read_from_the_counters_not_counted_twice() -> None:
    from gateway import GatewayStats

    m = GatewayMetrics()
    m.received.inc(5)
    m.stored.labels("result").inc(2)
    m.stored.labels("event").inc()
    m.duplicates.inc()
    m.acks.inc(4)
    m.reject(Reason.RATE_LIMIT)
    m.reject(Reason.STORE)
    m.reject(Reason.MALFORMED)
    assert GatewayStats.of(m) == GatewayStats(
        received=5, stored=3, duplicates=1, rejected=3, acks=4, rate_limited=1, store_refused=1
    )


@pytest.mark.slow
def test_gateway_run_serves_metrics(  # type: ignore[no-untyped-def]
    mosquitto, site_dir: Path, tmp_path: Path
) -> None:
    port = free_port("127.0.0.1")
    proc = start_medge(
        "gateway",
        "run",
        "--site-dir",
        str(site_dir),
        "--broker",
        f"{mosquitto.host}:{mosquitto.port}",
        "--db",
        str(tmp_path / "gw.sqlite"),
        "--silence-after",
        "5",
        "--metrics-port",
        str(port),
        "--log-level",
        "warning",
    )
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        m = wait_serving(proc, lambda: scrape(url), 20, "the metrics endpoint")
        assert value(m, "medge_gateway_messages_received_total") == 0
        assert value(m, "medge_gateway_devices_online") == 0
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err[-2000:]
    assert '"received": 0' in out
