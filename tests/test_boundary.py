"""One boundary for every message handler, and a supervisor in every long-running command,
against real Mosquitto processes, a real gateway, real SQLite files and real subprocesses.

- a message that breaks a handler (a list where the header has a string, retained or not; a
  handler raising RuntimeError; JSON 10,000 levels deep on a device's ack and cmd) is
  rejected with its Reason code and counted; the threads go on, and a legitimate message that
  follows is stored and acknowledged;
- a worker that dies (the store's table dropped under the writer) makes /healthz answer 503
  and ``medge gateway run`` exit non-zero on one line naming it;
- ``medge gateway run`` against a closed port warns once, retries, and connects when a broker
  starts there.
"""

from __future__ import annotations

import itertools
import json
import logging
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from medge_process import start_medge, wait_serving
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_for

from edge_agent.envelope import Envelope, Sealer
from edge_agent.identity import DeviceIdentity
from edge_agent.link import DeviceLink
from edge_agent.mqtt_session import MqttSession
from edge_agent.outbox import Outbox
from edge_agent.reasons import Reason
from edge_agent.supervisor import Supervisor
from edge_agent.topics import topic
from gateway import Gateway, Store
from gateway.broker import RunningBroker, free_port, start_broker
from gateway.metrics import MetricsServer

SITE = "ward-a"
DEEP = b"[" * 10_000 + b"]" * 10_000  # far past any JSON parser's recursion limit


def _publish(broker: RunningBroker, items: list[tuple[str, bytes]], retain: bool = False) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        for t, payload in items:
            c.publish(t, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        c.loop_stop()
        c.disconnect()


@contextmanager
def _device(
    tmp: Path, broker: RunningBroker, ident: Path, device: str, resend_after: float = 0.5
) -> Iterator[tuple[Outbox, DeviceLink]]:
    """A device as its agent runs it: sealed results in a disk outbox, deleted only on the
    gateway's ack."""
    idn = DeviceIdentity.load(ident, SITE, device)
    epochs = itertools.count(1)
    box = Outbox(tmp / f"{device}.outbox.sqlite", SITE, device)
    box.sealer = Sealer(SITE, device, idn.key, idn.recipient, lambda: next(epochs))
    with box, DeviceLink(box, broker.host, broker.port, resend_after=resend_after) as link:
        assert link.wait_connected(10)
        yield box, link


def _put(box: Outbox, link: DeviceLink, n: int = 1) -> list[int]:
    seqs = [
        box.put("result", {"input": f"s#{i}", "pred": 1, "scores": [0.2, 0.8]}).seq
        for i in range(n)
    ]
    box.flush()
    link.notify()
    return seqs


def _bad_header(sealer: Any, device: str, field: str) -> bytes:
    """A real sealed result whose header holds a list where a string belongs."""
    doc = json.loads(
        sealer(device).seal(Envelope("result", SITE, device, 1, time.time(), {"pred": 0}))
    )
    assert isinstance(doc[field], str), sorted(doc)
    doc[field] = [doc[field], "x"]
    return json.dumps(doc).encode()


def _rejected(gw: Gateway, reason: Reason) -> float:
    return (
        gw.metrics.registry.get_sample_value(  # type: ignore[no-any-return]
            "medge_gateway_messages_rejected_total", {"reason": reason.value}
        )
        or 0.0
    )


def _all_alive(gw: Gateway) -> bool:
    return all(t is not None and t.is_alive() for t in gw.workers().values())


@pytest.mark.parametrize("field", ["kind", "kid", "site"])
def test_a_list_in_a_header_field_is_rejected_and_the_gateway_goes_on(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    mosquitto: RunningBroker,
    opener,
    sealer,
    identity,
    field: str,
) -> None:
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port) as gw,
    ):
        _publish(
            mosquitto,
            [(topic(SITE, "bd-poison", "result"), _bad_header(sealer, "bd-poison", field))],
        )
        wait_for(lambda: gw.stats.rejected == 1, 10, "the rejection")
        assert _rejected(gw, Reason.MALFORMED) == 1
        assert gw.session.rejected[Reason.MALFORMED.value] == 1
        assert _all_alive(gw), gw.workers()
        assert [a["detail"] for a in store.audit("reject")] == ["malformed"]
        with _device(tmp_path, mosquitto, identity("bd-good"), "bd-good") as (box, link):
            seqs = _put(box, link, 3)
            assert link.drain(10), "a legitimate device is stored and acknowledged"
        assert sorted(r["seq"] for r in store.results(device="bd-good")) == seqs
        assert gw.stats.rejected == 1 and _all_alive(gw)


