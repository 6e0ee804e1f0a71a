"""The dashboard: login, its JSON API and event stream over HTTP, and the page as a browser
shows it (alerts, charts, live results)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect, sync_playwright

from edge_agent.envelope import Envelope
from edge_agent.errors import MedgeError
from gateway.alerts import AlertEngine, AlertRules, list_alerts
from gateway.dashboard import DashboardServer, add_user
from gateway.store import Store

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SITE, DEVICE = "ward-a", "us-01"
BUNDLE = "breast-cnn@1#abc"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 20_000  # generous: CI machines are shared and slow at times
USER, PASSWORD = "clinician", "correct horse battery"


def result(seq: int, pred: int, label: int | None, device: str = DEVICE) -> Envelope:
    names = ["malignant", "benign"]
    scores = [0.9, 0.1] if pred == 0 else [0.2, 0.8]
    body: dict[str, Any] = {
        "input": f"breastmnist_dev:val#{seq}",
        "pred": pred,
        "pred_label": names[pred],
        "scores": scores,
        "latency_ms": 0.4,
        "bundle": BUNDLE,
    }
    if label is not None:
        body |= {"label": label, "label_name": names[label]}
    return Envelope(kind="result", site=SITE, device=device, seq=seq, time=time.time(), body=body)


def telemetry(fps: float = 5.0) -> dict[str, Any]:
    return {
        "fps": fps,
        "latency_ms": {"total": {"p50": 0.4, "p99": 0.9}},
        "cpu_percent": 12.0,
        "rss_mb": 80.0,
        "temperature_c": None,
        "outbox_depth": 0,
        "sent": 10,
        "bundle": BUNDLE,
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "gateway.db") as s:
        yield s


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users.json"
    add_user(path, USER, PASSWORD)
    return path


def request(
    port: int,
    method: str,
    path: str,
    cookie: str | None = None,
    body: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    head = dict(headers or {})
    if cookie:
        head["Cookie"] = cookie
    if body is not None:
        head.setdefault("Content-Type", "application/x-www-form-urlencoded")
    try:
        conn.request(method, path, body=body, headers=head)
        response = conn.getresponse()
        all_headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, all_headers, response.read().decode()
    finally:
        conn.close()


def get(port: int, path: str, cookie: str | None = None) -> tuple[int, str, str]:
    status, headers, text = request(port, "GET", path, cookie)
    return status, headers.get("content-type", ""), text


def get_json(port: int, path: str, cookie: str | None = None) -> Any:
    status, content_type, text = get(port, path, cookie)
    assert status == 200
    assert content_type.startswith("application/json")
    return json.loads(text)


def login(port: int, name: str = USER, password: str = PASSWORD) -> str:
    """Sign in over HTTP; the session cookie as a Cookie header value."""
    form = urllib.parse.urlencode({"name": name, "password": password})
    status, headers, _ = request(port, "POST", "/login", body=form)
    assert status == 303, status
    cookie = headers["set-cookie"]
    return cookie.split(";", 1)[0]


# -- plain HTTP ------------------------------------------------------------------------------
def test_api_devices_results_and_stream(store: Store, users: Path) -> None:
    store.set_state(SITE, DEVICE, "online", time.time(), BUNDLE)
    store.set_telemetry(SITE, DEVICE, {**telemetry(), "cpu_percent": float("nan")})
    for seq in (1, 2, 3):
        store.add_result(result(seq, pred=0, label=seq % 2))
    store.add_result(result(1, pred=0, label=1, device="us-02"))

    with DashboardServer(store.path, port=0, title="Ward <A>", users=users) as dash:
        assert dash.url == f"http://127.0.0.1:{dash.port}/"
        cookie = login(dash.port)
        status, _, page = get(dash.port, "/", cookie)
        assert status == 200
        assert "Ward &lt;A&gt;" in page
        assert "<A>" not in page

        devices = get_json(dash.port, "/api/devices", cookie)
        assert [(d["site"], d["device"]) for d in devices] == [(SITE, DEVICE), (SITE, "us-02")]
        first = devices[0]
        assert (first["state"], first["stored"], first["bundle"]) == ("online", 3, BUNDLE)
        assert first["telemetry"]["fps"] == 5.0
        assert first["telemetry"]["cpu_percent"] is None  # NaN is sent as null

        rows = get_json(dash.port, "/api/results?limit=10", cookie)
        assert [r["id"] for r in rows] == [1, 2, 3, 4]
        assert rows[0]["pred_label"] == "malignant"
        assert rows[0]["score"] == pytest.approx(0.9)
        assert [r["id"] for r in get_json(dash.port, "/api/results?limit=2", cookie)] == [3, 4]
        assert [r["id"] for r in get_json(dash.port, "/api/results?after=2", cookie)] == [3, 4]
        only = get_json(dash.port, f"/api/results?device={SITE}/us-02", cookie)
        assert [(r["device"], r["seq"]) for r in only] == [("us-02", 1)]
        assert get(dash.port, "/api/results?limit=many", cookie)[0] == 400
        assert get(dash.port, "/static/app.js")[0] == 200

        history = get_json(dash.port, f"/api/history?device={SITE}/{DEVICE}", cookie)
        [point] = history["devices"][f"{SITE}/{DEVICE}"]["telemetry"]
        assert point["fps"] == 5.0 and point["latency_p50"] == 0.4
        [minute] = history["devices"][f"{SITE}/{DEVICE}"]["results_per_minute"]
        assert minute["count"] == 3

        # The stream resumes after the id the client last saw, then sends what is new.
        conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=5)
        conn.request("GET", "/api/stream", headers={"Last-Event-ID": "2", "Cookie": cookie})
        response = conn.getresponse()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        store.add_result(result(4, pred=1, label=1))
        seen = read_events(response, want_results=3)
        assert [e["id"] for e in seen if e["event"] == "result"] == ["3", "4", "5"]
        assert [e["event"] for e in seen[:2]] == ["devices", "alerts"]
        # stop() must not wait for the open stream
        started = time.monotonic()
    assert time.monotonic() - started < 2.5
    conn.close()


def test_no_anonymous_access_and_logins_are_audited(store: Store, users: Path) -> None:
    store.add_result(result(1, pred=0, label=0))
    with DashboardServer(store.path, port=0, users=users) as dash:
        status, headers, _ = request(dash.port, "GET", "/")
        assert (status, headers["location"]) == (303, "login")
        for path in (
            "/api/devices",
            "/api/results",
            "/api/alerts",
            "/api/history",
            "/api/stream",
            "/api/me",
        ):
            status, headers, text = request(dash.port, "GET", path)
            assert status == 401, path
            assert "breastmnist" not in text
        assert request(dash.port, "POST", "/api/alerts/1/ack")[0] == 401
        assert get(dash.port, "/login")[0] == 200

        bad = urllib.parse.urlencode({"name": USER, "password": "wrong password"})
        status, headers, page = request(dash.port, "POST", "/login", body=bad)
        assert status == 401 and "set-cookie" not in headers
        assert "Wrong name or password." in page
        nobody = urllib.parse.urlencode({"name": "intruder", "password": PASSWORD})
        assert request(dash.port, "POST", "/login", body=nobody)[0] == 401

        cookie = login(dash.port)
        token = cookie.split("=", 1)[1]
        assert len(token) >= 40, "a random token (secrets.token_urlsafe(32))"
        _, headers, _ = request(
            dash.port,
            "POST",
            "/login",
            body=urllib.parse.urlencode({"name": USER, "password": PASSWORD}),
        )
        flags = [f.strip().lower() for f in headers["set-cookie"].split(";")]
        assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
        assert get_json(dash.port, "/api/me", cookie) == {"user": USER, "anonymous": False}
        assert request(dash.port, "GET", "/api/devices", "medge_session=forged")[0] == 401
        # a state-changing request from another site's page is refused outright
        status, _, _ = request(
            dash.port,
            "POST",
            "/api/alerts/1/ack",
            cookie,
            headers={"Origin": "http://evil.example"},
        )
        assert status == 403
        assert request(dash.port, "POST", "/api/alerts/1/ack", cookie)[0] == 404

        # logout ends the session on the server, not only in the browser
        status, headers, _ = request(dash.port, "POST", "/logout", cookie)
        assert (status, headers["location"]) == (303, "login")
        assert request(dash.port, "GET", "/api/devices", cookie)[0] == 401

    failed = store.audit("login-failed")
    who = [a["detail"].split(" from ")[0] for a in failed]
    assert who == ["user 'intruder'", "user 'clinician'"]
    assert len(store.audit("login")) == 2
    assert "clinician" in store.audit("logout")[0]["detail"]


def test_the_users_file_and_refusing_to_start_without_it(store: Store, tmp_path: Path) -> None:
    with pytest.raises(MedgeError, match="users file"):
        DashboardServer(store.path, port=0)
    path = tmp_path / "users.json"
    with pytest.raises(MedgeError, match="no users file"):
        DashboardServer(store.path, port=0, users=path)
    with pytest.raises(MedgeError, match="at least"):
        add_user(path, "operator", "short")
    generated = add_user(path, "operator")  # what a demo does: a throwaway user, a random password
    assert len(generated) >= 20
    assert os.stat(path).st_mode & 0o777 == 0o600
    text = path.read_text()
    assert generated not in text and '"salt"' in text
    os.chmod(path, 0o644)
    with pytest.raises(MedgeError, match="readable by others"):
        DashboardServer(store.path, port=0, users=path)
    os.chmod(path, 0o600)
    # anonymous only when asked for explicitly
    with DashboardServer(store.path, port=0, allow_anonymous=True) as dash:
        assert get_json(dash.port, "/api/me") == {"user": "anonymous", "anonymous": True}


def test_cli_add_user_and_refusal(tmp_path: Path) -> None:
    import subprocess
    import sys

    from gateway.dashboard.auth import Users

    path = tmp_path / "users.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "medge",
            "dashboard",
            "add-user",
            "ward-nurse",
            "--users",
            str(path),
            "--password-stdin",
        ],
        input="a long pass phrase\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert os.stat(path).st_mode & 0o777 == 0o600
    users = Users(path)
    assert users.verify("ward-nurse", "a long pass phrase")
    assert not users.verify("ward-nurse", "a long pass phrase ")
    assert not users.verify("nobody", "a long pass phrase")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "medge",
            "dashboard",
            "--db",
            str(tmp_path / "gw.sqlite"),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("medge: error: the dashboard shows patient-derived data")


def test_an_expired_session_is_refused_and_its_stream_ends(store: Store, users: Path) -> None:
    with DashboardServer(store.path, port=0, users=users, session_ttl_s=1.0) as dash:
        cookie = login(dash.port)
        conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=5)
        conn.request("GET", "/api/stream", headers={"Cookie": cookie})
        response = conn.getresponse()
        assert response.status == 200
        started = time.monotonic()
        body = response.read()  # returns when the server ends the stream
        assert time.monotonic() - started < 3
        assert b"event: devices" in body
        assert request(dash.port, "GET", "/api/devices", cookie)[0] == 401
        conn.close()


def test_telemetry_history_is_bounded(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.store as store_module

    monkeypatch.setattr(store_module, "HISTORY_MAX_ROWS", 5)
    monkeypatch.setattr(store_module, "_PRUNE_EVERY", 1)
    for i in range(12):
        store.set_telemetry(SITE, DEVICE, telemetry(fps=float(i)))
    store.set_telemetry(SITE, "us-02", telemetry())
    points = store.telemetry_history(SITE, DEVICE, since=0)
    assert [p["fps"] for p in points] == [7.0, 8.0, 9.0, 10.0, 11.0], "the newest N per device"
    with store.transaction() as db:  # a point from yesterday
        db.execute("UPDATE telemetry_history SET time=time-90000 WHERE device='us-02'")
    store.set_telemetry(SITE, DEVICE, telemetry(fps=12.0))
    assert store.telemetry_history(SITE, "us-02", since=0) == [], "older than 24 h: gone"


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
    path = (
        os.environ.get("MEDGE_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
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


def sign_in(page: Any, dash: DashboardServer, password: str = PASSWORD) -> None:
    page.goto(dash.url)
    expect(page).to_have_url(f"{dash.url}login")
    page.fill("#name", USER)
    page.fill("#password", password)
    page.click("#sign-in")


@pytest.mark.slow
def test_page_shows_devices_and_live_results(store: Store, page: Any, users: Path) -> None:
    store.set_state(SITE, DEVICE, "online", time.time(), BUNDLE)
    store.set_telemetry(SITE, DEVICE, telemetry(fps=5.0))
    store.add_result(result(1, pred=0, label=0))

    with DashboardServer(store.path, port=0, title="medge · Ward A", users=users) as dash:
        sign_in(page, dash)
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
def test_page_counts_a_duplicate_without_a_new_row(store: Store, page: Any, users: Path) -> None:
    store.set_state(SITE, DEVICE, "online", time.time(), BUNDLE)
    with DashboardServer(store.path, port=0, users=users) as dash:
        sign_in(page, dash)
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
            "breastmnist_dev:val#8"
        )
        expect(page.locator("tr.result").first.locator(".check")).to_have_text("—")
        expect(page.locator("#result-count")).to_have_text("2 shown")
        shoot(page, "duplicate")


@pytest.mark.slow
def test_whole_chain_as_a_person_watches_it(
    bundle_dir: Path,
    mosquitto: Any,
    tmp_path: Path,
    page: Any,
    identity: Any,
    opener: Any,
    users: Path,
) -> None:
    """A real device, through a real Mosquitto and gateway, on the page a person opens."""
    import threading

    from edge_agent import Agent, AgentConfig
    from gateway import Gateway
    from models import breast_cnn

    cfg = AgentConfig(
        site="ward-a",
        device="us-07",
        bundle=bundle_dir,
        identity=identity("us-07"),
        broker={"host": mosquitto.host, "port": mosquitto.port},
        source={"path": breast_cnn.DATA, "split": "val", "rate_hz": 15, "limit": 40},
        outbox={"path": tmp_path / "outbox.sqlite"},
        telemetry_interval_s=0.3,
    )
    db = tmp_path / "gw.sqlite"
    with (
        Store(db) as gw_store,
        Gateway(gw_store, opener, mosquitto.host, mosquitto.port),
        DashboardServer(db, port=0, users=users) as dash,
    ):
        sign_in(page, dash)
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
        expect(row.locator(".state")).to_have_text("stopped", timeout=TIMEOUT_MS)
        expect(row.locator(".bundle")).to_contain_text("breast-cnn@")
        truths = page.locator("tr.result .truth").all_inner_texts()
        assert set(truths) <= {"malignant", "benign"} and len(truths) == 40
        # its charts, drawn from the telemetry history the gateway kept
        fps = page.locator('.device-charts[data-device="ward-a/us-07"] .chart-fps polyline')
        expect(fps).to_have_count(1, timeout=TIMEOUT_MS)
        deadline = time.monotonic() + TIMEOUT_MS / 1000  # charts redraw every few seconds
        while len((fps.get_attribute("points") or "").split()) < 2 and (
            time.monotonic() < deadline
        ):
            page.wait_for_timeout(250)
        assert len(fps.get_attribute("points").split()) >= 2
        # a clean stop says "stopped" and raises no alert (docs/dashboard.md); only the Last
        # Will's "offline" is one (test_kill_9_loses_nothing_and_the_last_will_says_offline)
        expect(page.locator("tr.alert")).to_have_count(0)
        shoot(page, "whole-chain")


@pytest.mark.slow
def test_login_alert_acknowledge_and_charts(store: Store, page: Any, users: Path) -> None:
    """A person signs in (after a typo), sees a fall alert arrive live, acknowledges it, and
    sees the device's charts."""
    now = time.time()
    store.set_state(SITE, "wr-01", "online", now, BUNDLE)
    for i in range(8):  # telemetry history: the charts' lines
        store.set_telemetry(SITE, "wr-01", {**telemetry(fps=4.0 + i % 3), "results": i})
    for seq in range(1, 6):
        store.add_result(result(seq, pred=0, label=0, device="wr-01"))
    engine = AlertEngine(store, AlertRules())

    with DashboardServer(store.path, port=0, title="Ward A", users=users) as dash:
        sign_in(page, dash, "not the password")
        expect(page.locator("#login-message")).to_have_text("Wrong name or password.")
        expect(page).to_have_url(f"{dash.url}login")
        shoot(page, "login-failed")
        assert "user 'clinician'" in store.audit("login-failed")[0]["detail"]
        page.fill("#name", USER)
        page.fill("#password", PASSWORD)
        page.click("#sign-in")
        expect(page).to_have_url(dash.url)
        expect(page.locator("#user")).to_have_text(USER)
        expect(page.locator("#connection")).to_have_text("live", timeout=TIMEOUT_MS)
        expect(page.locator("#alerts-empty")).to_be_visible()

        # A fall arrives (as the gateway handles it): the alert shows up without a reload.
        event = Envelope(
            "event",
            SITE,
            "wr-01",
            6,
            time.time(),
            {"event": "fall", "score": 0.97, "input": "imu:s07#6", "bundle": BUNDLE},
        )
        assert store.add_result(event)
        alert_id = engine.on_envelope(event)
        row = page.locator(f'tr.alert[data-alert-id="{alert_id}"]')
        expect(row).to_be_visible(timeout=TIMEOUT_MS)
        expect(row).to_have_attribute("data-state", "open")
        expect(row.locator(".sev")).to_have_text("critical")
        expect(row.locator(".message")).to_have_text("fall on ward-a/wr-01 (score 0.97)")
        expect(page.locator("#alerts-summary")).to_have_text("1 open (1 critical) · 0 acknowledged")
        expect(page).to_have_title("(1) Ward A · dashboard")

        # Charts: lines for fps and latency, bars for results per minute.
        charts = page.locator('.device-charts[data-device="ward-a/wr-01"]')
        expect(charts.locator("svg.chart")).to_have_count(3, timeout=TIMEOUT_MS)
        fps_line = charts.locator(".chart-fps polyline.line")
        expect(fps_line).to_have_count(1)
        assert len(fps_line.get_attribute("points").split()) == 8
        assert charts.locator(".chart-fps svg").get_attribute("data-points") == "8"
        expect(charts.locator(".chart-latency polyline.line")).to_have_count(1)
        assert charts.locator(".chart-results rect.bar").count() >= 1
        box = charts.locator(".chart-fps svg").bounding_box()
        assert box is not None and box["width"] > 100 and box["height"] > 20
        shoot(page, "alert-open")

        row.locator("button.ack").click()
        expect(row).to_have_attribute("data-state", "acknowledged", timeout=TIMEOUT_MS)
        expect(row.locator(".alert-state")).to_contain_text(f"acknowledged by {USER}")
        expect(row.locator("button.ack")).to_have_count(0)
        expect(page.locator("#alerts-summary")).to_have_text("0 open · 1 acknowledged")
        shoot(page, "alert-acknowledged")
        [audit] = store.audit("ack-alert")
        assert f"acknowledged by {USER}" in audit["detail"] and audit["device"] == "wr-01"
        [alert] = list_alerts(store)
        assert (alert["state"], alert["acked_by"]) == ("acknowledged", USER)

        page.click("#sign-out")
        expect(page).to_have_url(f"{dash.url}login")
        assert page.goto(f"{dash.url}api/alerts").status == 401


