"""`medge gateway outputs`: what waits in the fog gateway's clinical outbox for the PACS and the
FHIR server, what is parked (sending it again cannot help until someone acts), and unparking.

It opens the outbox file beside a running gateway (SQLite WAL; every write is one immediate
transaction), reads or unparks, and closes it; the gateway's sender threads look at the outbox
at least once a second (gateway.clinical.sender), so what is unparked goes within about a
second, once the target is not backing off from a failing receiver. The gateway package is
imported only when the command runs."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.errors import MedgeError, one_line

if TYPE_CHECKING:
    from gateway.clinical.outbox import ClinicalItem, ClinicalOutbox, TargetSummary

__all__ = ["cmd_gateway_outputs", "register_outputs"]

TARGETS = ("fhir", "pacs")
PARKED_DEFAULT = 20
DESCRIPTION = """\
Show the fog gateway's clinical outbox: per target (pacs, fhir) how many items
wait for the receiver, how many are parked, how long the oldest has waited, and
the next item to send with its attempts and last error.

Parked items are those that sending again cannot help (a source that does not
open, an object or Bundle the receiver refuses): list them with --parked, fix
the cause, then --unpark them. Safe while the gateway runs: it sends unparked
items within about a second (later while the receiver still fails and the
gateway is backing off).

