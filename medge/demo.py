"""``medge demo``: the whole chain on one machine, on loopback, replaying real recorded data.

broker (Mosquitto, else embedded amqtt) -> gateway + SQLite -> dashboard, and simulated devices:
one per scenario (medge/demo_scenarios.py: ultrasound, X-ray, wrist IMU, ECG), each running its
zoo model's bundle on its modality's recorded stream (real; the wrist stream's falls are
simulated).
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
from edge_agent.errors import MedgeError
from gateway import Gateway, Store, start_broker
from gateway.dashboard import DashboardServer
from gateway.dashboard.auth import add_user
from gateway.site import init_site, opener_for, provision_device, signer_key
from medge.demo_scenarios import SCENARIOS, Scenario, scenario

if TYPE_CHECKING:
    from gateway.broker import BrokerKind

__all__ = ["DemoOptions", "DeviceSummary", "run_demo"]

log = logging.getLogger("medge.demo")

SITE = "demo-ward"


@dataclass
class DemoOptions:
    duration: float | None = None
    devices: int = 1  # per scenario
    broker: BrokerKind = "auto"
    host: str = "127.0.0.1"
    port: int = 8080
    rate_hz: float = 4.0
    bundle: Path | None = None
    workdir: Path | None = None
    data: Path | None = None
    scenarios: list[str] | None = None  # None: all (only 'ultrasound' with bundle)


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
    data = opts.data
    base = opts.workdir or Path(tempfile.mkdtemp(prefix="medge-demo-"))
    run = base / time.strftime("run-%Y%m%d-%H%M%S")
    run.mkdir(parents=True, exist_ok=False)
    site_dir = run / "site"
    init_site(site_dir, SITE)  # throwaway keys for this run
    plan = _plan(opts, site_dir, run)
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
            for chosen, bundle in plan:
                for i in range(opts.devices):
                    name = f"{chosen.prefix}-{i + 1:02d}"
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
                            "source": chosen.source(opts.rate_hz, data),
                            "outbox": {"path": run / f"outbox-{name}.sqlite"},
                            "telemetry_interval_s": 1.0,
                        }
                    )
                    agent = Agent(cfg)
                    agents.append(agent)
                    t = threading.Thread(
                        target=agent.run, args=(stop,), name=cfg.device, daemon=True
                    )
                    threads.append(t)
            for t in threads:
                t.start()
            announce(
                f"medge demo: {len(agents)} device(s) on site '{SITE}', broker "
                f"{broker.kind} (MQTT {broker.protocol}) at {broker.host}:{broker.port}"
            )
            for chosen, bundle in plan:
                announce(f"medge demo: {chosen.name}: {chosen.summary}; bundle {bundle.id}")
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


def _plan(opts: DemoOptions, site_dir: Path, run: Path) -> list[tuple[Scenario, Bundle]]:
    """Each chosen scenario with its bundle, signed by this run's site."""
    import models
    from medge.zoo import build

    if opts.scenarios is not None:
        chosen = [scenario(n) for n in opts.scenarios]
    elif opts.bundle is not None:
        chosen = [scenario("ultrasound")]
    else:
        zoo = set(models.names())
        chosen = [s for s in SCENARIOS if s.model in zoo]
    if opts.bundle is not None and len(chosen) != 1:
        raise MedgeError("--bundle replaces one scenario's model: name it with --scenario")
    signer = site_dir / "bundle-signer.key"
    plan = []
    for s in chosen:
        if opts.bundle is not None:
            bundle = Bundle.load(opts.bundle)
        else:  # the LiteRT file only: each model converts in seconds on a first run
            bundle = build(s.model, sign_key=signer, lean=True)
        plan.append((s, _signed_copy(bundle, run / "bundles" / s.name, site_dir)))
    return plan


def _signed_copy(bundle: Bundle, dst: Path, site_dir: Path) -> Bundle:
    """The bundle as this site's devices will accept it: signed by the site's bundle signer."""
    shutil.copytree(  # copyfile: new files under the process umask, not the source's modes
        bundle.directory,
        dst,
        ignore=shutil.ignore_patterns(SIGNATURE_NAME),
        copy_function=shutil.copyfile,
    )
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