# -- CAM thumbnails ----------------------------------------------------------------------------
def cam_png(index: int = 0) -> str:
    """A 28x28 colour-mapped heat map PNG (base64) made from a real BreastMNIST ultrasound
    image of the zoo's development set (models/data): brighter tissue shows hotter."""
    import base64
    import struct
    import zlib

    import numpy as np

    from models import breast_cnn

    with np.load(breast_cnn.DATA) as data:
        img = data["val_images"][index].astype(np.float32)
    heat = (img - img.min()) / max(float(img.max() - img.min()), 1.0)
    rgb = np.stack([heat, 1.0 - np.abs(heat - 0.5) * 2, 1.0 - heat], axis=-1)  # blue-green-red
    raw = (rgb * 255).astype(np.uint8)
    rows = b"".join(b"\x00" + raw[y].tobytes() for y in range(raw.shape[0]))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", raw.shape[1], raw.shape[0], 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return base64.b64encode(png).decode()


def with_cam(seq: int, cam: Any) -> Envelope:
    env = result(seq, pred=1, label=1)
    return Envelope(env.kind, env.site, env.device, env.seq, env.time, {**env.body, "cam": cam})


def test_check_cam_accepts_only_small_pngs() -> None:
    import base64

    from gateway.dashboard.cam import CAM_MAX_BYTES, check_cam

    good = cam_png()
    assert check_cam({"png": good, "label": "benign"}) == ({"png": good, "label": "benign"}, None)
    gif = base64.b64encode(b"GIF89a" + b"\x00" * 30).decode()
    assert check_cam({"png": gif}) == (None, "not_png")
    assert check_cam({"png": 'iVBORw0KGgo="><script>'}) == (None, "malformed")
    assert check_cam({"png": "not base64!"}) == (None, "malformed")
    assert check_cam("iVBOR") == (None, "malformed")
    assert check_cam({"png": "A" * (CAM_MAX_BYTES * 2)}) == (None, "too_large")
    huge = base64.b64decode(good)
    wide = huge[:16] + (4096).to_bytes(4, "big") + huge[20:]  # IHDR says 4096 px wide
    assert check_cam({"png": base64.b64encode(wide).decode()}) == (None, "too_large")
    assert check_cam({"png": good, "label": 7})[0] == {"png": good, "label": ""}


