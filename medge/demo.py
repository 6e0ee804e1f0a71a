"""``medge demo``: the whole chain on one machine, on loopback, replaying real recorded data.

broker (Mosquitto, else embedded amqtt) -> gateway + SQLite -> dashboard, and N simulated
devices running the zoo's int8 CNN on BreastMNIST ultrasound validation images.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import Agent, AgentConfig, Bundle
from edge_agent.bundle import SIGNATURE_NAME, sign_bundle
from gateway import Gateway, Store, start_broker
from gateway.dashboard import DashboardServer
from gateway.dashboard.auth import add_user
from gateway.site import init_site, opener_for, provision_device, signer_key

if TYPE_CHECKING:
    from gateway.broker import BrokerKind

__all__ = ["DemoOptions", "DeviceSummary", "run_demo"]

log = logging.getLogger("medge.demo")

SITE = "demo-ward"


@dataclass
class DemoOptions:
    duration: float | None = None
    devices: int = 2
    broker: BrokerKind = "auto"
    host: str = "127.0.0.1"
    port: int = 8080
    rate_hz: float = 4.0
    bundle: Path | None = None
    workdir: Path | None = None
    data: Path | None = None


@dataclass(frozen=True)
class DeviceSummary:
    device: str
    sent: int
    stored: int
    duplicates: int
    pending: int

    @property
    def ok(self) -> bool:
        return self.stored >= self.sent and self.pending == 0


def run_demo(opts: DemoOptions, announce: Any = print) -> list[DeviceSummary]:
    """Run until ``opts.duration`` passes or SIGINT/SIGTERM; return the per-device summary."""
    from medge.zoo import breast_cnn_bundle
    from models import breast_cnn

    data = opts.data or breast_cnn.DATA
    base = opts.workdir or Path(tempfile.mkdtemp(prefix="medge-demo-"))
    run = base / time.strftime("run-%Y%m%d-%H%M%S")
    run.mkdir(parents=True, exist_ok=False)
    site_dir = run / "site"
    init_site(site_dir, SITE)  # throwaway keys for this run
    signer = site_dir / "bundle-signer.key"
    bundle = Bundle.load(opts.bundle) if opts.bundle else breast_cnn_bundle(sign_key=signer)
    bundle = _signed_copy(bundle, run / "bundle", site_dir)
    users = run / "dashboard-users.json"
    password = add_user(users, "demo")  # a throwaway login for this run only
    stop = threading.Event()
    previous = _install_signal_handlers(stop)
    agents: list[Agent] = []
    try:
        with (
            start_broker(opts.broker) as broker,
            Store(run / "gateway.sqlite") as store,
            Gateway(store, opener_for(site_dir), broker.host, broker.port, broker.protocol),
            DashboardServer(
                run / "gateway.sqlite", opts.host, opts.port, title="medge demo", users=users
            ) as dash,
        ):
            threads = []
            for i in range(opts.devices):
                name = f"us-{i + 1:02d}"
                cfg = AgentConfig.model_validate(
                    {
                        "site": SITE,
                        "device": name,
                        "bundle": bundle.directory,
                        "identity": provision_device(site_dir, name, run / "identities" / name),
                        "broker": {
                            "host": broker.host,
                            "port": broker.port,
                            "protocol": broker.protocol,
                        },
                        "source": {
                            "path": data,
                            "split": "val",
                            "rate_hz": opts.rate_hz,
                            "loop": True,
                        },
                        "outbox": {"path": run / f"outbox-us-{i + 1:02d}.sqlite"},
                        "telemetry_interval_s": 1.0,
                    }
                )
                agent = Agent(cfg)
                agents.append(agent)
                t = threading.Thread(target=agent.run, args=(stop,), name=cfg.device, daemon=True)
                threads.append(t)
            for t in threads:
                t.start()
            announce(
                f"medge demo: {opts.devices} device(s) on site '{SITE}', broker "
                f"{broker.kind} (MQTT {broker.protocol}) at {broker.host}:{broker.port}"
            )
            announce(f"medge demo: bundle {bundle.id}")
            announce(f"medge demo: dashboard at {dash.url} (user 'demo', password {password})")
            announce(
                "medge demo: press Ctrl-C to stop"
                if opts.duration is None
                else f"medge demo: running for {opts.duration:g} s"
            )
            stop.wait(opts.duration)
            stop.set()
            for t in threads:
                t.join(timeout=30)
            time.sleep(0.2)  # the last state messages
            return _summary(store, agents)
    finally:
        _restore_signal_handlers(previous)


def _signed_copy(bundle: Bundle, dst: Path, site_dir: Path) -> Bundle:
    """The bundle as this site's devices will accept it: signed by the site's bundle signer."""
    shutil.copytree(bundle.directory, dst, ignore=shutil.ignore_patterns(SIGNATURE_NAME))
    key = signer_key(site_dir)
    sign_bundle(dst, key)
    return Bundle.load(dst, trusted=[key.public_key()])


def _summary(store: Store, agents: list[Agent]) -> list[DeviceSummary]:
    by_name = {d["device"]: d for d in store.devices() if d["site"] == SITE}
    out = []
    for a in agents:
        row = by_name.get(a.cfg.device, {})
        out.append(
            DeviceSummary(
                device=a.cfg.device,
                sent=a.sent,
                stored=int(row.get("stored", 0)),
                duplicates=int(row.get("duplicates", 0)),
                pending=a.pending,
            )
        )
    return out


def _install_signal_handlers(stop: threading.Event) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda *_: stop.set())
    return previous


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
