"""The device link against real brokers: jittered reconnects, subscriptions that come back
after a broker restart on the same port, and MQTT 5 with a fall back to 3.1.1."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from waiting import wait_for

from edge_agent.link import DeviceLink, backoff_delay
from edge_agent.outbox import Outbox
from gateway import Gateway, Store
from gateway.broker import RunningBroker, start_broker
from gateway.ota import publish_command

SITE = "ward-a"


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (3, 4.0), (6, 30.0), (200, 30.0)]:
        draws = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(400)]
        assert all(0.0 <= d <= ceiling for d in draws), attempt
        # spread over the whole range, not bunched at the ceiling like plain doubling
        assert min(draws) < 0.1 * ceiling and max(draws) > 0.9 * ceiling, attempt
        assert 0.4 * ceiling < sum(draws) / len(draws) < 0.6 * ceiling, attempt


def test_subscriptions_come_back_after_a_broker_restart_on_the_same_port(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto: RunningBroker, sealer, opener
) -> None:
    device = "link-01"
    with Outbox(tmp_path / "o.sqlite", SITE, device) as box:
        box.sealer = sealer(device)
        commands: list[bytes] = []
        link = DeviceLink(
            box, mosquitto.host, mosquitto.port, reconnect_min_s=0.1, reconnect_max_s=0.5
        )
        link.on_command = commands.append
        with link:
            assert link.wait_connected(10)
            with (
                Store(tmp_path / "gw1.sqlite") as store,
                Gateway(store, opener, mosquitto.host, mosquitto.port),
            ):
                box.put("result", {"i": 0})
                link.notify()
                wait_for(lambda: link.acked == 1, 20, "ack before the restart")
            mosquitto.kill()
            wait_for(lambda: not link.connected, 20, "the link to see the broker gone")
            box.put("result", {"i": 1})  # waits in the outbox while the broker is away
            # a few attempts against the closed port, each refused, the link still trying
            wait_for(lambda: link.connect_failures >= 3, 20, "attempts against a closed port")
            assert not link.connected and link.connects == 1
            with (
                start_broker("mosquitto", mosquitto.host, mosquitto.port) as again,
                Store(tmp_path / "gw2.sqlite") as store,
                Gateway(store, opener, again.host, again.port),
            ):
                wait_for(lambda: link.connects == 2, 20, "reconnected on its own")
                wait_for(lambda: link.acked == 2, 20, "the ack subscription is back")
                publish_command(again.host, again.port, SITE, device, b"after-restart")
                wait_for(lambda: commands == [b"after-restart"], 20, "so is the cmd one")
                assert store.result_count() == 1
            assert link.protocol_in_use == "5"
        assert box.depth() == 0


@pytest.mark.parametrize(
    ("broker_fixture", "spoken"), [("mosquitto", "5"), ("embedded_broker", "3.1.1")]
)
def test_protocol_auto_speaks_5_where_it_can_and_3_1_1_otherwise(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    broker_fixture: str,
    spoken: str,
    request: pytest.FixtureRequest,
    sealer,
    opener,
) -> None:
    broker: RunningBroker = request.getfixturevalue(broker_fixture)
    device = "link-02"
    with (
        Outbox(tmp_path / "o.sqlite", SITE, device) as box,
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, broker.host, broker.port, broker.protocol),
    ):
        box.sealer = sealer(device)
        # a short keepalive: an amqtt that never answers MQTT 5 is given up on sooner
        with DeviceLink(box, broker.host, broker.port, protocol="auto", keepalive=3) as link:
            assert link.wait_connected(15)
            assert link.protocol_in_use == spoken
            assert link.connect_failures == 0, "falling back is not a failure"
            for i in range(3):
                box.put("result", {"i": i})
            link.notify()
            assert link.drain(15), "results stored and acknowledged over MQTT " + spoken
        assert store.result_count() == 3


def test_a_message_on_a_topic_it_never_subscribed_to_is_a_topic_rejection(
    tmp_path: Path,
) -> None:
    """The embedded amqtt broker hands a device other devices' retained state: it is refused
    as a topic fault, not misread as a malformed ack (the demo's first run logged that)."""
    import paho.mqtt.client as mqtt

    with Outbox(tmp_path / "o.sqlite", SITE, "stray") as box:
        link = DeviceLink(box, "127.0.0.1", 1)  # never started: the handler alone
        for where, payload in (
            (f"medge/v1/{SITE}/other/state", b'{"online": true}'),
            (f"medge/v1/{SITE}/stray/ack/extra", b"{}"),
        ):
            msg = mqtt.MQTTMessage(topic=where.encode())
            msg.payload = payload
            link.session._on_message(None, None, msg)
        assert {k: n for k, n in link.rejected.items() if n} == {"topic": 2}
        assert (link.bad_acks, link.bad_commands) == (0, 0)


def test_a_link_closed_by_a_fault_says_offline_and_the_fog_node_alerts(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto: RunningBroker, sealer, opener
) -> None:
    """Only a clean stop says "stopped" (no alert). A link that closes on an exception, or
    after Agent.mark_failed (a worker died), says "offline", as the Last Will would."""
    from gateway.alerts import list_alerts

    device = "link-03"

    def state(store: Store) -> str | None:
        rows = [d for d in store.devices() if d["device"] == device]
        return rows[0]["state"] if rows else None

    with (
        Outbox(tmp_path / "o.sqlite", SITE, device) as box,
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port),
    ):
        box.sealer = sealer(device)
        link = DeviceLink(box, mosquitto.host, mosquitto.port)

        def fail_while_open() -> None:
            with link:
                assert link.wait_connected(10)
                wait_for(lambda: state(store) == "online", 10, "the device online")
                raise RuntimeError("a worker died")

        with pytest.raises(RuntimeError, match="a worker died"):
            fail_while_open()
        wait_for(lambda: state(store) == "offline", 10, "the fault's offline goodbye")
        wait_for(lambda: list_alerts(store), 10, "the offline alert")
        assert [a["rule"] for a in list_alerts(store)] == ["offline"]


