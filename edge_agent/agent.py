"""The agent: a bundle, a source and a link, run until the source ends or it is told to stop.

Its worker threads (the link's session and pump, the update thread, the telemetry ticker) are
registered with a :class:`~edge_agent.supervisor.Supervisor` while they must run; the metrics
port answers ``/healthz`` from it (``medge agent run`` ends non-zero when one dies)."""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

from edge_agent.bundle import Bundle
from edge_agent.config import AgentConfig
from edge_agent.device_metrics import MetricsServer, device_families
from edge_agent.drift import WatchInputs
from edge_agent.envelope import Sealer
from edge_agent.errors import MedgeError, one_line
from edge_agent.identity import (
    DEVICE_CERT,
    DEVICE_KEY,
    SITE_CA,
    SOURCE_RECIPIENT,
    DeviceIdentity,
)
from edge_agent.link import DeviceLink
from edge_agent.model import LoadedModel
from edge_agent.model_slot import ModelSlot, Probation
from edge_agent.outbox import Outbox
from edge_agent.pipeline import SealSource, build_graph
from edge_agent.shadow import ShadowRun
from edge_agent.source_ids import SourceSealer, no_source_key
from edge_agent.sources import open_source
from edge_agent.supervisor import Supervisor
from edge_agent.telemetry import PipelineStats, device_health
from edge_agent.update import Updater
from edge_agent.window import split_window

__all__ = ["Agent", "AgentReport"]

_NOT_WATCHED = {"watched": False, "why": "the agent config turns input watching off (drift: null)"}
log = logging.getLogger("medge.agent")

FLOAT_CHECK_BUDGET = 0.25  # the float check spends at most this share of the inference time


@dataclass(frozen=True)
class AgentReport:
    device: str
    sent: int
    acked: int
    pending: int
    errors: dict[str, int]


