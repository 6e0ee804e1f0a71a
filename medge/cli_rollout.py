"""`medge gateway group ...` and `medge gateway rollout ...`: device groups and staged fleet
rollouts (docs/rollouts.md).

These commands only read and write the gateway's store (and `rollout start` packs the
bundle into the folder the gateway serves); the running gateway, with a `rollouts:` section
in its gateway.yaml, drives each rollout within a second or so. The gateway package is
imported only when one of them runs."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.errors import MedgeError

if TYPE_CHECKING:
    from gateway.store import Store

__all__ = ["cmd_group", "cmd_rollout", "register_rollouts"]

STORE_HELP = (
    "gateway.yaml: the store (store.db), the site (site_dir) and, for 'rollout start', the "
    "rollouts: section of its 'gateway:' section"
)
ROLLOUT_DESCRIPTION = """\
Move a signed bundle through a device group stage by stage: a canary of N
devices, then each step (a cumulative share of the group). In each stage the
new devices first run the bundle in shadow (beside their current one, on a
share of samples, within a CPU budget; only the current model's results are
published) until each has compared --min-results samples and the shadow gates
hold; then they switch, and the stage is done once each has made
--min-results results on the new bundle and the gates after the switch hold.
A gate that fails pauses the rollout with the reason; it never goes on past
one. 'abort' sends every device that took the bundle back to the bundle it ran
before. The running gateway (its gateway.yaml has a rollouts: section) does
the work; these commands read and write its store (docs/rollouts.md)."""
ROLLOUT_EXAMPLES = """\
examples:
  medge gateway group set ward-3 --match 'ward-3-*' --config gateway.yaml
  medge gateway rollout start build/breast-cnn-v2 --group ward-3 --config gateway.yaml \\
      --canary 2 --steps 10%,50%,100% --gate agreement>=0.98,alerts_per_hour<=2
  medge gateway rollout status --config gateway.yaml            every rollout, one a line
  medge gateway rollout status 3 --config gateway.yaml --json   all of rollout 3
  medge gateway rollout pause 3 --config gateway.yaml
  medge gateway rollout retry 3 bed-7 --config gateway.yaml    a failed device again
  medge gateway rollout abort 3 --config gateway.yaml"""


# -- opening the store ---------------------------------------------------------------------
def _target(a: argparse.Namespace) -> tuple[Path | str, Any]:
    """The store target and the gateway config (None without --config)."""
    if a.config is not None:
        from gateway.config import load_gateway_config

        over = {"store.db": a.db} if a.db is not None else {}
        cfg = load_gateway_config(a.config, over)
        return cfg.store.target(), cfg
    if a.db is None:
        raise MedgeError("give --config gateway.yaml (its store) or --db FILE|URL")
    from gateway.config import StoreSettings

    return StoreSettings(db=a.db).target(), None


def _open(a: argparse.Namespace, create: bool = False) -> tuple[Store, Any]:
    from gateway.store import Store

    target, cfg = _target(a)
    if not create and isinstance(target, Path) and not target.exists():
        raise MedgeError(f"no gateway store at {target} (has 'medge gateway run' used it?)")
    return Store(target), cfg


def _store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help=STORE_HELP)
    p.add_argument(
        "--db", default=None, metavar="FILE|URL", help="the store itself (overrides the config's)"
    )


# -- groups --------------------------------------------------------------------------------
def cmd_group(a: argparse.Namespace) -> int:
    """set/add/remove/list of device groups."""
    from gateway import groups

    store, cfg = _open(a, create=a.action in ("set", "add"))
    with store:
        if a.action == "list":
            found = groups.list_groups(store)
            doc: dict[str, Any] = {
                "groups": {n: [f"{s}/{d}" for s, d in m] for n, m in found.items()}
            }
            if a.json:
                print(json.dumps(doc))
            else:
                for name, members in doc["groups"].items():
                    print(f"{name}: {len(members)} device(s): {', '.join(members)}")
                if not found:
                    print("no device groups (medge gateway group set NAME DEVICE...)")
            return 0
        site = a.site or (_site_of(cfg) if cfg is not None else None)
        if site is None:
            raise MedgeError("give --site SITE (or --config naming gateway.site_dir)")
        names = list(a.devices)
        if a.match:
            site_dir = cfg.site_dir if cfg is not None else None
            names += groups.match_devices(store, site, a.match, site_dir)
        if not names:
            raise MedgeError("name the devices (DEVICE... or --match PATTERN)")
        members = [(site, n) for n in sorted(set(names))]
        do = {"set": groups.set_group, "add": groups.add_members, "remove": groups.remove_members}
        n = do[a.action](store, a.name, members)
        now = groups.list_groups(store).get(a.name, [])
    if a.json:
        print(json.dumps({"group": a.name, a.action: n, "devices": [f"{s}/{d}" for s, d in now]}))
    else:
        verb = {"set": "set to", "add": "added", "remove": "removed"}[a.action]
        print(f"group {a.name}: {verb} {n} device(s); it has {len(now)}")
    return 0


def _site_of(cfg: Any) -> str:
    from gateway.site import site_name

    return site_name(cfg.site_dir)


# -- rollouts ------------------------------------------------------------------------------
def cmd_rollout(a: argparse.Namespace) -> int:
    """start/status/pause/resume/abort/retry."""
    from gateway import rollout_store as rs

    if a.action == "start":
        return _start(a)
    store, _ = _open(a)
    with store:
        if a.action == "status" and a.id is None:
            return _list(store, a.json)
        retried = None if a.action == "status" else _act(store, a)
        doc = rs.status(store, a.id)
    if retried is not None:
        doc["retried"] = retried
    if a.json:
        print(json.dumps(doc))
    elif a.action == "status":
        print("\n".join(status_lines(doc)))
    else:
        if retried is not None:
            print(f"rollout {a.id}: retrying {', '.join(retried)}")
        print(f"{_headline(doc)}; the running gateway acts on it within a poll")
    return 0


def _list(store: Any, as_json: bool) -> int:
    """Every rollout: a headline each, or one JSON document."""
    from gateway import rollout_store as rs

    rows = [rs.status(store, int(r["id"])) for r in rs.rollouts(store)]
    if as_json:
        print(json.dumps({"rollouts": rows}))
        return 0
    for doc in rows:
        print(_headline(doc))
    if not rows:
        print("no rollouts (medge gateway rollout start BUNDLE --group G)")
    return 0


def _act(store: Any, a: argparse.Namespace) -> list[str] | None:
    """pause, resume, abort (None) or retry (the devices retried) rollout ``a.id``."""
    from gateway import rollout_store as rs

    if a.action == "retry":
        return rs.retry(store, a.id, a.devices or None)
    rs.control(store, a.id, a.action)
    return None


def _start(a: argparse.Namespace) -> int:
    from gateway.config import load_gateway_config
    from gateway.rollout_plan import Plan, parse_gates, parse_steps
    from gateway.rollout_store import create_rollout, status
    from gateway.site import signer_key, site_name
    from gateway.store import Store

    if a.config is None:
        raise MedgeError("rollout start needs --config gateway.yaml: the gateway that drives it")
    cfg = load_gateway_config(a.config, {"store.db": a.db} if a.db is not None else {})
    if cfg.rollouts is None:
        raise MedgeError(
            f"{a.config}: no rollouts: section in gateway:, so no gateway would drive this "
            "rollout (docs/rollouts.md)"
        )
    plan = Plan(
        canary=a.canary,
        steps=parse_steps(a.steps),
        gates=parse_gates(a.gate),
        min_results=a.min_results,
        shadow=not a.no_shadow,
        shadow_share=a.shadow_share,
        cpu_budget=a.cpu_budget,
        allow_downgrade=a.allow_downgrade,
    ).check()
    trusted = [signer_key(cfg.site_dir).public_key()]
    with Store(cfg.store.target()) as store:
        rid = create_rollout(
            store, a.bundle, a.group, plan, cfg.rollout_bundles(), site_name(cfg.site_dir), trusted
        )
        doc = status(store, rid)
    if a.json:
        print(json.dumps(doc))
    else:
        print("\n".join(status_lines(doc)))
    return 0


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _headline(doc: dict[str, Any]) -> str:
    line = f"rollout {doc['id']}: {doc['bundle']} to group {doc['group']}: {doc['status']}"
    n = len(doc["stages"])
    if doc["status"] in ("running", "paused") and doc["stage"] < n:
        line += f", stage {doc['stage'] + 1}/{n} {doc['stage_name']} ({doc['phase']})"
    elif doc["status"] == "running":
        owed = sum(1 for d in doc["devices"] if d["command"])
        line += f", every stage done; {owed} command(s) still owed"
    if doc["reason"]:
        line += f": {doc['reason']}"
    return line


def _value(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def status_lines(doc: dict[str, Any]) -> list[str]:
    """The lines an operator reads: headline, stages with their gates, one line a device."""
    lines = [_headline(doc)]
    for s in doc["stages"]:
        gates = "; ".join(
            f"{g['gate']}: {_value(g['value'])}"
            + ("" if g["holds"] is None else " (holds)" if g["holds"] else " (FAILS)")
            for g in s["gates"]
        )
        lines.append(
            f"  stage {s['index'] + 1} {s['name']}: {s['devices']} device(s), {s['state']}"
            + (f"; {gates}" if gates else "")
        )
    counts = ", ".join(f"{n} {k}" for k, n in doc["counts"].items() if n)
    lines.append(f"  devices: {counts}")
    for d in doc["devices"]:
        line = f"  {d['site']}/{d['device']} (stage {d['stage'] + 1}): {d['state']}"
        if d["reason"]:
            line += f" ({d['reason']})"
        sh = d["shadow"]
        if sh is not None and d["state"] == "shadowing":
            line += f"; shadow {sh.get('samples')} samples, agreement {_value(sh.get('agreement'))}"
            if isinstance(sh.get("dice"), dict):
                line += f", Dice {_value(sh['dice'].get('mean'))}"
        if d["command"]:
            sent = "sent, answer awaited" if d["command_sent"] else "waits for it to be online"
            line += f"; {d['command']} {sent}"
        line += f"; runs {d['running'] or '?'}" + ("" if d["online"] else ", offline")
        lines.append(line)
    return lines


# -- parsers -------------------------------------------------------------------------------
def register_rollouts(gsub: Any, common: Callable[..., None]) -> None:
    """Add `gateway group` and `gateway rollout` to the `medge gateway` actions."""
    _register_group(gsub, common)
    _register_rollout(gsub, common)


def _register_group(gsub: Any, common: Callable[..., None]) -> None:
    g = gsub.add_parser(
        "group",
        help="device groups that rollouts move through",
        description="Name a set of devices (a ward, a model family) in the gateway's store. "
        "--match PATTERN picks the known devices whose names match (fnmatch: 'ward-3-*'), "
        "once, when the command runs (docs/rollouts.md).",
    )
    actions = g.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("set", "make the group exactly these devices"),
        ("add", "add devices to the group (made if new)"),
        ("remove", "remove devices from the group"),
    ):
        p = actions.add_parser(name, help=text, description=text)
        p.add_argument("name", metavar="NAME", help="the group")
        p.add_argument("devices", nargs="*", metavar="DEVICE", help="device names")
        p.add_argument(
            "--match",
            action="append",
            default=[],
            metavar="PATTERN",
            help="also the known devices matching this fnmatch pattern (repeatable)",
        )
        p.add_argument("--site", default=None, help="their site (default: the config's site)")
        _store_flags(p)
        common(p, json_flag=True)
        p.set_defaults(func=cmd_group)
    p = actions.add_parser("list", help="every group and its devices")
    _store_flags(p)
    common(p, json_flag=True)
    p.set_defaults(func=cmd_group)


def _register_rollout(gsub: Any, common: Callable[..., None]) -> None:
    r = gsub.add_parser(
        "rollout",
        help="move a bundle through a device group stage by stage, behind gates",
        description=ROLLOUT_DESCRIPTION,
        epilog=ROLLOUT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = r.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = actions.add_parser(
        "start",
        help="start a rollout",
        description="Verify BUNDLE (signed by the site's signer), pack it into the folder the "
        "gateway serves, and store a rollout over the group's devices (as they are now).",
    )
    s.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle directory")
    s.add_argument("--group", required=True, help="the device group")
    s.add_argument(
        "--canary", type=int, default=2, metavar="N", help="devices of the first stage (default 2)"
    )
    s.add_argument(
        "--steps",
        default="10%,50%,100%",
        help="then these cumulative shares of the group (default 10%%,50%%,100%%)",
    )
    s.add_argument(
        "--gate",
        default="",
        help="gates every stage must pass, e.g. agreement>=0.98,alerts_per_hour<=2 "
        "(agreement, dice, shadow_p99_ms: on the shadow run; alerts_per_hour: after the "
        "switch)",
    )
    s.add_argument(
        "--min-results",
        type=int,
        default=200,
        metavar="N",
        help="shadow samples, then results on the bundle, each device makes before its "
        "stage's gates are read (default 200)",
    )
    s.add_argument(
        "--shadow-share",
        type=float,
        default=0.25,
        metavar="X",
        help="share of samples the candidate also runs on in shadow (0-1, default 0.25)",
    )
    s.add_argument(
        "--cpu-budget",
        type=float,
        default=0.5,
        metavar="X",
        help="the shadow may use at most X times the current model's inference time "
        "(0-4, default 0.5)",
    )
    s.add_argument("--no-shadow", action="store_true", help="switch without a shadow run")
    s.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="let devices install a bundle older than the one they run",
    )
    _store_flags(s)
    common(s, json_flag=True)
    s.set_defaults(func=cmd_rollout)
    st = actions.add_parser(
        "status", help="every rollout, or one in full", description="every rollout, or one"
    )
    st.add_argument("id", type=int, nargs="?", default=None, metavar="ID", help="the rollout")
    _store_flags(st)
    common(st, json_flag=True)
    st.set_defaults(func=cmd_rollout)
    for name, text in (
        ("pause", "stop advancing (devices keep what they run)"),
        ("resume", "go on (gates are read again; failed devices stay out until 'retry')"),
        ("abort", "roll back every device that took the bundle, stop every shadow"),
    ):
        p = actions.add_parser(name, help=text, description=text)
        p.add_argument("id", type=int, metavar="ID", help="the rollout")
        _store_flags(p)
        common(p, json_flag=True)
        p.set_defaults(func=cmd_rollout)
    text = (
        "give failed devices another try: back to pending in the current stage, sent the "
        "current phase's command at the driver's next pass (a paused rollout stays paused)"
    )
    r = actions.add_parser("retry", help=text, description=text)
    r.add_argument("id", type=int, metavar="ID", help="the rollout")
    r.add_argument(
        "devices",
        nargs="*",
        metavar="DEVICE",
        help="device or site/device to retry (default: every failed one)",
    )
    _store_flags(r)
    common(r, json_flag=True)
    r.set_defaults(func=cmd_rollout)
