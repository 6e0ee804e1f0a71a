"""A gateway worker built from its config section (gateway.config): the opener of the site's
keys, the alert rules, the forwarder to the cloud and the Gateway itself, each from its own
sub-model. ``medge gateway run`` is :func:`run_gateway` under signal handling."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from edge_agent.envelope import Opener
from edge_agent.errors import MedgeError
from gateway.alert_rules import AlertRules, load_alert_rules
from gateway.config import GatewayConfig, parse_host_port
from gateway.forward import Forwarder, ForwardOutbox
from gateway.service import Gateway, GatewayStats

if TYPE_CHECKING:
    from gateway.clinical.sender import ClinicalSender
    from gateway.ota import BundleServer
    from gateway.rollout import RolloutDriver
    from gateway.store import Store

__all__ = [
    "build_clinical",
    "build_forwarder",
    "build_opener",
    "build_rules",
    "run_gateway",
    "start_rollouts",
]

log = logging.getLogger("medge.gateway")


def build_opener(cfg: GatewayConfig) -> Opener:
    """What the worker opens envelopes with: the site's keys, ``relay_for``, ``cloud_key``."""
    from gateway.site import opener_for

    return opener_for(cfg.site_dir, relay_for=tuple(cfg.relay_for), keys=tuple(cfg.cloud_key))


def build_rules(cfg: GatewayConfig) -> AlertRules:
    """The alert rules: the rules file when set (its silence_after wins), else the default
    rules with ``alerts.silence_after``."""
    a = cfg.alerts
    if a.rules is not None:
        return load_alert_rules(a.rules, a.silence_after)
    return AlertRules(silence_after=a.silence_after)


def build_forwarder(cfg: GatewayConfig) -> Forwarder | None:
    """The forwarder to the cloud broker (``forward.to``), None when forwarding is off."""
    f = cfg.forward
    if f.to is None:
        return None
    host, port = parse_host_port(f.to)
    return Forwarder(
        ForwardOutbox(cfg.forward_outbox()),
        host,
        port,
        client_id=f"{cfg.broker.client_id}-forward",
        resend_after=f.resend_after,
        tls=f.tls.files() if f.tls is not None else None,
    )


def build_clinical(cfg: GatewayConfig) -> ClinicalSender | None:
    """The clinical outputs (``outputs``: PACS, FHIR) and their outbox, None when off (the
    Gateway counts them in its metrics)."""
    if cfg.outputs is None or (cfg.outputs.pacs is None and cfg.outputs.fhir is None):
        return None
    from gateway.clinical.outbox import ClinicalOutbox
    from gateway.clinical.sender import ClinicalSender

    return ClinicalSender(ClinicalOutbox(cfg.clinical_outbox()), cfg.outputs)


def start_rollouts(cfg: GatewayConfig, store: Store, gw: Gateway) -> RolloutService:
    """The rollouts' bundle server and driver (``rollouts:``), started: the driver publishes
    its signed commands through the gateway's own MQTT session (docs/rollouts.md)."""
    from gateway.metrics import RolloutMetrics
    from gateway.ota import BundleServer, address_toward
    from gateway.rollout import RolloutDriver
    from gateway.site import signer_key

    ro = cfg.rollouts
    assert ro is not None
    folder = cfg.rollout_bundles()
    folder.mkdir(parents=True, exist_ok=True)
    url_host = ro.url_host or (
        ro.http_host
        if ro.http_host not in ("0.0.0.0", "::", "")  # noqa: S104
        else address_toward(cfg.broker.host, cfg.broker.port)
    )

    def publish(where: str, payload: bytes) -> bool:
        info = gw.session.publish(where, payload, qos=1)
        info.wait_for_publish(timeout=5.0)
        return bool(info.is_published())

    server = BundleServer(folder, ro.http_host, ro.http_port, url_host=url_host).__enter__()
    driver = RolloutDriver(
        store,
        publish,
        signer_key(cfg.site_dir),
        server.url,
        poll_s=ro.poll_s,
        metrics=RolloutMetrics.of(gw.metrics.registry),
        on_alert=gw.metrics.alert,
    ).start()
    log.info("rollouts: serving %s at %s", folder, server.url(""))
    return RolloutService(server, driver)


class RolloutService:
    """The bundle server and the driver of rollouts, stopped together."""

    def __init__(self, server: BundleServer, driver: RolloutDriver) -> None:
        self.server, self.driver = server, driver

    def workers(self) -> dict[str, threading.Thread | None]:
        return {"rollout-driver": self.driver.thread}

    def stop(self) -> None:
        self.driver.stop()
        self.server.__exit__(None, None, None)


def run_gateway(cfg: GatewayConfig, stop: threading.Event) -> GatewayStats:
    """Run one supervised worker until ``stop``; a worker that dies raises MedgeError naming
    it (one line), so systemd restarts the service. Returns the counts at the end."""
    from edge_agent.supervisor import Supervisor
    from gateway.forward import backfill, parse_since
    from gateway.metrics import MetricsServer
    from gateway.store import Store

    cfg.check_combination()
    since = parse_since(cfg.forward.backfill) if cfg.forward.backfill else None
    opener = build_opener(cfg)
    forward = build_forwarder(cfg)
    clinical = build_clinical(cfg)
    rules = build_rules(cfg)
    with Supervisor() as sup, Store(cfg.store.target()) as store:
        gw = Gateway.from_config(
            cfg, store, opener, rules=rules, forward=forward, clinical=clinical
        )
        metrics = rollout = None
        try:
            gw.start(timeout=3.0)  # a broker not up yet: one warning, then retried with back-off
            for name, thread in gw.workers().items():
                sup.watch(name, thread)
            if cfg.rollouts is not None:
                rollout = start_rollouts(cfg, store, gw)
                for name, thread in rollout.workers().items():
                    sup.watch(name, thread)
            sup.track("stored", lambda: gw.last_stored)
            if forward is not None and since is not None:
                backfill(store, forward.outbox, since)
            if cfg.metrics.port is not None:
                metrics = MetricsServer(
                    gw.metrics, cfg.metrics.host, cfg.metrics.port, health=sup.health
                ).start()
            log.info("storing into %s; Ctrl-C to stop", store.location)
            death = sup.wait(stop)
        finally:
            if metrics is not None:
                metrics.stop()
            if rollout is not None:
                rollout.stop()
            gw.stop()
            if clinical is not None:
                clinical.outbox.close()
    if death is not None:
        raise MedgeError(f"gateway: {death.line()}")
    return gw.stats
