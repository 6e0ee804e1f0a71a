"""The gateway service: subscribe, open and check device messages, store each result once,
acknowledge what is stored, track device state, raise alerts (gateway.alerts: evaluated as
each message is accepted, and by a silence watchdog thread between start() and stop()) and
count it all (gateway.metrics).

Order matters for no loss: a result is committed to the store before its ack is published, and
a duplicate is acknowledged again (its first ack may have been lost) but not stored again.

Flood limiting: each (site, device) has a token bucket (``device_rate`` messages per second,
``device_burst`` at once). A message over the limit is dropped before it is opened, counted
(``reason="rate_limit"``) and logged once per interval per device (gateway.rejections); it is
never acknowledged, so a device's outbox sends it again later and nothing is lost. ``state``
messages (the Last Will, retained) are never limited.

The MQTT side is an :class:`~edge_agent.mqtt_session.MqttSession`: reconnects with jittered
back-off (a broker down at start is retried), and any exception while handling one message
rejects that message with its :class:`~edge_agent.reasons.Reason` (metrics and audit use the
code), logged once per reason and interval; the network thread goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import paho.mqtt.client as mqtt

from edge_agent.envelope import Envelope, Opener, encode_ack, encode_limits
from edge_agent.errors import EnvelopeError, MedgeError, one_line
from edge_agent.mqtt_session import MqttSession
from edge_agent.reasons import Reason
from edge_agent.topics import ROOT, parse, topic
from gateway.alerts import AlertEngine, AlertRules
from gateway.config import BatchingSettings, GatewayConfig
from gateway.dashboard.cam import check_cam
from gateway.forward import Forwarder
from gateway.limits import DeviceLimiter
from gateway.metrics import GatewayMetrics
from gateway.rejections import Rejections
from gateway.store import Store

if TYPE_CHECKING:  # the clinical outputs import their DICOM/FHIR libraries only when used
    from gateway.clinical.sender import ClinicalSender

__all__ = ["DeviceLimiter", "Gateway", "GatewayStats"]

log = logging.getLogger("medge.gateway")

_UP = ("result", "event", "state", "telemetry")


@dataclass(frozen=True)
class GatewayStats:
    """What a gateway has counted so far, read from its Prometheus counters
    (:meth:`GatewayMetrics.totals`): one count, shown two ways. ``gw.stats`` is a snapshot."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    acks: int = 0
    rate_limited: int = 0  # also counted in ``rejected``
    store_refused: int = 0  # rows the store refused (Reason.STORE), also in ``rejected``

    @classmethod
    def of(cls, metrics: GatewayMetrics) -> GatewayStats:
        return cls(**metrics.totals())


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
        clinical: ClinicalSender | None = None,
        device_rate: float = 100.0,
        device_burst: float = 1000.0,
        batching: BatchingSettings | None = None,
    ) -> None:
        """``forward``: also queue every stored result and event for the cloud (gateway.forward),
        durably, before the device is acknowledged, and the latest state and telemetry of each
        device; the Gateway starts and stops it. ``device_rate``/``device_burst``: the flood
        limit per device (messages per second, at once; rate 0: no limit). ``batching``: the
        group commit of results (window, when_idle, max). :meth:`from_config` takes all of
        these from the ``gateway:`` section of gateway.yaml (gateway.config)."""
        self.store = store
        self.forward = forward
        # clinical outputs (gateway.clinical): each stored result/event they take is queued
        # durably, like the forward outbox, before the device is acknowledged
        self.clinical = clinical
        self.opener = opener
        self.max_skew_s = 300.0
        self.host, self.port = host, port
        self.metrics = GatewayMetrics(store)
        if clinical is not None and clinical.metrics is None:  # counted with the gateway's own
            from gateway.metrics import ClinicalMetrics

            clinical.metrics = ClinicalMetrics(self.metrics.registry)
        self.alerts = AlertEngine(store, rules, on_raise=self.metrics.alert)
        self.last_stored: float | None = None  # time.time() of the last commit of results
        # group commit: the writer commits at once what is waiting (at most batching.max);
        # what arrives during a commit goes into the next, so batches grow with the load by
        # themselves. batching.when_idle: wait batching.window before every commit (the fixed
        # window of earlier versions; for comparison in bench/gateway_throughput.py)
        self.batching = batching or BatchingSettings()
        self.limiter = DeviceLimiter(device_rate, device_burst)
        self._pending: queue.Queue[tuple[Envelope, str, bytes]] = queue.Queue()
        self._writer_stop = threading.Event()
        self._writer = threading.Thread(target=self._run_writer, name="gateway-writer", daemon=True)
        self.store_failures_fatal = 3  # failed commits in a row that end the writer
        # a store that does not answer at all (PostgreSQL restarting, failing over) is waited
        # for this long, with back-off, before the writer gives up
        self.store_down_fatal_s = 60.0
        # when this gateway began serving: its start, its last (re)connect to the broker, its
        # store back after an outage. Told to each device with its limits; a device that sees
        # it move on sends what it holds again at once, events first (edge_agent.link)
        self.serving_since = time.time()
        self._v5 = protocol == "5"
        prefix = f"$share/{share_group}/" if share_group and self._v5 else ""
        self.session = MqttSession(
            "gateway",
            host,
            port,
            protocol=protocol,
            client_id=client_id,
            tls=tls,
            subscriptions=[(f"{prefix}{ROOT}/+/+/{kind}", 1) for kind in _UP],
            on_message=self._on_message,
            on_reject=self._on_reject,
            on_connect=self._on_connect,
            reconnect_min_s=0.5,
            reconnect_max_s=10.0,
            logger=log,
        )
        # audit rows in pace and rate-limit lines; the metrics count every message
        self.rejections = Rejections(store, self.metrics, self.limiter, self.session.rejects)

    @classmethod
    def from_config(
        cls,
        cfg: GatewayConfig,
        store: Store,
        opener: Opener,
        rules: AlertRules | None = None,
        forward: Forwarder | None = None,
        clinical: ClinicalSender | None = None,
    ) -> Gateway:
        """A worker with the broker, limits and batching of ``cfg`` (``rules``, ``forward`` and
        ``clinical`` are built from its alerts, forward and outputs sections by gateway.node)."""
        b = cfg.broker
        tls = None
        if b.tls:
            from gateway.broker_config import gateway_client_files

            tls = gateway_client_files(cfg.site_dir)
        return cls(
            store,
            opener,
            b.host,
            b.port,
            b.protocol,
            client_id=b.client_id,
            share_group=b.share_group,
            tls=tls,
            rules=rules,
            forward=forward,
            clinical=clinical,
            device_rate=cfg.limits.device_rate,
            device_burst=cfg.limits.device_burst,
            batching=cfg.batching,
        )

    @property
    def stats(self) -> GatewayStats:
        """A snapshot of the counts, read from :attr:`metrics` (they are counted once)."""
        return GatewayStats.of(self.metrics)

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> Gateway:
        """Start every worker; wait up to ``timeout`` s for the broker. One that is not there
        yet is one warning line, and the session keeps trying with back-off. The outboxes'
        senders start first: each refuses (MedgeError) when another process sends from its
        file, and then nothing of this gateway runs."""
        if self.forward is not None:
            self.forward.start()
        if self.clinical is not None:
            try:
                self.clinical.start()
            except BaseException:
                if self.forward is not None:
                    self.forward.stop()
                raise
        self._writer.start()
        self.session.start()
        if not self.session.wait_connected(timeout):
            log.warning("gateway: no broker at %s:%d yet; still trying", self.host, self.port)
        self.alerts.start()  # the silence watchdog
        return self

    @property
    def connected(self) -> bool:
        return self.session.connected

    def workers(self) -> dict[str, threading.Thread | None]:
        """The threads that must stay alive while the gateway runs (for a Supervisor)."""
        found: dict[str, threading.Thread | None] = {
            "gateway-writer": self._writer,
            "gateway-mqtt": self.session.thread,
            "alert-watchdog": self.alerts.thread,
        }
        if self.forward is not None:
            found.update(self.forward.workers())
        if self.clinical is not None:
            found.update(self.clinical.workers())
        return found

    def stop(self) -> None:
        self.session.stop()
        self._writer_stop.set()  # what was received is still committed (and not acked)
        if self._writer.is_alive():
            self._writer.join(timeout=10)
        self.rejections.flush()
        self.alerts.stop()
        if self.forward is not None:
            self.forward.stop()
        if self.clinical is not None:
            self.clinical.stop()

    def _on_reject(self, msg: mqtt.MQTTMessage, reason: Reason, _exc: BaseException) -> None:
        """The session rejected ``msg`` (and logged it): count it, charge its device."""
        site: str | None
        device: str | None
        try:
            parts = parse(msg.topic)
            site, device = parts.site, parts.device
        except (EnvelopeError, UnicodeDecodeError):
            site = device = None
        self._record_reject(reason, site, device)
        if device is not None:  # results in flight first: the device's row may be among them
            self._settle(timeout=10.0)
        self.rejections.audit(site, device, reason.value)

    def _settle(self, timeout: float) -> None:
        """Wait until the writer has handled what is queued (at most ``timeout`` s, and not
        at all once it is dead: the network thread must never hang on it)."""
        q = self._pending
        with q.all_tasks_done:
            q.all_tasks_done.wait_for(
                lambda: q.unfinished_tasks == 0 or not self._writer.is_alive(), timeout
            )

    def _record_reject(self, reason: Reason, site: str | None, device: str | None) -> None:
        self.metrics.reject(reason)

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        self.metrics.received.inc()
        # any exception below rejects this message only (MqttSession's boundary: _on_reject)
        parts = parse(msg.topic)
        if parts.kind != "state" and not self.limiter.allow(parts.site, parts.device):
            self.rejections.rate_limited(parts.site, parts.device, cast(bytes, msg.payload))
            return  # not acknowledged: the device's outbox sends it again
        payload = cast(bytes, msg.payload)  # received: bytes (paho types it bytes | bytearray)
        env = self.opener.open(payload)
        env.check_topic(parts)
        if env.time > time.time() + self.max_skew_s:
            raise EnvelopeError(
                f"time {env.time:.0f} is more than {self.max_skew_s:.0f} s "
                "ahead of the gateway's clock",
                Reason.CLOCK,
            )
        if env.kind in ("state", "telemetry") and not self._newer(env, msg):
            return  # the broker's retained copy of a state this store has
        if env.kind in ("result", "event"):
            if "cam" in env.body:
                env = self._check_cam(env)
            self._pending.put((env, msg.topic, payload))  # the writer commits, then acks
        elif env.kind == "state":
            state = env.body.get("state")
            if state not in ("online", "offline", "stopped"):
                raise EnvelopeError(f"state {state!r} is not online/offline/stopped", Reason.SCHEMA)
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
            self._forward_latest(env, msg)
            if state == "online":
                self._announce_limits(env.site, env.device)
        else:
            with self.metrics.store_write.labels(env.kind).time():
                self.store.set_telemetry(env.site, env.device, env.body)
            self._evaluate_alerts(env, True)
            self._forward_latest(env, msg)

    def _newer(self, env: Envelope, msg: mqtt.MQTTMessage) -> bool:
        """True for a state/telemetry newer than the store's; False for the broker's retained
        copy of a state it already has, delivered again on (re)subscribing: not a replay (it
        stores nothing; counted, and the device's limits are told again, as this gateway may
        have new ones). Anything else not newer is a replay."""
        if self.store.advance(env.site, env.device, env.kind, env.seq):
            return True
        if msg.retain and env.kind == "state":
            self.metrics.retained_known.inc()
            log.debug("retained state of %s/%s seq %d: known", env.site, env.device, env.seq)
            if env.body.get("state") == "online":
                self._announce_limits(env.site, env.device)
            return False
        raise EnvelopeError(
            f"{env.kind} seq {env.seq} is not newer than the last one (replayed or stale)",
            Reason.REPLAY,
        )

    def _on_connect(self, _client: mqtt.Client) -> None:
        """(Re)connected to the broker: what devices sent meanwhile may never have reached
        this gateway. The retained 'online' states come again with the subscriptions, and
        each is answered with limits carrying the new serving time."""
        self.serving_since = time.time()

    def _serving_again(self, why: str) -> None:
        """The store answered again: what was dropped unacknowledged meanwhile is in the
        devices' outboxes; tell every online device the new serving time now."""
        self.serving_since = time.time()
        try:
            online = [
                (d["site"], d["device"]) for d in self.store.devices() if d["state"] == "online"
            ]
        except Exception as exc:  # the next batch or state message tells them anyway
            log.error("serving again (%s): listing devices failed: %s", why, one_line(str(exc)))
            return
        log.warning("%s: telling %d online device(s) to send what they hold", why, len(online))
        for site, device in online:
            self._announce_limits(site, device)

    def _announce_limits(self, site: str, device: str) -> None:
        """Tell a device that came online its flood limit (retained on .../limits), so it
        drains a backlog at a pace this gateway takes instead of being refused, and since when
        this gateway serves (:attr:`serving_since`)."""
        rate = self.limiter.rate if self.limiter.rate > 0 else 0.0
        payload = encode_limits(rate, self.limiter.burst, self.serving_since)
        self.session.publish(topic(site, device, "limits"), payload, qos=1, retain=True)
        self.metrics.limits_announced.inc()

    def _forward_latest(self, env: Envelope, msg: mqtt.MQTTMessage) -> None:
        """The cloud's fleet view: the device's newest state/telemetry, as the device sent it."""
        if self.forward is None:
            return
        try:
            if self.forward.put_latest(
                env.site, env.device, env.kind, env.seq, msg.topic, cast(bytes, msg.payload)
            ):
                self.metrics.forward_latest.labels(env.kind).inc()
        except Exception:  # the fleet view may lag; storing and acknowledging go on
            log.exception(
                "queueing %s of %s/%s for the cloud failed", env.kind, env.site, env.device
            )

    def _check_cam(self, env: Envelope) -> Envelope:
        """Keep a result's CAM thumbnail only if it is a small PNG (gateway.dashboard.cam);
        otherwise store the result without it, count and log why (the original message, with
        the CAM, is still kept as ``raw`` and forwarded)."""
        _, why = check_cam(env.body["cam"])
        if why is None:
            return env
        self.metrics.cam_dropped.labels(why).inc()
        log.warning(
            "CAM of %s/%s seq %d dropped (%s); the result is stored without it",
            env.site,
            env.device,
            env.seq,
            why,
        )
        return replace(env, body={k: v for k, v in env.body.items() if k != "cam"})

    def _run_writer(self) -> None:
        """Commit a batch in one transaction (one fsync instead of one per result), queue it
        for the cloud, then acknowledge: commit before ack. Group commit: the writer never
        waits for more results (waiting adds latency to every result in hand) and batches
        grow with the load by themselves, as what arrives during one commit goes into the
        next: idle, a result is committed alone at once; busy, a gateway spends fewer commits
        and acks per result. Only ``batching.when_idle`` waits ``batching.window`` first."""
        failures, down_since = 0, None
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            try:
                self._write(batch)
                if down_since is not None:
                    self._serving_again(f"the store is back after {failures} failure(s)")
                failures, down_since = 0, None
            except Exception as exc:  # not acknowledged: the devices send these again
                failures += 1
                why = one_line(f"{type(exc).__name__}: {exc}")
                if self.store.answers():  # it answers but refuses this: no use waiting
                    down_since = None
                    log.error(
                        "storing %d result(s) failed (%d in a row): %s", len(batch), failures, why
                    )
                    if failures >= self.store_failures_fatal:  # end the writer
                        raise MedgeError(
                            f"the store failed {failures} commits in a row: {why}"
                        ) from exc
                else:
                    down_since = down_since or time.monotonic()
                    self._store_down(len(batch), failures, time.monotonic() - down_since, why)
            finally:
                for _ in batch:
                    self._pending.task_done()

    def _next_batch(self) -> list[tuple[Envelope, str, bytes]] | None:
        """What waits now, at most ``batching.max`` (``when_idle``: what arrives within
        ``batching.window`` of the first); [] when nothing came for 0.2 s, None to stop."""
        try:
            first = self._pending.get(timeout=0.2)
        except queue.Empty:
            return None if self._writer_stop.is_set() else []
        batch = [first]
        deadline = time.monotonic() + (self.batching.window if self.batching.when_idle else 0)
        while len(batch) < self.batching.max:
            try:  # what queued up during the last commit joins this one
                wait = deadline - time.monotonic()
                batch.append(
                    self._pending.get(timeout=wait) if wait > 0 else self._pending.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def _store_down(self, n: int, failures: int, down_s: float, why: str) -> None:
        """The store does not answer: drop what waits (not acknowledged: the devices send it
        again, so nothing is lost and memory stays bounded), say so, back off; after
        ``store_down_fatal_s`` end the writer (the process exits non-zero)."""
        dropped = 0
        while True:
            try:
                self._pending.get_nowait()
            except queue.Empty:
                break
            self._pending.task_done()
            dropped += 1
        self.metrics.store_down_dropped.inc(n + dropped)
        log.error(
            "storing %d result(s) failed: the store does not answer (for %.1f s, %d failures "
            "in a row; %d more waiting dropped unacknowledged: the devices send them again): %s",
            n,
            down_s,
            failures,
            dropped,
            why,
        )
        if down_s >= self.store_down_fatal_s:
            raise MedgeError(f"the store has not answered for {down_s:.0f} s: {why}")
        self._writer_stop.wait(min(2.0, 0.05 * 2 ** min(failures, 6)))

    def _write(self, batch: list[tuple[Envelope, str, bytes]]) -> None:
        items = [(env, raw if env.sealed is None else None) for env, _, raw in batch]
        t0 = time.perf_counter()
        news: list[bool | None] = list(self.store.add_results(items, time.time()))
        self.last_stored = time.time()
        share = (time.perf_counter() - t0) / len(batch)  # one commit, shared by the batch
        self.metrics.store_batch.observe(len(batch))
        for env, _, _ in batch:
            self.metrics.store_write.labels(env.kind).observe(share)
        refused = [(env, t) for (env, t, _), new in zip(batch, news, strict=True) if new is None]
        for env, t in refused:  # the store logged why; not acknowledged, not forwarded
            self._record_reject(Reason.STORE, env.site, env.device)
            self.session.rejects.add(Reason.STORE, f"gateway: store refused seq {env.seq} on {t}")
            try:
                self.rejections.audit(env.site, env.device, Reason.STORE.value)
            except Exception as exc:  # the audit row only; the rejection is counted above
                log.error("auditing a refused row failed: %s", one_line(str(exc)))
        kept = [(item, new) for item, new in zip(batch, news, strict=True) if new is not None]
        if self.forward is not None and kept:  # a resend is queued again: its first may be lost
            self.forward.put_many(
                [(e.site, e.device, e.seq, e.kind, t, raw) for (e, t, raw), _ in kept]
            )
        if self.clinical is not None and kept:  # a resend too: sending again is idempotent
            self.clinical.put([self._clinical_row(env) for (env, _, _), _ in kept if env.body])
        acks: dict[tuple[str, str], list[int]] = {}
        for (env, _, _), new in kept:
            if new:
                self.metrics.stored.labels(env.kind).inc()
            else:
                self.metrics.duplicates.inc()
            self._evaluate_alerts(env, new)
            acks.setdefault((env.site, env.device), []).append(env.seq)
        for (site, device), seqs in acks.items():
            self.session.publish(topic(site, device, "ack"), encode_ack(seqs), qos=1)
            self.metrics.acks.inc(len(seqs))

    def _clinical_row(
        self, env: Envelope
    ) -> tuple[str, str, int, str, float, str | None, dict[str, Any]]:
        """A stored message as the clinical outputs take it, with the bundle that made it: a
        result names its own; an event, the device's bundle as its state and telemetry said."""
        bundle = env.body.get("bundle")
        if env.kind == "event" or not isinstance(bundle, str):
            rows = self.store.query(
                "SELECT bundle FROM devices WHERE site=? AND device=?", (env.site, env.device)
            )
            bundle = rows[0]["bundle"] if rows else None
        return (env.site, env.device, env.seq, env.kind, env.time, bundle, env.body)

    def _evaluate_alerts(self, env: Envelope, new: bool) -> None:
        # a failing rule is logged, never allowed to stop storing and acknowledging
        try:
            self.alerts.on_envelope(env, new)
        except Exception:
            log.exception("alert rules failed on %s/%s seq %d", env.site, env.device, env.seq)
