"""`medge gateway ...` and `medge dashboard ...`: the fog-node service and its web page.

The gateway package is imported only when one of these commands runs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.errors import MedgeError
from medge.cli_site import register_broker_config

__all__ = ["cmd_dashboard", "cmd_dashboard_add_user", "cmd_gateway_run", "register"]


_DB_HELP = (
    "the store: a SQLite file (default gateway.sqlite; also sqlite:///FILE) or a PostgreSQL "
    "URL postgresql://USER[:PASSWORD]@HOST[:PORT]/DB shared by several gateway workers "
    "(docs/config.md, 'Gateway storage')"
)


def _db_arg(text: str) -> Path | str:
    """--db: a postgresql:// URL, kept as text; otherwise a SQLite file (path or sqlite:///)."""
    if text.startswith(("postgresql://", "postgres://")):
        return text
    return Path(text.removeprefix("sqlite:///"))


def _forward_outbox_beside(db: Path | str) -> Path:
    """The default forward outbox: DB.forward.sqlite beside a SQLite --db."""
    if isinstance(db, str):
        raise MedgeError("--forward-to with a PostgreSQL --db needs --forward-outbox FILE: the "
                         "forward outbox is a file on this gateway's own disk")
    return db.with_name(db.stem + ".forward.sqlite")