def test_a_retained_poison_message_is_rejected_and_the_gateway_goes_on(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    mosquitto: RunningBroker,
    opener,
    sealer,
    identity,
) -> None:
    """Retained: the broker hands it to the gateway at every subscribe, first of all."""
    _publish(
        mosquitto,
        [(topic(SITE, "bd-retained", "state"), _bad_header(sealer, "bd-retained", "kind"))],
        retain=True,
    )
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port) as gw,
    ):
        wait_for(lambda: gw.stats.rejected == 1, 10, "the retained message's rejection")
        assert _rejected(gw, Reason.MALFORMED) == 1
        with _device(tmp_path, mosquitto, identity("bd-good2"), "bd-good2") as (box, link):
            seqs = _put(box, link, 2)
            assert link.drain(10)
        assert sorted(r["seq"] for r in store.results(device="bd-good2")) == seqs
        assert _all_alive(gw)


def test_a_handler_that_raises_is_counted_as_handler_and_the_session_goes_on(
    mosquitto: RunningBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="medge.test-boundary")
    got: list[bytes] = []

    def handle(msg: mqtt.MQTTMessage) -> None:
        if msg.payload == b"boom":
            raise RuntimeError("handler bug")
        got.append(msg.payload)

    t = "medge/v1/ward-a/bd-handler/test"
    subscribed = threading.Event()
    with MqttSession(
        "test",
        mosquitto.host,
        mosquitto.port,
        subscriptions=[(t, 1)],
        on_message=handle,
        logger=logging.getLogger("medge.test-boundary"),
        on_subscribed=subscribed.set,
    ) as session:
        assert session.wait_connected(10)
        wait_for(subscribed.is_set, 10, "the subscription")
        _publish(mosquitto, [(t, b"boom"), (t, b"boom"), (t, b"boom"), (t, b"after")])
        wait_for(lambda: got == [b"after"], 10, "the message after three failures")
        assert session.rejected[Reason.HANDLER.value] == 3
        assert sum(session.rejected.values()) == 3
        assert session.thread.is_alive() and session.connected
    lines = [r.getMessage() for r in caplog.records if "rejected message" in r.getMessage()]
    assert len(lines) == 1, "one line per reason and interval, not one per message"
    assert "RuntimeError: handler bug" in lines[0] and "[handler]" in lines[0]


@pytest.mark.slow
def test_nested_json_on_ack_and_cmd_stops_neither_the_link_nor_the_update_thread(  # type: ignore[no-untyped-def]
    bundle_dir: Path,
    tmp_path: Path,
    mosquitto: RunningBroker,
    identity,
    opener,
) -> None:
    from edge_agent import Agent, AgentConfig
    from models import breast_cnn

    cfg = AgentConfig(
        site=SITE,
        device="bd-agent",
        bundle=bundle_dir,
        identity=identity("bd-agent"),
        broker={"host": mosquitto.host, "port": mosquitto.port},
        source={"path": breast_cnn.DATA, "split": "val", "rate_hz": 10},  # ~8 s of samples
        outbox={"path": tmp_path / "outbox.sqlite", "resend_after_s": 0.5},
    )
    agent = Agent(cfg)
    stop = threading.Event()
    result: list[Any] = []
    runner = threading.Thread(target=lambda: result.append(agent.run(stop, 30.0)))
    runner.start()
    try:

        def workers() -> dict[str, Any]:
            return agent.supervisor.health()[1]["workers"]  # type: ignore[no-any-return]

        wait_for(
            lambda: "update" in workers() and agent._link is not None and agent._link.connected,
            20,
            "the agent's link and update thread",
        )
        link = agent._link
        assert link is not None
        _publish(
            mosquitto,
            [(topic(SITE, "bd-agent", "ack"), DEEP), (topic(SITE, "bd-agent", "cmd"), DEEP)],
        )
        wait_for(lambda: link.bad_acks == 1, 10, "the deep ack's rejection")
        assert sum(link.rejected.values()) == 1  # the command is the update thread's to refuse
        with (
            Store(tmp_path / "gw.sqlite") as store,
            Gateway(store, opener, mosquitto.host, mosquitto.port),
        ):

            def reported() -> bool:
                rows = store.query(
                    "SELECT body FROM results WHERE device=? AND kind='event'", ("bd-agent",)
                )
                return any(json.loads(r["body"]).get("update") == "rejected" for r in rows)

            wait_for(reported, 20, "the update thread's report of the deep command")
            assert all(w["alive"] for w in workers().values()), workers()
            runner.join(timeout=60)
            assert result, "the agent finished"
            assert result[0].pending == 0, "the outbox drained through the same link"
            assert store.result_count() == result[0].sent
    finally:
        stop.set()
        runner.join(timeout=60)


