"""The device's MQTT link: Last Will, retained state, the outbox pump and gateway acks.

paho-mqtt 2.x, MQTT 5 or 3.1.1 (``auto``: MQTT 5, and 3.1.1 when the broker says it does not
speak 5). A message leaves the outbox only on the gateway's application-level ack on
``.../ack``; the broker's PUBACK only tells us it arrived there.

Reconnects are ours, not paho's: a supervisor thread connects, runs one paho network loop per
connection, and after a loss waits a full-jitter exponential back-off (a uniform draw in
``[0, min(cap, base * 2**attempt)]``) so a fleet that lost its broker does not come back in
lock-step. Every connect subscribes to ``ack`` and ``cmd`` again and re-sends what is unacked.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.envelope import decode_ack
from edge_agent.errors import EnvelopeError
from edge_agent.outbox import Outbox
from edge_agent.topics import topic

__all__ = ["DeviceLink", "backoff_delay", "no_delay"]

log = logging.getLogger("medge.agent.link")

_UNSUPPORTED_PROTOCOL = (0x84, 0x01)  # MQTT 5 reason code; MQTT 3.1.1 return code


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)] (AWS architecture blog,
    "Exponential Backoff and Jitter")."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 62))
    return (rng or random).uniform(0.0, ceiling)


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
    ) -> None:
        """``protocol``: "5", "3.1.1" or "auto"; ``tls``: (CA certificate, device certificate,
        device key) for a TLS listener that requires client certificates (see ``medge gateway
        broker-config``); ``reconnect_min_s``/``reconnect_max_s``: back-off base and cap."""
        self.outbox = outbox
        self.site, self.device = outbox.site, outbox.device
        self.host, self.port, self.keepalive = host, port, keepalive
        self.resend_after = resend_after
        self.bundle_id = bundle_id
        self.protocol = protocol
        # what the last successful connection spoke ("auto" starts with 5)
        self.protocol_in_use = "3.1.1" if protocol == "3.1.1" else "5"
        self.tls = tls
        self.backoff = (reconnect_min_s, reconnect_max_s)
        self.acked = 0
        self.published = 0
        self.bad_acks = 0
        self.denied = 0
        self.connects = 0  # successful connections, the first included
        self.connect_failures = 0
        # commands from the gateway on .../cmd (bundle updates): handed over as they arrive
        self.on_command: Callable[[bytes], None] | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._connected = threading.Event()
        self._session_over = threading.Event()
        self._refused: Any = None  # the CONNACK reason of the last refused connect
        self._spoke_5 = False  # has this broker ever accepted MQTT 5 from us
        self._client = self._make_client(self.protocol_in_use)
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"mqtt-{self.device}", daemon=True
        )
        self._pump = threading.Thread(
            target=self._run_pump, name=f"pump-{self.device}", daemon=True
        )

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> DeviceLink:
        self._supervisor.start()
        self._pump.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        self._pump.join(timeout=5)
        client = self._client
        if self._connected.is_set():
            info = client.publish(
                topic(self.site, self.device, "state"),
                self._state_payload("offline"),
                qos=1,
                retain=True,
            )
            info.wait_for_publish(timeout=2)
        client.disconnect()
        self._supervisor.join(timeout=10)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

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
        if not self._connected.is_set():
            return
        payload = self.outbox.make(kind, body)
        self._client.publish(topic(self.site, self.device, kind), payload, qos=0, retain=retain)

    # -- connecting ------------------------------------------------------------------------
    def _make_client(self, protocol: str) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"medge-{self.site}-{self.device}",
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
            reconnect_on_failure=False,  # the supervisor reconnects, with jitter
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        if self.tls is not None:
            ca, cert, key = self.tls
            client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        return client

    def _supervise(self) -> None:
        attempt = 0
        proto = self.protocol_in_use
        while not self._stop.is_set():
            client = self._make_client(proto)
            self._arm_state(client)
            self._client = client
            self._session_over.clear()
            self._refused = None
            up_before = self.connects
            try:
                client.connect(self.host, self.port, keepalive=self.keepalive)
            except (OSError, ValueError) as exc:
                self._failed(attempt, f"cannot reach {self.host}:{self.port}: {exc}")
            else:
                client.loop_start()
                while not self._session_over.wait(0.5):
                    if self._stop.is_set():  # close() says goodbye on this connection
                        self._session_over.wait(3.0)
                        break
                client.loop_stop()
                if self._stop.is_set():
                    client.disconnect()  # close() may have raced a reconnect
                    break
                if self.connects > up_before:
                    attempt = 0  # it worked: the next loss starts the back-off again
                elif self._refused is not None:
                    code = getattr(self._refused, "value", self._refused)
                    if self.protocol == "auto" and code in _UNSUPPORTED_PROTOCOL and proto == "5":
                        log.info("%s: broker does not speak MQTT 5; using 3.1.1", self.device)
                        proto = "3.1.1"
                        continue  # at once: this is not a failure of the broker
                    self._failed(attempt, f"broker refused the connection: {self._refused}")
                elif self.protocol == "auto" and proto == "5" and not self._spoke_5:
                    # some 3.1.1-only brokers (amqtt) hang up on an MQTT 5 CONNECT unanswered
                    log.info("%s: no answer to MQTT 5; trying 3.1.1", self.device)
                    proto = "3.1.1"
                    continue
                else:
                    self._failed(attempt, "connection closed before the broker answered")
                    if self.protocol == "auto":
                        proto = "3.1.1" if proto == "5" else "5"  # it may not speak this one
            if self._stop.wait(backoff_delay(attempt, *self.backoff)):
                break
            attempt += 1

    def _failed(self, attempt: int, why: str) -> None:
        self.connect_failures += 1
        if attempt == 0:
            log.warning("%s: %s; retrying with back-off", self.device, why)
        else:
            log.debug("%s: attempt %d: %s", self.device, attempt + 1, why)

    # -- paho callbacks (network thread) ---------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if rc.is_failure:
            self._refused = rc
            return
        no_delay(client)  # results and acks go out at once, not after a delayed TCP ACK
        client.subscribe(
            [(topic(self.site, self.device, "ack"), 1), (topic(self.site, self.device, "cmd"), 1)]
        )
        client.publish(topic(self.site, self.device, "state"), self._online, qos=1, retain=True)
        self.protocol_in_use = "5" if client.protocol == mqtt.MQTTv5 else "3.1.1"
        self._spoke_5 = self._spoke_5 or self.protocol_in_use == "5"
        self.connects += 1
        self._connected.set()
        self.outbox.unsend_all()  # anything in flight on the old connection goes again
        self._wake.set()
        log.info(
            "%s: connected to %s:%s (MQTT %s)",
            self.device,
            self.host,
            self.port,
            self.protocol_in_use,
        )

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

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._session_over.set()
        if was and not self._stop.is_set():
            log.warning("%s: disconnected (%s); will reconnect", self.device, rc)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: Any, _p: Any = None) -> None:
        for rc in codes:
            if getattr(rc, "is_failure", False):
                self.denied += 1
                log.warning("%s: broker refused a subscription (ack/cmd): %s", self.device, rc)

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any = None) -> None:
        # MQTT 5 brokers say no instead of dropping silently (e.g. 0x87 not authorized)
        if getattr(rc, "is_failure", False):
            self.denied += 1
            log.warning("%s: broker refused message %d: %s", self.device, mid, rc)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/cmd"):
            if self.on_command is not None:
                self.on_command(msg.payload)
            return
        try:
            seqs = decode_ack(msg.payload)
        except EnvelopeError as exc:
            self.bad_acks += 1
            log.warning("%s: bad ack ignored: %s", self.device, exc)
            return
        self.acked += self.outbox.ack(seqs)

    # -- the pump --------------------------------------------------------------------------
    def _run_pump(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            if not self._connected.is_set():
                continue
            while not self._stop.is_set():
                batch = self.outbox.due(self.resend_after, limit=100)
                if not batch:
                    break
                sent = []
                client = self._client
                for p in batch:
                    info = client.publish(p.topic, p.payload, qos=1)
                    if info.rc != mqtt.MQTT_ERR_SUCCESS:
                        break
                    sent.append(p.seq)
                self.outbox.mark_sent(sent)
                self.published += len(sent)
                if len(sent) < len(batch):
                    break

    def _state_payload(self, state: str) -> bytes:
        return self.outbox.make("state", {"state": state, "bundle": self.bundle_id})


def no_delay(client: mqtt.Client) -> None:
    """TCP_NODELAY on the client's socket. Without it an ack written right after a PUBACK
    waits for the broker's delayed TCP ACK (Nagle's algorithm): ~40 ms per ack on Linux."""
    sock = client.socket()
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # not TCP (e.g. a websocket or unix socket)
        log.debug("TCP_NODELAY not set: %s", exc)
