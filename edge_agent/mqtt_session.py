"""One MQTT session for every client of medge: the device link, the MQTT sensor source, the
gateway, the forwarder and the OTA publisher (docs/topics.md, "The session boundary").

One reconnect policy. A session thread connects, lets paho run one network loop per
connection, and after a loss (or a broker that is down at start) waits a full-jitter
exponential back-off (a uniform draw in ``[0, min(cap, base * 2**attempt)]``) before the next
try, so a fleet that lost its broker does not come back in lock-step. The first failure of a
run of failures is one warning line; the rest are debug lines. ``protocol="auto"`` starts
with MQTT 5 and falls back to 3.1.1 when the broker refuses 5 or hangs up on it (amqtt).

One rule for messages. An exception of any type raised by the owner's message handler
rejects that one message: :class:`~edge_agent.errors.EnvelopeError` with its ``.reason``,
anything else with :attr:`Reason.HANDLER`. It is counted per reason (:attr:`MqttSession.
rejected`), handed to the owner's ``on_reject`` (metrics, audit), logged at most once per
reason and interval with the number of lines suppressed (:class:`RejectLog`), and the session
goes on. Every other paho callback sits behind the same kind of guard: nothing a broker or a
peer sends can end the network thread.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.errors import EnvelopeError, one_line
from edge_agent.reasons import Reason

__all__ = ["MqttSession", "RejectLog", "backoff_delay", "no_delay", "reason_of", "topic_text"]

log = logging.getLogger("medge.mqtt")

_UNSUPPORTED_PROTOCOL = (0x84, 0x01)  # MQTT 5 reason code; MQTT 3.1.1 return code

Handler = Callable[[mqtt.MQTTMessage], object]
OnReject = Callable[[mqtt.MQTTMessage, Reason, BaseException], None]


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)] (AWS architecture blog,
    "Exponential Backoff and Jitter")."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 62))
    return (rng or random).uniform(0.0, ceiling)


def no_delay(client: mqtt.Client) -> None:
    """TCP_NODELAY on the client's socket. Without it an ack written right after a PUBACK
    waits for the broker's delayed TCP ACK (Nagle's algorithm): ~40 ms per ack on Linux."""
    sock = client.socket()
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
    except (OSError, AttributeError) as exc:  # not TCP (e.g. a websocket or unix socket)
        log.debug("TCP_NODELAY not set: %s", exc)


def reason_of(exc: BaseException) -> Reason:
    """The code of a failed message: an EnvelopeError's own, ``HANDLER`` for anything else."""
    if isinstance(exc, EnvelopeError):
        return exc.reason
    return Reason.HANDLER


