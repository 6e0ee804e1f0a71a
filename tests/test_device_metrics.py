"""The device's Prometheus endpoint: the text format written by hand, checked by the reference
parser (prometheus_client, a gateway dependency, not a device one), scraped over HTTP while a
real agent streams real images."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent import Agent, AgentConfig, Bundle
from edge_agent.device_metrics import Family, MetricsServer, render
from gateway import Gateway, Store
from gateway.broker import RunningBroker
from models import breast_cnn


def test_render_escapes_labels_and_help_so_the_reference_parser_reads_them_back() -> None:
    tricky = 'ward "A"\\b\nnext'
    text = render(
        [
            Family("x_info", "gauge", "help with \\ and\nnewline").add(1, name=tricky),
            Family("x_lat_seconds", "summary", "lat")
            .add(0.25, stage="infer", quantile="0.5")
            .add(1.5, "_sum", stage="infer")
            .add(6, "_count", stage="infer"),
            Family("x_drops", "counter", "drops").add(3, "_total", edge="outbox", reason="quota"),
            Family("x_empty", "gauge", "no samples: left out"),
        ]
    )
    assert "x_empty" not in text
    assert '\\"A\\"' in text and "\\n" in text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["x_info"].samples[0].labels["name"] == tricky
    assert fams["x_info"].documentation == "help with \\ and\nnewline"
    assert fams["x_lat_seconds"].type == "summary"
    got = {s.name: s.value for s in fams["x_lat_seconds"].samples}
    assert got == {"x_lat_seconds": 0.25, "x_lat_seconds_sum": 1.5, "x_lat_seconds_count": 6}
    assert fams["x_drops"].type == "counter"
    assert fams["x_drops"].samples[0].value == 3


def test_a_scrape_that_fails_is_a_500_and_the_server_lives_on() -> None:
    calls = []

    def collect() -> list[Family]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("sensor gone")
        return [Family("up", "gauge", "up").add(1)]

    with MetricsServer(collect, "127.0.0.1", 0) as server:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=5)
        assert err.value.code == 500
        assert (
            urllib.request.urlopen(url, timeout=5).read()
            == b"# HELP up up\n# TYPE up gauge\nup 1\n"
        )
        assert server.errors == 1


@pytest.mark.slow
def test_the_running_agent_is_scraped_over_http(  # type: ignore[no-untyped-def]
    bundle_dir: Path, tmp_path: Path, mosquitto: RunningBroker, identity, opener
) -> None:
    cfg = AgentConfig(
        site="ward-a",
        device="us-50",
        bundle=bundle_dir,
        identity=identity("us-50"),
        broker={"host": mosquitto.host, "port": mosquitto.port},
        source={"path": breast_cnn.DATA, "split": "val", "rate_hz": 20, "limit": 60},
        outbox={"path": tmp_path / "outbox.sqlite", "resend_after_s": 0.5},
        metrics_port=0,
    )
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port),
    ):
        agent = Agent(cfg)
        t = threading.Thread(target=agent.run, args=(threading.Event(),))
        t.start()
        deadline = time.monotonic() + 30
        while (
            agent.metrics_port is None or agent.stats.results < 20
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.metrics_port, "the endpoint is up while the agent runs"
        url = f"http://127.0.0.1:{agent.metrics_port}"
        resp = urllib.request.urlopen(url + "/metrics", timeout=5)  # noqa: S310
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/other", timeout=5)  # noqa: S310
        assert err.value.code == 404
        t.join(timeout=60)
        assert not t.is_alive()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for f in fams.values():  # every family came with HELP and TYPE
        assert f.documentation and f.type != "unknown", f.name
    assert fams["medge_agent_fps"].samples[0].value > 0
    assert fams["medge_agent_results"].samples[0].value >= 20
    lat = fams["medge_agent_stage_latency_seconds"]
    stages = {s.labels["stage"] for s in lat.samples}
    assert {"preprocess", "infer", "decode", "total"} <= stages
    q = {
        (s.labels["stage"], s.labels.get("quantile")): s.value
        for s in lat.samples
        if s.name == "medge_agent_stage_latency_seconds"
    }
    assert 0 < q[("infer", "0.5")] <= q[("infer", "0.99")] < 1.0
    counts = [s.value for s in lat.samples if s.name.endswith("_count")]
    assert all(c >= 20 for c in counts)
    info = fams["medge_agent_bundle_info"].samples[0]
    assert info.labels["bundle"] == Bundle.load(bundle_dir).id and info.value == 1
    assert info.labels["runtime"] == "litert"
    assert fams["process_resident_memory_bytes"].samples[0].value > 10 * 2**20
    assert fams["process_cpu_seconds"].samples[0].value > 0
    assert fams["medge_agent_mqtt_connected"].samples[0].value == 1
    assert fams["medge_agent_outbox_depth"].samples[0].value >= 0
    assert fams["medge_agent_published"].samples[0].value >= 1
