"""The MQTT sensor source against a real Mosquitto: a wearable publishes real WISDM 2019
smartwatch samples on medge/v1/<site>/<device>/sensor/<name>; the agent subscribes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from paho.mqtt import client as mqtt
from waiting import within

from edge_agent.bundle import WindowSpec
from edge_agent.errors import SourceError
from edge_agent.sources import MqttSensorSettings, MqttSensorSource, open_source
from edge_agent.sources.mqtt import parse_payload, sensor_topic
from edge_agent.window import WindowedSource
from gateway.broker import RunningBroker

DATA = Path(__file__).parent / "data" / "imu"
DE = DATA / "1601_gyro_DE.txt"  # 100 rows sitting (D) then 100 standing (E); clock +35.8 s


def rows() -> list[list[str]]:
    return [r.rstrip(";").split(",") for r in DE.read_text().splitlines()]


def settings(broker: RunningBroker, sensor: str, **kw: Any) -> MqttSensorSettings:
    return MqttSensorSettings(
        host=broker.host,
        port=broker.port,
        site="ward-a",
        device="wrist-01",
        sensor=sensor,
        idle_timeout_s=1.0,
        **kw,
    )


def publish(
    broker: RunningBroker, topic: str, payloads: list[bytes], protocol: int = mqtt.MQTTv5
) -> None:
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        for p in payloads:
            pub.publish(topic, p, qos=1).wait_for_publish(timeout=10)
    finally:
        pub.disconnect()
        pub.loop_stop()


def subscribed(src: MqttSensorSource) -> MqttSensorSource:
    src.open()
    assert src.subscribed.wait(10), "no SUBACK"
    return src


def test_topic_of_a_sensor() -> None:
    assert sensor_topic("ward-a", "wrist-01", "gyro") == "medge/v1/ward-a/wrist-01/sensor/gyro"
    with pytest.raises(Exception, match="sensor name 'a/b' must be"):
        sensor_topic("ward-a", "wrist-01", "a/b")


def test_one_sample_a_message_from_a_real_recording(mosquitto: RunningBroker) -> None:
    payloads = []
    for i, f in enumerate(rows()):
        if i in (30, 31, 77):  # never published: lost
            continue
        values = [float(v) for v in f[3:6]]
        if i == 50:
            values[1] = float("nan")
        obj = {"seq": i, "t": int(f[2]) / 1e9, "values": values, "label": "DE".index(f[1])}
        payloads.append(b"{broken" if i == 60 else json.dumps(obj).encode())
    src = subscribed(MqttSensorSource(settings(mosquitto, "gyro", rate_hz=20)))
    threading.Thread(target=publish, args=(mosquitto, src.topic, payloads), daemon=True).start()
    out = list(src.stream(threading.Event()))
    assert len(out) == 200 - 3 - 2
    assert src.errors == {"lost": 3 + 1, "nan": 1, "malformed": 1, "gap": 1}  # 60 is lost too
    assert [s.meta["seq"] for s in out if s.meta.get("gap")] == [100]  # the 35.8 s gap
    assert [s.label for s in out].count(1) == 100
    np.testing.assert_allclose(out[0].data, [float(v) for v in rows()[0][3:6]], rtol=1e-6)
    assert out[0].time == pytest.approx(int(rows()[0][2]) / 1e9)  # the wearable's clock


def test_compact_batches_windowed_as_the_manifest_says(mosquitto: RunningBroker) -> None:
    r = rows()[:100]  # sitting, 20 Hz
    vals = [[float(v) for v in f[3:6]] for f in r]
    times = [int(f[2]) / 1e9 for f in r]
    payloads = [
        json.dumps({"seq": i, "t0": times[i], "dt": 0.05, "values": vals[i : i + 25]}).encode()
        if i < 50
        else json.dumps({"seq": i, "t": times[i : i + 25], "values": vals[i : i + 25]}).encode()
        for i in range(0, 100, 25)
    ]
    payloads.insert(2, json.dumps({"t0": 1.0, "dt": 0.05, "values": [[1, 2]]}).encode())
    cfg = settings(mosquitto, "gyro-batch", rate_hz=20)
    src = open_source(cfg, WindowSpec(length=40, hop=20, rate_hz=20, label="majority"))
    assert isinstance(src, WindowedSource) and isinstance(src.inner, MqttSensorSource)
    subscribed(src.inner)
    threading.Thread(
        target=publish, args=(mosquitto, src.inner.topic, payloads), daemon=True
    ).start()
    out = list(src.stream(threading.Event()))
    assert len(out) == 1 + (100 - 40) // 20 and out[0].data.shape == (40, 3)
    assert src.errors == {"malformed": 1}
    np.testing.assert_allclose(out[-1].data[-1], vals[99], rtol=1e-6)
    assert out[1].time == pytest.approx(times[0] + 20 * 0.05)  # t0 + i * dt
    with pytest.raises(
        SourceError,
        match="source rate 20 Hz does not match the model's window "
        r"rate_hz 50 Hz",
    ):
        open_source(cfg, WindowSpec(length=40, hop=20, rate_hz=50))


def test_a_full_queue_pushes_back_then_counts_overflow(mosquitto: RunningBroker) -> None:
    r = rows()[:60]
    msgs = [
        json.dumps({"seq": i, "values": [float(v) for v in f[3:6]]}).encode()
        for i, f in enumerate(r)
    ]
    # back-pressure: a queue of 4 and a slow reader lose nothing
    src = subscribed(MqttSensorSource(settings(mosquitto, "slow", queue=4, block_s=10)))
    threading.Thread(target=publish, args=(mosquitto, src.topic, msgs), daemon=True).start()
    got = []
    for s in src.stream(threading.Event()):
        got.append(s)
        time.sleep(0.005)
    assert len(got) == 60 and src.errors == {}
    # a reader that does not read at all: after block_s, what does not fit is dropped, counted
    src = subscribed(MqttSensorSource(settings(mosquitto, "stuck", queue=4, block_s=0.05)))
    publish(mosquitto, src.topic, msgs[:20])
    within(lambda: src.errors.get("overflow", 0) >= 16, 10)
    out = list(src.stream(threading.Event()))
    assert [s.meta["seq"] for s in out] == [0, 1, 2, 3] and src.errors == {"overflow": 16}


def test_over_mqtt_3_1_1_on_the_embedded_broker(embedded_broker: RunningBroker) -> None:
    r = rows()[:30]
    msgs = [
        json.dumps({"seq": i, "t": int(f[2]) / 1e9, "values": [float(v) for v in f[3:6]]}).encode()
        for i, f in enumerate(r)
    ]
    cfg = settings(embedded_broker, "gyro", protocol="3.1.1", rate_hz=20)
    src = subscribed(MqttSensorSource(cfg))
    threading.Thread(
        target=publish, args=(embedded_broker, src.topic, msgs, mqtt.MQTTv311), daemon=True
    ).start()
    out = list(src.stream(threading.Event()))
    assert [s.meta["seq"] for s in out] == list(range(30)) and src.errors == {}


def test_parse_payload_forms() -> None:
    one = parse_payload(b'{"t": 1.5, "values": [1, 2, 3], "seq": 7}', "json", ["x", "y", "z"])
    assert [(v.tolist(), t, s) for v, t, _, s in one] == [([1.0, 2.0, 3.0], 1.5, 7)]
    listed = parse_payload(
        b'[{"x": 1, "y": 2, "z": 3}, {"x": 4, "y": 5, "z": 6}]', "json", ["x", "y", "z"]
    )
    assert [v.tolist() for v, *_ in listed] == [[1, 2, 3], [4, 5, 6]]
    csv = parse_payload(b"0.1,1,2,3\n0.2,4,5,6\n", "csv", ["x", "y", "z"], csv_time=True)
    assert [t for _, t, _, _ in csv] == [0.1, 0.2]
    for bad in (b"[1, 2]", b'{"values": [[1, 2, 3]], "t": [1, 2]}', b'"x"'):
        with pytest.raises((ValueError, KeyError, TypeError)):
            parse_payload(bad, "json", ["x", "y", "z"])