class RejectLog:
    """Counts per reason (every :class:`Reason` present, at 0 until it happens) and one log
    line per reason and ``interval`` seconds; the next line says how many were not logged."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger, self.interval, self._clock = logger, interval, clock
        self.counts: dict[Reason, int] = dict.fromkeys(Reason, 0)
        self._last: dict[Reason, float] = {}
        self._quiet: dict[Reason, int] = dict.fromkeys(Reason, 0)
        self._lock = threading.Lock()

    def add(self, reason: Reason, what: str) -> None:
        """Count one rejection; log ``what`` (one line) unless this reason was logged within
        the interval."""
        now = self._clock()
        with self._lock:
            self.counts[reason] += 1
            last = self._last.get(reason)
            if last is not None and now - last < self.interval:
                self._quiet[reason] += 1
                return
            quiet, self._quiet[reason], self._last[reason] = self._quiet[reason], 0, now
        more = f" ({quiet} more {reason.value} rejection(s) not logged)" if quiet else ""
        self.logger.warning("%s [%s]%s", one_line(what, 500), reason.value, more)

    def count(self, reason: Reason) -> None:
        """Count one rejection that its owner logs in its own way (e.g. per device)."""
        with self._lock:
            self.counts[reason] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {r.value: n for r, n in self.counts.items()}


class MqttSession:
    """One MQTT connection, kept up by its own thread, with every handler behind the boundary.

    ``subscriptions`` are made again on every connect; ``before_connect(client)`` runs before
    each connect (a Last Will), ``on_connect(client)`` after each successful one. Use as a
    context manager, or :meth:`start` / :meth:`stop`."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        *,
        protocol: str = "5",
        client_id: str = "",
        keepalive: int = 10,
        tls: tuple[Path, Path | None, Path | None] | None = None,
        username: str | None = None,
        password: str | None = None,
        subscriptions: Sequence[tuple[str, int]] = (),
        on_message: Handler | None = None,
        on_reject: OnReject | None = None,
        classify: Callable[[BaseException], Reason] = reason_of,
        before_connect: Callable[[mqtt.Client], None] | None = None,
        on_connect: Callable[[mqtt.Client], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        on_subscribed: Callable[[], None] | None = None,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        logger: logging.Logger = log,
        reject_log_interval: float = 10.0,
    ) -> None:
        """``protocol``: "5", "3.1.1" or "auto"; ``tls``: (CA, client certificate, key);
        ``classify``: the reason of a handler's exception (default :func:`reason_of`)."""
        if protocol not in ("5", "3.1.1", "auto"):
            raise ValueError(f"MQTT protocol {protocol!r}: use 5, 3.1.1 or auto")
        self.name, self.host, self.port = name, host, port
        self.protocol, self.client_id, self.keepalive = protocol, client_id, keepalive
        self.tls, self.username, self.password = tls, username, password
        self.subscriptions = list(subscriptions)
        self.handler, self.on_reject, self.classify = on_message, on_reject, classify
        self.before_connect, self.on_connect = before_connect, on_connect
        self.on_disconnect, self.on_subscribed = on_disconnect, on_subscribed
        self.backoff = (reconnect_min_s, reconnect_max_s)
        self.log = logger
        self.rejects = RejectLog(logger, reject_log_interval)
        # what the last successful connection spoke ("auto" starts with 5)
        self.protocol_in_use = "3.1.1" if protocol == "3.1.1" else "5"
        self.connects = 0  # successful connections, the first included
        self.connect_failures = 0
        self.denied = 0  # subscriptions and publishes the broker refused (MQTT 5 reason codes)
        self.callback_errors = 0  # exceptions in connect/subscribe/publish callbacks
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._session_over = threading.Event()
        self._refused: Any = None  # the CONNACK reason of the last refused connect
        self._spoke_5 = False  # has this broker ever accepted MQTT 5 from us
        self._client = self._make_client(self.protocol_in_use)
        self.thread = threading.Thread(target=self._run, name=f"mqtt-{name}", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> MqttSession:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> MqttSession:
        if not self.thread.is_alive() and not self._stop.is_set():
            self.thread.start()
        return self

    def stop(self, goodbye: Callable[[mqtt.Client], Any] | None = None) -> None:
        """Disconnect and end the session thread. ``goodbye(client)`` runs first while still
        connected (e.g. a retained 'offline' state); a message info it returns is waited for."""
        if self._stop.is_set():
            return
        self._stop.set()
        client = self._client
        if goodbye is not None and self._connected.is_set():
            try:
                info = goodbye(client)
                if info is not None:
                    info.wait_for_publish(timeout=2)
            except Exception as exc:  # a goodbye is a courtesy: the Will says it anyway
                self.log.warning("%s: goodbye not sent: %s", self.name, one_line(str(exc)))
        client.disconnect()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def rejected(self) -> dict[str, int]:
        """Rejected messages by reason code, every code present."""
        return self.rejects.snapshot()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def client(self) -> mqtt.Client:
        """The paho client of the current connection (a new one after each reconnect)."""
        return self._client

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def reject(
        self, where: str, reason: Reason, exc: BaseException, msg: mqtt.MQTTMessage | None = None
    ) -> None:
        """Count, log (rate-limited) and hand to ``on_reject`` one rejected message."""
        why = str(exc) if isinstance(exc, EnvelopeError) else f"{type(exc).__name__}: {exc}"
        self.rejects.add(reason, f"{self.name}: rejected message on {where}: {why}")
        if self.on_reject is not None and msg is not None:
            try:
                self.on_reject(msg, reason, exc)
            except Exception as err:  # recording failed; the count above stands
                self.callback_errors += 1
                self.log.error(
                    "%s: recording a %s rejection failed: %s",
                    self.name,
                    reason.value,
                    one_line(f"{type(err).__name__}: {err}"),
                )

    # -- connecting ------------------------------------------------------------------------
    def _make_client(self, protocol: str) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
            reconnect_on_failure=False,  # the session thread reconnects, with jitter
        )
        client.suppress_exceptions = True  # belt and braces: our callbacks are guarded
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls is not None:
            ca, cert, key = self.tls
            client.tls_set(
                ca_certs=str(ca),
                certfile=str(cert) if cert else None,
                keyfile=str(key) if key else None,
            )
        return client

    def _run(self) -> None:
        attempt = 0
        proto = self.protocol_in_use
        while not self._stop.is_set():
            client = self._make_client(proto)
            if self.before_connect is not None:
                self.before_connect(client)
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
                self._serve(client)
                client.loop_stop()
                if self._stop.is_set():
                    client.disconnect()  # stop() may have raced a reconnect
                    break
                if self.connects > up_before:
                    attempt = 0  # it worked: the next loss starts the back-off again
                else:
                    proto, at_once = self._next_protocol(attempt, proto)
                    if at_once:
                        continue
            if self._stop.wait(backoff_delay(attempt, *self.backoff)):
                break
            attempt += 1

    def _next_protocol(self, attempt: int, proto: str) -> tuple[str, bool]:
        """After a connection that never came up: the protocol to try next, and whether to
        try at once (a protocol the broker does not speak is not a failure of the broker)."""
        auto = self.protocol == "auto"
        if self._refused is not None:
            code = getattr(self._refused, "value", self._refused)
            if auto and code in _UNSUPPORTED_PROTOCOL and proto == "5":
                self.log.info("%s: broker does not speak MQTT 5; using 3.1.1", self.name)
                return "3.1.1", True
            self._failed(attempt, f"broker refused the connection: {self._refused}")
            return proto, False
        if auto and proto == "5" and not self._spoke_5:
            # some 3.1.1-only brokers (amqtt) hang up on an MQTT 5 CONNECT unanswered
            self.log.info("%s: no answer to MQTT 5; trying 3.1.1", self.name)
            return "3.1.1", True
        self._failed(attempt, "connection closed before the broker answered")
        if auto:
            proto = "3.1.1" if proto == "5" else "5"  # it may not speak this one
        return proto, False

    def _serve(self, client: mqtt.Client) -> None:
        """Wait while this connection lasts (or until stop, then let the goodbye through)."""
        while not self._session_over.wait(0.5):
            if self._stop.is_set():
                self._session_over.wait(3.0)
                return
            net = getattr(client, "_thread", None)  # paho's network thread
            if net is not None and not net.is_alive():
                self.log.error("%s: the MQTT network loop ended; reconnecting", self.name)
                self._connected.clear()
                return

    def _failed(self, attempt: int, why: str) -> None:
        self.connect_failures += 1
        if attempt == 0:
            self.log.warning(
                "%s: %s; retrying with back-off (up to %g s)",
                self.name,
                one_line(why),
                self.backoff[1],
            )
        else:
            self.log.debug("%s: attempt %d: %s", self.name, attempt + 1, why)

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:
            self.callback_errors += 1
            self.log.error(
                "%s: %s failed: %s", self.name, what, one_line(f"{type(exc).__name__}: {exc}")
            )

    # -- paho callbacks (network thread) ---------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if rc.is_failure:
            self._refused = rc
            return

        def connected() -> None:
            no_delay(client)  # results and acks go out at once, not after a delayed TCP ACK
            if self.subscriptions:
                client.subscribe(self.subscriptions)
            self.protocol_in_use = "5" if client.protocol == mqtt.MQTTv5 else "3.1.1"
            self._spoke_5 = self._spoke_5 or self.protocol_in_use == "5"
            self.connects += 1
            self._connected.set()
            if self.on_connect is not None:
                self.on_connect(client)
            self.log.info(
                "%s: connected to %s:%s (MQTT %s)",
                self.name,
                self.host,
                self.port,
                self.protocol_in_use,
            )

        self._guard("on connect", connected)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._session_over.set()
        if was and not self._stop.is_set():
            self.log.warning("%s: disconnected (%s); will reconnect", self.name, rc)
        if self.on_disconnect is not None:
            self._guard("on disconnect", self.on_disconnect)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: Any, _p: Any = None) -> None:
        refused = [rc for rc in codes if getattr(rc, "is_failure", False)]
        for rc in refused:
            self.denied += 1
            self.log.warning("%s: broker refused a subscription: %s", self.name, rc)
        if not refused and self.on_subscribed is not None:
            self._guard("on subscribed", self.on_subscribed)

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any = None) -> None:
        # MQTT 5 brokers say no instead of dropping silently (e.g. 0x87 not authorized)
        if getattr(rc, "is_failure", False):
            self.denied += 1
            self.log.warning("%s: broker refused message %d: %s", self.name, mid, rc)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if self.handler is None:
            return
        try:
            self.handler(msg)
        except Exception as exc:  # the boundary: one message fails, the session goes on
            try:
                reason = self.classify(exc)
            except Exception:
                reason = Reason.HANDLER
            self.reject(topic_text(msg), reason, exc, msg)


def topic_text(msg: mqtt.MQTTMessage) -> str:
    """The topic as one printable line, even when it is not UTF-8."""
    try:
        return one_line(msg.topic, 200)
    except UnicodeDecodeError:
        return one_line(repr(bytes(msg._topic)), 200)  # paho has no public raw topic
