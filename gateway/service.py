"""The gateway service: subscribe, open and check device messages, store each result once,
acknowledge what is stored, track device state, raise alerts (gateway.alerts: evaluated as
each message is accepted, and by a silence watchdog thread between start() and stop()) and
count it all (gateway.metrics).

Order matters for no loss: a result is committed to the store before its ack is published, and
a duplicate is acknowledged again (its first ack may have been lost) but not stored again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.envelope import Envelope, Opener, encode_ack
from edge_agent.errors import EnvelopeError
from edge_agent.topics import ROOT, parse, topic
from gateway.alerts import AlertEngine, AlertRules
from gateway.forward import Forwarder
from gateway.metrics import GatewayMetrics
from gateway.store import Store

__all__ = ["Gateway", "GatewayStats"]

log = logging.getLogger("medge.gateway")

_UP = ("result", "event", "state", "telemetry")


@dataclass
class GatewayStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    acks: int = 0


class Gateway:
    """One gateway worker. With MQTT 5 and ``share_group`` set, several workers split the load
    of one site through a shared subscription."""

    def __init__(
        self,
        store: Store,
        opener: Opener,
        host: str = "127.0.0.1",
        port: int = 1883,
        protocol: str = "5",
        client_id: str = "medge-gateway",
        share_group: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        rules: AlertRules | None = None,
        forward: Forwarder | None = None,
    ) -> None:
        """``forward``: also queue every stored result and event for the cloud (gateway.forward),
        durably, before the device is acknowledged; the Gateway starts and stops it."""
        self.store = store
        self.forward = forward
        self.opener = opener
        self.max_skew_s = 300.0
        self.host, self.port = host, port
        self.stats = GatewayStats()
        self.metrics = GatewayMetrics(store)
        self.alerts = AlertEngine(store, rules, on_raise=self.metrics.alert)
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self.batch_window = 0.005  # seconds the writer gathers results into one commit
        self.batch_max = 500
        self._pending: queue.Queue[tuple[Envelope, str, bytes]] = queue.Queue()
        self._writer_stop = threading.Event()
        self._writer = threading.Thread(target=self._run_writer, name="gateway-writer",
                                        daemon=True)
        self._v5 = protocol == "5"
        prefix = f"$share/{share_group}/" if share_group and self._v5 else ""
        self._subs = [(f"{prefix}{ROOT}/+/+/{kind}", 1) for kind in _UP]
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        if tls is not None:
            ca, cert, key = tls
            self._client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> Gateway:
        self._writer.start()
        self._client.connect_async(self.host, self.port, keepalive=10)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.stop()
            raise TimeoutError(f"gateway could not connect to {self.host}:{self.port}")
        self.alerts.start()  # the silence watchdog
        if self.forward is not None:
            self.forward.start()
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._writer_stop.set()  # what was received is still committed (and not acked)
        if self._writer.is_alive():
            self._writer.join(timeout=10)
        self.alerts.stop()
        if self.forward is not None:
            self.forward.stop()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if rc.is_failure:
            log.error("broker refused the gateway: %s", rc)
            return
        client.subscribe(self._subs)
        self._connected.set()
        log.info("gateway connected to %s:%d", self.host, self.port)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        self._connected.clear()

    def _reject(
        self, where: str, why: str, site: str | None = None, device: str | None = None
    ) -> None:
        with self._lock:
            self.stats.rejected += 1
        self.metrics.reject(why)
        log.warning("rejected message on %s: %s", where, why)
        if device is not None:  # results in flight first: the device's row may be among them
            self._pending.join()
        self.store.count_rejected(site, device, why)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.stats.received += 1
        self.metrics.received.inc()
        try:
            parts = parse(msg.topic)
        except EnvelopeError as exc:
            self._reject(msg.topic, str(exc))
            return
        try:
            env = self.opener.open(msg.payload)
            env.check_topic(parts)
            if env.time > time.time() + self.max_skew_s:
                raise EnvelopeError(
                    f"time {env.time:.0f} is more than {self.max_skew_s:.0f} s "
                    "ahead of the gateway's clock"
                )
            if env.kind in ("state", "telemetry") and not self.store.advance(
                env.site, env.device, env.kind, env.seq
            ):
                raise EnvelopeError(
                    f"{env.kind} seq {env.seq} is not newer than the last one (replayed or stale)"
                )
        except EnvelopeError as exc:
            # only authenticated headers get their device charged; the rest is counted globally
            self._reject(msg.topic, str(exc), parts.site, parts.device)
            return
        if env.kind in ("result", "event"):
            self._pending.put((env, msg.topic, msg.payload))  # the writer commits, then acks
        elif env.kind == "state":
            state = env.body.get("state")
            if state not in ("online", "offline"):
                self._reject(
                    msg.topic, f"state {state!r} is not online/offline", env.site, env.device
                )
                return
            bundle = env.body.get("bundle")
            with self.metrics.store_write.labels(env.kind).time():
                self.store.set_state(
                    env.site,
                    env.device,
                    state,
                    env.time,
                    bundle if isinstance(bundle, str) and bundle else None,
                )
            self._evaluate_alerts(env, True)
        else:
            with self.metrics.store_write.labels(env.kind).time():
                self.store.set_telemetry(env.site, env.device, env.body)
            self._evaluate_alerts(env, True)

    def _run_writer(self) -> None:
        """Commit what arrived within ``batch_window`` seconds in one transaction (one fsync
        instead of one per result), queue it for the cloud, then acknowledge: commit before ack."""
        while True:
            try:
                first = self._pending.get(timeout=0.2)
            except queue.Empty:
                if self._writer_stop.is_set():
                    return
                continue
            batch = [first]
            deadline = time.monotonic() + self.batch_window
            while len(batch) < self.batch_max:
                try:
                    batch.append(self._pending.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                self._write(batch)
            except Exception:  # not acknowledged: the devices send these again
                log.exception("storing %d results failed", len(batch))
            finally:
                for _ in batch:
                    self._pending.task_done()

    def _write(self, batch: list[tuple[Envelope, str, bytes]]) -> None:
        items = [(env, raw if env.sealed is None else None) for env, _, raw in batch]
        t0 = time.perf_counter()
        news = self.store.add_results(items, time.time())
        share = (time.perf_counter() - t0) / len(batch)  # one commit, shared by the batch
        for env, _, _ in batch:
            self.metrics.store_write.labels(env.kind).observe(share)
        if self.forward is not None:  # a resend is queued again: its first may be lost
            self.forward.put_many(
                [(e.site, e.device, e.seq, e.kind, t, raw) for e, t, raw in batch]
            )
        acks: dict[tuple[str, str], list[int]] = {}
        for (env, _, _), new in zip(batch, news, strict=True):
            with self._lock:
                if new:
                    self.stats.stored += 1
                else:
                    self.stats.duplicates += 1
                self.stats.acks += 1
            if new:
                self.metrics.stored.labels(env.kind).inc()
            else:
                self.metrics.duplicates.inc()
            self._evaluate_alerts(env, new)
            acks.setdefault((env.site, env.device), []).append(env.seq)
        for (site, device), seqs in acks.items():
            self._client.publish(topic(site, device, "ack"), encode_ack(seqs), qos=1)
            self.metrics.acks.inc(len(seqs))

    def _evaluate_alerts(self, env: Envelope, new: bool) -> None:
        # a failing rule is logged, never allowed to stop storing and acknowledging
        try:
            self.alerts.on_envelope(env, new)
        except Exception:
            log.exception("alert rules failed on %s/%s seq %d", env.site, env.device, env.seq)