def test_api_rows_carry_checked_cams_and_a_csp(store: Store, users: Path) -> None:
    good = cam_png()
    store.add_result(with_cam(1, {"png": good, "label": "benign"}))
    store.add_result(with_cam(2, {"png": "PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+", "label": "x"}))  # <svg..
    store.add_result(result(3, pred=0, label=0))
    with DashboardServer(store.path, port=0, users=users) as dash:
        cookie = login(dash.port)
        status, headers, _ = request(dash.port, "GET", "/", cookie)
        assert status == 200
        csp = headers["content-security-policy"]
        assert "img-src 'self' data:" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        rows = get_json(dash.port, "/api/results?limit=10", cookie)
        assert rows[0]["cam"] == {"png": good, "label": "benign"}
        assert "cam" not in rows[1], "an SVG passed off as a PNG is not shown"
        assert "cam" not in rows[2]
        conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=5)
        conn.request("GET", "/api/stream?after=0", headers={"Cookie": cookie})
        events = read_events(conn.getresponse(), want_results=3)
        conn.close()
        cams = [json.loads(e["data"]).get("cam") for e in events if e["event"] == "result"]
        assert cams == [{"png": good, "label": "benign"}, None, None]


@pytest.mark.slow
def test_page_shows_a_cam_thumbnail(store: Store, page: Any, users: Path) -> None:
    store.set_state(SITE, DEVICE, "online", time.time(), BUNDLE)
    store.add_result(result(1, pred=0, label=0))
    with DashboardServer(store.path, port=0, users=users) as dash:
        sign_in(page, dash)
        expect(page.locator("#connection")).to_have_text("live", timeout=TIMEOUT_MS)
        expect(page.locator("tr.result")).to_have_count(1, timeout=TIMEOUT_MS)
        expect(page.locator("tr.result .cam-thumb")).to_have_count(0)
        store.add_result(with_cam(2, {"png": cam_png(3), "label": "benign"}))  # arrives live
        store.add_result(with_cam(3, {"png": "R0lGODlhAQABAAAAACw=", "label": "gif"}))
        expect(page.locator("tr.result")).to_have_count(3, timeout=TIMEOUT_MS)
        thumb = page.locator('tr.result[data-id="2"] img.cam-thumb')
        expect(thumb).to_have_count(1)
        expect(thumb).to_have_attribute("alt", "Class activation map: benign")
        page.wait_for_function(
            "() => { const i = document.querySelector('tr.result[data-id=\"2\"] img.cam-thumb');"
            " return i && i.complete && i.naturalWidth > 0; }",
            timeout=TIMEOUT_MS,
        )
        size = thumb.evaluate("i => [i.naturalWidth, i.naturalHeight]")
        assert size == [28, 28], size
        expect(page.locator('tr.result[data-id="3"] .cam')).to_have_text("—")
        expect(page.locator('tr.result[data-id="3"] img')).to_have_count(0)
        shoot(page, "cam")


