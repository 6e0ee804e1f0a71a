"""The device's MQTT link: Last Will, retained state, the outbox pump and gateway acks.

paho-mqtt 2.x, MQTT 5 or 3.1.1 (``auto``: MQTT 5, and 3.1.1 when the broker says it does not
speak 5). A message leaves the outbox only on the gateway's application-level ack on
``.../ack``; the broker's PUBACK only tells us it arrived there.

The connection is an :class:`~edge_agent.mqtt_session.MqttSession`: reconnects are ours, with
full-jitter exponential back-off (so a fleet that lost its broker does not come back in
lock-step), and a bad ``ack`` or ``cmd`` message (malformed, 10,000 levels deep, anything) is
rejected with a reason code and counted; the link goes on. Every connect subscribes to ``ack``
and ``cmd`` again and re-sends what is unacked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as mqtt

from edge_agent.envelope import decode_ack, decode_limits
from edge_agent.errors import EnvelopeError
from edge_agent.mqtt_session import MqttSession, backoff_delay, no_delay
from edge_agent.outbox import Outbox
from edge_agent.reasons import Reason
from edge_agent.topics import topic

__all__ = ["DeviceLink", "backoff_delay", "no_delay"]

log = logging.getLogger("medge.agent.link")

PACE = 0.9  # a device drains at this share of the gateway's announced rate (and burst)
LIMITS_WAIT_S = 1.0
"""After connecting, a link that does not know the gateway's flood limit yet waits this long
at most for its announcement (retained: it arrives with the subscription) before it sends,
so that a backlog is not sent unpaced and refused; a gateway that announces none costs each
connect this much delay."""


class Pacer:
    """A token bucket on the device's side of the gateway's flood limit: :meth:`wait` says how
    long to wait before the next message may go (0 when one may go now) and takes its token."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens, self._last = burst, clock()

    def wait(self) -> float:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class DeviceLink:
    """Owns the MQTT connection of one device. Use as a context manager."""

    def __init__(
        self,
        outbox: Outbox,
        host: str,
        port: int,
        protocol: str = "5",
        keepalive: int = 10,
        resend_after: float = 5.0,
        bundle_id: str = "",
        tls: tuple[Path, Path, Path] | None = None,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        pace: bool = True,
    ) -> None:
        """``protocol``: "5", "3.1.1" or "auto"; ``tls``: (CA certificate, device certificate,
        device key) for a TLS listener that requires client certificates (see ``medge gateway
        broker-config``); ``reconnect_min_s``/``reconnect_max_s``: back-off base and cap;
        ``pace``: drain the outbox at the pace of the flood limit the gateway announces
        (false only to act as a device that ignores it, in tests)."""
        self.outbox = outbox
        self.site, self.device = outbox.site, outbox.device
        self.host, self.port, self.keepalive = host, port, keepalive
        self.resend_after = resend_after
        self.bundle_id = bundle_id
        self.protocol = protocol
        self.tls = tls
        self.backoff = (reconnect_min_s, reconnect_max_s)
        self.acked = 0
        self.published = 0
        self.bad_acks = 0
        self.bad_commands = 0
        self.last_sent: float | None = None  # time.time() of the last publish from the outbox
        self.last_acked: float | None = None  # ... and of the last ack of the gateway
        # commands from the gateway on .../cmd (bundle updates): handed over as they arrive
        self.on_command: Callable[[bytes], None] | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._online = b""
        # the retained state said on close: "stopped" for a clean stop, which raises no alert;
        # "offline" (as the Last Will) when the link closes on a fault (an exception, or
        # Agent.mark_failed after a worker died), so the fog node alerts as if the power went
        self.goodbye = "stopped"
        self._topics = {k: topic(self.site, self.device, k) for k in ("ack", "cmd", "limits")}
        # the gateway's flood limit for this device, as it announces it (retained, on
        # .../limits): the pump drains at PACE of its rate, so a backlog is not refused
        self.pace = pace
        self.pacer: Pacer | None = None
        self.limits: tuple[float, float] | None = None
        self.gateway_since: float | None = None  # when the gateway began serving (.../limits)
        self.gateway_restarts = 0  # changes of it seen: each sent the outbox again
        self._limits_known = threading.Event()
        self._connected_at = 0.0
        self.session = MqttSession(
            self.device,
            host,
            port,
            protocol=protocol,
            client_id=f"medge-{self.site}-{self.device}",
            keepalive=keepalive,
            tls=tls,
            subscriptions=[(self._topics[k], 1) for k in ("ack", "cmd", "limits")],
            on_message=self._on_message,
            on_reject=self._on_reject,
            before_connect=self._arm_state,
            on_connect=self._on_connect,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
            logger=log,
        )
        self._pump = threading.Thread(
            target=self._run_pump, name=f"pump-{self.device}", daemon=True
        )

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> DeviceLink:
        self.session.start()
        self._pump.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self.goodbye = "offline"
        self.close()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        self._pump.join(timeout=5)
        self.session.stop(
            goodbye=lambda client: client.publish(
                topic(self.site, self.device, "state"),
                self._state_payload(self.goodbye),
                qos=1,
                retain=True,
            )
        )

    def workers(self) -> dict[str, threading.Thread | None]:
        """The threads that must stay alive while the link runs (for a Supervisor)."""
        return {"link-mqtt": self.session.thread, "link-pump": self._pump}

    @property
    def connected(self) -> bool:
        return self.session.connected

    @property
    def protocol_in_use(self) -> str:
        """What the last successful connection spoke ("auto" starts with 5)."""
        return self.session.protocol_in_use

    @property
    def connects(self) -> int:
        """Successful connections, the first included."""
        return self.session.connects

    @property
    def connect_failures(self) -> int:
        return self.session.connect_failures

    @property
    def denied(self) -> int:
        """Subscriptions and messages the broker refused (MQTT 5 reason codes)."""
        return self.session.denied

    @property
    def rejected(self) -> dict[str, int]:
        """Messages from the gateway (ack, cmd) rejected, by reason code."""
        return self.session.rejected

    def wait_connected(self, timeout: float) -> bool:
        return self.session.wait_connected(timeout)

    def notify(self) -> None:
        """Something new is in the outbox: pump now rather than at the next tick."""
        self._wake.set()

    def drain(self, timeout: float) -> bool:
        """Wait until the gateway has acknowledged everything in the outbox."""
        self.outbox.flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.outbox.depth() == 0:
                return True
            self._wake.set()
            time.sleep(0.05)
        return self.outbox.depth() == 0

    def publish_direct(self, kind: str, body: dict[str, Any], retain: bool = False) -> None:
        """Telemetry and state: sent when connected, never queued (a fresher one follows)."""
        if not self.session.connected:
            return
        payload = self.outbox.make(kind, body)
        self.session.publish(topic(self.site, self.device, kind), payload, qos=0, retain=retain)

    # -- session hooks (network thread) ----------------------------------------------------
    def _arm_state(self, client: mqtt.Client) -> None:
        """Seal the 'online' message and then the Last Will 'offline', in that order, before
        every connect: the gateway accepts a state only with a newer sequence number than the
        last, so the Will must be numbered after the 'online' it follows."""
        self._online = self._state_payload("online")
        client.will_set(
            topic(self.site, self.device, "state"),
            self._state_payload("offline"),
            qos=1,
            retain=True,
        )

    def _on_connect(self, client: mqtt.Client) -> None:
        self._connected_at = time.monotonic()
        client.publish(topic(self.site, self.device, "state"), self._online, qos=1, retain=True)
        self.outbox.unsend_all()  # anything in flight on the old connection goes again
        self._wake.set()

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        # any exception here rejects this message only (the session's boundary)
        payload = cast(bytes, msg.payload)  # received: bytes (paho types it bytes | bytearray)
        if msg.topic == self._topics["cmd"]:
            if self.on_command is not None:
                self.on_command(payload)
            return
        if msg.topic == self._topics["limits"]:
            rate, burst, since = decode_limits(payload)
            self._set_limits((rate, burst))
            self._gateway_since(since)
            return
        if msg.topic != self._topics["ack"]:  # a broker fault (amqtt sends others' retained state)
            raise EnvelopeError(
                f"message on {msg.topic!r}, which this device did not subscribe to", Reason.TOPIC
            )
        self.acked += self.outbox.ack(decode_ack(payload))
        self.last_acked = time.time()

    def _on_reject(self, msg: mqtt.MQTTMessage, _reason: Reason, _exc: BaseException) -> None:
        if msg.topic == self._topics["cmd"]:
            self.bad_commands += 1
        elif msg.topic == self._topics["ack"]:
            self.bad_acks += 1

    def _gateway_since(self, since: float | None) -> None:
        """The gateway says since when it serves: when that moves on (it restarted, or its
        store came back), what it dropped meanwhile is in this outbox, sent, waiting for its
        resend time one by one in the order it was made; send it all again now instead, so
        that events go first, as after a reconnect. An older time (another worker of the
        same gateway, started a moment earlier) changes nothing."""
        if since is None:
            return
        before = self.gateway_since
        if before is None or since <= before:
            self.gateway_since = since if before is None else before
            return
        self.gateway_since = since
        self.gateway_restarts += 1
        log.info(
            "%s: the gateway serves again (since %.3f, was %.3f): the %d unacknowledged "
            "message(s) go again now, events first",
            self.device,
            since,
            before,
            self.outbox.depth(),
        )
        self.outbox.unsend_all()
        self._wake.set()

    def _set_limits(self, limits: tuple[float, float]) -> None:
        self._limits_known.set()
        if limits == self.limits:
            return
        rate, burst = limits
        self.limits = limits
        paced = self.pace and rate > 0
        self.pacer = Pacer(PACE * rate, max(1.0, PACE * burst)) if paced else None
        if rate <= 0:
            log.info("%s: the gateway announces no flood limit", self.device)
        elif not self.pace:
            log.info(
                "%s: the gateway's flood limit is %g messages/s; pacing is off", self.device, rate
            )
        else:
            log.info(
                "%s: the gateway's flood limit is %g messages/s (burst %g): the outbox drains "
                "at %g/s",
                self.device,
                rate,
                burst,
                PACE * rate,
            )

    # -- the pump --------------------------------------------------------------------------
    def _await_limits(self) -> None:
        """Before the first send: the gateway's announcement is on its way (retained, with
        the subscription); wait for it up to LIMITS_WAIT_S after connecting, once."""
        if self._limits_known.is_set():
            return
        left = self._connected_at + LIMITS_WAIT_S - time.monotonic()
        if left > 0 and self._limits_known.wait(left) is False:
            log.info(
                "%s: no flood limit announced within %g s of connecting: sending unpaced",
                self.device,
                LIMITS_WAIT_S,
            )
        self._limits_known.set()  # waited once: not again

    def _run_pump(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            if not self.session.connected:
                continue
            self._await_limits()
            while not self._stop.is_set():
                batch = self.outbox.due(self.resend_after, limit=100)
                if not batch:
                    break
                sent = []
                client = self.session.client
                for p in batch:
                    pacer = self.pacer
                    if pacer is not None and self._stop.wait(pacer.wait()):
                        break
                    info = client.publish(p.topic, p.payload, qos=1)
                    if info.rc != mqtt.MQTT_ERR_SUCCESS:
                        break
                    sent.append(p.seq)
                self.outbox.mark_sent(sent)
                self.published += len(sent)
                if sent:
                    self.last_sent = time.time()
                if len(sent) < len(batch):
                    break

    def _state_payload(self, state: str) -> bytes:
        return self.outbox.make("state", {"state": state, "bundle": self.bundle_id})
