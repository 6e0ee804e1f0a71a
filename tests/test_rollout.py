"""Staged fleet rollouts on the gateway side (docs/rollouts.md): device groups and rollouts in a
real store, driven by the RolloutDriver through a real Gateway's MQTT session on a real
Mosquitto, its signed commands checked with the site's signer key, its archive fetched from the
real BundleServer. The devices are simulated: each answers its commands the way the agent does
(docs/device.md), with real sealed state, telemetry, events and results through the Gateway."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_for

from edge_agent.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Bundle,
    Manifest,
    sign_bundle,
    write_manifest,
)
from edge_agent.envelope import Envelope
from edge_agent.keys import key_id
from edge_agent.topics import ROOT, topic
from gateway import Gateway, Store
from gateway.alerts import list_alerts
from gateway.config import GatewayConfig, load_gateway_config
from gateway.groups import group_members, list_groups, match_devices, set_group
from gateway.node import start_rollouts
from gateway.rollout_plan import Plan, RolloutError, parse_gates, parse_steps, stage_sizes
from gateway.rollout_store import control, create_rollout, rollout_devices, status
from gateway.site import signer_key
from medge.cli import main

SITE = "ward-a"
POLL = 0.05


# -- the plan, on its own -------------------------------------------------------------------
def test_stages_and_gates_parse_exactly() -> None:
    assert stage_sizes(10, 2, [10, 50, 100]) == [("canary", 2), ("50%", 5), ("100%", 10)]
    assert stage_sizes(20, 2, [10, 50, 100]) == [("canary", 2), ("50%", 10), ("100%", 20)]
    assert stage_sizes(3, 5, [100]) == [("canary", 3)]
    assert stage_sizes(4, 0, [25, 100]) == [("25%", 1), ("100%", 4)]
    assert parse_steps("10%,50%,100%") == [10.0, 50.0, 100.0]
    [a, b] = parse_gates("agreement>=0.98, alerts_per_hour<=2")
    assert (str(a), a.phase, a.holds(0.98), a.holds(0.97), a.holds(None)) == (
        "agreement>=0.98",
        "shadow",
        True,
        False,
        False,
    )
    assert (str(b), b.phase, b.holds(2.0), b.holds(2.5)) == (
        "alerts_per_hour<=2",
        "after",
        True,
        False,
    )
    for bad, said in (
        ("50%,10%", "must rise"),
        ("0%", "must rise"),
        ("x", "percentage"),
    ):
        with pytest.raises(RolloutError, match=said):
            parse_steps(bad)
    with pytest.raises(RolloutError, match="unknown measure"):
        parse_gates("accuracy>=0.9")
    with pytest.raises(RolloutError, match="MEASURE>=NUMBER"):
        parse_gates("agreement=0.9")
    with pytest.raises(RolloutError, match="not with --no-shadow"):
        Plan(gates=parse_gates("agreement>=0.9"), shadow=False).check()
    with pytest.raises(RolloutError, match="cpu-budget"):
        Plan(cpu_budget=5).check()


def test_the_dice_gate_reads_the_pair_weighted_mean_of_the_devices_masks() -> None:
    """A U-Net's shadow telemetry carries dice {mean, min, n}; the gate reads the mean over
    every compared mask pair of the stage's devices; no device with masks: not measured."""
    from gateway.rollout_store import measure_shadow

    target = "unet@1#x"
    devs = [{"site": SITE, "device": n} for n in ("a", "b", "c")]

    def tel(dice: dict[str, float]) -> str:
        shadow = {"bundle": target, "samples": 10, "agreement": 1.0}
        return json.dumps({"bundle": "old", "shadow": {**shadow, "dice": dice}})

    fleet = {
        (SITE, "a"): {"telemetry": tel({"mean": 0.9, "min": 0.5, "n": 30})},
        (SITE, "b"): {"telemetry": tel({"mean": 0.8, "min": 0.7, "n": 10})},
        (SITE, "c"): {"telemetry": json.dumps({"shadow": {"bundle": target, "samples": 10}})},
    }
    m = measure_shadow(target, devs, fleet)
    assert m["dice"] == pytest.approx(0.875) and m["agreement"] == 1.0
    [gate] = parse_gates("dice>=0.9")
    assert gate.phase == "shadow" and not gate.holds(m["dice"]) and gate.holds(0.9)
    assert measure_shadow(target, devs[2:], fleet)["dice"] is None