# -- the result detail panel ------------------------------------------------------------------
HOSTILE_LABEL = '<img src=x onerror="window.__pwned=1">benign'


def detail_store(store: Store) -> None:
    """A classification result with a CAM and an input thumbnail (real BreastMNIST image), a
    segmentation result with an outline and a fitted ellipse, a result whose class name is
    hostile markup, and a device's events: a fall that ended, a PVC run still going."""
    import numpy as np

    from edge_agent.thumbnail import input_thumbnail
    from models import breast_cnn

    with np.load(breast_cnn.DATA) as data:
        img = data["val_images"][0]
    thumb = input_thumbnail(img)
    now = time.time()
    store.set_state(SITE, DEVICE, "online", now, BUNDLE)
    clf = with_cam(1, {"png": cam_png(0), "label": "benign"})
    store.add_result(
        Envelope(
            "result",
            SITE,
            DEVICE,
            1,
            now - 60,
            {**clf.body, "thumbnail": thumb, "positive_label": "malignant"},
        )
    )
    mask = {
        "area_px": 225,
        "area_frac": 0.287,
        "bbox": [5, 6, 20, 21],
        "components": 1,
        "contour": [[5, 6], [20, 6], [20, 21], [12, 24], [5, 21]],
        "size": [28, 28],
        "class_px": {},
    }
    seg = {
        "input": "breastmnist_dev:val#2",
        "pred": 1,
        "pred_label": "lesion",
        "scores": [],
        "bundle": "breast-unet@3#def",
        "mask": mask,
        "ellipse": {"center": [12.5, 13.0], "axes": [16.0, 12.0], "angle": 30.0},
        "thumbnail": thumb,
    }
    store.add_result(Envelope("result", SITE, DEVICE, 2, now - 50, seg))
    hostile = result(3, pred=1, label=0)
    store.add_result(
        Envelope("result", SITE, DEVICE, 3, now - 40, {**hostile.body, "pred_label": HOSTILE_LABEL})
    )
    fall = {"event": "fall", "label": "fall", "start": 100.0, "peak": 0.97, "alert": True}
    pvc = {"event": "pvc_run", "label": "V", "start": 130.0, "peak": 0.8, "alert": False}
    for seq, at, body in (
        (4, now - 30, {**fall, "state": "start"}),
        (5, now - 27, {**fall, "state": "end", "end": 102.5, "duration_s": 2.5}),
        (6, now - 10, {**pvc, "state": "start"}),
    ):
        store.add_result(Envelope("event", SITE, DEVICE, seq, at, {**body, "bundle": BUNDLE}))