The outbox is the one gateway.yaml names (outputs.outbox, else
<store.db>.clinical.sqlite beside the store), or --outbox FILE; this command
never creates one (docs/outputs.md)."""
EXAMPLES = """\
examples:
  medge gateway outputs --config gateway.yaml                 what waits, what is parked
  medge gateway outputs --config gateway.yaml --parked        the parked items and why
  medge gateway outputs --config gateway.yaml --unpark pacs   send the PACS's again
  medge gateway outputs --outbox gw.clinical.sqlite --json    the same, as JSON"""


def register_outputs(gsub: Any, common: Callable[..., None]) -> None:
    """Add `gateway outputs` to the `medge gateway` actions."""
    o = gsub.add_parser(
        "outputs",
        help="watch the clinical outbox (PACS, FHIR): waiting, parked; unpark",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    o.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="gateway.yaml: the clinical outbox of its 'gateway: outputs:' section "
        "(docs/gateway-config.md)",
    )
    o.add_argument(
        "--outbox",
        type=Path,
        default=None,
        metavar="FILE",
        help="the clinical outbox file itself (instead of --config's) [outputs.outbox]",
    )
    act = o.add_mutually_exclusive_group()
    act.add_argument(
        "--parked",
        type=int,
        nargs="?",
        const=PARKED_DEFAULT,
        default=None,
        metavar="N",
        help=f"list up to N parked items (default {PARKED_DEFAULT}), one a line: target, "
        "site/device/seq, kind, attempts, the reason",
    )
    act.add_argument(
        "--unpark",
        nargs="?",
        const="all",
        default=None,
        choices=["pacs", "fhir", "all"],
        metavar="TARGET",
        help="make the parked items of TARGET (pacs, fhir or all; default all) wait to be "
        "sent again; prints how many",
    )
    common(o, json_flag=True)
    o.set_defaults(func=cmd_gateway_outputs)


def cmd_gateway_outputs(a: argparse.Namespace) -> int:
    """Status (default), --parked N or --unpark TARGET of the clinical outbox."""
    from gateway.clinical.outbox import ClinicalOutbox

    path, configured = _outbox_path(a.config, a.outbox)
    if a.parked is not None and a.parked < 1:
        raise MedgeError("--parked N: N must be 1 or more")
    with ClinicalOutbox.open_existing(path) as box:
        if a.unpark is not None:
            doc = _unpark(box, a.unpark)
        elif a.parked is not None:
            doc = _parked(box, a.parked)
        else:
            doc = _status(box, configured)
    doc = {"outbox": str(path), **doc}
    if a.json:
        print(json.dumps(doc))
    else:
        for line in _text(doc):
            print(line)
    return 0


def _outbox_path(config: Path | None, outbox: Path | None) -> tuple[Path, list[str] | None]:
    """The outbox file, and the targets the config sends to (None: no config read)."""
    if outbox is not None:
        return outbox, None
    if config is None:
        raise MedgeError("give --config gateway.yaml (its outputs: section) or --outbox FILE")
    from gateway.config import load_gateway_config

    cfg = load_gateway_config(config)
    out = cfg.outputs
    if out is None:
        raise MedgeError(
            f"{config}: no 'outputs:' in its gateway: section, so no clinical outbox "
            "(give --outbox FILE to read one anyway)"
        )
    targets = [t for t in TARGETS if getattr(out, t) is not None]
    return cfg.clinical_outbox(), targets


def _name(item: ClinicalItem) -> dict[str, Any]:
    return {"site": item.site, "device": item.device, "seq": item.seq, "kind": item.kind}


def _status(box: ClinicalOutbox, configured: list[str] | None) -> dict[str, Any]:
    now = time.time()
    found: dict[str, TargetSummary] = {s.target: s for s in box.summary()}
    targets: dict[str, Any] = {}
    for t in sorted(set(found) | set(configured or [])):
        s = found.get(t)
        doc: dict[str, Any] = {
            "waiting": s.waiting if s else 0,
            "parked": s.parked if s else 0,
            "oldest_waiting_s": None,
            "next": None,
            "configured": None if configured is None else t in configured,
        }
        if s is not None and s.next_item is not None and s.oldest_queued is not None:
            doc["oldest_waiting_s"] = round(max(0.0, now - s.oldest_queued), 1)
            doc["next"] = {
                **_name(s.next_item),
                "attempts": s.attempts,
                "next_try_in_s": round(max(0.0, s.next_try - now), 1),
                "last_error": s.last_error,
            }
        targets[t] = doc
    return {"targets": targets}


def _parked(box: ClinicalOutbox, limit: int) -> dict[str, Any]:
    total = sum(box.parked_count().values())
    items = [
        {"target": p.item.target, **_name(p.item), "attempts": p.attempts, "reason": p.reason}
        for p in box.parked(limit=limit)
    ]
    return {"parked": items, "parked_total": max(total, len(items))}


def _unpark(box: ClinicalOutbox, which: str) -> dict[str, Any]:
    targets = sorted(set(TARGETS) | set(box.parked_count())) if which == "all" else [which]
    done = {t: box.unpark(t) for t in targets}
    return {"unparked": done, "total": sum(done.values())}


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _text(doc: dict[str, Any]) -> list[str]:
    """The lines an operator reads."""
    where = f"clinical outbox {doc['outbox']}"
    if "unparked" in doc:
        per = ", ".join(f"{t} {n}" for t, n in doc["unparked"].items())
        tail = (
            "; a running gateway sends them again within about a second (later while a "
            "receiver still fails)"
            if doc["total"]
            else ""
        )
        return [f"{where}: unparked {doc['total']} item(s) ({per}){tail}"]
    if "parked" in doc:
        return [f"{where}: {doc['parked_total']} parked", *_parked_lines(doc)]
    lines = [where, *(_target_line(t, s) for t, s in doc["targets"].items())]
    if not doc["targets"]:
        lines.append("  empty: nothing waits, nothing is parked")
    if any(s["parked"] for s in doc["targets"].values()):
        lines.append(
            "  parked items are not sent again: list them with --parked, fix the cause, "
            "then --unpark"
        )
    return lines


def _parked_lines(doc: dict[str, Any]) -> list[str]:
    lines = [
        f"  {p['target']} {p['site']}/{p['device']}/{p['seq']} {p['kind']}, "
        f"{p['attempts']} attempt(s): {one_line(p['reason'], 500)}"
        for p in doc["parked"]
    ]
    more = doc["parked_total"] - len(doc["parked"])
    if more > 0:
        lines.append(f"  ... and {more} more (--parked N shows N)")
    return lines


def _target_line(target: str, s: dict[str, Any]) -> str:
    line = f"  {target}: {s['waiting']} waiting, {s['parked']} parked"
    nxt = s["next"]
    if nxt is not None:
        line += f"; oldest waiting {_age(s['oldest_waiting_s'])}"
        line += f"; next {nxt['kind']} {nxt['site']}/{nxt['device']}/{nxt['seq']}"
        if nxt["attempts"]:
            due = nxt["next_try_in_s"]
            line += f", {nxt['attempts']} attempt(s), next try "
            line += f"in {_age(due)}" if due >= 1 else "now"
        if nxt["last_error"]:
            line += f", last error: {one_line(nxt['last_error'], 300)}"
    if s["configured"] is False and (s["waiting"] or s["parked"]):
        line += " [not in outputs: nothing sends these]"
    return line
