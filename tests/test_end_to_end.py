"""The whole chain against real brokers: every image sent is stored exactly once."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_for, within

from edge_agent import Agent, AgentConfig, Bundle, LoadedModel
from edge_agent.envelope import Envelope, decode_ack
from edge_agent.topics import topic
from gateway import Gateway, Store
from gateway.alerts import list_alerts
from gateway.broker import RunningBroker
from models import breast_cnn

pytestmark = pytest.mark.slow


def _config(
    bundle: Path, broker: RunningBroker, tmp: Path, identity: Path, **source: object
) -> AgentConfig:
    return AgentConfig(
        site="ward-a",
        device="us-01",
        bundle=bundle,
        identity=identity,
        broker={"host": broker.host, "port": broker.port, "protocol": broker.protocol},
        source={"path": breast_cnn.DATA, "split": "val", "rate_hz": 0, **source},
        outbox={"path": tmp / "outbox.sqlite", "resend_after_s": 0.5},
        telemetry_interval_s=0.2,
    )


def _expected(bundle: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    with np.load(breast_cnn.DATA) as d:
        x, y = d["val_images"], d["val_labels"].astype(int)
    model = LoadedModel(Bundle.load(bundle))
    return x, y, [model.predict(s).pred for s in x]


def _check_exactly_once(store: Store, bundle: Path) -> None:
    x, y, preds = _expected(bundle)
    bundle_id = Bundle.load(bundle).id
    rows = store.results(limit=1000)
    assert len(rows) == len(y) == 78
    assert len({r["seq"] for r in rows}) == 78, "no (device, seq) stored twice"
    by_index = {int(r["input"].rsplit("#", 1)[1]): r for r in rows}
    assert sorted(by_index) == list(range(78)), "every image arrived"
    for i, r in by_index.items():
        assert r["label"] == y[i], f"image {i}: ground truth"
        assert r["pred"] == preds[i], f"image {i}: prediction equals the device's model"
        assert r["label_name"] == breast_cnn.CLASS_NAMES[y[i]]
        assert r["pred_label"] == breast_cnn.CLASS_NAMES[preds[i]]
        # audit: each stored result names the exact bundle and input behind it
        assert r["bundle"] == bundle_id
        assert r["input_sha256"] == hashlib.sha256(x[i].tobytes()).hexdigest()


@pytest.mark.parametrize("broker_fixture", ["mosquitto", "embedded_broker"])
def test_every_image_is_stored_exactly_once(  # type: ignore[no-untyped-def]
    bundle_dir: Path,
    tmp_path: Path,
    broker_fixture: str,
    request: pytest.FixtureRequest,
    identity,
    opener,
) -> None:
    broker: RunningBroker = request.getfixturevalue(broker_fixture)
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, broker.host, broker.port, broker.protocol) as gw,
    ):
        cfg = _config(bundle_dir, broker, tmp_path, identity("us-01"))
        report = Agent(cfg).run(threading.Event())
        assert (report.sent, report.acked, report.pending) == (78, 78, 0)
        _check_exactly_once(store, bundle_dir)
        assert gw.stats.rejected == 0
        within(lambda: store.devices()[0]["state"] == "stopped", 5)
        dev = store.devices()[0]
        assert dev["state"] == "stopped", "a clean stop is announced on the retained state topic"
        assert list_alerts(store) == [], "a device stopped on purpose is not an alert"
        assert dev["bundle"] == Bundle.load(bundle_dir).id
        assert dev["telemetry"]["results"] == 78 and dev["telemetry"]["outbox_depth"] == 0


def test_results_wait_in_the_outbox_until_a_gateway_stores_them(  # type: ignore[no-untyped-def]
    bundle_dir: Path, tmp_path: Path, mosquitto: RunningBroker, identity, opener
) -> None:
    """The broker takes every message (PUBACK) while no gateway listens; none is deleted
    until the gateway, started later, acknowledges it."""
    agent = Agent(_config(bundle_dir, mosquitto, tmp_path, identity("us-01")))
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(agent.run(threading.Event(), 30.0)))
    t.start()
    from edge_agent.outbox import Outbox

    with Outbox(tmp_path / "outbox.sqlite", "ward-a", "us-01") as box:

        def attempts() -> list[int]:  # of each message the outbox holds, as it is on disk
            return [p.attempts for p in box.due(0.0, limit=1000)]

        # Every result is sent, taken by the broker, and sent again resend_after_s later:
        # the outbox keeps all 78, since nothing is acknowledged while no gateway runs.
        wait_for(
            lambda: len(attempts()) == 78 and min(attempts()) >= 2,
            20,
            lambda: f"78 results each sent twice; attempts: {attempts()}",
        )
    assert agent.sent == 78
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port),
    ):
        t.join(timeout=40)
        assert result and result[0].pending == 0  # type: ignore[attr-defined]
        _check_exactly_once(store, bundle_dir)


def test_duplicates_are_acked_not_stored_and_bad_messages_rejected(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto: RunningBroker, sealer, opener
) -> None:
    acks: list[int] = []

    def on_message(_c, _u, msg):  # type: ignore[no-untyped-def]
        acks.extend(decode_ack(msg.payload))

    s09, s08 = sealer("us-09"), sealer("us-08")
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port) as gw,
    ):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.on_message = on_message
        c.connect(mosquitto.host, mosquitto.port)
        c.loop_start()
        subacked: list[object] = []
        c.on_subscribe = lambda *_: subacked.append(True)
        c.subscribe(topic("ward-a", "us-09", "ack"), qos=1)
        wait_for(lambda: subacked, 5, "the SUBACK")

        def send(t: str, payload: bytes) -> None:
            c.publish(t, payload, qos=1).wait_for_publish(5)

        t_result = topic("ward-a", "us-09", "result")
        env = Envelope("result", "ward-a", "us-09", 42, time.time(), {"pred": 1, "label": 1})
        sealed = s09.seal(env)
        for _ in range(2):  # the second is what a device resends when an ack was lost
            send(t_result, sealed)
        now = time.time()
        send(t_result, b"\x00garbage")
        send(t_result, s08.seal(Envelope("result", "ward-a", "us-08", 1, now, {})))  # topic swap
        send(topic("ward-a", "us-09", "event"), sealed)  # kind of the topic != header
        state = topic("ward-a", "us-09", "state")
        send(state, s09.seal(Envelope("state", "ward-a", "us-09", 50, now, {"state": "online"})))
        send(state, s09.seal(Envelope("state", "ward-a", "us-09", 49, now, {"state": "offline"})))
        send(
            state,
            s09.seal(Envelope("state", "ward-a", "us-09", 51, now + 3600, {"state": "online"})),
        )  # from the future
        within(lambda: len(acks) >= 2 and gw.stats.rejected >= 5, 5)
        c.disconnect()
        c.loop_stop()
        assert acks == [42, 42], "the resend is acknowledged again: its first ack may be lost"
        assert store.result_count() == 1
        dev = next(d for d in store.devices() if d["device"] == "us-09")
        assert (dev["stored"], dev["duplicates"], dev["rejected"]) == (1, 1, 5)
        assert dev["state"] == "online", "a replayed older 'offline' must not win"
        assert (gw.stats.stored, gw.stats.duplicates, gw.stats.rejected) == (1, 1, 5)
        # the audit keeps the reason code, never the (untrusted) text, one row per device,
        # reason and 10 s: the second header_mismatch is counted above, not audited again
        reasons = sorted(a["detail"] for a in store.audit("reject"))
        assert reasons == ["clock", "header_mismatch", "malformed", "replay"]
        assert "us-08" not in {d["device"] for d in store.devices()}


def test_the_agent_runs_the_onnx_int8_artifact_too(  # type: ignore[no-untyped-def]
    bundle_dir: Path, tmp_path: Path, mosquitto: RunningBroker, identity, opener
) -> None:
    cfg = _config(bundle_dir, mosquitto, tmp_path, identity("us-01"), limit=20)
    cfg = cfg.model_copy(update={"runtime": "onnx", "precision": "int8"})
    agent = Agent(cfg)
    assert agent.model.artifact.file == "model_int8.onnx"
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port),
    ):
        assert agent.run(threading.Event()).acked == 20
        rows = store.results(limit=100)
    with np.load(breast_cnn.DATA) as d:
        x = d["val_images"][:20]
    onnx = LoadedModel(Bundle.load(bundle_dir), "onnx", precision="int8")
    want = {f"breastmnist_dev:val#{i}": onnx.predict(s).pred for i, s in enumerate(x)}
    assert {r["input"]: r["pred"] for r in rows} == want


def test_kill_9_loses_nothing_and_the_last_will_says_offline(  # type: ignore[no-untyped-def]
    bundle_dir: Path, tmp_path: Path, mosquitto: RunningBroker, identity, opener
) -> None:
    """The agent process is SIGKILLed mid-stream: the broker publishes its Last Will, the
    gateway marks it offline; restarted on the same outbox, it delivers what was not yet
    acknowledged, and the store holds each result exactly once."""
    import signal
    import sqlite3
    import subprocess
    import sys

    config = tmp_path / "agent.yaml"
    config.write_text(
        f"site: ward-a\ndevice: us-30\nbundle: {bundle_dir}\nidentity: {identity('us-30')}\n"
        f"broker: {{host: {mosquitto.host}, port: {mosquitto.port}}}\n"
        f"source: {{path: {breast_cnn.DATA}, split: val, rate_hz: 40, loop: true}}\n"
        f"outbox: {{path: {tmp_path / 'outbox.sqlite'}, resend_after_s: 0.5}}\n"
    )
    run = [sys.executable, "-m", "medge", "agent", "run", "--config", str(config)]
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port),
    ):
        proc = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def state() -> str | None:
            devs = [d for d in store.devices() if d["device"] == "us-30"]
            return devs[0]["state"] if devs else None

        within(lambda: state() == "online" and store.result_count() >= 20, 30)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        within(lambda: state() == "offline", 10)
        assert state() == "offline", "the Last Will reached the gateway"
        stored = {r["seq"] for r in store.results(limit=100_000)}
        with sqlite3.connect(tmp_path / "outbox.sqlite") as db:
            pending = {s for (s,) in db.execute("SELECT seq FROM outbox")}
        assert stored, "some results were stored before the kill"
        # restart on the same outbox: one more image, and everything still pending
        config.write_text(config.read_text().replace("loop: true", "limit: 1"))
        r = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr[-2000:]
        rows = store.results(limit=100_000)
        seqs = [row["seq"] for row in rows]
        assert len(seqs) == len(set(seqs)), "nothing stored twice"
        assert stored | pending <= set(seqs), "nothing lost"
        assert len(seqs) == len(stored | pending) + 1
        within(lambda: state() == "stopped", 10)
        assert state() == "stopped"  # the clean stop of the second run


def test_end_to_end_mode_through_the_chain(  # type: ignore[no-untyped-def]
    bundle_dir: Path, tmp_path: Path, mosquitto: RunningBroker, site_dir: Path
) -> None:
    """Devices seal to the cloud's key; the fog gateway stores, deduplicates and acknowledges
    without reading a single body; the cloud key opens every kept message."""
    from edge_agent.envelope import Opener
    from edge_agent.keys import load_recipient
    from gateway.site import DeviceRegistry, opener_for, provision_device, write_recipient

    cloud_pub = write_recipient(tmp_path / "cloud.json")
    ident = provision_device(site_dir, "us-40", tmp_path / "id", recipient=cloud_pub)
    cfg = _config(bundle_dir, mosquitto, tmp_path, ident, limit=20)
    cfg = cfg.model_copy(update={"device": "us-40", "end_to_end": True})
    relay = opener_for(site_dir, relay_for=(cloud_pub,))
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, relay, mosquitto.host, mosquitto.port) as gw,
    ):
        report = Agent(cfg).run(threading.Event())
        assert (report.sent, report.acked, report.pending) == (20, 20, 0)
        assert gw.stats.rejected == 0
        rows = store.results(limit=100)
        kept = store.sealed_results()
    assert len(rows) == 20 and all(r["pred"] is None for r in rows), "the relay read nothing"
    cloud = Opener([load_recipient(tmp_path / "cloud.json")], DeviceRegistry(site_dir).key_for)
    opened = [cloud.open(payload) for _, payload in kept]
    assert sorted(e.seq for e in opened) == sorted(r["seq"] for r in rows)
    _, _, preds = _expected(bundle_dir)
    for e in opened:
        i = int(e.body["input"].rsplit("#", 1)[1])
        assert e.body["pred"] == preds[i]
