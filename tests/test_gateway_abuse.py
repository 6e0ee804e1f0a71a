"""The gateway under abuse, against real Mosquitto processes: a flooding device is limited
while the others are served (and loses nothing: what is limited is never acknowledged, so its
outbox resends it), oversized messages are refused by the gateway and, with the broker-config
limits, by the broker first; malformed messages, unknown devices and wrong keys each get a
counted reason and one log line naming the device."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_for

from edge_agent.envelope import MAX_BYTES, Envelope, Sealer
from edge_agent.identity import DEVICE_CERT, DEVICE_KEY, SITE_CA, DeviceIdentity
from edge_agent.link import DeviceLink
from edge_agent.outbox import Outbox
from edge_agent.topics import topic
from gateway import Gateway, Store
from gateway.broker import RunningBroker, free_port, start_mosquitto_conf
from gateway.broker_config import MAX_PACKET_BYTES, gateway_client_files, write_broker_config
from gateway.site import init_site, opener_for, provision_device, write_recipient

SITE = "ward-a"


def _rejected(gw: Gateway, reason: str) -> float:
    return (
        gw.metrics.registry.get_sample_value(
            "medge_gateway_messages_rejected_total", {"reason": reason}
        )
        or 0.0
    )


@contextmanager
def _device(
    tmp: Path,
    broker: RunningBroker,
    ident: Path,
    device: str,
    tls: bool = False,
    pace: bool = True,
) -> Iterator[tuple[Outbox, DeviceLink]]:
    """A device as its agent runs it: sealed results in a disk outbox, deleted only on the
    gateway's ack, resent after 0.5 s without one. ``pace`` False: a device that ignores the
    flood limit the gateway announces (an older agent, or a faulty one)."""
    idn = DeviceIdentity.load(ident, SITE, device)
    epochs = itertools.count(1)
    box = Outbox(tmp / f"{device}.outbox.sqlite", SITE, device)
    box.sealer = Sealer(SITE, device, idn.key, idn.recipient, lambda: next(epochs))
    files = (ident / SITE_CA, ident / DEVICE_CERT, ident / DEVICE_KEY) if tls else None
    link = DeviceLink(box, broker.host, broker.port, resend_after=0.5, tls=files, pace=pace)
    with box, link:
        assert link.wait_connected(10)
        yield box, link


def _put(box: Outbox, link: DeviceLink, n: int) -> list[int]:
    seqs = [
        box.put("result", {"input": f"s#{i}", "pred": 1, "scores": [0.2, 0.8]}).seq
        for i in range(n)
    ]
    link.notify()
    return seqs


def _seqs(store: Store, device: str) -> list[int]:
    return [r["seq"] for r in store.results(limit=100_000, device=device)]


def _lines(caplog: pytest.LogCaptureFixture, *needles: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("medge.gateway") and all(n in r.getMessage() for n in needles)
    ]


def test_a_flooding_device_is_limited_and_loses_nothing_while_others_are_served(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    mosquitto: RunningBroker,
    site_dir: Path,
    identity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="medge.gateway")
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(
            store,
            opener_for(site_dir),
            mosquitto.host,
            mosquitto.port,
            device_rate=40,
            device_burst=20,
        ) as gw,
        _device(tmp_path, mosquitto, identity("ab-flood"), "ab-flood", pace=False) as (
            fbox,
            flink,
        ),
        _device(tmp_path, mosquitto, identity("ab-calm"), "ab-calm") as (cbox, clink),
    ):
        flood = _put(fbox, flink, 300)  # at once: far over 40/s with a burst of 20
        wait_for(lambda: gw.stats.rate_limited > 50, 20, "the flood to hit the limit")
        calm = []
        for _ in range(10):  # a calm device, 5 results a second, during the flood
            calm += _put(cbox, clink, 1)
            time.sleep(0.2)
        assert clink.drain(10), "the calm device is served during the flood"
        assert sorted(_seqs(store, "ab-calm")) == calm
        assert fbox.depth() > 0, "the flood is not through yet"
        assert flink.drain(60), "every limited result is resent by the outbox and stored"
        assert sorted(_seqs(store, "ab-flood")) == flood, "each flood result once"
        assert gw.stats.rate_limited == _rejected(gw, "rate_limit") > 50
        assert gw.stats.rejected == gw.stats.rate_limited, "nothing else was refused"
    limited = _lines(caplog, "rate limit")
    assert 1 <= len(limited) <= 2, "one line per device and 10 s, not one per message"
    assert all("ward-a/ab-flood" in line for line in limited)
    assert "not acknowledged" in limited[0] or "unacknowledged" in limited[0]


def test_state_is_never_rate_limited(
    sealer,
    opener,
    mosquitto: RunningBroker,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    s = sealer("ab-state")
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port, device_rate=1, device_burst=1) as gw,
    ):
        c.connect(mosquitto.host, mosquitto.port)
        c.loop_start()
        try:
            for seq, kind in enumerate(["telemetry", "telemetry", "state"], start=1):
                body = {"state": "online"} if kind == "state" else {"fps": 1.0}
                env = Envelope(kind, SITE, "ab-state", seq, time.time(), body)
                c.publish(topic(SITE, "ab-state", kind), s.seal(env), qos=1).wait_for_publish(5)
            wait_for(lambda: gw.stats.received == 3, 10, "three messages")
        finally:
            c.disconnect()
            c.loop_stop()
        assert gw.stats.rate_limited == 1, "the second telemetry is over 1/s, burst 1"
        wait_for(lambda: store.devices() and store.devices()[0]["state"] == "online", 5, "state")


def _raw_publish(broker: RunningBroker, items: list[tuple[str, bytes]]) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        for t, payload in items:
            c.publish(t, payload, qos=1).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def test_oversized_message_through_the_broker_is_rejected_counted_and_logged(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto: RunningBroker, opener, caplog: pytest.LogCaptureFixture
) -> None:
    """The test broker has no size limit: the gateway itself refuses, before any crypto."""
    caplog.set_level(logging.WARNING, logger="medge.gateway")
    big = b"{" + b" " * (300 * 1024) + b"}"
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port) as gw,
    ):
        _raw_publish(mosquitto, [(topic(SITE, "ab-big", "result"), big)])
        wait_for(lambda: gw.stats.rejected == 1, 10, "the rejection")
        assert _rejected(gw, "size") == 1
        assert store.result_count() == 0
    lines = _lines(caplog, "ab-big")
    assert len(lines) == 1 and f"exceeds {MAX_BYTES}" in lines[0]


def test_bad_input_each_has_a_reason_and_one_line_naming_the_device(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    mosquitto: RunningBroker,
    site_dir: Path,
    identity,
    sealer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="medge.gateway")
    now = time.time()
    good = DeviceIdentity.load(identity("ab-good"), SITE, "ab-good")
    # an unknown device: a key the site never certified, sealed to the right gateway key
    stranger = Sealer(
        SITE, "ab-stranger", ec.generate_private_key(ec.SECP256R1()), good.recipient, lambda: 1
    )
    # a wrong key: a registered device sealing to a key that is not the gateway's
    other = write_recipient(tmp_path / "other.json")
    wrong = DeviceIdentity.load(
        provision_device(site_dir, "ab-wrongkey", tmp_path / "wk", recipient=other),
        SITE,
        "ab-wrongkey",
    )
    wrong_sealer = Sealer(SITE, "ab-wrongkey", wrong.key, wrong.recipient, lambda: 1)

    def sealed(s: Sealer, device: str) -> bytes:
        return s.seal(Envelope("result", SITE, device, 1, now, {"pred": 0}))

    sends = {
        "ab-garbage": (b"\x00\x01 not json", "malformed"),
        "ab-stranger": (sealed(stranger, "ab-stranger"), "device"),
        "ab-wrongkey": (sealed(wrong_sealer, "ab-wrongkey"), "unknown_key"),
    }
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener_for(site_dir), mosquitto.host, mosquitto.port) as gw,
    ):
        _raw_publish(mosquitto, [(topic(SITE, d, "result"), p) for d, (p, _) in sends.items()])
        wait_for(lambda: gw.stats.rejected == len(sends), 10, "three rejections")
        for device, (_, reason) in sends.items():
            assert _rejected(gw, reason) == 1, (device, reason)
            assert len(_lines(caplog, f"{SITE}/{device}")) == 1, device
        assert store.result_count() == 0
        audit = store.audit("reject")
        assert {a["device"] for a in audit} == set(sends)


def test_broker_config_stops_oversized_messages_before_the_gateway(  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    init_site(site, SITE)
    port = free_port()
    files = write_broker_config(site, tmp_path / "broker", port=port)
    conf = files.conf.read_text()
    assert f"message_size_limit {MAX_BYTES}\n" in conf
    assert f"max_packet_size {MAX_PACKET_BYTES}\n" in conf
    ident = provision_device(site, "ab-big", tmp_path / "id")
    idn = DeviceIdentity.load(ident, SITE, "ab-big")
    sealer = Sealer(SITE, "ab-big", idn.key, idn.recipient, lambda: 1)
    t = topic(SITE, "ab-big", "result")

    def client() -> tuple[mqtt.Client, dict[str, Any]]:
        seen: dict[str, Any] = {"pubacks": {}, "disconnects": []}
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.tls_set(
            ca_certs=str(ident / SITE_CA),
            certfile=str(ident / DEVICE_CERT),
            keyfile=str(ident / DEVICE_KEY),
        )
        c.on_publish = lambda _c, _u, mid, rc, _p=None: seen["pubacks"].__setitem__(mid, rc)
        c.on_disconnect = lambda _c, _u, _f, rc, _p=None: seen["disconnects"].append(rc)
        c.connect(broker.host, broker.port)
        c.loop_start()
        wait_for(c.is_connected, 10, "the device to connect")
        return c, seen

    def refused(payload: bytes) -> None:
        """Published once: the broker refuses it (a failing PUBACK or a disconnect)."""
        c, seen = client()
        try:
            info = c.publish(t, payload, qos=1)
            wait_for(
                lambda: (
                    bool(seen["disconnects"])
                    or (info.mid in seen["pubacks"] and seen["pubacks"][info.mid].is_failure)
                ),
                10,
                "the broker to refuse the message",
            )
        finally:
            c.disconnect()
            c.loop_stop()

    with (
        start_mosquitto_conf(files.conf, "127.0.0.1", port) as broker,
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(
            store, opener_for(site), broker.host, broker.port, tls=gateway_client_files(site)
        ) as gw,
    ):

        def good(seq: int) -> None:
            c, _ = client()
            try:
                env = Envelope("result", SITE, "ab-big", seq, time.time(), {"pred": 1})
                c.publish(t, sealer.seal(env), qos=1).wait_for_publish(10)
                wait_for(lambda: store.result_count() == seq, 10, f"good result {seq}")
            finally:
                c.disconnect()
                c.loop_stop()

        good(1)
        refused(b"x" * (MAX_BYTES + 1))  # over message_size_limit
        refused(b"x" * (MAX_PACKET_BYTES + 1))  # over max_packet_size
        # A good result published after both refusals reaches the gateway after anything the
        # broker had taken before it: once it is stored, nothing oversized is still on its way.
        good(2)
        assert (gw.stats.received, gw.stats.rejected) == (2, 0), "nothing oversized got through"
        log = tmp_path / "broker" / "mosquitto.log"
        wait_for(lambda: "oversize packet" in log.read_text(), 5, "the broker to log it")


def test_a_bad_cam_is_dropped_and_counted_the_result_kept(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto: RunningBroker, sealer, opener, caplog: pytest.LogCaptureFixture
) -> None:
    import base64
    import json

    caplog.set_level(logging.WARNING, logger="medge.gateway")
    s = sealer("ab-cam")
    png = base64.b64encode(
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
        + (8).to_bytes(4, "big") * 2
        + b"\x08\x00\x00\x00\x00"
    ).decode()
    cams = {
        1: {"png": png, "label": "benign"},
        2: {"png": "PHN2Zz4=", "label": "svg"},
        3: {"png": "A" * 40_000},
    }
    items = [
        (
            topic(SITE, "ab-cam", "result"),
            s.seal(Envelope("result", SITE, "ab-cam", seq, time.time(), {"pred": 1, "cam": cam})),
        )
        for seq, cam in cams.items()
    ]
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port) as gw,
    ):
        _raw_publish(mosquitto, items)
        wait_for(lambda: store.result_count() == 3, 10, "three results")
        bodies = {
            r["seq"]: json.loads(r["body"]) for r in store.query("SELECT seq, body FROM results")
        }
        assert bodies[1]["cam"] == cams[1], "a small PNG is kept"
        assert "cam" not in bodies[2] and "cam" not in bodies[3]
        assert bodies[2]["pred"] == 1, "the result itself is stored"
        dropped = {
            r: gw.metrics.registry.get_sample_value(
                "medge_gateway_cam_dropped_total", {"reason": r}
            )
            for r in ("not_png", "too_large")
        }
        assert dropped == {"not_png": 1, "too_large": 1}
        assert gw.stats.rejected == 0
    assert len(_lines(caplog, "CAM", "ward-a/ab-cam")) == 2


def test_device_limiter_token_bucket() -> None:
    from gateway.service import DeviceLimiter

    now = [0.0]
    lim = DeviceLimiter(rate=10, burst=5, clock=lambda: now[0])
    assert [lim.allow(SITE, "a") for _ in range(6)] == [True] * 5 + [False]
    assert lim.allow(SITE, "b"), "each device has its own bucket"
    now[0] = 0.1  # one token back after 1/rate s
    assert lim.allow(SITE, "a") and not lim.allow(SITE, "a")
    now[0] = 100.0
    assert sum(lim.allow(SITE, "a") for _ in range(20)) == 5, "never more than the burst"
    lim.max_keys = 3
    for d in ("c", "d", "e"):
        lim.allow(SITE, d)
    now[0] = 101.0  # every bucket has refilled: forgotten, losing nothing
    lim.allow(SITE, "f")
    assert len(lim._buckets) == 1
    off = DeviceLimiter(rate=0, burst=1)
    assert all(off.allow(SITE, "a") for _ in range(1000))
