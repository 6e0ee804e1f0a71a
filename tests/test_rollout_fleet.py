"""A staged rollout on a real fleet: three real agents streaming real images through Mosquitto
to a gateway whose driver shadows, gates and switches them stage by stage, started by the real
CLI. One device drops off the network in the middle (its link silently dead, then cut) and
comes back: it gets what it is owed, and no result of any device is lost or stored twice."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from tcp_proxy import TcpProxy
from test_update import _variant
from waiting import wait_for

from edge_agent import Agent, AgentConfig, Bundle
from gateway import Gateway, Store
from gateway.broker import RunningBroker
from gateway.config import load_gateway_config
from gateway.groups import set_group
from gateway.node import start_rollouts
from gateway.rollout_store import status
from gateway.site import signer_key
from medge.cli import main as medge
from models import breast_cnn

pytestmark = pytest.mark.slow

DEVICES = ("fl-1", "fl-2", "fl-3")
SAMPLES = 600  # per device: 15 s at 40 per second


def _agent(
    device: str, bundle: Path, ident: Path, port: int, tmp: Path
) -> tuple[Agent, threading.Thread, dict[str, Any]]:
    cfg = AgentConfig(
        site="ward-a",
        device=device,
        bundle=bundle,
        identity=ident,
        broker={"host": "127.0.0.1", "port": port, "keepalive": 2, "reconnect_max_s": 1.0},
        source={"path": breast_cnn.DATA, "split": "val", "rate_hz": 40, "loop": True},
        outbox={"path": tmp / device / "outbox.sqlite", "resend_after_s": 1.0},
        telemetry_interval_s=0.3,
    )
    cfg.source.limit = SAMPLES  # type: ignore[union-attr]
    agent, box = Agent(cfg), {}
    thread = threading.Thread(target=lambda: box.update(r=agent.run(threading.Event(), 30)))
    return agent, thread, box


def test_a_group_rolls_out_stage_by_stage_through_a_device_that_drops_off(  # type: ignore[no-untyped-def]
    bundle_dir: Path, site_dir: Path, identity, opener, mosquitto: RunningBroker, tmp_path: Path
) -> None:
    new = _variant(bundle_dir, tmp_path / "v2", "99991231.000000", signer_key(site_dir))
    old_id, new_id = Bundle.load(bundle_dir).id, Bundle.load(new).id
    config = tmp_path / "gateway.yaml"
    gw_cfg = {
        "site_dir": str(site_dir),
        "broker": {"host": mosquitto.host, "port": mosquitto.port},
        "store": {"db": str(tmp_path / "gw.sqlite")},
        "rollouts": {"http_host": "127.0.0.1", "http_port": 0, "poll_s": 0.2},
    }
    config.write_text(yaml.safe_dump({"gateway": gw_cfg}))
    cfg = load_gateway_config(config)
    with TcpProxy((mosquitto.host, mosquitto.port)) as proxy:  # fl-3's network
        agents = {
            d: _agent(
                d,
                bundle_dir,
                identity(d),
                proxy.port if d == "fl-3" else mosquitto.port,
                tmp_path,
            )
            for d in DEVICES
        }
        with Store(cfg.store.target()) as store, Gateway.from_config(cfg, store, opener) as gw:
            service = start_rollouts(cfg, store, gw)
            try:
                for _, thread, _ in agents.values():
                    thread.start()
                set_group(store, "ward-a-beds", [("ward-a", d) for d in DEVICES])
                args = ["gateway", "rollout", "start", str(new), "--group", "ward-a-beds"]
                args += ["--config", str(config), "--canary", "1", "--steps", "100%"]
                args += ["--gate", "agreement>=0.98,alerts_per_hour<=60", "--min-results", "15"]
                args += ["--shadow-share", "0.5", "--cpu-budget", "4", "--json"]
                assert medge(args) == 0
                rid = status_of(store)["id"]
                # the canary shadows, switches; then fl-3 drops off before its own turn
                wait_for(lambda: device_state(store, rid, "fl-1") == "done", 40, "the canary")
                proxy.blackhole()  # its link is dead; it does not know yet
                wait_for(lambda: fleet_state(store, "fl-3") == "offline", 20, "fl-3 seen offline")
                time.sleep(1.0)  # the stage's other device goes on without it
                proxy.cut()
                proxy.restore()  # back: it reconnects, drains, gets its commands
                wait_for(
                    lambda: status_of(store)["status"] == "completed",
                    60,
                    lambda: f"the rollout to complete: {status(store, rid)}",
                )
                final = status(store, rid)
                for _, thread, _ in agents.values():
                    thread.join(timeout=60)
                    assert not thread.is_alive()
                wait_for(lambda: stored(store) == produced(agents), 30, "every result stored")
                rows = store.query(
                    "SELECT device, seq, bundle FROM results WHERE kind='result' ORDER BY seq"
                )
                events = store.query("SELECT device, body FROM results WHERE kind='event'")
            finally:
                service.stop()

    assert final["status"] == "completed" and final["reason"] is None
    _check_fleet(agents, rows, events, old_id, new_id)
    for stage in final["stages"]:  # each stage's gates, as decided, held on measured values
        assert stage["state"] == "done"
        held = {g["gate"]: (g["value"], g["holds"]) for g in stage["gates"]}
        assert held["agreement>=0.98"] == (1.0, True), stage  # the same model: full agreement
        assert held["alerts_per_hour<=60"][1] is True, stage
    dropped = next(d for d in final["devices"] if d["device"] == "fl-3")
    assert dropped["state"] == "done" and dropped["sends"] >= 2, dropped  # owed, sent again


def _check_fleet(
    agents: dict[str, Any], rows: list[Any], events: list[Any], old_id: str, new_id: str
) -> None:
    """Every device: every sample stored once, one switch between two samples and never
    back, and the rollout's events (shadow, applied, shadow stopped)."""
    for d in DEVICES:
        agent, _, box = agents[d]
        assert box["r"].pending == 0 and agent.bundle.id == new_id, d
        mine = [r for r in rows if r["device"] == d]
        theirs = [json.loads(e["body"]) for e in events if e["device"] == d]
        assert len(mine) == SAMPLES and len(mine) + len(theirs) == box["r"].sent, d
        assert len({r["seq"] for r in mine}) == SAMPLES, d
        bundles = [r["bundle"] for r in mine]
        switch = bundles.index(new_id)
        assert set(bundles[:switch]) == {old_id} and set(bundles[switch:]) == {new_id}, d
        updates = [e["update"] for e in theirs]
        assert updates[:1] == ["shadow"] and "applied" in updates, (d, updates)
        assert "shadow_stopped" in updates, (d, updates)


def status_of(store: Store) -> dict[str, Any]:
    rows = store.query("SELECT id, status FROM rollouts ORDER BY id DESC LIMIT 1")
    return dict(rows[0]) if rows else {"id": None, "status": None}


def device_state(store: Store, rid: int, device: str) -> str | None:
    rows = store.query(
        "SELECT state FROM rollout_devices WHERE rollout=? AND device=?", (rid, device)
    )
    return rows[0]["state"] if rows else None


def fleet_state(store: Store, device: str) -> str | None:
    rows = store.query("SELECT state FROM devices WHERE device=?", (device,))
    return rows[0]["state"] if rows else None


def stored(store: Store) -> int:
    return int(store.query("SELECT count(*) AS n FROM results")[0]["n"])  # results and events


def produced(agents: dict[str, Any]) -> int:
    return sum(box["r"].sent for _, _, box in agents.values() if "r" in box)