def _break_the_store(db: Path) -> None:
    """A real fault of the database under a running gateway: its results table is gone."""
    with sqlite3.connect(db) as con:
        con.execute("DROP TABLE results")


def _healthz(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 (http on loopback)
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_healthz_reports_liveness_and_503_once_the_writer_died(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    mosquitto: RunningBroker,
    opener,
    identity,
) -> None:
    db = tmp_path / "gw.sqlite"
    with (
        Supervisor() as sup,
        Store(db) as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port) as gw,
    ):
        for name, thread in gw.workers().items():
            sup.watch(name, thread)
        sup.track("stored", lambda: gw.last_stored)
        with MetricsServer(gw.metrics, port=0, health=sup.health) as server:
            url = server.url.replace("/metrics", "/healthz")
            with _device(
                tmp_path, mosquitto, identity("bd-health"), "bd-health", resend_after=0.2
            ) as (box, link):
                _put(box, link)
                assert link.drain(10)
                status, body = _healthz(url)
                assert status == 200 and body["status"] == "ok"
                assert set(body["workers"]) == {"gateway-writer", "gateway-mqtt", "alert-watchdog"}
                assert 0 <= body["last_message_age_s"]["stored"] < 10
                _break_the_store(db)
                _put(box, link)  # resent every 0.2 s: the writer fails, and fails again
                wait_for(
                    lambda: not gw.workers()["gateway-writer"].is_alive(),  # type: ignore[union-attr]
                    20,
                    "the writer to give up",
                )
            status, body = _healthz(url)
        assert status == 503 and body["status"] == "failing"
        writer = body["workers"]["gateway-writer"]
        assert writer["alive"] is False
        assert "no such table: results" in writer["error"]
        death = sup.check()
        assert death is not None and death.worker == "gateway-writer"


def _gateway_run(site_dir: Path, broker: str, db: Path, metrics_port: int) -> subprocess.Popen[str]:
    return start_medge(
        "gateway", "run", "--site-dir", str(site_dir), "--broker", broker, "--db", str(db),
        "--metrics-port", str(metrics_port), "--log-level", "info",
    )  # fmt: skip


def _healthy(proc: subprocess.Popen[str], url: str, timeout: float) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        status, body = _healthz(url)
        return body if status == 200 else None

    return wait_serving(proc, probe, timeout, "gateway run to be healthy")


@pytest.mark.slow
def test_a_dead_worker_ends_gateway_run_non_zero_on_one_line(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    mosquitto: RunningBroker,
    site_dir: Path,
    identity,
) -> None:
    db, port = tmp_path / "gw.sqlite", free_port("127.0.0.1")
    proc = _gateway_run(site_dir, f"{mosquitto.host}:{mosquitto.port}", db, port)
    try:
        body = _healthy(proc, f"http://127.0.0.1:{port}/healthz", 30)
        assert all(w["alive"] for w in body["workers"].values())
        with _device(tmp_path, mosquitto, identity("bd-dies"), "bd-dies", resend_after=0.2) as (
            box,
            link,
        ):
            _break_the_store(db)
            _put(box, link)  # resent until the writer gives up and the process ends
            proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode != 0
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("medge: error: gateway: worker gateway-writer died: "), err[-3000:]
    assert "no such table: results" in last
    assert [ln for ln in err.splitlines() if "died" in ln] == [last], "one line says it"


@pytest.mark.slow
def test_gateway_run_retries_a_closed_port_then_connects(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    site_dir: Path,
    sealer,
) -> None:
    broker_port, port = free_port("127.0.0.1"), free_port("127.0.0.1")
    db = tmp_path / "gw.sqlite"
    proc = _gateway_run(site_dir, f"127.0.0.1:{broker_port}", db, port)
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(iter(proc.stderr.readline, "")),  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()
    try:
        wait_for(
            lambda: any("retrying with back-off" in ln for ln in lines),
            20,
            "the warning that the broker is not there",
        )
        assert proc.poll() is None, "a broker that is down is retried, not fatal"
        warned = [ln for ln in lines if "retrying with back-off" in ln]
        assert len(warned) == 1 and f"127.0.0.1:{broker_port}" in warned[0]
        with start_broker("mosquitto", port=broker_port) as broker:
            wait_for(lambda: any("connected to" in ln for ln in lines), 40, "the connection")
            _healthy(proc, f"http://127.0.0.1:{port}/healthz", 10)
            s = sealer("bd-late")
            _publish(
                broker,
                [
                    (
                        topic(SITE, "bd-late", "result"),
                        s.seal(Envelope("result", SITE, "bd-late", 1, time.time(), {"pred": 0})),
                    )
                ],
            )
            with Store(db) as store:
                wait_for(lambda: store.result_count() == 1, 10, "the result stored")
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=5)
    assert proc.returncode == 0, "".join(lines)[-3000:]
    assert not any("Traceback" in ln for ln in lines), "".join(lines)[-3000:]