def test_api_result_detail_and_events(store: Store, users: Path) -> None:
    detail_store(store)
    with DashboardServer(store.path, port=0, users=users) as dash:
        cookie = login(dash.port)
        r = get_json(dash.port, "/api/results/1", cookie)
        assert r["model"] == {"name": "breast-cnn", "version": "1", "hash": "abc"}
        assert [(c["name"], c["score"]) for c in r["classes"]] == [
            ("malignant", 0.2),
            ("benign", 0.8),
        ]
        assert (r["thumbnail"]["width"], r["thumbnail"]["height"]) == (28, 28)
        assert r["cam"]["label"] == "benign" and r["positive_label"] == "malignant"
        seg = get_json(dash.port, "/api/results/2", cookie)
        assert seg["mask"]["contour"][0] == [5, 6] and seg["mask"]["size"] == [28, 28]
        assert seg["ellipse"] == {"center": [12.5, 13.0], "axes": [16.0, 12.0], "angle": 30.0}
        # names of classes the body does not name come from the bundle's other results
        assert get_json(dash.port, "/api/results/3", cookie)["classes"][0]["name"] == "malignant"
        assert get(dash.port, "/api/results/99", cookie)[0] == 404
        assert get(dash.port, "/api/results/99999999999999999999", cookie)[0] == 404
        assert request(dash.port, "GET", "/api/results/1")[0] == 401
        assert request(dash.port, "GET", f"/api/events?device={SITE}/{DEVICE}")[0] == 401
        events = get_json(dash.port, f"/api/events?device={SITE}/{DEVICE}", cookie)["events"]
        assert [(e["event"], e["duration_s"]) for e in events] == [("fall", 2.5), ("pvc_run", None)]
        assert get(dash.port, "/api/events", cookie)[0] == 400


@pytest.mark.slow
def test_page_opens_a_result_s_detail_panel(store: Store, page: Any, users: Path) -> None:
    """A clinician opens a result: its input with the CAM over it, a bar per class (the
    predicted, positive and true ones marked), the model and bundle; a segmentation's outline
    and ellipse over its input; the device's events of the last hour; a hostile class name
    shown as text. By mouse and by keyboard; Escape closes."""
    detail_store(store)
    with DashboardServer(store.path, port=0, users=users) as dash:
        sign_in(page, dash)
        expect(page.locator("tr.result")).to_have_count(6, timeout=TIMEOUT_MS)
        panel = page.locator("#detail")
        expect(panel).to_be_hidden()

        row = page.locator('tr.result[data-id="1"]')
        row.click()
        expect(panel).to_be_visible()
        expect(panel).to_have_attribute("data-id", "1", timeout=TIMEOUT_MS)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#detail .detail-image img')]"
            ".every(i => i.complete && i.naturalWidth === 28)",
            timeout=TIMEOUT_MS,
        )
        expect(panel.locator("img.detail-thumb")).to_have_count(1)
        expect(panel.locator("img.detail-cam")).to_have_attribute(
            "alt", "Class activation map: benign"
        )
        bars = panel.locator("tr.class-row")
        expect(bars).to_have_count(2)
        expect(panel.locator("tr.class-row.predicted .class-name")).to_have_text("benign")
        expect(panel.locator("tr.class-row.predicted .class-score")).to_have_text("80.0%")
        expect(panel.locator("tr.class-row.positive .class-name")).to_have_text("malignant")
        expect(bars.nth(1).locator(".badge-truth")).to_have_text("ground truth")
        expect(panel.locator('[data-fact="bundle"]')).to_have_text(BUNDLE)
        expect(panel.locator('[data-fact="model"]')).to_have_text("breast-cnn")
        expect(panel.locator('[data-fact="version"]')).to_have_text("1")
        expect(panel.locator('[data-fact="device"]')).to_have_text(f"{SITE}/{DEVICE}")
        expect(panel.locator('[data-fact="seq"]')).to_have_text("1")
        timeline = panel.locator("#detail-timeline")
        expect(timeline.locator("g.tl-event")).to_have_count(2, timeout=TIMEOUT_MS)
        expect(timeline.locator("g.tl-event.ongoing")).to_have_attribute("data-event", "pvc_run")
        expect(timeline.locator("li.event-item").first).to_contain_text("fall")
        expect(timeline.locator("li.event-item").first).to_contain_text("2.5 s")
        shoot(page, "detail-classification")
        page.keyboard.press("Escape")
        expect(panel).to_be_hidden()
        assert page.evaluate("document.activeElement.dataset.id") == "1", "focus goes back"

        page.locator('tr.result[data-id="2"]').focus()  # by keyboard
        page.keyboard.press("Enter")
        expect(panel).to_have_attribute("data-id", "2", timeout=TIMEOUT_MS)
        contour = panel.locator("svg.detail-outline polygon.contour")
        expect(contour).to_have_count(1)
        assert len(contour.get_attribute("points").split()) == 5
        expect(panel.locator("svg.detail-outline ellipse.fit-ellipse")).to_have_count(1)
        assert panel.locator("svg.detail-outline").get_attribute("viewBox") == "0 0 28 28"
        box = panel.locator("svg.detail-outline").bounding_box()
        thumb = panel.locator("img.detail-thumb").bounding_box()
        assert box is not None and thumb is not None and box == thumb, "drawn over the input"
        expect(panel.locator('[data-fact="model"]')).to_have_text("breast-unet")
        shoot(page, "detail-segmentation")
        panel.locator("#detail-close").click()
        expect(panel).to_be_hidden()

        page.locator('tr.result[data-id="3"]').click()
        expect(panel).to_have_attribute("data-id", "3", timeout=TIMEOUT_MS)
        expect(panel.locator("tr.class-row.predicted .class-name")).to_have_text(HOSTILE_LABEL)
        expect(panel.locator('[data-fact="prediction"]')).to_have_text(HOSTILE_LABEL)
        expect(page.locator('tr.result[data-id="3"] .pred-label')).to_have_text(HOSTILE_LABEL)
        expect(panel.locator("img")).to_have_count(0)
        assert page.evaluate("window.__pwned") is None
        shoot(page, "detail-hostile")


