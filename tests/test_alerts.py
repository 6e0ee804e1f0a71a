"""Alerts: a fall event, a silent device and a device gone offline, through a real Mosquitto,
real sealed envelopes and the real gateway; and the alert table's rules on their own."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.envelope import Envelope
from edge_agent.topics import topic
from gateway import Gateway, Store
from gateway.alerts import (
    AlertEngine,
    AlertError,
    AlertRules,
    UnknownAlert,
    acknowledge,
    list_alerts,
    open_alert,
)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SITE = "ward-a"


@contextmanager
def publisher(broker: Any) -> Iterator[Callable[[str, str, bytes], None]]:
    """send(device, kind, payload): publish on the device's topic and wait for the PUBACK."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        yield lambda device, kind, payload: c.publish(
            topic(SITE, device, kind), payload, qos=1).wait_for_publish(5)
    finally:
        c.loop_stop()
        c.disconnect()


def wait_for(check: Callable[[], Any], timeout: float = 5.0, every: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)


def fall(device: str, seq: int, event: str = "fall", score: float = 0.97) -> Envelope:
    body = {"event": event, "score": score, "input": f"imu-replay:subject07#{seq}",
            "bundle": "fall-lstm@1#abc"}
    return Envelope("event", SITE, device, seq, time.time(), body)


def state(device: str, seq: int, value: str) -> Envelope:
    return Envelope("state", SITE, device, seq, time.time(), {"state": value, "bundle": "b@1"})


def of_rule(store: Store, rule: str) -> list[dict[str, Any]]:
    return [a for a in list_alerts(store, 1000) if a["rule"] == rule]


# -- through the broker ----------------------------------------------------------------------
def test_a_fall_event_raises_an_alert_within_a_second(  # type: ignore[no-untyped-def]
    mosquitto, sealer, opener, tmp_path: Path
) -> None:
    wr = sealer("wr-01")
    with Store(tmp_path / "gw.sqlite") as store, \
            Gateway(store, opener, mosquitto.host, mosquitto.port) as gw, \
            publisher(mosquitto) as send:
        sealed = wr.seal(fall("wr-01", 1))
        started = time.perf_counter()
        send("wr-01", "event", sealed)
        alert = wait_for(lambda: of_rule(store, "event:fall"))[0]
        latency = time.perf_counter() - started
        assert latency < 1.0, f"the fall alert took {latency:.3f} s"
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "alert-latency.json").write_text(json.dumps({"fall_alert_s": latency}))

        assert (alert["site"], alert["device"], alert["severity"], alert["state"]) == (
            SITE, "wr-01", "critical", "open")
        assert alert["message"] == "fall on ward-a/wr-01 (score 0.97)"
        assert alert["detail"]["seq"] == 1
        assert alert["detail"]["input"] == "imu-replay:subject07#1"
        assert store.result_count() == 1, "the event itself is stored like a result"

        # The same envelope again (a resend after a lost ack): no second alert, no new count.
        send("wr-01", "event", sealed)
        wait_for(lambda: gw.stats.duplicates == 1)
        # Another fall while the alert is open adds to it; an event kind no rule lists does not.
        send("wr-01", "event", wr.seal(fall("wr-01", 2)))
        send("wr-01", "event", wr.seal(fall("wr-01", 3, event="cough")))
        wait_for(lambda: gw.stats.stored == 3)
        [alert] = list_alerts(store)
        assert alert["count"] == 2
        assert alert["detail"]["seq"] == 2

        acked = acknowledge(store, alert["id"], "nurse-1")
        assert (acked["state"], acked["acked_by"]) == ("acknowledged", "nurse-1")
        [audit] = store.audit("ack-alert")
        assert "nurse-1" in audit["detail"] and (audit["site"], audit["device"]) == (
            SITE, "wr-01")
        with pytest.raises(AlertError, match="acknowledged, not open"):
            acknowledge(store, alert["id"], "nurse-1")

        # Once acknowledged, the next fall is a new alert.
        send("wr-01", "event", wr.seal(fall("wr-01", 4)))
        newest = wait_for(lambda: [a for a in of_rule(store, "event:fall")
                                   if a["state"] == "open"])[0]
        assert newest["id"] != alert["id"]
        assert [a["state"] for a in of_rule(store, "event:fall")] == ["open", "acknowledged"]


