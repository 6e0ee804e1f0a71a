"""Alerts: a fall event, a PVC run, a silent device and a device gone offline, through a real
Mosquitto, real sealed envelopes and the real gateway; alert rules from a file, shown on the
dashboard; and the alert table's rules on their own."""

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
from waiting import wait_for

from edge_agent.bundle import EventRule
from edge_agent.envelope import Envelope
from edge_agent.events import EventTracker
from edge_agent.topics import topic
from gateway import Gateway, Store
from gateway.alert_rules import load_alert_rules
from gateway.alerts import (
    AlertEngine,
    AlertError,
    AlertRules,
    UnknownAlert,
    acknowledge,
    current_rules,
    list_alerts,
    open_alert,
    record_rules,
)
from gateway.dashboard import DashboardServer

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
            topic(SITE, device, kind), payload, qos=1
        ).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


def fall(device: str, seq: int, event: str = "fall", score: float = 0.97, **extra: Any) -> Envelope:
    body = {
        "event": event,
        "score": score,
        "input": f"imu-replay:subject07#{seq}",
        "bundle": "fall-lstm@1#abc",
        **extra,
    }
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
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port) as gw,
        publisher(mosquitto) as send,
    ):
        sealed = wr.seal(fall("wr-01", 1))
        started = time.perf_counter()
        send("wr-01", "event", sealed)
        alert = wait_for(lambda: of_rule(store, "event:fall"))[0]
        latency = time.perf_counter() - started
        assert latency < 1.0, f"the fall alert took {latency:.3f} s"
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "alert-latency.json").write_text(json.dumps({"fall_alert_s": latency}))

        assert (alert["site"], alert["device"], alert["severity"], alert["state"]) == (
            SITE,
            "wr-01",
            "critical",
            "open",
        )
        assert alert["message"] == "fall on ward-a/wr-01 (score 0.97)"
        assert alert["detail"]["seq"] == 1
        assert alert["detail"]["input"] == "imu-replay:subject07#1"
        assert store.result_count() == 1, "the event itself is stored like a result"

        # The same envelope again (a resend after a lost ack): no second alert, no new count.
        send("wr-01", "event", sealed)
        wait_for(lambda: gw.stats.duplicates == 1)
        # Another fall while the alert is open adds to it; an event its bundle marks alert:
        # false does not raise one.
        send("wr-01", "event", wr.seal(fall("wr-01", 2)))
        send("wr-01", "event", wr.seal(fall("wr-01", 3, event="cough", alert=False)))
        wait_for(lambda: gw.stats.stored == 3)
        [alert] = list_alerts(store)
        assert alert["count"] == 2
        assert alert["detail"]["seq"] == 2

        acked = acknowledge(store, alert["id"], "nurse-1")
        assert (acked["state"], acked["acked_by"]) == ("acknowledged", "nurse-1")
        [audit] = store.audit("ack-alert")
        assert "nurse-1" in audit["detail"] and (audit["site"], audit["device"]) == (SITE, "wr-01")
        with pytest.raises(AlertError, match="acknowledged, not open"):
            acknowledge(store, alert["id"], "nurse-1")

        # Once acknowledged, the next fall is a new alert.
        send("wr-01", "event", wr.seal(fall("wr-01", 4)))
        newest = wait_for(
            lambda: [a for a in of_rule(store, "event:fall") if a["state"] == "open"]
        )[0]
        assert newest["id"] != alert["id"]
        assert [a["state"] for a in of_rule(store, "event:fall")] == ["open", "acknowledged"]


