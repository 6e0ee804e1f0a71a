"""The device's MQTT link: Last Will, retained state, the outbox pump and gateway acks.

paho-mqtt 2.x, MQTT 5 or 3.1.1. A message leaves the outbox only on the gateway's
application-level ack on ``.../ack``; the broker's PUBACK only tells us it arrived there.
"""

from __future__ import annotations

import logging
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

__all__ = ["DeviceLink"]

log = logging.getLogger("medge.agent.link")


class DeviceLink:
    """Owns the MQTT client of one device. Use as a context manager."""

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
    ) -> None:
        """``tls``: (CA certificate, device certificate, device key) for a TLS listener that
        requires client certificates (see ``medge gateway broker-config``)."""
        self.outbox = outbox
        self.site, self.device = outbox.site, outbox.device
        self.host, self.port, self.keepalive = host, port, keepalive
        self.resend_after = resend_after
        self.bundle_id = bundle_id
        self.acked = 0
        self.published = 0
        self.bad_acks = 0
        self.denied = 0
        # commands from the gateway on .../cmd (bundle updates): handed over as they arrive
        self.on_command: Callable[[bytes], None] | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._connected = threading.Event()
        proto = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"medge-{self.site}-{self.device}",
            protocol=proto,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        if tls is not None:
            ca, cert, key = tls
            self._client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        self._online = b""
        self._arm_state()
        self._pump = threading.Thread(
            target=self._run_pump, name=f"pump-{self.device}", daemon=True
        )

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> DeviceLink:
        self._client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self._client.loop_start()
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
        if self._connected.is_set():
            info = self._client.publish(
                topic(self.site, self.device, "state"),
                self._state_payload("offline"),
                qos=1,
                retain=True,
            )
            info.wait_for_publish(timeout=2)
        self._client.disconnect()
        self._client.loop_stop()

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

    # -- paho callbacks (network thread) ---------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if rc.is_failure:
            log.warning("%s: broker refused the connection: %s", self.device, rc)
            return
        client.subscribe(topic(self.site, self.device, "ack"), qos=1)
        client.subscribe(topic(self.site, self.device, "cmd"), qos=1)
        client.publish(topic(self.site, self.device, "state"), self._online, qos=1, retain=True)
        self._connected.set()
        self.outbox.unsend_all()  # anything in flight on the old connection goes again
        self._wake.set()
        log.info("%s: connected to %s:%s", self.device, self.host, self.port)

    def _arm_state(self) -> None:
        """Seal the 'online' message and then the Last Will 'offline', in that order, before
        every (re)connect: the gateway accepts a state only with a newer sequence number than
        the last, so the Will must be numbered after the 'online' it follows."""
        self._online = self._state_payload("online")
        self._client.will_set(
            topic(self.site, self.device, "state"),
            self._state_payload("offline"),
            qos=1,
            retain=True,
        )

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            self._arm_state()  # the next connect carries a fresh pair
        if not self._stop.is_set():
            log.warning("%s: disconnected (%s); will reconnect", self.device, rc)

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
                for p in batch:
                    info = self._client.publish(p.topic, p.payload, qos=1)
                    if info.rc != mqtt.MQTT_ERR_SUCCESS:
                        break
                    sent.append(p.seq)
                self.outbox.mark_sent(sent)
                self.published += len(sent)
                if len(sent) < len(batch):
                    break

    def _state_payload(self, state: str) -> bytes:
        return self.outbox.make("state", {"state": state, "bundle": self.bundle_id})