def cmd_gateway_run(a: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; a worker that dies ends the command non-zero on one line
    (edge_agent.supervisor), so systemd restarts it."""
    import signal
    import threading

    from edge_agent.supervisor import Supervisor
    from gateway import Gateway, Store
    from gateway.alerts import AlertRules
    from gateway.broker_config import gateway_client_files
    from gateway.forward import Forwarder, ForwardOutbox, backfill, parse_since
    from gateway.metrics import MetricsServer
    from gateway.site import opener_for

    if a.tier == "cloud" and (a.relay_for or a.forward_to):
        raise MedgeError("--tier cloud opens every message itself: no --relay-for/--forward-to")
    if a.backfill and not a.forward_to:
        raise MedgeError("--backfill re-queues stored results for the cloud: add --forward-to")
    since = parse_since(a.backfill) if a.backfill else None
    opener = opener_for(a.site_dir, relay_for=tuple(a.relay_for), keys=tuple(a.cloud_key))
    forward = None
    if a.forward_to:
        fhost, _, fport = a.forward_to.rpartition(":")
        forward = Forwarder(
            ForwardOutbox(a.forward_outbox or _forward_outbox_beside(a.db)),
            fhost or "127.0.0.1",
            int(fport),
            client_id=f"{a.client_id}-forward",
            resend_after=a.forward_resend_after,
            tls=tuple(a.forward_tls) if a.forward_tls else None,  # type: ignore[arg-type]
        )
    rules = AlertRules(silence_after=a.silence_after)
    host, _, port = a.broker.rpartition(":")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log = logging.getLogger("medge.gateway")
    with Supervisor() as sup, Store(a.db) as store:
        gw = Gateway(
            store,
            opener,
            host or "127.0.0.1",
            int(port),
            a.protocol,
            client_id=a.client_id,
            share_group=a.share_group,
            tls=gateway_client_files(a.site_dir) if a.tls else None,
            rules=rules,
            forward=forward,
            device_rate=a.device_rate,
            device_burst=a.device_burst,
        )
        gw.batch_window, gw.batch_when_idle = a.batch_window, a.batch_when_idle
        metrics = None
        try:
            gw.start(timeout=3.0)  # a broker not up yet: one warning, then retried with back-off
            for name, thread in gw.workers().items():
                sup.watch(name, thread)
            sup.track("stored", lambda: gw.last_stored)
            if forward is not None and since is not None:
                backfill(store, forward.outbox, since)
            if a.metrics_port is not None:
                metrics = MetricsServer(gw.metrics, a.metrics_host, a.metrics_port,
                                        health=sup.health).start()
            log.info("storing into %s; Ctrl-C to stop", store.location)
            death = sup.wait(stop)
        finally:
            if metrics is not None:
                metrics.stop()
            gw.stop()
    if death is not None:
        raise MedgeError(f"gateway: {death.line()}")
    print(json.dumps(gw.stats.__dict__))
    return 0


def cmd_dashboard(a: argparse.Namespace) -> int:
    from gateway.dashboard import run_dashboard
    from gateway.dashboard.throttle import LoginPolicy

    policy = LoginPolicy(trusted_proxies=tuple(a.trusted_proxy), secure_cookies=a.secure_cookies)
    run_dashboard(a.db, a.host, a.port, a.title, users=a.users,
                  allow_anonymous=a.allow_anonymous, login_policy=policy)
    return 0


def cmd_dashboard_add_user(a: argparse.Namespace) -> int:
    import getpass

    from gateway.dashboard import add_user

    if a.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {a.name}: ")
        if getpass.getpass("again: ") != password:
            raise MedgeError("the passwords differ")
    add_user(a.users, a.name, password)
    print(f"{a.users}: user {a.name} added (mode 0600)")
    return 0


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add `gateway` (run, broker-config) and `dashboard` (add-user) to the `medge` commands."""
    g = sub.add_parser(
        "gateway",
        help="the fog-node service",
        description="Subscribe to devices, store each result once, acknowledge.",
    )
    gsub = g.add_subparsers(dest="gateway_command", required=True, metavar="ACTION")
    gr = gsub.add_parser("run", help="run the gateway against a broker")
    gr.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT (default 127.0.0.1:1883)")
    gr.add_argument("--protocol", default="5", choices=["5", "3.1.1"], help="MQTT version")
    gr.add_argument(
        "--site-dir",
        type=Path,
        required=True,
        help="site directory (from 'medge site init'): keys and registered devices",
    )
    gr.add_argument("--db", type=_db_arg, default=Path("gateway.sqlite"), metavar="FILE|URL",
                    help=_DB_HELP)
    gr.add_argument("--client-id", default="medge-gateway", help="MQTT client id of this worker")
    gr.add_argument("--share-group", help="MQTT 5 shared-subscription group for several workers")
    gr.add_argument("--relay-for", type=Path, action="append", default=[],
                    help="end-to-end mode: accept messages sealed to this public key (the "
                    "cloud's) unread, checking each device signature (repeatable)")
    gr.add_argument("--tls", action="store_true",
                    help="connect with the site's gateway certificate (site broker from "
                    "'medge gateway broker-config')")
    gr.add_argument("--tier", choices=["fog", "cloud"], default="fog",
                    help="fog: the site's gateway (default); cloud: the cloud tier that stores "
                    "what fog gateways forward and acks them (docs/forwarding.md)")
    gr.add_argument("--cloud-key", type=Path, action="append", default=[], metavar="FILE",
                    help="also open messages sealed to this private key (the cloud's, from "
                    "'medge site cloud-key'; end-to-end mode) (repeatable)")
    gr.add_argument("--forward-to", metavar="HOST:PORT",
                    help="forward every stored result/event to this cloud broker through an "
                    "outbox on disk, deleted only on the cloud gateway's ack")
    gr.add_argument("--forward-outbox", type=Path, metavar="FILE",
                    help="the forward outbox (default: DB.forward.sqlite beside --db)")
    gr.add_argument("--forward-tls", type=Path, nargs=3, metavar=("CA", "CERT", "KEY"),
                    help="TLS to the cloud broker: CA certificate, client certificate, key")
    gr.add_argument("--forward-resend-after", type=float, default=10.0, metavar="SECONDS",
                    help="resend to the cloud what it has not acknowledged (default 10)")
    gr.add_argument("--backfill", metavar="SINCE",
                    help="with --forward-to: also queue for the cloud the results already "
                    "stored since SINCE (all, 30m, 24h, 7d, an ISO date/time or a Unix time); "
                    "the cloud keeps each once")
    gr.add_argument("--device-rate", type=float, default=100.0, metavar="MSG_PER_S",
                    help="flood limit per device: messages per second (default 100; 0: no "
                    "limit); messages over it are not acknowledged, so the device resends them")
    gr.add_argument("--device-burst", type=float, default=1000.0, metavar="N",
                    help="messages a device may send at once above its rate (default 1000)")
    gr.add_argument("--batch-window", type=float, default=0.005, metavar="SECONDS",
                    help="under load, gather results this long into one store commit (default "
                    "0.005); a result that finds the gateway idle is committed at once")
    gr.add_argument("--batch-when-idle", action="store_true",
                    help="wait the batch window also when idle (a fixed window, as before "
                    "adaptive batching; for comparison)")
    gr.add_argument("--silence-after", type=float, default=30.0, metavar="SECONDS",
                    help="alert when a device sends nothing for this long (default 30)")
    gr.add_argument("--alert-rules", type=Path, metavar="FILE.yaml",
                    help="alert rules: severity per event kind, silence, offline "
                    "(docs/dashboard.md, 'Alerts'); its silence_after wins over --silence-after")
    gr.add_argument("--metrics-port", type=int, metavar="N",
                    help="serve Prometheus metrics at http://HOST:N/metrics (0: any free port)")
    gr.add_argument("--metrics-host", default="127.0.0.1",
                    help="address of the metrics endpoint (default loopback)")
    common(gr)
    gr.set_defaults(func=cmd_gateway_run)
    register_broker_config(gsub, common)

    d = sub.add_parser(
        "dashboard",
        help="serve the live web dashboard of a gateway store",
        description="Serve the alerts, the fleet and the live results of a gateway store to "
        "signed-in users (docs/dashboard.md); 'medge dashboard add-user' creates them.",
    )
    d.add_argument("--db", type=_db_arg, default=Path("gateway.sqlite"), metavar="FILE|URL",
                   help=_DB_HELP)
    d.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    d.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    d.add_argument("--users", type=Path, help="users file (from 'medge dashboard add-user')")
    d.add_argument("--allow-anonymous", action="store_true",
                   help="serve without login (local tests only: the data is patient-derived)")
    d.add_argument("--title", default="medge", help="title shown on the page")
    d.add_argument("--trusted-proxy", action="append", default=[], metavar="ADDRESS[/BITS]",
                   help="a reverse proxy whose X-Forwarded-For/-Proto are believed (repeatable; "
                   "from anyone else they are ignored)")
    d.add_argument("--secure-cookies", action="store_true",
                   help="mark the session cookie Secure (the page is reached over TLS)")
    common(d)
    d.set_defaults(func=cmd_dashboard)
    dsub = d.add_subparsers(dest="dashboard_command", metavar="ACTION")
    du = dsub.add_parser("add-user", help="add a dashboard user (or set a new password)",
                         description="Add a user to a users file (created mode 0600); the "
                         "password is stored as scrypt with a random salt.")
    du.add_argument("name", help="user name: 1-64 of [A-Za-z0-9_.@-]")
    du.add_argument("--users", type=Path, required=True, help="users file")
    du.add_argument("--password-stdin", action="store_true",
                    help="read the password from the first line of stdin instead of a prompt")
    common(du)
    du.set_defaults(func=cmd_dashboard_add_user)