def test_dashboard_healthz_without_login_and_503_when_the_store_fails(tmp_path: Path) -> None:
    from gateway.dashboard import DashboardServer, add_user

    db, users = tmp_path / "gw.sqlite", tmp_path / "users.json"
    Store(db).close()
    add_user(users, "clinician", "a long enough password")
    with DashboardServer(db, users=users) as dash:
        status, body = _healthz(dash.url + "healthz")
        assert status == 200 and body["workers"]["store"] == {"alive": True}
        _break_the_store(db)
        status, body = _healthz(dash.url + "healthz")
    assert status == 503 and body["workers"]["store"]["alive"] is False
    assert "no such table: results" in body["workers"]["store"]["error"]


def test_device_healthz_reports_a_dead_worker() -> None:
    from edge_agent.device_metrics import MetricsServer as DeviceMetrics

    def fails() -> None:
        raise RuntimeError("link pump bug")

    with Supervisor() as sup:
        alive, stop = threading.Event(), threading.Event()
        sup.spawn("link-mqtt", stop.wait)
        with DeviceMetrics(list, "127.0.0.1", 0, health=sup.health) as server:
            url = f"http://127.0.0.1:{server.port}/healthz"
            status, body = _healthz(url)
            assert status == 200 and body["workers"] == {"link-mqtt": {"alive": True}}
            sup.spawn("link-pump", fails).join()
            status, body = _healthz(url)
            death = sup.wait(alive)
        stop.set()
    assert status == 503
    assert body["workers"]["link-pump"] == {"alive": False, "error": "RuntimeError: link pump bug"}
    assert death is not None
    assert death.line() == "worker link-pump died: RuntimeError: link pump bug"


def test_a_flood_of_rejections_is_counted_in_full_and_audited_in_pace(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    mosquitto: RunningBroker,
    opener,
    sealer,
    identity,
) -> None:
    """Every rejected message counts (metrics, the device's counter); the audit table gets one
    row per device, reason and interval, and the next row says how many it folded in."""
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port) as gw,
        _device(tmp_path, mosquitto, identity("bd-flood"), "bd-flood") as (box, link),
    ):
        _put(box, link)
        assert link.drain(10)  # the device is registered, so it can be charged
        bad = _bad_header(sealer, "bd-flood", "kind")
        _publish(mosquitto, [(topic(SITE, "bd-flood", "result"), bad)] * 40)
        wait_for(lambda: gw.stats.rejected == 40, 10, "40 rejections")
        assert _rejected(gw, Reason.MALFORMED) == 40

        def charged() -> int:
            return int(next(d for d in store.devices() if d["device"] == "bd-flood")["rejected"])

        wait_for(lambda: charged() == 40, 10, "the device's counter to reach 40")
        assert [a["detail"] for a in store.audit("reject")] == ["malformed"]
        gw.rejections.audit_interval = 0.0  # the interval has passed: the next row carries the fold
        _publish(mosquitto, [(topic(SITE, "bd-flood", "result"), bad)])
        wait_for(lambda: charged() == 41, 10, "the 41st rejection")
        details = sorted(a["detail"] for a in store.audit("reject"))
        assert details == ["malformed", "malformed (+39 since the last row)"]
        assert _all_alive(gw)
        gw.rejections.audit_interval = 3600.0  # folded from here on, until the gateway stops
        _publish(mosquitto, [(topic(SITE, "bd-flood", "result"), bad)] * 2)
        wait_for(lambda: charged() == 43, 10, "two more rejections")
        assert len(store.audit("reject")) == 2  # both folded into the row of the 41st
        gw.stop()
        details = sorted(a["detail"] for a in store.audit("reject"))
        # 1 + (1 + 39) + (1 + 2): the audit log adds up to all 43 rejections
        assert details == [
            "malformed",
            "malformed (+2 folded, at stop)",
            "malformed (+39 since the last row)",
        ]
