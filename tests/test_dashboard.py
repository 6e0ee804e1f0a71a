"""The dashboard: its JSON API and event stream over HTTP, and the page as a browser shows it."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect, sync_playwright

from edge_agent.envelope import Envelope
from gateway.dashboard import DashboardServer
from gateway.store import Store

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SITE, DEVICE = "ward-a", "us-01"
BUNDLE = "breast-cnn@1#abc"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 10_000


def result(seq: int, pred: int, label: int | None, device: str = DEVICE) -> Envelope:
    names = ["malignant", "benign"]
    scores = [0.9, 0.1] if pred == 0 else [0.2, 0.8]
    body: dict[str, Any] = {
        "input": f"breastmnist_dev:val#{seq}", "pred": pred, "pred_label": names[pred],
        "scores": scores, "latency_ms": 0.4, "bundle": BUNDLE,
    }
    if label is not None:
        body |= {"label": label, "label_name": names[label]}
    return Envelope(kind="result", site=SITE, device=device, seq=seq, time=time.time(),
                    body=body)


def telemetry(fps: float = 5.0) -> dict[str, Any]:
    return {"fps": fps, "latency_ms": {"total": {"p50": 0.4, "p99": 0.9}}, "cpu_percent": 12.0,
            "rss_mb": 80.0, "temperature_c": None, "outbox_depth": 0, "sent": 10,
            "bundle": BUNDLE}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "gateway.db") as s:
        yield s


def get(port: int, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.headers["Content-Type"], response.read().decode()
    finally:
        conn.close()


def get_json(port: int, path: str) -> Any:
    status, content_type, text = get(port, path)
    assert status == 200
    assert content_type.startswith("application/json")
    return json.loads(text)


# -- plain HTTP ------------------------------------------------------------------------------
def test_api_devices_results_and_stream(store: Store) -> None:
    store.set_state(SITE, DEVICE, "online", time.time(), BUNDLE)
    store.set_telemetry(SITE, DEVICE, {**telemetry(), "cpu_percent": float("nan")})
    for seq in (1, 2, 3):
        store.add_result(result(seq, pred=0, label=seq % 2))
    store.add_result(result(1, pred=0, label=1, device="us-02"))

    with DashboardServer(store.path, port=0, title="Ward <A>") as dash:
        assert dash.url == f"http://127.0.0.1:{dash.port}/"
        status, _, page = get(dash.port, "/")
        assert status == 200
        assert "Ward &lt;A&gt;" in page
        assert "<A>" not in page

        devices = get_json(dash.port, "/api/devices")
        assert [(d["site"], d["device"]) for d in devices] == [(SITE, DEVICE), (SITE, "us-02")]
        first = devices[0]
        assert (first["state"], first["stored"], first["bundle"]) == ("online", 3, BUNDLE)
        assert first["telemetry"]["fps"] == 5.0
        assert first["telemetry"]["cpu_percent"] is None  # NaN is sent as null

        rows = get_json(dash.port, "/api/results?limit=10")
        assert [r["id"] for r in rows] == [1, 2, 3, 4]
        assert rows[0]["pred_label"] == "malignant"
        assert rows[0]["score"] == pytest.approx(0.9)
        assert [r["id"] for r in get_json(dash.port, "/api/results?limit=2")] == [3, 4]
        assert [r["id"] for r in get_json(dash.port, "/api/results?after=2")] == [3, 4]
        only = get_json(dash.port, f"/api/results?device={SITE}/us-02")
        assert [(r["device"], r["seq"]) for r in only] == [("us-02", 1)]
        assert get(dash.port, "/api/results?limit=many")[0] == 400
        assert get(dash.port, "/static/app.js")[0] == 200

        # The stream resumes after the id the client last saw, then sends what is new.
        conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=5)
        conn.request("GET", "/api/stream", headers={"Last-Event-ID": "2"})
        response = conn.getresponse()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        store.add_result(result(4, pred=1, label=1))
        seen = read_events(response, want_results=3)
        assert [e["id"] for e in seen if e["event"] == "result"] == ["3", "4", "5"]
        assert seen[0]["event"] == "devices"
        # stop() must not wait for the open stream
        started = time.monotonic()
    assert time.monotonic() - started < 2.5
    conn.close()


def read_events(response: http.client.HTTPResponse, want_results: int) -> list[dict[str, str]]:
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    deadline = time.monotonic() + 5
    while sum(e.get("event") == "result" for e in events) < want_results:
        assert time.monotonic() < deadline, f"stream sent only {events}"
        line = response.readline().decode().rstrip("\n")
        if not line:
            if "event" in current:
                events.append(current)
            current = {}
        elif not line.startswith(":") and ":" in line:
            key, value = line.split(":", 1)
            current[key] = value.strip()
    return events


# -- in a browser ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = os.environ.get("MEDGE_CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed: apt-get install -y chromium (see .ci/run)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"the page raised: {errors}"


def shoot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


@pytest.mark.slow
def test_page_shows_devices_and_live_results(store: Store, page: Any) -> None:
    store.set_state(SITE, DEVICE, "online", time.time(), BUNDLE)
    store.set_telemetry(SITE, DEVICE, telemetry(fps=5.0))
    store.add_result(result(1, pred=0, label=0))

    with DashboardServer(store.path, port=0, title="medge · Ward A") as dash:
        page.goto(dash.url)
        expect(page.locator("h1")).to_have_text("medge · Ward A")
        row = page.locator(f'tr[data-device="{SITE}/{DEVICE}"]')
        expect(row.locator(".state")).to_have_text("online", timeout=TIMEOUT_MS)
        expect(row.locator(".fps")).to_have_text("5.0")
        expect(row.locator(".stored")).to_have_text("1")
        expect(page.locator("tr.result")).to_have_count(1)
        expect(page.locator("#connection")).to_have_text("live", timeout=TIMEOUT_MS)

        # Results stored after the page loaded appear on top, without a reload.
        store.add_result(result(2, pred=0, label=0))
        store.add_result(result(3, pred=0, label=1))
        feed = page.locator("tr.result")
        expect(feed).to_have_count(3, timeout=TIMEOUT_MS)
        newest, middle = feed.nth(0), feed.nth(1)
        expect(newest).to_have_attribute("data-id", "3")
        expect(newest.locator(".pred")).to_have_text("malignant 90.0%")
        expect(newest.locator(".truth")).to_have_text("benign")
        expect(newest.locator(".check")).to_have_text("✗ wrong")
        expect(middle.locator(".check")).to_have_text("✓ correct")
        expect(newest.locator(".input")).to_have_text("breastmnist_dev:val#3")
        expect(page.locator("#result-count")).to_have_text("3 shown")
        expect(row.locator(".stored")).to_have_text("3", timeout=TIMEOUT_MS)
        shoot(page, "live")

        # The device goes offline: the badge follows.
        store.set_state(SITE, DEVICE, "offline", time.time())
        expect(row.locator(".state")).to_have_text("offline", timeout=TIMEOUT_MS)
        expect(row.locator(".state")).to_have_class("state state-offline")
        shoot(page, "offline")


@pytest.mark.slow
def test_page_counts_a_duplicate_without_a_new_row(store: Store, page: Any) -> None:
    store.set_state(SITE, DEVICE, "online", time.time(), BUNDLE)
    with DashboardServer(store.path, port=0) as dash:
        page.goto(dash.url)
        row = page.locator(f'tr[data-device="{SITE}/{DEVICE}"]')
        expect(row.locator(".duplicates")).to_have_text("0", timeout=TIMEOUT_MS)
        expect(page.locator("#connection")).to_have_text("live", timeout=TIMEOUT_MS)
        assert store.add_result(result(7, pred=1, label=1))
        expect(page.locator("tr.result")).to_have_count(1, timeout=TIMEOUT_MS)

        assert not store.add_result(result(7, pred=1, label=1))  # a resend after a lost ack
        expect(row.locator(".duplicates")).to_have_text("1", timeout=TIMEOUT_MS)
        assert store.add_result(result(8, pred=1, label=None))  # a later row still comes
        expect(page.locator("tr.result")).to_have_count(2, timeout=TIMEOUT_MS)
        expect(page.locator("tr.result").first.locator(".input")).to_have_text(
            "breastmnist_dev:val#8")
        expect(page.locator("tr.result").first.locator(".check")).to_have_text("—")
        expect(page.locator("#result-count")).to_have_text("2 shown")
        shoot(page, "duplicate")


@pytest.mark.slow
def test_whole_chain_as_a_person_watches_it(
    bundle_dir: Path, mosquitto: Any, tmp_path: Path, page: Any, identity: Any, opener: Any
) -> None:
    """A real device, through a real Mosquitto and gateway, on the page a person opens."""
    import threading

    from edge_agent import Agent, AgentConfig
    from gateway import Gateway
    from models import breast_cnn

    cfg = AgentConfig(
        site="ward-a", device="us-07", bundle=bundle_dir, identity=identity("us-07"),
        broker={"host": mosquitto.host, "port": mosquitto.port},
        source={"path": breast_cnn.DATA, "split": "val", "rate_hz": 15, "limit": 40},
        outbox={"path": tmp_path / "outbox.sqlite"}, telemetry_interval_s=0.3,
    )
    db = tmp_path / "gw.sqlite"
    with Store(db) as gw_store, Gateway(gw_store, opener, mosquitto.host, mosquitto.port), \
            DashboardServer(db, port=0) as dash:
        page.goto(dash.url)
        agent = Agent(cfg)
        runner = threading.Thread(target=agent.run, args=(threading.Event(),))
        runner.start()
        row = page.locator('tr[data-device="ward-a/us-07"]')
        expect(row.locator(".state")).to_have_text("online", timeout=TIMEOUT_MS)
        expect(page.locator("tr.result").first).to_be_visible(timeout=TIMEOUT_MS)
        expect(row.locator(".fps")).not_to_have_text("—", timeout=TIMEOUT_MS)
        assert float(row.locator(".fps").inner_text()) > 0
        runner.join(timeout=30)
        expect(page.locator("tr.result")).to_have_count(40, timeout=TIMEOUT_MS)
        expect(row.locator(".stored")).to_have_text("40", timeout=TIMEOUT_MS)
        expect(row.locator(".state")).to_have_text("offline", timeout=TIMEOUT_MS)
        expect(row.locator(".bundle")).to_contain_text("breast-cnn@")
        truths = page.locator("tr.result .truth").all_inner_texts()
        assert set(truths) <= {"malignant", "benign"} and len(truths) == 40
        shoot(page, "whole-chain")
