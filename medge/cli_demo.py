"""`medge demo`: the whole chain on this machine, on real recorded data."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["cmd_demo", "register"]


def cmd_demo(a: argparse.Namespace) -> int:
    from medge.demo import DemoOptions, run_demo

    summary = run_demo(
        DemoOptions(
            duration=a.duration,
            devices=a.devices,
            broker=a.broker,
            host=a.host,
            port=a.port,
            rate_hz=a.rate,
            bundle=a.bundle,
            workdir=a.workdir,
            scenarios=a.scenario,
        )
    )
    ok = all(s.ok for s in summary)
    if a.json:
        print(json.dumps({"ok": ok, "devices": [s.__dict__ for s in summary]}, indent=2))
    else:
        print(f"{'device':10s} {'sent':>6s} {'stored':>7s} {'duplicates':>11s} {'pending':>8s}")
        for s in summary:
            print(f"{s.device:10s} {s.sent:6d} {s.stored:7d} {s.duplicates:11d} {s.pending:8d}")
        print("every result sent was stored" if ok else "LOSS: some results were not stored")
    return 0 if ok else 1


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add `demo` to the `medge` subcommands."""
    from medge.demo_scenarios import SCENARIOS

    scenarios = "; ".join(f"{s.name}: {s.summary}" for s in SCENARIOS)
    m = sub.add_parser(
        "demo",
        help="the whole chain on this machine, on real recorded data",
        description="Start a broker (Mosquitto if installed, else embedded), the "
        "gateway, the dashboard and simulated devices: one per scenario, each replaying "
        "recorded data of its modality through its zoo model (real recordings; where a "
        f"scenario adds simulated events its summary says so) ({scenarios}). "
        "Each zoo bundle is converted on first use and cached. Ctrl-C stops it; with "
        "--duration it stops by itself, prints per-device sent/stored/duplicates "
        "and exits 1 if anything sent was not stored.",
    )
    m.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    m.add_argument(
        "--scenario",
        action="append",
        choices=[s.name for s in SCENARIOS],
        help="run this scenario only (repeatable; default: every scenario)",
    )
    m.add_argument(
        "--devices", type=int, default=1, help="simulated devices per scenario (default 1)"
    )
    m.add_argument(
        "--broker",
        default="auto",
        choices=["auto", "mosquitto", "embedded"],
        help="which broker to start (default: mosquitto if installed)",
    )
    m.add_argument("--host", default="127.0.0.1", help="dashboard address (default loopback)")
    m.add_argument("--port", type=int, default=8080, help="dashboard port (0: any free one)")
    images = ", ".join(s.name for s in SCENARIOS if not s.realtime)
    streams = ", ".join(s.name for s in SCENARIOS if s.realtime)
    m.add_argument(
        "--rate",
        type=float,
        default=4.0,
        help=f"images per second per device of the image scenarios ({images}; default 4); "
        f"the stream scenarios ({streams}) play in real time at their recording's rate",
    )
    m.add_argument(
        "--bundle",
        type=Path,
        help="use this bundle instead of the zoo's model (one scenario: ultrasound by default)",
    )
    m.add_argument("--workdir", type=Path, help="where stores and outboxes go (default: temp)")
    common(m, json_flag=True)
    m.set_defaults(func=cmd_demo)