# -- hostile rows and a failing store ---------------------------------------------------------
HOSTILE_TELEMETRY = {  # device -> telemetry column as an older, unvalidated gateway stored it
    "hx-deep": "[" * 100_000 + "]" * 100_000,  # json.loads: RecursionError
    "hx-string": '"not an object"',
    "hx-types": '{"fps": NaN, "latency_ms": {"total": [1, 2]}, "cpu_percent": "hot",'
    ' "outbox_depth": {"x": 1}, "rss_mb": true}',
    "hx-bigint": '{"fps": 123456789012345678901234567890, "results": -99999999999999999999}',
    "hx-garbage": "{not json",
}


def _hostile_store(store: Store) -> int:
    """Good device with an open critical fall alert, and one device per hostile telemetry
    row, written straight into the table; returns the alert's id."""
    from gateway.alerts import open_alert

    now = time.time()
    store.set_state(SITE, DEVICE, "online", now, BUNDLE)
    store.set_telemetry(SITE, DEVICE, telemetry(fps=5.0))
    store.add_result(result(1, pred=0, label=0))
    for device, text in HOSTILE_TELEMETRY.items():
        store.set_state(SITE, device, "online", now, BUNDLE)
        with store.transaction() as db:
            db.execute(
                "UPDATE devices SET telemetry=? WHERE site=? AND device=?", (text, SITE, device)
            )
    alert_id, _ = open_alert(
        store,
        SITE,
        DEVICE,
        "event:fall",
        "critical",
        f"fall on {SITE}/{DEVICE} (score 0.97)",
        now=now,
    )
    return alert_id


def test_api_answers_every_device_despite_hostile_telemetry(store: Store, users: Path) -> None:
    """One hostile telemetry row is an error marker on its own device, never a 500 for the
    whole list; the alerts and the stream still answer."""
    _hostile_store(store)
    with DashboardServer(store.path, port=0, title="Ward A", users=users) as dash:
        cookie = login(dash.port)
        devices = {d["device"]: d for d in get_json(dash.port, "/api/devices", cookie)}
        assert set(devices) == {DEVICE, *HOSTILE_TELEMETRY}
        assert "error" not in devices[DEVICE] and devices[DEVICE]["telemetry"]["fps"] == 5.0
        for device in ("hx-deep", "hx-string", "hx-garbage"):
            assert devices[device]["telemetry"] is None
            assert devices[device]["error"].startswith("telemetry"), device
        assert devices["hx-types"]["telemetry"]["fps"] is None  # NaN: sent as null
        alerts = get_json(dash.port, "/api/alerts", cookie)
        assert [(a["severity"], a["state"]) for a in alerts] == [("critical", "open")]
        assert len(get_json(dash.port, "/api/results", cookie)) == 1
        history = get_json(dash.port, "/api/history", cookie)
        assert set(history["devices"]) == {f"{SITE}/{d}" for d in devices}


def test_a_failing_api_is_an_error_not_an_empty_list(store: Store, users: Path) -> None:
    """The store cannot answer (its alerts table is gone): 503 with one line saying so."""
    _hostile_store(store)
    with store.transaction() as db:
        db.execute("DROP TABLE alerts")
    with DashboardServer(store.path, port=0, title="Ward A", users=users) as dash:
        cookie = login(dash.port)
        status, content_type, text = get(dash.port, "/api/alerts", cookie)
        assert status == 503 and content_type.startswith("application/json")
        error = json.loads(text)["error"]
        assert error.startswith("cannot read alerts:") and "alerts" in error[19:]
        assert "\n" not in error
        assert len(get_json(dash.port, "/api/devices", cookie)) == 1 + len(HOSTILE_TELEMETRY)


@pytest.mark.slow
def test_page_shows_the_alert_despite_hostile_rows_and_an_error_state(
    store: Store, page: Any, users: Path
) -> None:
    """The page with hostile telemetry stored: the open critical alert is shown, each bad
    device row carries its error marker. When the alerts cannot be read, the page says so
    ("Could not load alerts: ..."), never "No alerts."."""
    alert_id = _hostile_store(store)
    with DashboardServer(store.path, port=0, title="Ward A", users=users) as dash:
        sign_in(page, dash)
        row = page.locator(f'tr.alert[data-alert-id="{alert_id}"]')
        expect(row).to_be_visible(timeout=TIMEOUT_MS)
        expect(row.locator(".sev")).to_have_text("critical")
        expect(page.locator("#alerts-empty")).to_be_hidden()
        expect(page.locator("#alerts-error")).to_be_hidden()
        expect(page.locator("#connection")).to_have_text("live", timeout=TIMEOUT_MS)
        deep = page.locator(f'tr[data-device="{SITE}/hx-deep"]')
        expect(deep.locator(".row-error")).to_contain_text("telemetry unreadable")
        good = page.locator(f'tr[data-device="{SITE}/{DEVICE}"]')
        expect(good.locator(".fps")).to_have_text("5.0")
        expect(good.locator(".row-error")).to_have_count(0)
        shoot(page, "hostile-rows")

        with store.transaction() as db:
            db.execute("DROP TABLE alerts")
        page.reload()
        error = page.locator("#alerts-error")
        expect(error).to_be_visible(timeout=TIMEOUT_MS)
        expect(error).to_contain_text("Could not load alerts: cannot read alerts:")
        expect(page.locator("#alerts-empty")).to_be_hidden()
        expect(page.locator("#connection")).to_have_text("gateway error")
        expect(page.locator(f'tr[data-device="{SITE}/{DEVICE}"] .fps')).to_have_text("5.0")
        shoot(page, "alerts-error")


