"""`medge agent ...`: run the edge agent, check its configuration, build a device package.

Only `edge_agent` (and, for `package`, medge's own packaging code) is imported, and only when
a command runs: the device never loads the converter, the gateway or TensorFlow."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["cmd_agent_check", "cmd_agent_package", "cmd_agent_run", "register"]


def cmd_agent_run(a: argparse.Namespace) -> int:
    """The pipeline runs in a supervised thread; the link's threads, the update thread and
    the telemetry ticker are watched: one that dies ends the command non-zero on one line
    (systemd restarts it; the outbox on disk keeps every unacknowledged result)."""
    import signal
    import threading

    from edge_agent import Agent, load_config
    from edge_agent.errors import MedgeError
    from edge_agent.supervisor import Supervisor

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with Supervisor() as sup:
        agent = Agent(load_config(a.config), supervisor=sup)
        outcome: dict[str, Any] = {}

        def pipeline() -> None:
            try:
                outcome["report"] = agent.run(stop, drain_timeout=a.drain_timeout)
            except BaseException as exc:  # raised again below, in the main thread
                outcome["error"] = exc

        runner = sup.spawn("pipeline", pipeline, finishes=True)
        never = threading.Event()
        death = sup.wait(never, done=lambda: sup.finished("pipeline") or stop.is_set())
        if death is None and not sup.finished("pipeline"):  # stopping: let it drain
            death = sup.wait(never, done=lambda: sup.finished("pipeline"))
        if death is not None:
            agent.mark_failed()  # its goodbye says offline: the fog node alerts
            stop.set()  # the pipeline stops; what is unacknowledged stays in the outbox
            runner.join(timeout=a.drain_timeout + 5)
            raise MedgeError(f"agent: {death.line()}")
    if "error" in outcome:
        raise outcome["error"]
    report = outcome["report"]
    print(
        json.dumps(report.__dict__)
        if a.json
        else f"{report.device}: sent {report.sent}, acknowledged {report.acked}, "
        f"still in the outbox {report.pending}"
    )
    return 0


def cmd_agent_check(a: argparse.Namespace) -> int:
    """Validate the YAML (pointing at the line), then check what `agent run` checks on start
    (edge_agent.preflight): identity and key modes, bundle signature and hashes, the artifact,
    the source and its window; an unreachable broker is a warning."""
    import logging

    from edge_agent import load_config
    from edge_agent.preflight import preflight

    cfg = load_config(a.config)
    report = preflight(cfg, a.broker_timeout)
    for w in report.warnings:
        logging.getLogger("medge.agent.check").warning("%s", w)
    if a.json:
        print(json.dumps({"config": str(a.config), "ok": True, **report.to_json()}))
        return 0
    print(f"{a.config}: OK (site {cfg.site}, device {cfg.device}, bundle {cfg.bundle})")
    for line in report.lines():
        print(f"  {line}")
    return 0


def cmd_agent_package(a: argparse.Namespace) -> int:
    from medge.package import build_package

    report = build_package(
        a.config,
        a.out,
        platforms=a.platform,
        python_version=a.python_version,
        wheel_cache=a.wheel_cache,
        tarball=not a.no_tarball,
        extras=a.extra or (),
    )
    if a.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"{report.directory}: {len(report.wheels)} wheels, bundle {report.bundle}")
        if report.tarball:
            print(f"{report.tarball}: copy it to the device, unpack, sudo ./install.sh")
    return 0


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add `agent` and its actions to the `medge` subcommands."""
    ag = sub.add_parser(
        "agent",
        help="the on-device runtime",
        description="Run the edge agent, or check its configuration file.",
    )
    agsub = ag.add_subparsers(dest="agent_command", required=True, metavar="ACTION")
    r = agsub.add_parser(
        "run",
        help="run the agent with a YAML config",
        description="Load and verify the bundle, replay the source, publish "
        "results through the disk outbox until the source ends or Ctrl-C.",
    )
    r.add_argument("--config", type=Path, required=True, help="agent YAML (see docs/config.md)")
    r.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for acks before exiting (default 10)",
    )
    common(r, json_flag=True)
    r.set_defaults(func=cmd_agent_run)
    k = agsub.add_parser(
        "check-config",
        help="check an agent YAML as 'agent run' would, and point at the bad line",
        description="Validate the YAML (pointing at the line of the first problem), then check "
        "what 'agent run' checks on start: the identity (device key mode 0600, certificate, "
        "CA), the bundle's signature and file hashes against the identity's trusted signers, "
        "the artifact with its runtime, the source and its sampling rate. Prints the window "
        "(each setting from the bundle or the config) and the preprocessing the agent will "
        "use. An unreachable broker is a warning, not a failure (docs/config.md).",
    )
    k.add_argument("config", type=Path)
    k.add_argument(
        "--broker-timeout",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds to wait for a TCP connection to the broker (default 2)",
    )
    common(k, json_flag=True)
    k.set_defaults(func=cmd_agent_check)
    pk = agsub.add_parser(
        "package",
        help="build a self-contained device package (wheels, bundle, identity, systemd unit)",
        description="Build a directory and .tar.gz that install the agent on a device with no "
        "network: wheels of medge[device] plus the extras the config needs (device-video for "
        "a video/images source, device-dicom, device-onnx for runtime onnx, serial) for the "
        "target, the signed bundle, the config, the identity, a systemd unit and install.sh "
        "(docs/device.md).",
    )
    pk.add_argument("--config", type=Path, required=True, help="agent YAML (see docs/config.md)")
    pk.add_argument("--out", type=Path, required=True, help="package directory to create")
    pk.add_argument(
        "--platform",
        action="append",
        help="target wheel platform, repeatable (e.g. manylinux2014_aarch64 and "
        "manylinux_2_28_aarch64 for a Raspberry Pi; default: this machine)",
    )
    pk.add_argument("--python-version", help="target Python, e.g. 3.11 (default: this one)")
    pk.add_argument(
        "--wheel-cache",
        type=Path,
        help="reuse downloaded wheels from here (default ~/.cache/medge-wheels)",
    )
    pk.add_argument(
        "--extra",
        action="append",
        metavar="NAME",
        help="ship another device extra too, repeatable (e.g. device-video for JPEG-compressed "
        "DICOM, which the config alone does not reveal)",
    )
    pk.add_argument("--no-tarball", action="store_true", help="only the directory")
    common(pk, json_flag=True)
    pk.set_defaults(func=cmd_agent_package)
