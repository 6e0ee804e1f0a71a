"""The attack suite: one fog node as a hospital runs it — Mosquitto with the `broker-config` TLS
listener and ACLs, `medge gateway run` and `medge dashboard` as real processes — attacked by a
provisioned device ("mallory") that holds a real certificate and key. After every attack the
same gateway process still stores a legitimate device's results within seconds, and the attack
is counted under its reason code in the gateway's metrics. docs/security.md lists the classes."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from medge_process import start_medge
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_for

import edge_agent.envelope as envelope_mod
from edge_agent.envelope import Envelope, Sealer
from edge_agent.envelope_header import HEADER
from edge_agent.identity import DEVICE_CERT, DEVICE_KEY, SITE_CA, DeviceIdentity
from edge_agent.link import DeviceLink
from edge_agent.outbox import Outbox
from edge_agent.topics import topic
from gateway.broker import RunningBroker, free_port, start_mosquitto_conf
from gateway.broker_config import write_broker_config
from gateway.site import init_site, provision_device

pytestmark = pytest.mark.slow

SITE = "ward-h"
GOOD, BAD = "us-01", "mallory"
USER, PASSWORD = "ward-nurse", "correct horse battery staple"


def _http(
    port: int,
    method: str,
    path: str,
    body: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    head = dict(headers or {})
    if body is not None:
        head.setdefault("Content-Type", "application/x-www-form-urlencoded")
    try:
        conn.request(method, path, body=body, headers=head)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        conn.close()


@dataclass
class Fog:
    tmp: Path
    site: Path
    broker: RunningBroker
    db: Path
    metrics_port: int
    dashboard_port: int
    gateway: subprocess.Popen[str] | None = None
    dashboard: subprocess.Popen[str] | None = None
    logs: list[Path] = field(default_factory=list)
    good_box: Outbox | None = None
    good_link: DeviceLink | None = None
    mallory: mqtt.Client | None = None
    mallory_sealer: Sealer | None = None
    seqs: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    # -- processes -----------------------------------------------------------------------
    def start_gateway(self) -> None:
        log = self.tmp / f"gateway-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("w") as err:  # the child has its own copy of the descriptor
            self.gateway = start_medge(
                "gateway", "run", "--site-dir", str(self.site),
                "--broker", f"127.0.0.1:{self.broker.port}", "--tls", "--db", str(self.db),
                "--metrics-port", str(self.metrics_port),
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        wait_for(lambda: self.metrics() is not None, 30, "the gateway's metrics port")

    def stop_gateway(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.terminate()
            self.gateway.wait(timeout=20)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def metrics(self) -> dict[str, float] | None:
        """The gateway's Prometheus samples, ``name{labels}`` -> value (None: not answering)."""
        try:
            status, _, text = _http(self.metrics_port, "GET", "/metrics")
        except OSError:
            return None
        if status != 200:
            return None
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def rejected(self) -> dict[str, float]:
        prefix = 'medge_gateway_messages_rejected_total{reason="'
        return {
            k[len(prefix) : -2]: v
            for k, v in (self.metrics() or {}).items()
            if k.startswith(prefix)
        }

    def assert_alive(self) -> None:
        assert self.gateway is not None and self.gateway.poll() is None, self.log_text()[-3000:]

    # -- the legitimate device -------------------------------------------------------------
    def stored_seqs(self, device: str = GOOD) -> set[int]:
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            return {
                r[0]
                for r in con.execute(
                    "SELECT seq FROM results WHERE site=? AND device=?", (SITE, device)
                )
            }
        finally:
            con.close()

    def good_result_is_stored(self, timeout: float = 15) -> None:
        """A legitimate device's new result is stored and acknowledged by the same gateway."""
        assert self.good_box is not None and self.good_link is not None
        seq = self.good_box.put("result", {"input": "s#1", "pred": 1, "scores": [0.2, 0.8]}).seq
        self.good_link.notify()
        wait_for(lambda: seq in self.stored_seqs(), timeout, f"{GOOD} seq {seq} to be stored")
        wait_for(lambda: self.good_box.depth() == 0, timeout, f"{GOOD} seq {seq} to be acked")
        self.assert_alive()

    # -- the attacker ----------------------------------------------------------------------
    def send(
        self, payload: bytes, kind: str = "result", retain: bool = False, device: str = BAD
    ) -> None:
        assert self.mallory is not None
        info = self.mallory.publish(topic(SITE, device, kind), payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def sealed(self, kind: str, body: Any, raw: bytes | None = None) -> bytes:
        """A message mallory really signs and seals: ``raw`` replaces the canonical body bytes
        (what a hostile device can put there, NaN and 10**30 included)."""
        assert self.mallory_sealer is not None
        mark: dict[str, Any] = {}
        env = Envelope(
            kind,
            SITE,
            BAD,
            next(self.seqs) + 1_000_000,
            time.time(),
            mark if raw is not None else body,
        )
        if raw is None:
            return self.mallory_sealer.seal(env)
        canon = envelope_mod.canonical
        envelope_mod.canonical = lambda obj: raw if obj is mark else canon(obj)  # type: ignore[assignment]
        try:
            return self.mallory_sealer.seal(env)
        finally:
            envelope_mod.canonical = canon  # type: ignore[assignment]

    def counted(self, before: dict[str, float], n: int, timeout: float = 15) -> dict[str, float]:
        """Wait until ``n`` more rejections are counted; the increase by reason."""

        def grew() -> dict[str, float] | None:
            now = self.rejected()
            diff = {k: v - before.get(k, 0.0) for k, v in now.items() if v > before.get(k, 0.0)}
            return diff if sum(diff.values()) >= n else None

        return wait_for(grew, timeout, f"{n} rejection(s) to be counted")


def _client(ident: Path, broker: RunningBroker) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=BAD, protocol=mqtt.MQTTv5)
    c.tls_set(
        ca_certs=str(ident / SITE_CA),
        certfile=str(ident / DEVICE_CERT),
        keyfile=str(ident / DEVICE_KEY),
    )
    connected = threading.Event()
    c.on_connect = lambda *_a: connected.set()
    c.connect(broker.host, broker.port)
    c.loop_start()
    assert connected.wait(10), "mallory could not connect"
    return c