def test_a_silent_device_raises_an_alert_and_speaking_resolves_it(  # type: ignore[no-untyped-def]
    mosquitto, sealer, opener, tmp_path: Path
) -> None:
    us = sealer("us-21")
    rules = AlertRules(silence_after=1.0)
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port, rules=rules) as gw,
        publisher(mosquitto) as send,
    ):
        send("us-21", "state", us.seal(state("us-21", 1, "online")))
        spoke = time.monotonic()
        wait_for(store.devices)
        alert = wait_for(lambda: of_rule(store, "silent"), timeout=4)[0]
        silent_for = time.monotonic() - spoke
        # not before N seconds; the upper bound is loose: the watchdog ticks on a loaded machine
        assert 0.9 <= silent_for < 4.0, f"reported silent after {silent_for:.2f} s"
        assert (alert["severity"], alert["state"]) == ("warning", "open")
        assert alert["message"] == "ward-a/us-21 silent for 1 s"
        # more watchdog rounds while it stays silent, a minute and an hour on: still one alert
        later = time.time()
        for ahead in (60.0, 3600.0):
            assert gw.alerts.check_silence(now=later + ahead) == []
        assert [a["count"] for a in of_rule(store, "silent")] == [1]
        acknowledge(store, alert["id"], "nurse-1")  # acknowledged, the condition goes on
        assert gw.alerts.check_silence(now=later + 7200.0) == []
        assert [a["state"] for a in of_rule(store, "silent")] == ["acknowledged"]

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
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port, rules=rules) as gw,
        publisher(mosquitto) as send,
    ):
        send("us-22", "state", us.seal(state("us-22", 1, "online")))
        send("us-22", "state", us.seal(state("us-22", 2, "offline")))
        alert = wait_for(lambda: of_rule(store, "offline"))[0]
        assert (alert["severity"], alert["state"], alert["message"]) == (
            "warning",
            "open",
            "ward-a/us-22 went offline",
        )
        # a watchdog round an hour on, far past silence_after: an offline device is not also
        # "silent"
        assert gw.alerts.check_silence(now=time.time() + 3600.0) == []
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
            db.execute(
                "INSERT INTO alerts (site, device, rule, severity, message, opened, "
                "updated) VALUES (?,?,?,?,?,?,?)",
                (SITE, "d1", "silent", "warning", "dup", 0.0, 0.0),
            )
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


# -- alerts by the bundle's rule, not by name ------------------------------------------------
PVC = EventRule(name="pvc_run", label="pvc", on=0.8, off=0.5, min_windows=2, severity="warning")
QUIET = EventRule(name="ectopic", label="pvc", on=0.8, off=0.5, alert=False)


def tracked(device: str, rules: list[EventRule], scores: list[float]) -> list[Envelope]:
    """The event messages the agent's own tracker makes of a score stream, as its outbox puts
    them in envelopes (the clear ``alert`` header on the start of an alerting event)."""
    tracker = EventTracker(rules, ["normal", "pvc"])
    bodies = []
    for i, pvc in enumerate(scores):
        bodies += tracker.update(i * 0.75, [1 - pvc, pvc], f"mitdb-106#{i}")
    bodies += tracker.finish()
    out = []
    for seq, body in enumerate(bodies, start=1):
        raising = body["alert"] is not False and body["state"] == "start"
        out.append(
            Envelope(
                "event",
                SITE,
                device,
                seq,
                time.time(),
                body,
                alert=body["event"] if raising else None,
            )
        )
    return out


def test_a_pvc_run_marked_alert_raises_an_alert_like_a_fall(  # type: ignore[no-untyped-def]
    mosquitto, sealer, opener, tmp_path: Path
) -> None:
    ecg = sealer("ecg-03")
    scores = [0.1, 0.9, 0.95, 0.9, 0.2, 0.1]
    events = tracked("ecg-03", [PVC, QUIET], scores)
    assert [(e.body["event"], e.body["state"]) for e in events] == [
        ("ectopic", "start"),
        ("pvc_run", "start"),
        ("pvc_run", "end"),
        ("ectopic", "end"),
    ]
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port) as gw,
        publisher(mosquitto) as send,
    ):
        for env in events:
            send("ecg-03", "event", ecg.seal(env))
        wait_for(lambda: gw.stats.stored == 4)
        [alert] = wait_for(lambda: list_alerts(store))
        assert (alert["rule"], alert["severity"], alert["state"]) == (
            "event:pvc_run",
            "warning",
            "open",
        ), "the bundle's severity, one alert per run"
        assert alert["message"] == "pvc_run on ward-a/ecg-03 (score 0.95)"
        assert alert["detail"]["severity_from"] == "bundle"
        assert alert["detail"]["input"] == ["mitdb-106#1", "mitdb-106#2"]
        assert store.result_count() == 4, "every event message is stored, alerting or not"


