"""Staged rollouts as rows of the gateway's store (docs/rollouts.md): ``rollouts`` (one per
rollout: target bundle, plan, status, stage, phase, reason, the gate values that decided each
stage) and ``rollout_devices`` (one per device: its stage, its state, the bundle it ran before,
the command owed to it). ``medge gateway rollout`` writes here; the running gateway's
:class:`~gateway.rollout.RolloutDriver` reads and advances them. Also the measures the gates
read (:func:`measure_shadow`, :func:`measure_after`) and the status document (:func:`status`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_agent.bundle import Bundle
from edge_agent.errors import MedgeError, one_line
from gateway.groups import group_members
from gateway.rollout_plan import Plan, RolloutError, stage_sizes
from gateway.store import Store

__all__ = [
    "ACTIVE",
    "DEVICE_STATES",
    "control",
    "create_rollout",
    "fleet_of",
    "measure_after",
    "measure_shadow",
    "retry",
    "rollout_devices",
    "rollouts",
    "shadow_of",
    "status",
]

ACTIVE = ("running", "paused", "aborting")  # a rollout the driver still looks after
DEVICE_STATES = (
    "pending",  # its stage has not come, or nothing sent yet
    "shadowing",  # shadow-bundle sent: runs the candidate beside its current bundle
    "updating",  # update-bundle sent, not yet running the target
    "done",  # runs the target
    "stopped",  # shadow stopped by an abort; never updated
    "rolling_back",  # abort: rollback-bundle sent
    "rolled_back",  # abort: back on the bundle it ran before
    "failed",  # rejected a command, or rolled the target back itself (reason says)
)


def create_rollout(
    store: Store,
    bundle_dir: Path,
    group: str,
    plan: Plan,
    bundles: Path,
    site: str,
    trusted: list[ed25519.Ed25519PublicKey],
) -> int:
    """Verify the bundle (signature by the site's signer, every hash), pack it into
    ``bundles`` (served by the gateway), snapshot the group's members into stages and store a
    ``running`` rollout; returns its id. RolloutError when the group is empty, holds devices
    of another site, or shares a device with a rollout still active."""
    from gateway.ota import pack_bundle

    plan.check()
    try:
        bundle = Bundle.load(bundle_dir, trusted=trusted)
    except MedgeError as exc:
        raise RolloutError(one_line(f"{bundle_dir}: {exc}")) from exc
    members = group_members(store, group)
    foreign = [f"{s}/{d}" for s, d in members if s != site]
    if foreign:
        raise RolloutError(
            f"group {group} holds devices of another site ({', '.join(foreign[:3])}): this "
            f"gateway signs commands for site {site} only"
        )
    busy = store.query(
        "SELECT r.id, d.site, d.device FROM rollout_devices d JOIN rollouts r ON r.id=d.rollout "
        f"WHERE r.status IN ({','.join('?' * len(ACTIVE))})",
        ACTIVE,
    )
    taken = {(b["site"], b["device"]): b["id"] for b in busy}
    clash = [f"{s}/{d} (rollout {taken[(s, d)]})" for s, d in members if (s, d) in taken]
    if clash:
        raise RolloutError(
            f"group {group} has devices in a rollout still active: {', '.join(clash[:3])}; "
            "abort it or wait for it to finish"
        )
    archive, digest = pack_bundle(bundle_dir, bundles)
    stages = stage_sizes(len(members), plan.canary, plan.steps)
    now = time.time()
    with store.transaction() as db:
        cur = db.execute(
            "INSERT INTO rollouts (group_name, bundle, archive, sha256, plan, status, stage, "
            "phase, created, updated, stage_since) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                group,
                bundle.id,
                archive.name,
                digest,
                json.dumps(plan.to_json()),
                "running",
                0,
                "shadow" if plan.shadow else "switch",
                now,
                now,
                now,
            ),
        )
        rid = int(cur.lastrowid or 0)
        for position, (site_, device) in enumerate(members):
            stage = next((i for i, (_, n) in enumerate(stages) if position < n), len(stages))
            db.execute(
                "INSERT INTO rollout_devices (rollout, site, device, position, stage, since) "
                "VALUES (?,?,?,?,?,?)",
                (rid, site_, device, position, stage, now),
            )
    names = ", ".join(f"{n} ({c})" for n, c in stages)
    store.add_audit(
        "rollout", f"rollout {rid}: {bundle.id} to group {group} started; stages {names}"
    )
    return rid


def rollouts(
    store: Store, rid: int | None = None, status: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Rollout rows (``plan`` and ``gate_values`` parsed), newest first; the one ``rid``, or
    those of a ``status``."""
    where, args = [], list[Any]()
    if rid is not None:
        where.append("id=?")
        args.append(rid)
    if status:
        where.append(f"status IN ({','.join('?' * len(status))})")
        args.extend(status)
    sql = "SELECT * FROM rollouts" + (" WHERE " + " AND ".join(where) if where else "")
    rows = store.query(sql + " ORDER BY id DESC", args)
    for r in rows:
        r["plan"] = json.loads(r["plan"])
        r["gate_values"] = json.loads(r["gate_values"]) if r["gate_values"] else {}
    return rows


def rollout_devices(store: Store, rid: int) -> list[dict[str, Any]]:
    return store.query("SELECT * FROM rollout_devices WHERE rollout=? ORDER BY position", (rid,))


def control(store: Store, rid: int, action: str) -> dict[str, Any]:
    """``pause``, ``resume`` or ``abort`` rollout ``rid`` (the running gateway acts on it
    within a poll); returns the row. RolloutError when the rollout's status does not allow it."""
    allowed = {"pause": ("running",), "resume": ("paused",), "abort": ("running", "paused")}
    target = {"pause": "paused", "resume": "running", "abort": "aborting"}[action]
    reason = {"pause": "paused by the operator", "resume": None, "abort": "aborted by the operator"}
    now = time.time()
    with store.transaction() as db:
        row = db.execute("SELECT status FROM rollouts WHERE id=?", (rid,)).fetchone()
        if row is None:
            raise RolloutError(f"no rollout {rid}")
        if row["status"] not in allowed[action]:
            raise RolloutError(f"rollout {rid} is {row['status']}: cannot {action} it")
        db.execute(
            "UPDATE rollouts SET status=?, reason=?, updated=? WHERE id=?",
            (target, reason[action], now, rid),
        )
    store.add_audit("rollout", f"rollout {rid}: {action} ({row['status']} -> {target})")
    return rollouts(store, rid)[0]


def retry(store: Store, rid: int, devices: list[str] | None = None) -> list[str]:
    """Give failed devices of rollout ``rid`` another try: each goes back to ``pending`` in
    the current stage (its own if that is later), with no command owed, and the running
    driver sends it the current phase's command at its next pass. ``devices``: names
    (``device`` or ``site/device``), or None for every failed one. A paused rollout stays
    paused until resumed. Returns the ``site/device`` names retried; RolloutError when the
    rollout is not running or paused, a named device is not in it or not failed, or none is."""
    now = time.time()
    with store.transaction() as db:
        row = db.execute("SELECT status, stage, plan FROM rollouts WHERE id=?", (rid,)).fetchone()
        if row is None:
            raise RolloutError(f"no rollout {rid}")
        if row["status"] not in ("running", "paused"):
            raise RolloutError(
                f"rollout {rid} is {row['status']}: cannot retry its devices (start a new one)"
            )
        devs = db.execute(
            "SELECT site, device, stage, state, reason FROM rollout_devices WHERE rollout=?",
            (rid,),
        ).fetchall()
        plan = Plan.of_json(json.loads(row["plan"]))
        last = len(stage_sizes(len(devs), plan.canary, plan.steps)) - 1
        if int(row["stage"]) > last:
            raise RolloutError(f"rollout {rid} has been through every stage: start a new one")
        chosen = _failed(rid, devs, devices)
        for d in chosen:
            db.execute(
                "UPDATE rollout_devices SET state='pending', reason=?, stage=?, cmd=NULL, "
                "cmd_sent=NULL, cmd_conn=NULL, cmd_mark=NULL, update_mark=NULL, since=? "
                "WHERE rollout=? AND site=? AND device=?",
                (
                    one_line(f"retried (it had failed: {d['reason']})", 300),
                    max(int(d["stage"]), int(row["stage"])),
                    now,
                    rid,
                    d["site"],
                    d["device"],
                ),
            )
    names = [f"{d['site']}/{d['device']}" for d in chosen]
    for d in chosen:
        store.add_audit(
            "rollout", f"rollout {rid}: retry (failed: {d['reason']})", d["site"], d["device"]
        )
    return names


def _failed(rid: int, devs: list[dict[str, Any]], names: list[str] | None) -> list[dict[str, Any]]:
    """The rows of ``names`` (every failed one for None), each checked to be failed."""
    if names is None:
        chosen = [d for d in devs if d["state"] == "failed"]
        if not chosen:
            raise RolloutError(f"rollout {rid} has no failed device")
        return chosen
    chosen = []
    for name in names:
        found = [d for d in devs if name in (f"{d['site']}/{d['device']}", d["device"])]
        if len(found) != 1:
            raise RolloutError(f"rollout {rid} has no device {name!r}")
        if found[0]["state"] != "failed":
            raise RolloutError(f"{name} is {found[0]['state']} in rollout {rid}, not failed")
        chosen.append(found[0])
    return chosen


# -- the measures gates read ---------------------------------------------------------------
def shadow_of(telemetry: str | dict[str, Any] | None, target: str) -> dict[str, Any] | None:
    """The ``shadow`` section of a device's latest telemetry, if it is about ``target``."""
    doc = telemetry
    if isinstance(doc, str):
        try:
            doc = json.loads(doc)
        except (ValueError, RecursionError):
            return None
    shadow = doc.get("shadow") if isinstance(doc, dict) else None
    if not isinstance(shadow, dict) or shadow.get("bundle") != target:
        return None
    return shadow


def _num(v: Any) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < float("inf")
    return float(v) if ok else None


def measure_shadow(
    target: str, devices: list[dict[str, Any]], fleet: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, Any]:
    """Over ``devices`` (rollout_devices rows) as their latest telemetry tells: ``samples``
    per device, ``samples_min``, ``agreement`` (all compared samples together: the
    sample-weighted mean of the devices' agreement), ``dice`` (segmentation: the mean Dice
    of the candidate's masks with the published ones over every compared pair; None for other
    models), ``shadow_p99_ms`` (the highest candidate p99 of any device), ``skipped`` (samples
    over the CPU budget, summed)."""
    per: dict[str, int] = {}
    agreeing = compared = skipped = overlap = pairs = 0.0
    p99: float | None = None
    for d in devices:
        key = (d["site"], d["device"])
        sh = shadow_of(fleet.get(key, {}).get("telemetry"), target) or {}
        n = int(_num(sh.get("samples")) or 0)
        per[f"{key[0]}/{key[1]}"] = n
        agreement = _num(sh.get("agreement"))
        if agreement is not None and n > 0:
            agreeing += agreement * n
            compared += n
        skipped += _num(sh.get("skipped")) or 0
        d_sh = sh.get("dice")
        mean, n_pairs = (
            (_num(d_sh.get("mean")), _num(d_sh.get("n")))
            if isinstance(d_sh, dict)
            else (None, None)
        )
        if mean is not None and n_pairs:
            overlap += mean * n_pairs
            pairs += n_pairs
        lat = sh.get("latency_ms")
        q = _num(lat.get("p99")) if isinstance(lat, dict) else None
        if q is not None:
            p99 = q if p99 is None else max(p99, q)
    return {
        "devices": len(devices),
        "samples": per,
        "samples_min": min(per.values()) if per else 0,
        "agreement": round(agreeing / compared, 6) if compared else None,
        "dice": round(overlap / pairs, 6) if pairs else None,
        "shadow_p99_ms": p99,
        "skipped": int(skipped),
    }


def measure_after(
    store: Store, target: str, devices: list[dict[str, Any]], now: float
) -> dict[str, Any]:
    """Over ``devices`` since each switched to ``target``: ``results`` on it per device
    (result rows naming the bundle), ``results_min``, ``alerts`` (alerts opened on these
    devices since their switch, each counted with its repeats), ``device_hours`` and
    ``alerts_per_hour`` = alerts / device-hours (None before any device switched; 0 without
    alerts, however short the time)."""
    per: dict[str, int] = {}
    alerts = 0
    hours = 0.0
    switched = [d for d in devices if d["switched"] is not None]
    for d in devices:
        name = f"{d['site']}/{d['device']}"
        if d["switched"] is None:
            per[name] = 0
            continue
        per[name] = int(
            store.query(
                "SELECT count(*) AS n FROM results WHERE site=? AND device=? AND id>? "
                "AND kind='result' AND bundle=?",
                (d["site"], d["device"], d["update_mark"] or 0, target),
            )[0]["n"]
        )
        alerts += int(
            store.query(
                "SELECT coalesce(sum(count), 0) AS n FROM alerts WHERE site=? AND device=? "
                "AND opened>=?",
                (d["site"], d["device"], d["switched"]),
            )[0]["n"]
        )
        hours += max(0.0, now - float(d["switched"])) / 3600
    return {
        "devices": len(devices),
        "results": per,
        "results_min": min(per.values()) if per else 0,
        "alerts": alerts,
        "device_hours": round(hours, 6),
        "alerts_per_hour": None if not switched else 0.0 if not alerts else _rate(alerts, hours),
    }


def _rate(alerts: int, hours: float) -> float:
    return round(alerts / hours, 6) if hours > 0 else float("inf")


def fleet_of(store: Store, devices: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The devices-table rows (state, state_since, bundle, telemetry) of these devices."""
    wanted = {(d["site"], d["device"]) for d in devices}
    sites = sorted({s for s, _ in wanted})
    if not sites:
        return {}
    rows = store.query(
        "SELECT site, device, state, state_since, bundle, telemetry FROM devices "
        f"WHERE site IN ({','.join('?' * len(sites))})",
        sites,
    )
    return {(r["site"], r["device"]): r for r in rows if (r["site"], r["device"]) in wanted}


# -- the status document -------------------------------------------------------------------
def status(store: Store, rid: int, now: float | None = None) -> dict[str, Any]:
    """Everything a page needs about rollout ``rid``: the plan, the stages (each ``done``,
    ``current`` or ``waiting``), the gates (measured value vs threshold: live for the current
    stage, as decided for the stages before) and every device's state."""
    found = rollouts(store, rid)
    if not found:
        raise RolloutError(f"no rollout {rid}")
    r = found[0]
    now = time.time() if now is None else now
    plan = Plan.of_json(r["plan"])
    devs = rollout_devices(store, rid)
    fleet = fleet_of(store, devs)
    sizes = stage_sizes(len(devs), plan.canary, plan.steps)
    stages = []
    before = 0
    for i, (name, count) in enumerate(sizes):
        state = "done" if i < r["stage"] else "current" if i == r["stage"] else "waiting"
        if r["status"] == "completed":
            state = "done"
        doc: dict[str, Any] = {"index": i, "name": name, "devices": count - before}
        doc.update(cumulative=count, state=state)
        decided = r["gate_values"].get(str(i), {})
        if state == "current" and r["status"] in ACTIVE:
            mine = [d for d in devs if d["stage"] == i and d["state"] != "failed"]
            live = {"after": measure_after(store, r["bundle"], mine, now)}
            if r["phase"] == "shadow":  # after the switch the shadow runs end: keep what held
                live["shadow"] = measure_shadow(r["bundle"], mine, fleet)
            decided = {**decided, **live}
        doc["gates"] = _gates(plan, decided)
        doc["measured"] = decided
        stages.append(doc)
        before = count
    return {
        "id": r["id"],
        "group": r["group_name"],
        "bundle": r["bundle"],
        "archive": r["archive"],
        "sha256": r["sha256"],
        "status": r["status"],
        "reason": r["reason"],
        "stage": r["stage"],
        "stage_name": sizes[r["stage"]][0] if r["stage"] < len(sizes) else None,
        "phase": r["phase"],
        "stage_since": r["stage_since"],
        "created": r["created"],
        "updated": r["updated"],
        "plan": r["plan"],
        "stages": stages,
        "devices": [_device_doc(d, fleet, r["bundle"]) for d in devs],
        "counts": {s: sum(d["state"] == s for d in devs) for s in DEVICE_STATES},
    }


def _gates(plan: Plan, measured: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for g in plan.gates:
        value = (measured.get(g.phase) or {}).get(g.measure)
        doc = {"gate": str(g), "measure": g.measure, "op": g.op, "threshold": g.threshold}
        doc.update(phase=g.phase, value=value, holds=None if value is None else g.holds(value))
        out.append(doc)
    return out


def _device_doc(
    d: dict[str, Any], fleet: dict[tuple[str, str], dict[str, Any]], target: str
) -> dict[str, Any]:
    dev = fleet.get((d["site"], d["device"]), {})
    return {
        "site": d["site"],
        "device": d["device"],
        "stage": d["stage"],
        "state": d["state"],
        "reason": d["reason"],
        "since": d["since"],
        "previous": d["previous"],
        "switched": d["switched"],
        "command": d["cmd"],  # owed to the device (None: nothing)
        "command_sent": d["cmd_sent"],  # None: waiting for the device to come online
        "sends": d["sends"],
        "online": dev.get("state") == "online",
        "running": dev.get("bundle"),
        "shadow": shadow_of(dev.get("telemetry"), target),
    }