@pytest.mark.slow  # converts the zoo's wrist model (once per session) and runs the demo
def test_the_wrist_demo_as_a_clinician_watches_it(
    page: Any, wrist_bundle: Any, zoo_cache: Path, tmp_path: Path
) -> None:
    """`medge demo --scenario wrist`, watched in Chromium: the stream's first simulated fall
    (6.45 s in) raises the critical fall alert on the page, live, and a result of the wrist
    opens with its device and bundle. How fast the alert shows is a benchmark's to measure."""
    import re
    import subprocess
    import sys

    args = ["--scenario", "wrist", "--duration", "60", "--port", "0", "--workdir", str(tmp_path)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "medge", "demo", *args, "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "MEDGE_CACHE_DIR": str(zoo_cache)},  # the session's bundle
    )
    try:
        assert proc.stdout is not None
        found = None
        for line in proc.stdout:
            found = re.search(r"dashboard at (\S+) \(user '(\w+)', password (\S+)\)", line)
            if found:
                break
        assert found, "the demo printed no dashboard address"
        url, user, password = found.groups()
        page.goto(url)
        page.fill("#name", user)
        page.fill("#password", password)
        page.click("#sign-in")
        expect(page).to_have_url(url)
        alert = page.locator('tr.alert[data-rule="event:fall"]')
        expect(alert).to_be_visible(timeout=TIMEOUT_MS)
        expect(alert).to_have_attribute("data-severity", "critical")
        expect(alert.locator(".message")).to_contain_text("fall on demo-ward/wr-01")
        first = page.locator("tr.result").first
        expect(first).to_be_visible(timeout=TIMEOUT_MS)
        first.click()
        panel = page.locator("#detail")
        expect(panel).to_be_visible()
        expect(panel).to_contain_text("demo-ward/wr-01")
        expect(panel).to_contain_text(wrist_bundle.id)
        shoot(page, "demo-wrist-fall")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# -- rollouts ----------------------------------------------------------------------------------
HOSTILE = "<img src=x onerror=alert(1)>"
PAUSED = (
    "stage canary: gate alerts_per_hour<=2 failed: measured 3.0 (after the switch of 1 device(s))"
)


def rollout_store(store: Store, bundle_dir: Path, site_dir: Path, bundles: Path) -> tuple[int, int]:
    """Group ``ward`` (us-01, us-02) and two rollouts of the test bundle to it, left the way the
    driver leaves them (its UPDATEs, gateway/rollout_pass.py): one completed; one paused in
    its canary stage after the switch: agreement 0.991 held, then 3 alerts in the hour since
    us-01 switched failed alerts_per_hour<=2. us-01's telemetry: the shadow run's agreement,
    an input check in warning, the float check. Returns (completed id, paused id)."""
    from edge_agent.bundle import Bundle
    from gateway.alerts import open_alert
    from gateway.groups import set_group
    from gateway.rollout_plan import Plan, parse_gates
    from gateway.rollout_store import create_rollout
    from gateway.site import signer_key

    target = Bundle.load(bundle_dir).id
    trusted = [signer_key(site_dir).public_key()]
    now = time.time()
    for device in (DEVICE, "us-02"):
        store.set_state(SITE, device, "online", now, BUNDLE)
    set_group(store, "ward", [(SITE, DEVICE), (SITE, "us-02")])
    plan = Plan(canary=1, steps=[100], gates=parse_gates("agreement>=0.98"), min_results=5)
    done = create_rollout(store, bundle_dir, "ward", plan, bundles, SITE, trusted)
    decided = {str(i): {"shadow": {"agreement": 0.995, "samples_min": 50}} for i in (0, 1)}
    with store.transaction() as db:
        db.execute(
            "UPDATE rollouts SET status='completed', stage=2, phase='switch', gate_values=? "
            "WHERE id=?",
            (json.dumps(decided), done),
        )
        db.execute(
            "UPDATE rollout_devices SET state='done', switched=? WHERE rollout=?", (now, done)
        )

    plan = Plan(
        canary=1,
        steps=[100],
        gates=parse_gates("agreement>=0.98,alerts_per_hour<=2"),
        min_results=5,
    )
    paused = create_rollout(store, bundle_dir, "ward", plan, bundles, SITE, trusted)
    shadow = {"devices": 1, "samples": {f"{SITE}/{DEVICE}": 120}, "samples_min": 120}
    after = {"devices": 1, "alerts": 3, "device_hours": 1.0, "alerts_per_hour": 3.0}
    values = {"0": {"shadow": {**shadow, "agreement": 0.991}, "after": after}}
    with store.transaction() as db:
        db.execute(
            "UPDATE rollouts SET status='paused', phase='switch', reason=?, gate_values=? "
            "WHERE id=?",
            (PAUSED, json.dumps(values), paused),
        )
        db.execute(
            "UPDATE rollout_devices SET state='done', previous=?, switched=?, update_mark=0, "
            "cmd='shadow-stop', cmd_sent=? WHERE rollout=? AND device=?",
            (BUNDLE, now - 3600, now - 3500, paused, DEVICE),
        )
    store.set_state(SITE, DEVICE, "online", now, target)
    store.set_telemetry(
        SITE,
        DEVICE,
        {
            **telemetry(),
            "bundle": target,
            "shadow": {"bundle": target, "samples": 120, "agreement": 0.991, "skipped": 0},
            "inputs": {"warning": 1, "state": {"channel_0": "warning", "flat_line": "ok"}},
            "float_check": {"bundle": target, "samples": 40, "agreement": 0.97},
        },
    )
    store.set_telemetry(
        SITE,
        "us-02",
        {
            **telemetry(),
            "shadow": {"bundle": HOSTILE, "samples": 7, "agreement": 0.5},
            "inputs": {"warning": 0, "state": {"channel_0": "ok"}},
        },
    )
    for _ in range(3):  # one fall alert, repeated: counted 3 times, half an hour ago
        open_alert(store, SITE, DEVICE, "event:fall", "critical", "fall", now=now - 1800)
    return done, paused


