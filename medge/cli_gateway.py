"""`medge gateway ...`: the fog-node service (medge/cli_dashboard.py: its web page).

The gateway package is imported only when one of these commands runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.errors import MedgeError
from medge.cli_outputs import register_outputs
from medge.cli_rollout import register_rollouts
from medge.cli_site import register_broker_config

__all__ = [
    "CONFIG_HELP",
    "DB_HELP",
    "cmd_gateway_check",
    "cmd_gateway_push_bundle",
    "cmd_gateway_run",
    "config_overrides",
    "register",
]


DB_HELP = (
    "the store: a SQLite file (default gateway.sqlite; also sqlite:///FILE) or a PostgreSQL "
    "URL postgresql://USER[:PASSWORD]@HOST[:PORT]/DB shared by several gateway workers "
    "(docs/config.md, 'Gateway storage')"
)
CONFIG_HELP = (
    "gateway.yaml: the 'gateway:' and 'dashboard:' sections (docs/gateway-config.md); "
    "a flag given here overrides the file"
)

# flag (argparse dest) -> key of the config section it overrides (flag > file > default)
_GATEWAY_FLAGS = {
    "site_dir": "site_dir",
    "db": "store.db",
    "protocol": "broker.protocol",
    "client_id": "broker.client_id",
    "share_group": "broker.share_group",
    "tls": "broker.tls",
    "relay_for": "relay_for",
    "tier": "tier",
    "cloud_key": "cloud_key",
    "forward_to": "forward.to",
    "forward_outbox": "forward.outbox",
    "forward_resend_after": "forward.resend_after",
    "backfill": "forward.backfill",
    "device_rate": "limits.device_rate",
    "device_burst": "limits.device_burst",
    "batch_window": "batching.window",
    "batch_when_idle": "batching.when_idle",
    "silence_after": "alerts.silence_after",
    "alert_rules": "alerts.rules",
    "metrics_port": "metrics.port",
    "metrics_host": "metrics.host",
}


def config_overrides(a: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    """The flags given (their defaults are suppressed, so an absent flag leaves the file's
    value, or the config's default), as dotted keys of the config section."""
    given = {key: getattr(a, dest) for dest, key in flags.items() if hasattr(a, dest)}
    for key, value in given.items():
        if isinstance(value, Path):
            given[key] = str(value)
        elif isinstance(value, list):
            given[key] = [str(v) for v in value]
    return given


def _gateway_overrides(a: argparse.Namespace) -> dict[str, Any]:
    from gateway.config import parse_host_port

    over = config_overrides(a, _GATEWAY_FLAGS)
    if hasattr(a, "broker"):
        try:
            over["broker.host"], over["broker.port"] = parse_host_port(a.broker)
        except ValueError as exc:
            raise MedgeError(f"--broker: {exc}") from exc
    if hasattr(a, "forward_tls"):
        ca, cert, key = (str(p) for p in a.forward_tls)
        over["forward.tls"] = {"ca": ca, "cert": cert, "key": key}
    if a.config is None and "site_dir" not in over:
        raise MedgeError("--site-dir is required (or --config FILE naming gateway.site_dir)")
    return over


def cmd_gateway_run(a: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; a worker that dies ends the command non-zero on one line
    (edge_agent.supervisor), so systemd restarts it."""
    import signal
    import threading

    from gateway.config import load_gateway_config
    from gateway.node import run_gateway

    cfg = load_gateway_config(a.config, _gateway_overrides(a))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stats = run_gateway(cfg, stop)
    print(json.dumps(dataclasses.asdict(stats)))
    return 0


def cmd_gateway_check(a: argparse.Namespace) -> int:
    """Validate gateway.yaml (pointing at the line), then check what `gateway run` and
    `dashboard` need on start; an unreachable broker is a warning."""
    from gateway.check import check_node

    report = check_node(a.config, a.broker_timeout)
    for w in report.warnings:
        logging.getLogger("medge.gateway.check").warning("%s", w)
    if a.json:
        print(json.dumps({"config": str(a.config), "ok": True, **report.to_json()}))
        return 0
    print(f"{a.config}: OK ({report.summary})")
    for line in report.lines:
        print(f"  {line}")
    return 0


def cmd_gateway_push_bundle(a: argparse.Namespace) -> int:
    """Pack, serve and announce a bundle to one device; return once it has fetched it."""
    from gateway.config import load_gateway_config
    from gateway.ota import push_bundle

    cfg = load_gateway_config(a.config, _gateway_overrides(a))  # site_dir and broker
    b = cfg.broker
    result = push_bundle(
        a.bundle,
        cfg.site_dir,
        b.host,
        b.port,
        a.device,
        protocol=b.protocol,
        tls=b.tls,
        allow_downgrade=a.allow_downgrade,
        http_host=a.http_host,
        http_port=a.http_port,
        url_host=a.url_host,
        timeout=a.timeout,
    )
    if a.json:
        print(json.dumps(result))
    else:
        print(
            f"{a.device}: fetched {result['url']} (sha256 {result['sha256'][:12]}); its "
            "update event says whether it applied it"
        )
    return 0


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add `gateway` (run, check-config, push-bundle, broker-config, outputs) to the `medge`
    commands."""
    g = sub.add_parser(
        "gateway",
        help="the fog-node service",
        description="Subscribe to devices, store each result once, acknowledge.",
    )
    gsub = g.add_subparsers(dest="gateway_command", required=True, metavar="ACTION")
    _register_run(gsub, common)
    _register_check(gsub, common)
    _register_push_bundle(gsub, common)
    register_broker_config(gsub, common)
    register_outputs(gsub, common)
    register_rollouts(gsub, common)


def _register_run(gsub: Any, common: Callable[..., None]) -> None:
    # no flag has a default here: one not given leaves gateway.yaml's value, or the config's
    # default (gateway/config.py), which the help texts name
    gr = gsub.add_parser(
        "run",
        help="run the gateway against a broker",
        argument_default=argparse.SUPPRESS,
        description="Run one gateway worker: subscribe, open, store, acknowledge, alert, "
        "forward. Settings come from --config gateway.yaml (section 'gateway:', "
        "docs/gateway-config.md); each flag given overrides the file's key.",
    )
    gr.add_argument("--config", type=Path, default=None, metavar="FILE", help=CONFIG_HELP)
    gr.add_argument("--broker", help="HOST:PORT (default 127.0.0.1:1883) [broker.host/port]")
    gr.add_argument(
        "--protocol", choices=["5", "3.1.1"], help="MQTT version (default 5) [broker.protocol]"
    )
    gr.add_argument(
        "--site-dir",
        type=Path,
        help="site directory (from 'medge site init'): keys and registered devices; "
        "required unless the config names it [site_dir]",
    )
    gr.add_argument("--db", metavar="FILE|URL", help=DB_HELP + " [store.db]")
    gr.add_argument(
        "--client-id",
        help="MQTT client id of this worker (default medge-gateway) [broker.client_id]",
    )
    gr.add_argument(
        "--share-group",
        help="MQTT 5 shared-subscription group for several workers [broker.share_group]",
    )
    gr.add_argument(
        "--relay-for",
        type=Path,
        action="append",
        help="end-to-end mode: accept messages sealed to this public key (the "
        "cloud's) unread, checking each device signature (repeatable) [relay_for]",
    )
    gr.add_argument(
        "--tls",
        action="store_true",
        help="connect with the site's gateway certificate (site broker from "
        "'medge gateway broker-config') [broker.tls]",
    )
    gr.add_argument(
        "--tier",
        choices=["fog", "cloud"],
        help="fog: the site's gateway (default); cloud: the cloud tier that stores "
        "what fog gateways forward and acks them (docs/forwarding.md) [tier]",
    )
    gr.add_argument(
        "--cloud-key",
        type=Path,
        action="append",
        metavar="FILE",
        help="also open messages sealed to this private key (the cloud's, from "
        "'medge site cloud-key'; end-to-end mode) (repeatable) [cloud_key]",
    )
    gr.add_argument(
        "--forward-to",
        metavar="HOST:PORT",
        help="forward every stored result/event to this cloud broker through an "
        "outbox on disk, deleted only on the cloud gateway's ack [forward.to]",
    )
    gr.add_argument(
        "--forward-outbox",
        type=Path,
        metavar="FILE",
        help="the forward outbox (default: DB.forward.sqlite beside --db) [forward.outbox]",
    )
    gr.add_argument(
        "--forward-tls",
        type=Path,
        nargs=3,
        metavar=("CA", "CERT", "KEY"),
        help="TLS to the cloud broker: CA certificate, client certificate, key [forward.tls]",
    )
    gr.add_argument(
        "--forward-resend-after",
        type=float,
        metavar="SECONDS",
        help="resend to the cloud what it has not acknowledged (default 10) [forward.resend_after]",
    )
    gr.add_argument(
        "--backfill",
        metavar="SINCE",
        help="with --forward-to: also queue for the cloud the results already "
        "stored since SINCE (all, 30m, 24h, 7d, an ISO date/time or a Unix time); "
        "the cloud keeps each once [forward.backfill]",
    )
    gr.add_argument(
        "--device-rate",
        type=float,
        metavar="MSG_PER_S",
        help="flood limit per device: messages per second (default 100; 0: no "
        "limit); messages over it are not acknowledged, so the device resends them "
        "[limits.device_rate]",
    )
    gr.add_argument(
        "--device-burst",
        type=float,
        metavar="N",
        help="messages a device may send at once above its rate (default 1000) "
        "[limits.device_burst]",
    )
    gr.add_argument(
        "--batch-window",
        type=float,
        metavar="SECONDS",
        help="with --batch-when-idle: gather results this long into one store commit "
        "(default 0.005); without it the writer commits at once what is waiting (group "
        "commit) [batching.window]",
    )
    gr.add_argument(
        "--batch-when-idle",
        action="store_true",
        help="wait the batch window before every commit (a fixed window, as earlier "
        "versions did; for comparison) [batching.when_idle]",
    )
    gr.add_argument(
        "--silence-after",
        type=float,
        metavar="SECONDS",
        help="alert when a device sends nothing for this long (default 30) [alerts.silence_after]",
    )
    gr.add_argument(
        "--alert-rules",
        type=Path,
        metavar="FILE.yaml",
        help="alert rules: severity per event kind, silence, offline "
        "(docs/dashboard.md, 'Alerts'); its silence_after wins over --silence-after "
        "[alerts.rules]",
    )
    gr.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="serve Prometheus metrics at http://HOST:N/metrics (0: any free port) [metrics.port]",
    )
    gr.add_argument(
        "--metrics-host", help="address of the metrics endpoint (default loopback) [metrics.host]"
    )
    common(gr)
    gr.set_defaults(func=cmd_gateway_run)


def _register_check(gsub: Any, common: Callable[..., None]) -> None:
    k = gsub.add_parser(
        "check-config",
        help="check a gateway.yaml as 'gateway run' and 'dashboard' would, and point at the "
        "bad line",
        description="Validate gateway.yaml strictly (pointing at the line of the first "
        "problem), then check what 'gateway run' needs on start: the site directory (site.json, "
        "private keys mode 0600 or stricter, the keys the gateway opens envelopes with), the "
        "alert rules file, the forward TLS files, the store (reachable; a SQLite file not there "
        "yet is created on the first run) and, with a dashboard: section, its users file and "
        "store. An unreachable broker is a warning, not a failure (docs/gateway-config.md).",
    )
    k.add_argument("config", type=Path, metavar="FILE", help="gateway.yaml")
    k.add_argument(
        "--broker-timeout",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds to wait for a TCP connection to the broker (default 2)",
    )
    common(k, json_flag=True)
    k.set_defaults(func=cmd_gateway_check)


def _register_push_bundle(gsub: Any, common: Callable[..., None]) -> None:
    pb = gsub.add_parser(
        "push-bundle",
        help="send a signed bundle to one device over the air",
        description="Verify and pack BUNDLE, serve it over HTTP from this machine, publish a "
        "signed update-bundle command (the site's bundle signer) on the device's cmd topic, and "
        "wait until the device has fetched it. The device verifies the signature and hashes, "
        "self-tests the new bundle and swaps it in between two samples; its 'update' event "
        "(applied/rejected, stored by the gateway) says what it did (docs/device.md).",
    )
    pb.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle directory")
    pb.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="gateway.yaml: site_dir and broker from its 'gateway:' section (the "
        "flags below override them)",
    )
    pb.add_argument(
        "--site-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="site directory: its name and bundle-signer.key; required unless the "
        "config names it [site_dir]",
    )
    pb.add_argument("--device", required=True, help="the device to update")
    pb.add_argument(
        "--broker",
        default=argparse.SUPPRESS,
        help="HOST:PORT of the site's broker (default 127.0.0.1:1883) [broker.host/port]",
    )
    pb.add_argument(
        "--protocol",
        choices=["5", "3.1.1"],
        default=argparse.SUPPRESS,
        help="MQTT version (default 5) [broker.protocol]",
    )
    pb.add_argument(
        "--tls",
        action="store_true",
        default=argparse.SUPPRESS,
        help="connect with the site's gateway certificate (site broker) [broker.tls]",
    )
    pb.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="let the device install a bundle older than the one it runs",
    )
    pb.add_argument(
        "--http-host",
        default="0.0.0.0",  # noqa: S104 - devices must reach it
        help="address the bundle is served on (default all)",
    )
    pb.add_argument(
        "--http-port", type=int, default=0, help="port it is served on (default: any free port)"
    )
    pb.add_argument(
        "--url-host",
        help="host name or address the device fetches the bundle from (default: "
        "this machine's address toward the broker)",
    )
    pb.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up when the device has not fetched the bundle by then (default 600)",
    )
    common(pb, json_flag=True)
    pb.set_defaults(func=cmd_gateway_push_bundle)