def test_a_relay_raises_from_the_clear_header(tmp_path: Path) -> None:
    """A relay that cannot read the body: the header's alert names the kind, the severity is
    the rules' default (or the site's rule for that kind)."""
    with Store(tmp_path / "s.sqlite") as store:
        engine = AlertEngine(store, AlertRules(events={"apnea": "info"}))
        sealed = Envelope("event", SITE, "r1", 1, time.time(), {}, alert="pvc_run")
        engine.on_envelope(sealed)
        engine.on_envelope(Envelope("event", SITE, "r1", 2, time.time(), {}, alert="apnea"))
        engine.on_envelope(Envelope("event", SITE, "r1", 3, time.time(), {}))  # no alert
        got = {a["rule"]: (a["severity"], a["detail"]["severity_from"]) for a in list_alerts(store)}
        assert got == {"event:pvc_run": ("critical", "default"), "event:apnea": ("info", "rule")}


RULES_YAML = """\
default_severity: warning
events:
  pvc_run: critical   # the site says a PVC run is critical, whatever the bundle says
  cough: ignore
silence_after: 2.5
offline_severity: info
"""


def test_configured_rules_change_severity_and_silence(tmp_path: Path) -> None:
    path = tmp_path / "alert-rules.yaml"
    path.write_text(RULES_YAML)
    rules = load_alert_rules(path, silence_after=30.0)
    assert rules.silence_after == 2.5 and rules.events == {"pvc_run": "critical", "cough": "ignore"}
    now = [1_000_000.0]
    with Store(tmp_path / "s.sqlite") as store:
        engine = AlertEngine(store, rules, clock=lambda: now[0])
        for env in tracked("ecg-04", [PVC], [0.9, 0.9, 0.1]):
            engine.on_envelope(env)
        cough = Envelope("event", SITE, "ecg-04", 9, now[0], {"event": "cough", "alert": True})
        assert engine.on_envelope(cough) is None, "a kind the site ignores is only recorded"
        unnamed = Envelope("event", SITE, "ecg-04", 10, now[0], {"event": "slump"})
        engine.on_envelope(unnamed)
        got = {a["rule"]: (a["severity"], a["detail"]["severity_from"]) for a in list_alerts(store)}
        assert got == {"event:pvc_run": ("critical", "rule"), "event:slump": ("warning", "default")}

        # silence after 2.5 s, not the default 30; offline at the configured severity
        store.set_state(SITE, "ecg-05", "online", now[0])
        with store.transaction() as db:  # heard at the test clock's now, not the wall clock's
            db.execute("UPDATE devices SET last_seen=? WHERE device='ecg-05'", (now[0],))
        engine.start().stop()  # records its rules and counts silence from now; no watchdog
        now[0] += 2.4
        assert engine.check_silence() == []
        now[0] += 0.2
        [silent] = engine.check_silence()
        assert next(a for a in list_alerts(store) if a["id"] == silent)["message"] == (
            "ward-a/ecg-05 silent for 2.5 s"
        )
        engine.on_envelope(state("ecg-05", 1, "offline"))
        assert of_rule(store, "offline")[0]["severity"] == "info"
        assert current_rules(store) is not None
        assert current_rules(store)["silence_after"] == 2.5  # type: ignore[index]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("events: {fall: urgent}\n", "events.fall"),
        ("silence: 3\n", "silence: Extra inputs are not permitted"),
        ("events: {fall: off}\n", "events.fall"),  # YAML's off is false: say ignore
        ("silence_after: -1\n", "silence_after"),
        ("silence_after: '30'\n", "silence_after"),
        ("- fall\n", "must be a mapping"),
        ("events: {\n", "not valid YAML"),
    ],
)
def test_a_bad_rules_file_is_refused_by_name(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(AlertError, match=message) as exc:
        load_alert_rules(path)
    assert "\n" not in str(exc.value)


def test_the_dashboard_shows_the_rules_the_gateway_recorded(tmp_path: Path) -> None:
    import http.client

    with Store(tmp_path / "s.sqlite") as store:
        with DashboardServer(store.path, port=0, allow_anonymous=True) as dash:

            def rules() -> Any:
                conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=5)
                try:
                    conn.request("GET", "/api/alert-rules")
                    response = conn.getresponse()
                    assert response.status == 200
                    return json.loads(response.read())["rules"]
                finally:
                    conn.close()

            assert rules() is None
            first = AlertRules(events={"pvc_run": "warning"}, silence_after=12.0)
            assert record_rules(store, first, now=100.0)
            assert not record_rules(store, first, now=200.0), "unchanged: not recorded again"
            shown = rules()
            assert shown == {**first.as_dict(), "recorded": 100.0}
            assert record_rules(store, AlertRules(), now=300.0)
            assert rules()["events"] == {} and rules()["recorded"] == 300.0
        assert len(store.audit("alert-rules")) == 2