def test_api_rollouts_is_the_status_document_with_its_gates(
    store: Store, users: Path, bundle_dir: Path, site_dir: Path, tmp_path: Path
) -> None:
    from gateway.dashboard.rollouts_view import recent_rollouts
    from gateway.rollout_store import status

    done, paused = rollout_store(store, bundle_dir, site_dir, tmp_path / "bundles")
    with DashboardServer(store.path, port=0, users=users) as dash:
        assert request(dash.port, "GET", "/api/rollouts")[0] == 401
        cookie = login(dash.port)
        doc = get_json(dash.port, "/api/rollouts", cookie)
    assert [r["id"] for r in doc["rollouts"]] == [paused, done]
    live, finished = doc["rollouts"]
    # the CLI's status document, unchanged, plus the gates of the stage it is at
    reference = status(store, paused)
    assert set(live) == {*reference, "gates"}
    assert (live["status"], live["stage"], live["stage_name"], live["phase"]) == (
        "paused",
        0,
        "canary",
        "switch",
    )
    assert live["reason"] == PAUSED and live["group"] == "ward"
    [agreement, alerts] = live["gates"]
    assert (agreement["gate"], agreement["value"], agreement["threshold"]) == (
        "agreement>=0.98",
        0.991,
        0.98,
    )
    assert (agreement["verdict"], agreement["op"], agreement["stage"]) == ("pass", ">=", 0)
    assert alerts["gate"] == "alerts_per_hour<=2" and alerts["verdict"] == "fail"
    assert alerts["value"] == pytest.approx(3.0, abs=0.01)  # live: 3 alerts in ~1 device-hour
    devices = {d["device"]: d for d in live["devices"]}
    first, second = devices[DEVICE], devices["us-02"]
    assert (first["state"], first["command"], first["stage"]) == ("done", "shadow-stop", 0)
    assert first["command_sent"] is not None and first["previous"] == BUNDLE
    assert (first["shadow"]["agreement"], first["shadow"]["samples"]) == (0.991, 120)
    assert (second["state"], second["command"], second["shadow"]) == ("pending", None, None)
    assert live["counts"]["done"] == 1 and live["counts"]["pending"] == 1
    # completed: the last stage's gates, as decided
    assert finished["status"] == "completed"
    assert [(g["stage"], g["value"], g["verdict"]) for g in finished["gates"]] == [
        (1, 0.995, "pass")
    ]
    # the active ones are kept first when the list is cut
    assert [r["id"] for r in recent_rollouts(store, limit=1)] == [paused]


@pytest.mark.slow
def test_page_shows_the_rollout_its_gates_and_the_device_checks(
    store: Store, page: Any, users: Path, bundle_dir: Path, site_dir: Path, tmp_path: Path
) -> None:
    from gateway.rollout_store import control

    done, paused = rollout_store(store, bundle_dir, site_dir, tmp_path / "bundles")
    why = "bundle b@1 has no reference summary of its calibration data"
    store.set_state(SITE, "us-03", "online", time.time(), BUNDLE)
    store.set_telemetry(SITE, "us-03", {**telemetry(), "inputs": {"watched": False, "why": why}})
    with DashboardServer(store.path, port=0, users=users) as dash:
        sign_in(page, dash)
        block = page.locator(f'.rollout[data-rollout-id="{paused}"]')
        expect(block.locator(".rollout-status")).to_have_text("paused", timeout=TIMEOUT_MS)
        expect(block.locator(".rollout-stage")).to_have_text("stage 1/2 canary · switch")
        expect(block.locator('.gate[data-measure="agreement"]')).to_have_text(
            "agreement 0.991 ≥ 0.98 ✓"
        )
        failing = block.locator('.gate[data-measure="alerts_per_hour"]')
        expect(failing).to_have_text(f"alerts/h 3.0 ≤ 2 ✗ — paused: {PAUSED}")
        expect(failing).to_have_attribute("data-verdict", "fail")
        expect(block.locator(".rollout-reason")).to_have_count(0)  # said on its gate's line
        other = page.locator(f'.rollout[data-rollout-id="{done}"]')
        expect(other.locator(".rollout-status")).to_have_text("completed")
        expect(other.locator(".rollout-stage")).to_have_text("stage 2/2 · done")
        expect(page.locator("#rollouts-summary")).to_have_text("1 active · 1 finished")
        expect(page.locator("#rollouts-empty")).to_be_hidden()

        # the devices, one click away
        row = block.locator(f'.rollout-devices tr[data-device="{SITE}/{DEVICE}"]')
        expect(row).to_be_hidden()
        block.locator(".rollout-devices summary").click()
        expect(row.locator(".dev-state")).to_have_text("done")
        expect(row.locator(".command")).to_have_text("shadow-stop (sent)")
        expect(row.locator(".shadow")).to_have_text("0.991 (120 samples)")
        pending = block.locator(f'.rollout-devices tr[data-device="{SITE}/us-02"]')
        expect(pending.locator(".dev-state")).to_have_text("pending")
        expect(pending.locator(".stage")).to_have_text("100%")

        # the device list: input warning, shadow agreement, float check
        checks = page.locator(f'#devices tr[data-device="{SITE}/{DEVICE}"] td.checks')
        expect(checks.locator(".inputs")).to_have_text("⚠ inputs: channel_0")
        expect(checks.locator(".inputs")).to_have_class("check-badge inputs check-warn")
        expect(checks.locator(".shadow-agreement")).to_have_text("shadow 0.991 (n=120)")
        expect(checks.locator(".float-check")).to_have_text("float check 0.970 (n=40)")
        calm = page.locator(f'#devices tr[data-device="{SITE}/us-02"] td.checks')
        expect(calm.locator(".inputs")).to_have_text("inputs ok")
        blind = page.locator(f'#devices tr[data-device="{SITE}/us-03"] td.checks .inputs')
        expect(blind).to_have_text("inputs not watched")
        expect(blind).to_have_attribute("title", why)
        expect(blind).to_have_class("check-badge inputs check-off")
        expect(calm.locator(".shadow-bundle")).to_have_text(HOSTILE)  # text, not markup
        expect(page.locator("td.checks img")).to_have_count(0)
        shoot(page, "rollouts")

        # resumed: the next refresh shows it, the device list stays open
        control(store, paused, "resume")
        expect(block.locator(".rollout-status")).to_have_text("running", timeout=TIMEOUT_MS)
        expect(failing).to_have_text("alerts/h 3.0 ≤ 2 ✗")
        expect(row.locator(".command")).to_be_visible()