def test_a_restarted_gateway_takes_the_retained_state_it_knows_without_calling_it_a_replay(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto: RunningBroker, sealer, opener
) -> None:
    """The broker delivers each device's retained state again to every new subscriber: a
    gateway restarted on the same store gets the 'online' it already stored. That is not a
    replay (nothing rejected, audited or held against the device): it is counted as known.
    A state with an old seq sent live (not retained) is still a replay."""
    from edge_agent.reasons import Reason

    device = "link-04"
    with Outbox(tmp_path / "o.sqlite", SITE, device) as box, Store(tmp_path / "gw.sqlite") as store:
        box.sealer = sealer(device)
        link = DeviceLink(box, mosquitto.host, mosquitto.port)
        with link:
            assert link.wait_connected(10)
            with Gateway(store, opener, mosquitto.host, mosquitto.port) as first:
                wait_for(lambda: [d["state"] for d in store.devices()] == ["online"], 10, "online")
                assert first.metrics.retained_known._value.get() == 0  # new to this store
            with Gateway(store, opener, mosquitto.host, mosquitto.port) as again:
                wait_for(
                    lambda: again.metrics.retained_known._value.get() == 1, 10, "the retained state"
                )
                assert again.metrics.totals()["rejected"] == 0
                replay = again.metrics.rejected.labels(Reason.REPLAY.value)
                assert replay._value.get() == 0


def test_a_device_drains_its_backlog_at_the_pace_the_gateway_announces(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto: RunningBroker, sealer, opener
) -> None:
    """The gateway tells each device that comes online its flood limit (retained on
    .../limits); the device drains a backlog at 90 % of it, so the gateway refuses nothing and
    every result is stored. (Without the pacing, 150 results at once against a burst of 20
    are refused and resent every 5 s, and are not all stored within 30 s.)"""
    device = "link-05"
    with Outbox(tmp_path / "o.sqlite", SITE, device) as box, Store(tmp_path / "gw.sqlite") as store:
        box.sealer = sealer(device)
        with Gateway(
            store, opener, mosquitto.host, mosquitto.port, device_rate=60.0, device_burst=20.0
        ) as gw:
            with DeviceLink(box, mosquitto.host, mosquitto.port) as link:
                wait_for(lambda: link.limits == (60.0, 20.0), 10, "the announced limit")
            for i in range(150):  # held while the device was cut off
                box.put("result", {"i": i})
            with DeviceLink(box, mosquitto.host, mosquitto.port) as link:
                wait_for(lambda: store.result_count() == 150, 30, "the backlog stored")
            assert gw.metrics.totals()["rate_limited"] == 0
            assert gw.metrics.limits_announced._value.get() == 2
        assert box.depth() == 0


def test_a_rate_limited_message_is_told_apart_as_live_or_backlog(sealer) -> None:  # type: ignore[no-untyped-def]
    """The gateway reads a refused message's making time from its clear header without
    opening it: older than 30 s is a backlog being drained, else live traffic (a flood)."""
    import time

    from edge_agent.envelope import Envelope
    from gateway.rejections import traffic_of

    payload = sealer("link-06").seal(Envelope("result", SITE, "link-06", 1, time.time(), {}))
    now = time.time()
    assert traffic_of(payload, now) == "live"
    assert traffic_of(payload, now + 31) == "backlog"
    assert traffic_of(b'{"not":"an envelope"}', now) == "live"


def test_a_gateway_serving_again_gets_the_held_messages_at_once(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto: RunningBroker, sealer
) -> None:
    """The gateway's limits carry since when it serves (.../limits, retained). A later time
    (it restarted, or its store came back) sends what the device holds again at once, not on
    each message's own resend timer; an earlier one (another worker of it) changes nothing."""
    import paho.mqtt.client as mqtt

    from edge_agent.envelope import encode_limits
    from edge_agent.topics import topic

    device = "link-06"
    seen: list[bytes] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="results-watcher")
    sub.on_message = lambda _c, _u, m: seen.append(m.payload)
    sub.connect(mosquitto.host, mosquitto.port)
    sub.subscribe(topic(SITE, device, "result"), qos=1)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="a-gateway")
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()

    def announce(since: float) -> None:
        limits = encode_limits(0, 1000, since)
        pub.publish(topic(SITE, device, "limits"), limits, qos=1, retain=True).wait_for_publish(5)

    try:
        with Outbox(tmp_path / "o.sqlite", SITE, device) as box:
            box.sealer = sealer(device)
            announce(1000.0)
            with DeviceLink(box, mosquitto.host, mosquitto.port, resend_after=600) as link:
                wait_for(lambda: link.gateway_since == 1000.0, 10, "the first announcement")
                box.put("result", {"i": 1})
                link.notify()
                wait_for(lambda: len(seen) == 1, 10, "the result published")
                announce(999.0)  # an older worker: nothing goes again
                announce(1000.0)
                time.sleep(0.5)
                assert len(seen) == 1 and link.gateway_restarts == 0
                announce(2000.0)  # serving again: the held result goes now, not in 600 s
                wait_for(lambda: len(seen) == 2, 10, "the held result sent again")
                assert seen[1] == seen[0] and link.gateway_restarts == 1
                assert link.gateway_since == 2000.0
    finally:
        pub.publish(topic(SITE, device, "limits"), b"", qos=1, retain=True).wait_for_publish(5)
        for c in (sub, pub):
            c.loop_stop()
            c.disconnect()