# -- a new version of the test bundle ---------------------------------------------------------
@pytest.fixture(scope="module")
def new_bundle(bundle_dir: Path, site_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("v2") / "breast-cnn"
    shutil.copytree(bundle_dir, dst)
    m = Manifest.model_validate_json((dst / MANIFEST_NAME).read_text())
    write_manifest(dst, m.model_copy(update={"version": "99991231.000000"}))
    (dst / SIGNATURE_NAME).unlink()
    sign_bundle(dst, signer_key(site_dir))
    return dst


# -- simulated devices ------------------------------------------------------------------------
class Fleet:
    """Simulated devices behind one MQTT client: each verifies the commands on its ``cmd``
    topic (Ed25519, the site's signer; bound to itself; issued_ms rising), fetches and checks
    the archive, and answers as an agent would, with sealed messages through the gateway."""

    def __init__(self, broker: Any, sealer: Any, site_dir: Path, old: str, new: str) -> None:
        self.public = signer_key(site_dir).public_key()
        self.old, self.new = old, new
        self.sealer = sealer
        self.lock = threading.Lock()
        self.devices: dict[str, dict[str, Any]] = {}
        self.commands: list[tuple[float, str, dict[str, Any]]] = []  # (time, device, command)
        self.errors: list[str] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"{ROOT}/{SITE}/+/cmd", qos=1)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def add(
        self, name: str, agreement: float = 0.99, samples: int = 5, reject: str | None = None
    ) -> None:
        self.devices[name] = {
            "sealer": self.sealer(name),
            "seq": itertools.count(1),
            "running": self.old,
            "online": False,
            "agreement": agreement,
            "samples": samples,
            "reject": reject,
            "last_issued": 0,
        }
        self.online(name)

    def _send(self, name: str, kind: str, body: dict[str, Any]) -> None:
        d = self.devices[name]
        env = Envelope(kind, SITE, name, next(d["seq"]), time.time(), body)
        self.client.publish(topic(SITE, name, kind), d["sealer"].seal(env), qos=1)

    def online(self, name: str) -> None:
        self.devices[name]["online"] = True
        self._send(name, "state", {"state": "online", "bundle": self.devices[name]["running"]})

    def offline(self, name: str) -> None:
        self.devices[name]["online"] = False
        self._send(name, "state", {"state": "offline", "bundle": self.devices[name]["running"]})

    def got(self, name: str | None = None, cmd: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [c for _, n, c in self.commands if name in (None, n) and cmd in (None, c["cmd"])]

    def _verify(self, payload: bytes, name: str) -> dict[str, Any]:
        doc = json.loads(payload)
        sig = base64.b64decode(doc.pop("sig"))
        canonical = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        self.public.verify(sig, canonical)  # raises if forged
        assert doc["key_id"] == key_id(self.public.public_bytes_raw())
        assert (doc["v"], doc["site"], doc["device"]) == (2, SITE, name)
        d = self.devices[name]
        assert doc["issued_ms"] > d["last_issued"], "issued_ms must rise across all commands"
        d["last_issued"] = doc["issued_ms"]
        return doc

    def _fetch(self, doc: dict[str, Any]) -> None:
        with urllib.request.urlopen(doc["url"], timeout=10) as resp:  # noqa: S310 (a test URL)
            assert hashlib.sha256(resp.read()).hexdigest() == doc["sha256"]

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        name = msg.topic.split("/")[3]
        try:
            d = self.devices[name]
            if not d["online"]:
                return  # not connected: it never sees this one
            doc = self._verify(msg.payload, name)
            with self.lock:
                self.commands.append((time.monotonic(), name, doc))
            self._answer(name, d, doc)
        except Exception as exc:  # the test reads these
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")

    def _answer(self, name: str, d: dict[str, Any], doc: dict[str, Any]) -> None:
        cmd = doc["cmd"]
        if cmd == "shadow-bundle":
            assert (doc["share"], doc["cpu_budget"]) == (0.25, 0.5)
            self._fetch(doc)
            self._send(
                name, "event", {"update": "shadow", "bundle": self.new, "running": d["running"]}
            )
            shadow = {
                "bundle": self.new,
                "samples": d["samples"],
                "agreement": d["agreement"],
                "disagree": {"benign->malignant": 1},
                "latency_ms": {"p50": 3.0, "p99": 5.0},
                "skipped": 0,
                "since": time.time(),
            }
            self._send(name, "telemetry", {"bundle": d["running"], "shadow": shadow})
        elif cmd == "update-bundle":
            self._fetch(doc)
            if d["reject"]:
                self._send(
                    name,
                    "event",
                    {
                        "update": "rejected",
                        "bundle": None,
                        "running": d["running"],
                        "reason": d["reject"],
                    },
                )
                return
            previous, d["running"] = d["running"], self.new
            self._send(
                name, "event", {"update": "applied", "bundle": self.new, "previous": previous}
            )
            self._send(name, "state", {"state": "online", "bundle": self.new})
            for i in range(5):
                self._send(
                    name,
                    "result",
                    {"pred": 0, "scores": [0.9, 0.1], "bundle": self.new, "input": f"x#{i}"},
                )
        elif cmd == "shadow-stop":
            self._send(name, "event", {"update": "shadow_stopped", "bundle": self.new})
        elif cmd == "rollback-bundle":
            assert doc["to"] == self.old, doc
            bad, d["running"] = d["running"], doc["to"]
            self._send(
                name,
                "event",
                {
                    "update": "rolled_back",
                    "bundle": bad,
                    "running": doc["to"],
                    "reason": "commanded",
                },
            )
            self._send(name, "state", {"state": "online", "bundle": doc["to"]})


class Fog:
    """A store, a gateway on the broker, its config (with a rollouts: section) on disk, and
    the simulated fleet (with the bundle it runs, ``old``, and the candidate, ``new``)."""

    def __init__(
        self, store: Store, gw: Gateway, cfg: GatewayConfig, yaml: Path, fleet: Fleet, bundle: Path
    ) -> None:
        self.store, self.gw, self.cfg, self.yaml, self.fleet = store, gw, cfg, yaml, fleet
        self.bundle = bundle  # the candidate's directory
        self.old, self.new = fleet.old, fleet.new

    def rollout(self, group: str, devices: list[str], plan: Plan) -> int:
        """Group ``devices`` as ``group`` and create a rollout of the candidate to it."""
        set_group(self.store, group, [(SITE, n) for n in devices])
        trusted = [self.fleet.public]
        return create_rollout(
            self.store, self.bundle, group, plan, self.cfg.rollout_bundles(), SITE, trusted
        )

    @contextmanager
    def driving(self) -> Iterator[Any]:
        """The rollout driver and bundle server of gateway.node, between start and stop."""
        service = start_rollouts(self.cfg, self.store, self.gw)
        try:
            yield service
        finally:
            service.stop()


@pytest.fixture
def fog(  # type: ignore[no-untyped-def]
    bundle_dir, new_bundle, site_dir, mosquitto, opener, sealer, tmp_path
) -> Iterator[Fog]:
    db = tmp_path / "gw.sqlite"
    yaml = tmp_path / "gateway.yaml"
    yaml.write_text(
        f"gateway:\n  site_dir: {site_dir}\n"
        f"  broker: {{host: {mosquitto.host}, port: {mosquitto.port}}}\n  store: {{db: {db}}}\n"
        f"  rollouts: {{http_host: 127.0.0.1, http_port: 0, poll_s: {POLL}}}\n"
    )
    cfg = load_gateway_config(yaml)
    old, new = Bundle.load(bundle_dir).id, Bundle.load(new_bundle).id
    with Store(db) as store, Gateway(store, opener, mosquitto.host, mosquitto.port) as gw:
        fleet = Fleet(mosquitto, sealer, site_dir, old, new)
        try:
            yield Fog(store, gw, cfg, yaml, fleet, new_bundle)
        finally:
            fleet.close()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def devices_by_state(store: Store, rid: int) -> dict[str, str]:
    return {d["device"]: d["state"] for d in rollout_devices(store, rid)}


def rollout_status(store: Store, rid: int) -> str:
    return str(status(store, rid)["status"])


# -- a whole rollout ---------------------------------------------------------------------------
def test_a_rollout_goes_canary_then_each_step_behind_its_gates(
    fog: Fog, capsys: pytest.CaptureFixture[str]
) -> None:
    store, fleet, yaml = fog.store, fog.fleet, str(fog.yaml)
    names = [f"r1-{i:02d}" for i in range(10)]
    for n in names:
        fleet.add(n)
    wait_for(lambda: sum(d["state"] == "online" for d in store.devices()) == 10)
    out = cli(capsys, "gateway", "group", "set", "ward", "--match", "r1-*", "--config", yaml)
    assert out.strip() == "group ward: set to 10 device(s); it has 10"
    out = cli(
        capsys,
        "gateway",
        "rollout",
        "start",
        str(fog.bundle),
        "--group",
        "ward",
        "--config",
        yaml,
        "--canary",
        "2",
        "--steps",
        "10%,50%,100%",
        "--gate",
        "agreement>=0.98,alerts_per_hour<=2",
        "--min-results",
        "5",
    )
    assert (
        out.splitlines()[0]
        == f"rollout 1: {fog.new} to group ward: running, stage 1/3 canary (shadow)"
    )
    assert (
        "  stage 1 canary: 2 device(s), current; agreement>=0.98: -; alerts_per_hour<=2: -" in out
    )
    with fog.driving():
        wait_for(lambda: rollout_status(store, 1) == "completed", 30, lambda: status(store, 1))
    assert fleet.errors == []
    assert set(devices_by_state(store, 1).values()) == {"done"}
    # each device: shadow, switch, stop the shadow; once each, in that order
    for n in names:
        assert [c["cmd"] for c in fleet.got(n)] == ["shadow-bundle", "update-bundle", "shadow-stop"]
    # stage by stage: no device of a later stage heard anything before the earlier stage's
    # devices had all switched
    order = {n: i for i, n in enumerate(names)}
    stage_of = lambda n: 0 if order[n] < 2 else 1 if order[n] < 5 else 2  # noqa: E731
    first = {}
    switched = {}
    for t, n, c in fleet.commands:
        first.setdefault(n, t)
        if c["cmd"] == "update-bundle":
            switched[n] = t
    for n in names:
        for m in names:
            if stage_of(m) < stage_of(n):
                assert switched[m] < first[n], (m, n)
    doc = json.loads(cli(capsys, "gateway", "rollout", "status", "1", "--json", "--config", yaml))
    assert [(s["name"], s["devices"], s["state"]) for s in doc["stages"]] == [
        ("canary", 2, "done"),
        ("50%", 3, "done"),
        ("100%", 5, "done"),
    ]
    g = doc["stages"][0]["gates"]
    assert g[0]["gate"] == "agreement>=0.98" and g[0]["value"] == pytest.approx(0.99)
    assert g[0]["holds"] is True and g[1]["value"] == 0.0 and g[1]["holds"] is True
    assert doc["stages"][0]["measured"]["shadow"]["samples_min"] == 5
    assert doc["stages"][2]["measured"]["after"]["results_min"] == 5
    assert all(d["previous"] == fog.old and d["running"] == fog.new for d in doc["devices"])
    audit = [a["detail"] for a in store.audit("rollout", 500)]
    assert sum("update-bundle sent" in a for a in audit) == 10
    assert any("stage canary: the shadow gates hold; switching" in a for a in audit)
    assert any("completed" in a for a in audit)
    text = fog.gw.metrics.exposition().decode()
    assert 'medge_gateway_rollout_commands_total{cmd="update-bundle"} 10.0' in text
    assert 'medge_gateway_rollouts{status="running"} 0.0' in text


def test_a_failing_agreement_gate_pauses_with_the_reason(
    fog: Fog, capsys: pytest.CaptureFixture[str]
) -> None:
    store, fleet = fog.store, fog.fleet
    fleet.add("r2-01", agreement=0.9)
    fleet.add("r2-02", agreement=0.9)
    wait_for(lambda: len(store.devices()) == 2)
    plan = Plan(canary=2, steps=[100], gates=parse_gates("agreement>=0.98"), min_results=5)
    rid = fog.rollout("g2", ["r2-01", "r2-02"], plan)
    with fog.driving():
        wait_for(lambda: rollout_status(store, rid) == "paused", 20)
        doc = status(store, rid)
        assert doc["reason"] == (
            "stage canary: gate agreement>=0.98 failed: measured 0.9 (shadow run on 2 device(s))"
        )
        time.sleep(5 * POLL)  # a few passes: it stays paused, nothing is switched
        assert fleet.got(cmd="update-bundle") == []
        [alert] = [a for a in list_alerts(store) if a["rule"] == "rollout_paused"]
        assert (alert["site"], alert["device"], alert["severity"], alert["state"]) == (
            SITE,
            f"rollout-{rid}",
            "warning",
            "open",
        )
        assert alert["message"] == f"rollout {rid} paused: {doc['reason']}"
        assert alert["count"] == 1, "raised once, not once a pass"
        # resumed, the gate is read again: still failing, paused again
        control(store, rid, "resume")
        wait_for(lambda: rollout_status(store, rid) == "paused", 10)
        assert fleet.got(cmd="update-bundle") == []
        out = cli(capsys, "gateway", "rollout", "status", str(rid), "--config", str(fog.yaml))
        assert (
            "paused, stage 1/1 canary (shadow): stage canary: gate agreement>=0.98 failed"
            in (out.splitlines()[0])
        )
        assert "agreement>=0.98: 0.9 (FAILS)" in out


def test_abort_rolls_back_exactly_the_devices_that_took_it(
    fog: Fog, capsys: pytest.CaptureFixture[str]
) -> None:
    store, fleet = fog.store, fog.fleet
    fleet.add("r3-01")
    fleet.add("r3-02")
    fleet.add("r3-03", samples=1)  # stage 2 never gets enough shadow samples
    fleet.add("r3-04", samples=1)
    fleet.add("r3-05")
    fleet.offline("r3-05")  # its turn never comes: it hears nothing
    wait_for(lambda: len(store.devices()) == 5)
    rid = fog.rollout(
        "g3", [f"r3-0{i}" for i in range(1, 6)], Plan(canary=2, steps=[80, 100], min_results=5)
    )
    with fog.driving():
        wait_for(lambda: len(fleet.got(cmd="shadow-bundle")) == 4, 20)
        wait_for(
            lambda: status(store, rid)["phase"] == "shadow" and status(store, rid)["stage"] == 1
        )
        out = cli(capsys, "gateway", "rollout", "abort", str(rid), "--config", str(fog.yaml))
        assert "aborting" in out
        wait_for(lambda: rollout_status(store, rid) == "aborted", 20, lambda: status(store, rid))
    rollbacks = fleet.got(cmd="rollback-bundle")
    assert sorted(c["device"] for c in rollbacks) == ["r3-01", "r3-02"]
    assert {c["to"] for c in rollbacks} == {fog.old}
    assert sorted(c["device"] for c in fleet.got(cmd="shadow-stop")) == [
        "r3-01",
        "r3-02",
        "r3-03",
        "r3-04",
    ]
    assert fleet.got("r3-05") == []
    assert devices_by_state(store, rid) == {
        "r3-01": "rolled_back",
        "r3-02": "rolled_back",
        "r3-03": "stopped",
        "r3-04": "stopped",
        "r3-05": "pending",
    }
    assert {fleet.devices[n]["running"] for n in fleet.devices} == {fog.old}
    assert fleet.errors == []


def test_a_device_offline_at_its_turn_gets_its_command_when_it_comes_back(fog: Fog) -> None:
    store, fleet = fog.store, fog.fleet
    fleet.add("r4-01")
    fleet.add("r4-02")
    fleet.offline("r4-02")
    wait_for(
        lambda: (
            {d["device"]: d["state"] for d in store.devices()}
            == {"r4-01": "online", "r4-02": "offline"}
        )
    )
    plan = Plan(canary=2, steps=[100], min_results=5, shadow=False)
    rid = fog.rollout("g4", ["r4-01", "r4-02"], plan)
    with fog.driving():
        wait_for(lambda: devices_by_state(store, rid)["r4-01"] == "done", 20)
        time.sleep(5 * POLL)
        assert fleet.got("r4-02") == []
        doc = status(store, rid)
        [d2] = [d for d in doc["devices"] if d["device"] == "r4-02"]
        assert (d2["state"], d2["command"], d2["command_sent"], d2["online"]) == (
            "updating",
            "update-bundle",
            None,
            False,
        )
        fleet.online("r4-02")
        wait_for(lambda: rollout_status(store, rid) == "completed", 20)
    assert [c["cmd"] for c in fleet.got("r4-02")] == ["update-bundle"]
    assert fleet.errors == []


def test_pause_holds_resume_goes_on_and_a_restarted_driver_resumes(
    fog: Fog, capsys: pytest.CaptureFixture[str]
) -> None:
    store, fleet, yaml = fog.store, fog.fleet, str(fog.yaml)
    names = [f"r5-0{i}" for i in range(1, 5)]
    for n in names:
        fleet.add(n)
    wait_for(lambda: len(store.devices()) == 4)
    rid = fog.rollout("g5", names, Plan(canary=1, steps=[50, 100], min_results=5))
    cli(capsys, "gateway", "rollout", "pause", str(rid), "--config", yaml)
    with fog.driving():
        time.sleep(5 * POLL)
        assert fleet.commands == [], "paused: nothing is sent"
        cli(capsys, "gateway", "rollout", "resume", str(rid), "--config", yaml)
        wait_for(lambda: status(store, rid)["stage"] == 1, 20)  # the canary is done
    # the gateway stopped mid-rollout
    before = len(fleet.commands)
    time.sleep(5 * POLL)
    assert len(fleet.commands) == before, "no driver, no command"
    with fog.driving():  # a new driver (and server port) goes on
        wait_for(lambda: rollout_status(store, rid) == "completed", 20, lambda: status(store, rid))
    for n in names:  # nothing twice across the restart
        assert [c["cmd"] for c in fleet.got(n)] == ["shadow-bundle", "update-bundle", "shadow-stop"]
    assert fleet.errors == []


def test_a_rejected_update_pauses_the_rollout_and_retry_sends_it_again(
    fog: Fog, capsys: pytest.CaptureFixture[str]
) -> None:
    store, fleet, yaml = fog.store, fog.fleet, str(fog.yaml)
    fleet.add("r6-01", reject="self-test: scores are not finite")
    fleet.add("r6-02")
    wait_for(lambda: len(store.devices()) == 2)
    plan = Plan(canary=1, steps=[100], min_results=5, shadow=False)
    rid = fog.rollout("g6", ["r6-01", "r6-02"], plan)
    with fog.driving():
        wait_for(lambda: rollout_status(store, rid) == "paused", 20)
        time.sleep(5 * POLL)
        doc = status(store, rid)
        assert doc["reason"] == "ward-a/r6-01: update rejected: self-test: scores are not finite"
        assert devices_by_state(store, rid) == {"r6-01": "failed", "r6-02": "pending"}
        assert fleet.got("r6-02") == []
        # what retry refuses: a device that did not fail, one not in the rollout
        for argv, said in (
            (["r6-02"], "r6-02 is pending in rollout"),
            (["r9-99"], "has no device 'r9-99'"),
        ):
            assert main(["gateway", "rollout", "retry", str(rid), *argv, "--config", yaml]) == 2
            assert said in capsys.readouterr().err
        # the device is mended; retried, it gets the update again once the rollout resumes
        fleet.devices["r6-01"]["reject"] = None
        out = cli(capsys, "gateway", "rollout", "retry", str(rid), "--config", yaml)
        assert out.splitlines()[0] == f"rollout {rid}: retrying ward-a/r6-01"
        time.sleep(5 * POLL)
        assert [c["cmd"] for c in fleet.got("r6-01")] == ["update-bundle"], "still paused"
        cli(capsys, "gateway", "rollout", "resume", str(rid), "--config", yaml)
        wait_for(lambda: rollout_status(store, rid) == "completed", 20, lambda: status(store, rid))
    assert [c["cmd"] for c in fleet.got("r6-01")] == ["update-bundle", "update-bundle"]
    [alert] = [a for a in list_alerts(store) if a["rule"] == "rollout_paused"]
    assert alert["state"] == "resolved" and "r6-01: update rejected" in alert["message"]
    text = fog.gw.metrics.exposition().decode()
    assert 'medge_gateway_alerts_raised_total{rule="rollout_paused",severity="warning"} 1.0' in text
    assert devices_by_state(store, rid) == {"r6-01": "done", "r6-02": "done"}
    assert main(["gateway", "rollout", "retry", str(rid), "--config", yaml]) == 2
    assert "is completed: cannot retry" in capsys.readouterr().err
    audit = [a["detail"] for a in store.audit("rollout", 500)]
    assert any("retry (failed: update rejected: self-test" in a for a in audit)
    assert fleet.errors == []


# -- the store part, on both engines -----------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        with Store(tmp_path / "gw.sqlite") as store:
            yield store
        return
    from pg import new_database

    with Store(new_database(request.getfixturevalue("postgres_url"))) as store:
        yield store


def test_groups_and_a_driven_rollout_in_either_store(  # type: ignore[no-untyped-def]
    any_store: Store, new_bundle, bundle_dir, site_dir, tmp_path
) -> None:
    """The driver's SQL on SQLite and PostgreSQL: commands recorded through a publish that
    keeps them; the devices' answers written as the gateway stores them."""
    from gateway.rollout import RolloutDriver

    store = any_store
    old, new = Bundle.load(bundle_dir).id, Bundle.load(new_bundle).id
    for n in ("w3-a", "w3-b", "w4-a"):
        store.set_state(SITE, n, "online", time.time(), old)
    assert match_devices(store, SITE, ["w3-*"]) == ["w3-a", "w3-b"]
    set_group(store, "w3", [(SITE, "w3-a"), (SITE, "w3-b")])
    assert list_groups(store) == {"w3": [(SITE, "w3-a"), (SITE, "w3-b")]}
    assert group_members(store, "w3") == [(SITE, "w3-a"), (SITE, "w3-b")]
    trusted = [signer_key(site_dir).public_key()]
    plan = Plan(canary=1, steps=[100], min_results=2, shadow=False)
    rid = create_rollout(store, new_bundle, "w3", plan, tmp_path / "bundles", SITE, trusted)
    with pytest.raises(RolloutError, match="rollout still active"):
        create_rollout(store, new_bundle, "w3", plan, tmp_path / "bundles", SITE, trusted)
    sent: list[tuple[str, dict[str, Any]]] = []
    driver = RolloutDriver(
        store,
        lambda t, p: sent.append((t, json.loads(p))) or True,
        signer_key(site_dir),
        lambda name: f"http://fog/{name}",
    )
    driver.tick()
    assert [(t, c["cmd"], c["url"].startswith("http://fog/")) for t, c in sent] == [
        (topic(SITE, "w3-a", "cmd"), "update-bundle", True)
    ]
    # the device answers: it runs the bundle, and makes two results on it
    store.set_state(SITE, "w3-a", "online", time.time(), new)
    for seq in (1, 2):
        store.add_result(
            Envelope("result", SITE, "w3-a", seq, time.time(), {"bundle": new, "pred": 0})
        )
    driver.tick()  # done; the canary's results are in: stage 2
    driver.tick()
    assert [c["device"] for _, c in sent] == ["w3-a", "w3-b"]
    assert status(store, rid)["stage"] == 1
    control(store, rid, "abort")
    driver.tick()
    assert [(c["device"], c["cmd"], c.get("to")) for _, c in sent[2:]] == [
        ("w3-a", "rollback-bundle", old)
    ]
    store.set_state(SITE, "w3-a", "online", time.time(), old)
    store.set_state(SITE, "w3-b", "online", time.time(), old)  # came back without taking it
    driver.tick()
    assert devices_by_state(store, rid) == {"w3-a": "rolled_back", "w3-b": "pending"}
    assert status(store, rid)["status"] == "aborted"


def test_group_commands_and_what_start_refuses(  # type: ignore[no-untyped-def]
    site_dir, new_bundle, tmp_path, capsys
) -> None:
    db = tmp_path / "gw.sqlite"
    yaml = tmp_path / "gateway.yaml"
    yaml.write_text(f"gateway:\n  site_dir: {site_dir}\n  store: {{db: {db}}}\n")
    with Store(db) as store:
        for n in ("bed-1", "bed-2", "icu-1"):
            store.set_state(SITE, n, "online", time.time(), "b@1")
    out = cli(capsys, "gateway", "group", "set", "beds", "--match", "bed-*", "--config", str(yaml))
    assert out.strip() == "group beds: set to 2 device(s); it has 2"
    out = cli(capsys, "gateway", "group", "add", "beds", "icu-1", "--config", str(yaml), "--json")
    assert json.loads(out) == {
        "group": "beds",
        "add": 1,
        "devices": ["ward-a/bed-1", "ward-a/bed-2", "ward-a/icu-1"],
    }
    cli(capsys, "gateway", "group", "remove", "beds", "bed-2", "--db", str(db), "--site", SITE)
    out = cli(capsys, "gateway", "group", "list", "--db", str(db), "--json")
    assert json.loads(out) == {"groups": {"beds": ["ward-a/bed-1", "ward-a/icu-1"]}}
    assert cli(capsys, "gateway", "group", "list", "--db", str(db)) == (
        "beds: 2 device(s): ward-a/bed-1, ward-a/icu-1\n"
    )
    for argv, said in (
        (["group", "set", "x", "--match", "nope-*"], "matches no known device"),
        (["rollout", "start", str(new_bundle), "--group", "beds"], "no rollouts: section"),
        (["rollout", "status", "7"], "no rollout 7"),
        (["rollout", "pause", "7"], "no rollout 7"),
    ):
        assert main(["gateway", *argv, "--config", str(yaml)]) == 2
        assert said in capsys.readouterr().err
    yaml.write_text(f"gateway:\n  site_dir: {site_dir}\n  store: {{db: {db}}}\n  rollouts: {{}}\n")
    for extra, said in (
        (["--gate", "agreement>=0.9", "--no-shadow"], "not with --no-shadow"),
        (["--steps", "50%,20%"], "must rise"),
        (["--group", "nobody"], "no device group 'nobody'"),
    ):
        argv = ["gateway", "rollout", "start", str(new_bundle), "--group", "beds", *extra]
        assert main([*argv, "--config", str(yaml)]) == 2
        assert said in capsys.readouterr().err
    assert (tmp_path / "gw.bundles").is_dir() is False  # nothing packed for a refused start
    out = cli(
        capsys,
        "gateway",
        "rollout",
        "start",
        str(new_bundle),
        "--group",
        "beds",
        "--config",
        str(yaml),
    )
    assert "stage 1/1 canary (shadow)" in out
    assert len(list((tmp_path / "gw.bundles").glob("breast-cnn-*.tar.gz"))) == 1
    assert "rollout 1: " in cli(capsys, "gateway", "rollout", "status", "--config", str(yaml))


def test_rollouts_with_a_postgresql_store_name_their_bundles_folder(site_dir: Path) -> None:
    from edge_agent.errors import ConfigError

    cfg = GatewayConfig(
        site_dir=site_dir,
        store={"db": "postgresql://u@h/db"},
        rollouts={},  # type: ignore[arg-type]
    )
    with pytest.raises(ConfigError, match="rollouts.bundles"):
        cfg.check_combination()


def test_a_failing_pass_is_counted_every_time_and_said_once(
    tmp_path: Path, site_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that does not answer: the driver keeps running and trying, every failed pass
    counted in medge_gateway_rollout_pass_failures_total, the reason logged once."""
    from gateway.metrics import RolloutMetrics
    from gateway.rollout import RolloutDriver

    store = Store(tmp_path / "gone.sqlite")
    store.close()  # every read now fails
    metrics = RolloutMetrics()
    driver = RolloutDriver(
        store, lambda where, payload: True, signer_key(site_dir), lambda name: name, 0.02, metrics
    )
    with driver:
        wait_for(lambda: metrics.pass_failures._value.get() >= 3, 10, "three failed passes")
        assert driver.thread is not None and driver.thread.is_alive()
    lines = [r for r in caplog.records if "a pass failed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "ERROR"


def test_one_driver_drives_at_a_time_and_a_standby_takes_over(  # type: ignore[no-untyped-def]
    any_store: Store, new_bundle, bundle_dir, site_dir, tmp_path, caplog
) -> None:
    """Two gateway workers with a rollouts: section on one store: the lease lets one drive;
    the other stands by, says so once, and takes over when the first stops renewing it (dead)
    or gives it back (stopped), without sending what was sent again."""
    from gateway.metrics import RolloutMetrics
    from gateway.rollout import RolloutDriver

    store = any_store
    old = Bundle.load(bundle_dir).id
    for n in ("l-a", "l-b"):
        store.set_state(SITE, n, "online", time.time(), old)
    set_group(store, "lease", [(SITE, "l-a"), (SITE, "l-b")])
    plan = Plan(canary=1, steps=[100], min_results=2, shadow=False)
    trusted = [signer_key(site_dir).public_key()]
    create_rollout(store, new_bundle, "lease", plan, tmp_path / "bundles", SITE, trusted)
    later = [0.0]  # how far the drivers' clock is ahead of the wall clock
    sent: list[tuple[str, str]] = []

    def driver(name: str) -> tuple[RolloutDriver, RolloutMetrics]:
        metrics = RolloutMetrics()
        d = RolloutDriver(
            store,
            lambda t, p: sent.append((name, json.loads(p)["device"])) or True,
            signer_key(site_dir),
            lambda n: f"http://fog/{n}",
            metrics=metrics,
            clock=lambda: time.time() + later[0],
            lease_s=10,
        )
        return d, metrics

    (a, ma), (b, mb) = driver("a"), driver("b")
    a.tick()
    b.tick()
    b.tick()
    assert sent == [("a", "l-a")]
    assert (a.driving, b.driving) == (True, False)
    assert (ma.driving._value.get(), mb.driving._value.get()) == (1, 0)
    standby = [r.getMessage() for r in caplog.records if "stands by" in r.getMessage()]
    assert len(standby) == 1 and a.holder in standby[0]
    # a dies without giving the lease back: b waits for it to lapse, then drives
    later[0] = 9
    b.tick()
    assert not b.driving
    later[0] = 11
    b.tick()
    assert b.driving and mb.driving._value.get() == 1
    assert sent == [("a", "l-a")], "l-a had its command on this connection: not sent again"
    a.tick()  # a is back: b holds the lease now
    assert not a.driving and ma.driving._value.get() == 0
    b.release()  # b stops: a takes over at its next pass
    a.tick()
    assert a.driving


def test_retry_brings_a_device_failed_in_an_earlier_stage_into_the_current_one(  # type: ignore[no-untyped-def]
    any_store: Store, new_bundle, bundle_dir, site_dir, tmp_path
) -> None:
    """The retry's SQL on both engines: a device that failed in the canary, the rollout
    resumed past it, is retried in the stage now running and sent the update again."""
    from gateway.rollout import RolloutDriver
    from gateway.rollout_store import retry

    store = any_store
    old = Bundle.load(bundle_dir).id
    names = ["t-a", "t-b", "t-c"]
    for n in names:
        store.set_state(SITE, n, "online", time.time(), old)
    set_group(store, "t", [(SITE, n) for n in names])
    plan = Plan(canary=1, steps=[100], min_results=1, shadow=False)
    trusted = [signer_key(site_dir).public_key()]
    rid = create_rollout(store, new_bundle, "t", plan, tmp_path / "bundles", SITE, trusted)
    sent: list[str] = []
    driver = RolloutDriver(
        store,
        lambda t, p: sent.append(json.loads(p)["device"]) or True,
        signer_key(site_dir),
        lambda name: f"http://fog/{name}",
    )
    driver.tick()
    assert sent == ["t-a"]
    body = {"update": "rejected", "bundle": None, "running": old, "reason": "disk full"}
    store.add_result(Envelope("event", SITE, "t-a", 1, time.time(), body))
    driver.tick()
    assert status(store, rid)["status"] == "paused"
    with pytest.raises(RolloutError, match="t-b is pending in rollout"):
        retry(store, rid, ["t-b"])
    control(store, rid, "resume")
    driver.tick()  # the canary has no live device left: on to the next stage
    driver.tick()
    assert status(store, rid)["stage"] == 1 and sorted(sent) == ["t-a", "t-b", "t-c"]
    assert retry(store, rid) == [f"{SITE}/t-a"]
    with pytest.raises(RolloutError, match="has no failed device"):
        retry(store, rid)
    [row] = [d for d in rollout_devices(store, rid) if d["device"] == "t-a"]
    assert (row["state"], row["stage"]) == ("pending", 1)
    assert row["reason"] == "retried (it had failed: update rejected: disk full)"
    driver.tick()
    assert sent[-1] == "t-a" and len(sent) == 4
    assert devices_by_state(store, rid)["t-a"] == "updating"