@pytest.fixture(scope="module")
def fog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fog]:
    tmp = tmp_path_factory.mktemp("attacks")
    site = tmp / "site"
    init_site(site, SITE)
    good_ident = provision_device(site, GOOD, tmp / GOOD)
    bad_ident = provision_device(site, BAD, tmp / BAD)
    port = free_port()
    files = write_broker_config(site, tmp / "broker", port=port)
    with start_mosquitto_conf(files.conf, "127.0.0.1", port) as broker:
        f = Fog(tmp, site, broker, tmp / "gateway.sqlite", free_port(), free_port())
        f.start_gateway()
        users = tmp / "users.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "medge",
                "dashboard",
                "add-user",
                USER,
                "--users",
                str(users),
                "--password-stdin",
            ],
            input=PASSWORD + "\n",
            text=True,
            check=True,
            capture_output=True,
        )
        dash_log = tmp / "dashboard.log"
        with dash_log.open("w") as err:
            f.dashboard = start_medge(
                "dashboard", "--db", str(f.db), "--users", str(users),
                "--port", str(f.dashboard_port),
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        wait_for(
            lambda: _ok(lambda: _http(f.dashboard_port, "GET", "/login")[0] == 200),
            30,
            "the dashboard",
        )
        idn = DeviceIdentity.load(good_ident, SITE, GOOD)
        epochs = itertools.count(1)
        box = Outbox(tmp / "good.outbox.sqlite", SITE, GOOD)
        box.sealer = Sealer(SITE, GOOD, idn.key, idn.recipient, lambda: next(epochs))
        tls = (good_ident / SITE_CA, good_ident / DEVICE_CERT, good_ident / DEVICE_KEY)
        bad = DeviceIdentity.load(bad_ident, SITE, BAD)
        bad_epochs = itertools.count(1)
        f.mallory_sealer = Sealer(SITE, BAD, bad.key, bad.recipient, lambda: next(bad_epochs))
        with box, DeviceLink(box, broker.host, broker.port, resend_after=0.5, tls=tls) as link:
            assert link.wait_connected(10)
            f.good_box, f.good_link = box, link
            f.mallory = _client(bad_ident, broker)
            try:
                f.good_result_is_stored(30)
                yield f
            finally:
                f.mallory.loop_stop()
                f.mallory.disconnect()
                f.stop_gateway()
                if f.dashboard.poll() is None:
                    f.dashboard.terminate()
                    f.dashboard.wait(timeout=20)


def _ok(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except OSError:
        return False


# -- the attacks -------------------------------------------------------------------------------
HEADER_FIELDS = (*HEADER, "ct")  # pinned by tests/test_strict_parsing.py
WRONG_TYPES: tuple[Any, ...] = ([], ["result"], {}, {"a": 1}, None, True, 1.5, -1, 10**30, "x")


def test_wrong_json_types_in_every_header_field(fog: Fog) -> None:
    good = json.loads(fog.sealed("result", {"input": "m#1", "pred": 0, "scores": [1.0, 0.0]}))
    sent = 0
    before = fog.rejected()
    for name in HEADER_FIELDS:
        for value in WRONG_TYPES:
            if value == good[name] or (name == "alert" and value is None):
                continue  # not wrong for this field
            fog.send(json.dumps({**good, name: value}).encode())
            sent += 1
    grew = fog.counted(before, sent)
    assert set(grew) <= {
        "malformed",
        "topic",
        "unknown_key",
        "authentication",
        "schema",
        "signature",
        "header_mismatch",
        "device",
    }, grew
    fog.good_result_is_stored()


def test_deeply_nested_and_huge_headers_are_rejected(fog: Fog) -> None:
    before = fog.rejected()
    deep = b'{"v":' * 20_000 + b"2" + b"}" * 20_000  # under the broker's packet limit
    fog.send(deep)
    fog.send(b"[" * 50_000 + b"]" * 50_000)
    fog.send(b'{"v": 2, "kind": "result"' + b", " * 10 + b"}")
    grew = fog.counted(before, 3)
    assert set(grew) <= {"malformed", "size"}, grew
    fog.good_result_is_stored()


@pytest.mark.parametrize(
    ("kind", "raw"),
    [
        ("telemetry", b'{"cpu_percent":100000000000000000000000000000000000000}'),
        ("result", b'{"input":"m#2","pred":100000000000000000000000000000000000000,"scores":[1]}'),
        ("result", b'{"input":"m#3","pred":0,"scores":[NaN,Infinity]}'),
        ("telemetry", b'{"cpu_percent":NaN}'),
        ("result", b'{"input":"m#4","pred":0,"scores":' + b"[" * 1000 + b"]" * 1000 + b"}"),
        ("telemetry", b'{"x":' + b'{"x":' * 1000 + b"1" + b"}" * 1001),
        ("state", b'{"state":["online"]}'),
        ("telemetry", b'{"fps":"' + b"A" * 100_000 + b'"}'),
    ],
    ids=[
        "telemetry-bigint",
        "result-bigint",
        "result-nan",
        "telemetry-nan",
        "result-deep",
        "telemetry-deep",
        "state-list",
        "telemetry-long-string",
    ],
)
def test_authenticated_hostile_bodies_are_rejected(fog: Fog, kind: str, raw: bytes) -> None:
    before = fog.rejected()
    fog.send(fog.sealed(kind, None, raw), kind=kind)
    grew = fog.counted(before, 1)
    assert set(grew) <= {"schema", "malformed"}, grew
    fog.good_result_is_stored()


def test_retained_poison_does_not_kill_a_restarted_gateway(fog: Fog) -> None:
    poison = json.dumps({"v": 2, "kind": ["result"], "kid": {"a": 1}, "site": [], "ct": 1})
    fog.send(poison.encode(), kind="state", retain=True)
    try:
        fog.stop_gateway()
        before_restart = len(fog.logs)
        fog.start_gateway()  # a fresh process: its counters start at 0
        assert len(fog.logs) == before_restart + 1
        wait_for(lambda: sum(fog.rejected().values()) >= 1, 15, "the retained poison to be counted")
        fog.good_result_is_stored()
        fog.assert_alive()
    finally:
        fog.send(b"", kind="state", retain=True)  # clear the retained message


def test_an_empty_or_half_written_crl_is_survived(fog: Fog) -> None:
    crl = fog.site / "crl.pem"
    original = crl.read_bytes()
    try:
        for broken in (b"", original[: len(original) // 2]):
            crl.write_bytes(broken)
            time.sleep(1.2)  # the gateway re-reads crl.pem at most once a second
            fog.good_result_is_stored()
    finally:
        crl.write_bytes(original)
    assert "crl" in fog.log_text().lower()  # the broken file was named in the log
    fog.good_result_is_stored()


def _login(port: int) -> str:
    form = urllib.parse.urlencode({"name": USER, "password": PASSWORD})
    status, headers, _ = _http(port, "POST", "/login", body=form)
    assert status == 303, status
    return headers["set-cookie"].split(";", 1)[0]


def test_hostile_telemetry_does_not_hide_an_open_fall_alert(fog: Fog) -> None:
    assert fog.good_box is not None and fog.good_link is not None
    fog.good_box.put("event", {"event": "fall", "state": "start", "score": 0.97})
    fog.good_link.notify()
    before = fog.rejected()
    hostile = [
        b'{"cpu_percent":{"a":[1,2,{"b":null}]},"fps":"' + b"\xe2\x80\xae" * 50 + b'"}',
        b'{"mem":1e400}',
        b'{"a":' * 50 + b"1" + b"}" * 50,
    ]
    for raw in hostile:
        fog.send(fog.sealed("telemetry", None, raw), kind="telemetry")
    fog.counted(before, len(hostile))
    fog.good_link.publish_direct("telemetry", {"fps": 5.0, "cpu_percent": 12.5})
    cookie = _login(fog.dashboard_port)

    def fall_alert_open() -> bool:
        status, _, text = _http(
            fog.dashboard_port, "GET", "/api/alerts", headers={"Cookie": cookie}
        )
        assert status == 200, text[:300]
        alerts = json.loads(text)
        alerts = alerts.get("alerts", []) if isinstance(alerts, dict) else alerts
        return any(
            a.get("rule") in ("fall", "event:fall") and a.get("state") == "open" for a in alerts
        )

    wait_for(fall_alert_open, 15, "the fall alert")
    status, _, text = _http(fog.dashboard_port, "GET", "/api/devices", headers={"Cookie": cookie})
    assert status == 200, text[:300]
    assert GOOD in text
    fog.good_result_is_stored()


def test_parallel_login_guesses_are_throttled(fog: Fog) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def guess(i: int) -> None:
        form = urllib.parse.urlencode({"name": USER, "password": f"wrong-{i}"})
        try:
            status = _http(fog.dashboard_port, "POST", "/login", body=form)[0]
        except OSError:
            status = -1
        with lock:
            results.append(status)

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    evaluated = sum(1 for s in results if s == 401)
    assert evaluated <= 10, f"{evaluated} of {len(results)} guesses evaluated"
    assert all(s in (401, 429) for s in results), results


def test_the_gateway_survived_every_attack(fog: Fog) -> None:
    fog.assert_alive()
    samples = fog.metrics() or {}
    assert all(not math.isnan(v) for v in samples.values())
    assert os.stat(fog.db).st_mode & 0o077 == 0, "gateway.sqlite is readable by others"
    fog.good_result_is_stored()