def test_a_silent_device_raises_an_alert_and_speaking_resolves_it(  # type: ignore[no-untyped-def]
    mosquitto, sealer, opener, tmp_path: Path
) -> None:
    us = sealer("us-21")
    rules = AlertRules(silence_after=1.0)
    with Store(tmp_path / "gw.sqlite") as store, \
            Gateway(store, opener, mosquitto.host, mosquitto.port, rules=rules), \
            publisher(mosquitto) as send:
        send("us-21", "state", us.seal(state("us-21", 1, "online")))
        spoke = time.monotonic()
        wait_for(store.devices)
        alert = wait_for(lambda: of_rule(store, "silent"), timeout=4)[0]
        silent_for = time.monotonic() - spoke
        # not before N seconds; the upper bound is loose: the watchdog ticks on a loaded machine
        assert 0.9 <= silent_for < 4.0, f"reported silent after {silent_for:.2f} s"
        assert (alert["severity"], alert["state"]) == ("warning", "open")
        assert alert["message"] == "ward-a/us-21 silent for 1 s"
        time.sleep(0.6)  # more watchdog rounds while it stays silent: still one alert
        assert len(of_rule(store, "silent")) == 1
        acknowledge(store, alert["id"], "nurse-1")  # acknowledged, the condition goes on
        time.sleep(0.3)
        assert len(of_rule(store, "silent")) == 1

        telemetry = Envelope("telemetry", SITE, "us-21", 2, time.time(), {"fps": 4.0})
        started = time.monotonic()
        send("us-21", "telemetry", us.seal(telemetry))
        wait_for(lambda: of_rule(store, "silent")[0]["state"] == "resolved", timeout=3)
        assert time.monotonic() - started < 3.0
        [resolved] = of_rule(store, "silent")
        assert resolved["acked_by"] == "nurse-1" and resolved["resolved_at"] is not None


def test_offline_is_a_warning_resolved_by_online(  # type: ignore[no-untyped-def]
    mosquitto, sealer, opener, tmp_path: Path
) -> None:
    """What the broker publishes for a device's Last Will: its retained state 'offline'."""
    us = sealer("us-22")
    rules = AlertRules(silence_after=0.5)
    with Store(tmp_path / "gw.sqlite") as store, \
            Gateway(store, opener, mosquitto.host, mosquitto.port, rules=rules) as gw, \
            publisher(mosquitto) as send:
        send("us-22", "state", us.seal(state("us-22", 1, "online")))
        send("us-22", "state", us.seal(state("us-22", 2, "offline")))
        alert = wait_for(lambda: of_rule(store, "offline"))[0]
        assert (alert["severity"], alert["state"], alert["message"]) == (
            "warning", "open", "ward-a/us-22 went offline")
        time.sleep(0.9)  # longer than silence_after: an offline device is not also "silent"
        assert of_rule(store, "silent") == []
        # a replayed older 'online' is rejected and resolves nothing
        send("us-22", "state", us.seal(state("us-22", 1, "online")))
        wait_for(lambda: gw.stats.rejected == 1)
        assert of_rule(store, "offline")[0]["state"] == "open"
        send("us-22", "state", us.seal(state("us-22", 3, "online")))
        wait_for(lambda: of_rule(store, "offline")[0]["state"] == "resolved")


# -- the rules and the table on their own ----------------------------------------------------
def test_one_open_alert_per_condition(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        first, new = open_alert(store, SITE, "d1", "silent", "warning", "d1 silent")
        assert new
        again, new = open_alert(store, SITE, "d1", "silent", "warning", "d1 silent")
        assert (again, new) == (first, False)
        assert list_alerts(store)[0]["count"] == 2
        # the database itself refuses a second open alert for one condition
        with pytest.raises(sqlite3.IntegrityError), store.transaction() as db:
            db.execute("INSERT INTO alerts (site, device, rule, severity, message, opened, "
                       "updated) VALUES (?,?,?,?,?,?,?)",
                       (SITE, "d1", "silent", "warning", "dup", 0.0, 0.0))
        with pytest.raises(UnknownAlert):
            acknowledge(store, 999, "x")
        with pytest.raises(AlertError, match="severity"):
            open_alert(store, SITE, "d1", "other", "apocalyptic", "no")
        with pytest.raises(AlertError):
            AlertRules(silence_after=0)
        with pytest.raises(AlertError):
            AlertRules(events={"fall": "urgent"})


def test_alerts_list_open_first_by_severity(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        info, _ = open_alert(store, SITE, "d1", "offline", "info", "a")
        crit, _ = open_alert(store, SITE, "d2", "event:fall", "critical", "b")
        warn, _ = open_alert(store, SITE, "d3", "silent", "warning", "c")
        acked, _ = open_alert(store, SITE, "d4", "event:fall", "critical", "d")
        acknowledge(store, acked, "u")
        assert [a["id"] for a in list_alerts(store)] == [crit, warn, info, acked]


def test_silence_counts_from_the_gateway_start_and_another_worker_can_resolve(
    tmp_path: Path,
) -> None:
    now = [1_000_000.0]
    with Store(tmp_path / "s.sqlite") as store:
        store.set_state(SITE, "old", "online", 0.0)
        with store.transaction() as db:  # last heard long before this gateway started
            db.execute("UPDATE devices SET last_seen=? WHERE device='old'", (now[0] - 3600,))
        engine = AlertEngine(store, AlertRules(silence_after=30), clock=lambda: now[0])
        assert engine.check_silence() == [], "no alert before the gateway has listened N s"
        now[0] += 31
        [alert_id] = engine.check_silence()
        assert engine.check_silence() == [], "no duplicate"
        # the device speaks to another worker sharing this database
        with store.transaction() as db:
            db.execute("UPDATE devices SET last_seen=? WHERE device='old'", (now[0] + 1,))
        now[0] += 2
        engine.check_silence()
        assert list_alerts(store)[0]["state"] == "resolved"
        assert list_alerts(store)[0]["id"] == alert_id
