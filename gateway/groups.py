"""Device groups in the gateway's store (``device_groups``: name, site, device): the fleets a
staged rollout moves through (docs/rollouts.md). A group holds explicit members; a pattern
(``ward-3-*``) is expanded once, when the command runs, against the devices the site has
registered and those the store has heard from."""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Iterable
from pathlib import Path

from gateway.rollout_plan import RolloutError
from gateway.store import Store

__all__ = [
    "add_members",
    "group_members",
    "known_devices",
    "list_groups",
    "match_devices",
    "remove_members",
    "set_group",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

Member = tuple[str, str]  # (site, device)


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise RolloutError(
            f"group name {name!r}: 1-64 of letters, digits, '.', '_', '-' (starting with a "
            "letter or digit)"
        )
    return name


def known_devices(store: Store, site: str, site_dir: Path | None = None) -> list[str]:
    """The devices of ``site``: registered in ``site_dir`` (devices/*.crt) or heard from."""
    names = {r["device"] for r in store.query("SELECT device FROM devices WHERE site=?", (site,))}
    if site_dir is not None and (site_dir / "devices").is_dir():
        names.update(p.stem for p in (site_dir / "devices").glob("*.crt"))
    return sorted(names)


def match_devices(
    store: Store, site: str, patterns: Iterable[str], site_dir: Path | None = None
) -> list[str]:
    """The known devices of ``site`` whose names match any fnmatch pattern (``ward-3-*``);
    RolloutError when a pattern matches none."""
    known = known_devices(store, site, site_dir)
    found: set[str] = set()
    for pattern in patterns:
        hit = fnmatch.filter(known, pattern)
        if not hit:
            raise RolloutError(f"--match {pattern!r} matches no known device of site {site}")
        found.update(hit)
    return sorted(found)


def set_group(store: Store, name: str, members: Iterable[Member]) -> int:
    """Make ``name`` exactly these members (a new group, or replacing one); returns how many."""
    _check_name(name)
    wanted = sorted(set(members))
    if not wanted:
        raise RolloutError(f"group {name}: no devices given")
    with store.transaction() as db:
        db.execute("DELETE FROM device_groups WHERE name=?", (name,))
        for site, device in wanted:
            db.execute(
                "INSERT INTO device_groups (name, site, device, added) VALUES (?,?,?,?)",
                (name, site, device, time.time()),
            )
    store.add_audit("group", f"group {name} set: {len(wanted)} device(s)")
    return len(wanted)


def add_members(store: Store, name: str, members: Iterable[Member]) -> int:
    """Add members to ``name`` (created if new); returns how many were not in it yet."""
    _check_name(name)
    added = 0
    with store.transaction() as db:
        for site, device in sorted(set(members)):
            cur = db.execute(
                "INSERT INTO device_groups (name, site, device, added) VALUES (?,?,?,?) "
                "ON CONFLICT (name, site, device) DO NOTHING",
                (name, site, device, time.time()),
            )
            added += max(cur.rowcount, 0)
    store.add_audit("group", f"group {name}: {added} device(s) added")
    return added


def remove_members(store: Store, name: str, members: Iterable[Member]) -> int:
    """Remove members from ``name``; returns how many were in it. A group left empty is gone."""
    removed = 0
    with store.transaction() as db:
        for site, device in sorted(set(members)):
            cur = db.execute(
                "DELETE FROM device_groups WHERE name=? AND site=? AND device=?",
                (name, site, device),
            )
            removed += max(cur.rowcount, 0)
    store.add_audit("group", f"group {name}: {removed} device(s) removed")
    return removed


def group_members(store: Store, name: str) -> list[Member]:
    """The members of ``name``, sorted by (site, device); RolloutError if there is no such group."""
    rows = store.query(
        "SELECT site, device FROM device_groups WHERE name=? ORDER BY site, device", (name,)
    )
    if not rows:
        raise RolloutError(f"no device group {name!r} (medge gateway group set {name} DEVICE...)")
    return [(str(r["site"]), str(r["device"])) for r in rows]


def list_groups(store: Store) -> dict[str, list[Member]]:
    """Every group and its members."""
    out: dict[str, list[Member]] = {}
    for r in store.query(
        "SELECT name, site, device FROM device_groups ORDER BY name, site, device"
    ):
        out.setdefault(str(r["name"]), []).append((str(r["site"]), str(r["device"])))
    return out