class Agent:
    """Loads and verifies everything up front: a bad bundle stops it before it starts."""

    def __init__(self, cfg: AgentConfig, supervisor: Supervisor | None = None) -> None:
        """``supervisor``: where the agent registers its worker threads (its own if None)."""
        self.cfg = cfg
        self.supervisor = supervisor or Supervisor()
        self.identity = DeviceIdentity.load(cfg.identity, cfg.site, cfg.device)
        self.bundle = Bundle.load(cfg.bundle, trusted=self.identity.signers)
        self.model = LoadedModel(self.bundle, cfg.runtime, cfg.threads, cfg.precision)
        m = self.bundle.manifest
        self.source = open_source(cfg.source, m.window, m.labels)
        self.stats = PipelineStats()
        self.sent = 0
        self.pending = 0
        self._link: DeviceLink | None = None
        self._outbox: Outbox | None = None
        self._updater: Updater | None = None
        self.metrics_port: int | None = None  # where the metrics endpoint listens, once running
        self._float: tuple[Bundle, ShadowRun | None] | None = None  # the float check, per bundle
        # input drift and signal quality against the bundle's reference (edge_agent.drift)
        self._watch = WatchInputs(self._emit, cfg.drift) if cfg.drift is not None else None

    def _compare_runs(self) -> list[ShadowRun]:
        """What runs beside the published model: a rollout's candidate, the float check."""
        runs = (
            [] if self._updater is None or self._updater.shadow is None else [self._updater.shadow]
        )
        float_run = self._float_run()
        return runs if float_run is None else [*runs, float_run]

    def _float_run(self) -> ShadowRun | None:
        """The float check of the running bundle (made again when the bundle changes)."""
        share, bundle = self.cfg.float_check_share, self.bundle
        if share <= 0:
            return None
        if self._float is not None and self._float[0] is bundle:
            return self._float[1]
        run, running, why = None, self.model.artifact, "it has no float (fp32) artifact"
        floats = [
            a for a in bundle.manifest.artifacts if a.precision == "fp32" and a is not running
        ]
        floats.sort(key=lambda a: a.runtime != running.runtime)  # this runtime's first
        if running.precision == "fp32":
            floats, why = [], "it runs the float artifact itself"
        for art in floats:
            try:
                model = LoadedModel(bundle, art.runtime, self.cfg.threads, "fp32")
            except MedgeError as exc:  # e.g. onnxruntime not installed for an ONNX fp32
                why = str(exc)
                continue
            run = ShadowRun(model, share, FLOAT_CHECK_BUDGET, kind="float_check")
            log.info(
                "%s: float check of %s with its %s fp32 artifact on %.0f%% of samples",
                self.cfg.device,
                bundle.id,
                art.runtime,
                share * 100,
            )
            break
        if run is None:
            log.info("%s: no float check of %s: %s", self.cfg.device, bundle.id, one_line(why))
        self._float = (bundle, run)
        return run

    def _source_sealer(self) -> SealSource | None:
        """Seals the UIDs of DICOM sources to the fog node's source key, when the identity
        has one; without it a DICOM source's results say in ``source`` that they carry no
        UIDs, and why (told here once; the fog node parks each with that reason)."""
        key, cfg = self.identity.source_recipient, self.cfg
        if key is not None:
            return SourceSealer(key, cfg.site, cfg.device)
        if cfg.source.kind != "dicom":
            return None
        log.warning(
            "%s: results will carry no source UIDs: the identity has no %s (medge site "
            "source-key, then provision); the gateway cannot write DICOM objects for them",
            cfg.device,
            SOURCE_RECIPIENT,
        )
        return no_source_key

    def run(self, stop: threading.Event, drain_timeout: float = 10.0) -> AgentReport:
        """Stream until the source ends or ``stop`` is set, then wait for acks to drain."""
        cfg = self.cfg
        ident = self.identity
        ob = cfg.outbox
        with Outbox(
            ob.path,
            cfg.site,
            cfg.device,
            batch_max=ob.batch_max,
            batch_ms=ob.batch_ms,
            max_messages=ob.max_messages,
            max_bytes=int(ob.max_mb * 2**20) if ob.max_mb is not None else None,
        ) as outbox:
            outbox.sealer = Sealer(
                cfg.site,
                cfg.device,
                ident.key,
                ident.recipient,
                outbox.next_epoch,
                cfg.epoch_messages,
                end_to_end=cfg.end_to_end,
            )
            if cfg.end_to_end:
                if ident.gateway_recipient is None:
                    raise MedgeError(
                        f"{ident.directory}: end_to_end needs gateway-recipient.json (provision "
                        "the device with --recipient CLOUD.pub.json)"
                    )
                outbox.status_sealer = Sealer(
                    cfg.site,
                    cfg.device,
                    ident.key,
                    ident.gateway_recipient,
                    outbox.next_epoch,
                    cfg.epoch_messages,
                )
            tls = None
            if cfg.broker.tls:
                d = ident.directory
                tls = (d / SITE_CA, d / DEVICE_CERT, d / DEVICE_KEY)
            link = DeviceLink(
                outbox,
                cfg.broker.host,
                cfg.broker.port,
                cfg.broker.protocol,
                cfg.broker.keepalive,
                cfg.outbox.resend_after_s,
                self.bundle.id,
                tls,
                cfg.broker.reconnect_min_s,
                cfg.broker.reconnect_max_s,
            )
            outbox.on_commit = link.notify  # a committed batch can go now
            metrics = None
            if cfg.metrics_port is not None:
                metrics = MetricsServer(
                    lambda: device_families(self, outbox, link),
                    cfg.metrics_host,
                    cfg.metrics_port,
                    health=self.supervisor.health,
                )
            sup = self.supervisor
            sup.track("sent", lambda: link.last_sent)
            sup.track("acked", lambda: link.last_acked)
            with link, metrics or contextlib.nullcontext():
                self.metrics_port = metrics.port if metrics else None
                for name, thread in link.workers().items():
                    sup.watch(name, thread)
                try:
                    return self._run(stop, drain_timeout, outbox, link)
                finally:
                    sup.forget(*link.workers())  # they end now, on purpose

    def _run(
        self, stop: threading.Event, drain_timeout: float, outbox: Outbox, link: DeviceLink
    ) -> AgentReport:
        cfg, sup = self.cfg, self.supervisor
        self._link, self._outbox = link, outbox
        done = threading.Event()
        ticker = threading.Thread(
            target=self._telemetry_loop,
            args=(link, outbox, done),
            daemon=True,
            name=f"telemetry-{cfg.device}",
        )
        ticker.start()
        sup.watch("telemetry", ticker)
        slot = ModelSlot(
            self.model,
            self._swapped,
            self._rolled_back,
            cfg.rollback_failures,
            cfg.rollback_within,
        )
        self._updater = updater = Updater(
            slot,
            self.identity.signers,
            cfg.site,
            cfg.device,
            cfg.outbox.path.parent,
            lambda body: self._emit("event", body),
            lambda b: LoadedModel(b, cfg.runtime, cfg.threads, cfg.precision),
            current_link=cfg.bundle,
        )
        source, window = split_window(self.source)  # the windowing, as its own stage
        graph = build_graph(
            source,
            window,
            Probation(slot, self.stats),
            self._emit,
            self.stats,
            cam=cfg.cam,
            thumbnails=cfg.thumbnails,
            pictures_max_hz=cfg.pictures_max_hz,
            seal_source=self._source_sealer(),
            compare=self._compare_runs,
            watch=self._watch,
        )
        link.on_command = updater.submit
        log.info("%s: running %s on %s", cfg.device, self.bundle.id, self.source.name)
        with updater:
            sup.watch("update", updater.thread)
            try:
                graph.run(stop)
            finally:
                sup.forget("update")  # it ends with this block
        link.on_command = None
        drained = link.drain(drain_timeout)
        if not drained:
            log.warning(
                "%s: %d result(s) not yet acknowledged; they stay in the outbox",
                cfg.device,
                outbox.depth(),
            )
        sup.forget("telemetry")
        done.set()
        ticker.join(timeout=2)
        self._publish_telemetry(link, outbox)
        self.pending = outbox.depth()
        return AgentReport(cfg.device, self.sent, link.acked, self.pending, dict(self.stats.errors))

    # -- what flows out of the graph, and what the model slot reports ------------------------
    def _emit(self, kind: str, body: dict[str, Any]) -> None:
        assert self._outbox is not None
        self._outbox.put(kind, body)  # an event commits at once, a result with its batch
        self.sent += 1

    def mark_failed(self) -> None:
        """The run is ending on a fault (a worker died): its goodbye says ``offline``, which
        the fog node alerts on, not the ``stopped`` of a clean stop."""
        if self._link is not None:
            self._link.goodbye = "offline"

    def _swapped(self, old: LoadedModel, new: LoadedModel) -> None:  # between two samples
        self.model, self.bundle = new, new.bundle
        assert self._link is not None
        self._link.bundle_id = new.bundle.id
        self._emit(
            "event", {"update": "applied", "bundle": new.bundle.id, "previous": old.bundle.id}
        )
        self._link.publish_direct("state", {"state": "online", "bundle": new.bundle.id}, True)
        log.info("%s: now running %s (was %s)", self.cfg.device, new.bundle.id, old.bundle.id)

    def _rolled_back(self, bad: LoadedModel, good: LoadedModel, reason: str) -> None:
        self.model, self.bundle = good, good.bundle
        assert self._link is not None and self._updater is not None
        self._link.bundle_id = good.bundle.id
        self._updater.rolled_back(bad.bundle, good.bundle)
        body = {"update": "rolled_back", "bundle": bad.bundle.id, "running": good.bundle.id}
        self._emit("event", {**body, "reason": reason})
        self._link.publish_direct("state", {"state": "online", "bundle": good.bundle.id}, True)
        log.warning(
            "%s: rolled back from %s to %s: %s",
            self.cfg.device,
            bad.bundle.id,
            good.bundle.id,
            reason,
        )

    def telemetry(self, outbox: Outbox) -> dict[str, Any]:
        body = self.stats.snapshot()
        body.update(device_health())
        body["outbox_depth"] = outbox.depth()
        body["outbox_bytes"] = outbox.size_bytes()
        body["outbox_drops"] = dict(outbox.drops)
        if self._link is not None:
            body["mqtt"] = {
                "connected": self._link.connected,
                "protocol": self._link.protocol_in_use,
                "connects": self._link.connects,
                "connect_failures": self._link.connect_failures,
            }
        body["source_errors"] = dict(getattr(self.source, "errors", {}) or {})
        body["sent"] = self.sent
        body["bundle"] = self.bundle.id
        inputs = self._watch.snapshot() if self._watch is not None else dict(_NOT_WATCHED)
        if inputs is not None:
            body["inputs"] = inputs
        shadow = self._updater.shadow if self._updater is not None else None
        if shadow is not None:
            body["shadow"] = shadow.snapshot()
        checked = self._float[1] if self._float is not None else None
        if checked is not None and self._float is not None and self._float[0] is self.bundle:
            body["float_check"] = checked.snapshot()
        return body

    def _publish_telemetry(self, link: DeviceLink, outbox: Outbox) -> None:
        link.publish_direct("telemetry", self.telemetry(outbox))

    def _telemetry_loop(self, link: DeviceLink, outbox: Outbox, done: threading.Event) -> None:
        while not done.wait(self.cfg.telemetry_interval_s):
            self._publish_telemetry(link, outbox)
