"""Shadow runs (edge_agent.shadow) and the rollout commands of edge_agent.update: a candidate
bundle runs beside the current one on a share of the same samples, is compared and never
published; the float artifact checks the quantized one; a commanded rollback goes back to the
previous bundle; nothing is lost on the way."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_update import _config, _events, _lut_bundle, _results, _updater, _variant
from waiting import wait_for

from edge_agent import Agent, Bundle
from edge_agent.graph import Work
from edge_agent.model import LoadedModel
from edge_agent.shadow import ShadowRun
from edge_agent.sources import Sample
from edge_agent.update import UpdateError, sign_command, verify_command
from gateway import Gateway, Store
from gateway.broker import RunningBroker
from gateway.ota import BundleServer, command, pack_bundle, publish_command
from gateway.site import signer_key
from models import breast_cnn

pytestmark = pytest.mark.slow


def _telemetry(store: Store, device: str) -> dict[str, Any]:
    rows = store.query("SELECT telemetry FROM devices WHERE device=?", (device,))
    return json.loads(rows[0]["telemetry"]) if rows and rows[0]["telemetry"] else {}


def test_a_candidate_shadows_switches_and_is_rolled_back_losing_nothing(  # type: ignore[no-untyped-def]
    bundle_dir: Path, site_dir: Path, identity, opener, mosquitto: RunningBroker, tmp_path: Path
) -> None:
    device, site, key = "sh-01", "ward-a", signer_key(site_dir)
    lut = _lut_bundle(bundle_dir, tmp_path / "lut", "99991231.000000", 11, key)
    old_id, lut_id = Bundle.load(bundle_dir).id, Bundle.load(lut).id
    archive, digest = pack_bundle(lut, tmp_path / "served")
    cfg = _config(bundle_dir, mosquitto, tmp_path, identity(device), device).model_copy(
        update={"runtime": "onnx"}  # the candidate is ONNX only
    )
    cfg.source.loop, cfg.source.limit, cfg.source.rate_hz = True, 240, 25  # type: ignore[union-attr]

    def send(cmd: str, **fields: Any) -> None:
        payload = command(key, site, device, cmd, **fields)
        publish_command(mosquitto.host, mosquitto.port, site, device, payload)

    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port, mosquitto.protocol),
        BundleServer(archive.parent) as server,
    ):
        agent = Agent(cfg)
        box: dict[str, Any] = {}
        t = threading.Thread(target=lambda: box.update(r=agent.run(threading.Event())))
        t.start()
        wait_for(lambda: len(_results(store, device)) >= 5, 20, "5 results")
        url = server.url(archive.name)
        send("shadow-bundle", url=url, sha256=digest, share=0.5, cpu_budget=4.0)
        wait_for(
            lambda: _telemetry(store, device).get("shadow", {}).get("samples", 0) >= 20,
            30,
            "20 shadowed samples in the telemetry",
        )
        shadow = _telemetry(store, device)["shadow"]
        no_float_check = "float_check" not in _telemetry(store, device)  # it runs fp32 itself
        published = {r["bundle"] for r in _results(store, device)}
        send("update-bundle", url=url, sha256=digest)
        wait_for(lambda: agent.bundle.id == lut_id, 20, "the switch to the candidate")
        wait_for(lambda: len(_results(store, device)) >= 120, 30, "results on the candidate")
        send("rollback-bundle", to=old_id)
        wait_for(lambda: agent.bundle.id == old_id, 20, "the commanded rollback")
        t.join(timeout=60)
        assert not t.is_alive() and box["r"].pending == 0
        rows, events = _results(store, device), _events(store, device)

    # the shadow: compared on about half the samples, counted, never published
    assert shadow["bundle"] == lut_id and shadow["share"] == 0.5 and shadow["samples"] >= 20
    assert 0.0 <= shadow["agreement"] <= 1.0
    wrong = sum(shadow["disagree"].values())
    assert wrong == round(shadow["samples"] * (1 - shadow["agreement"]))
    assert all(k.split("->")[0] in ("benign", "malignant") for k in shadow["disagree"])
    assert shadow["latency_ms"]["p50"] > 0 and "failures" not in shadow
    assert published == {old_id}, "only the current model's results are published"
    assert no_float_check
    # every sample once, on one bundle at a time, in order: old, candidate, old again
    assert len(rows) == 240 and len({r["seq"] for r in rows}) == 240
    bundles = [r["bundle"] for r in sorted(rows, key=lambda r: r["seq"])]
    first, last = bundles.index(lut_id), len(bundles) - 1 - bundles[::-1].index(lut_id)
    assert set(bundles[:first]) == {old_id} and set(bundles[first : last + 1]) == {lut_id}
    assert set(bundles[last + 1 :]) == {old_id} and last + 1 < len(bundles)
    kinds = [e["update"] for e in events]
    assert kinds == ["shadow", "shadow_stopped", "applied", "rolled_back"], events
    assert events[1] == {"update": "shadow_stopped", "bundle": lut_id, "reason": "update"}
    assert (events[3]["bundle"], events[3]["running"]) == (lut_id, old_id)
    assert events[3]["reason"] == "commanded"


def test_rollout_commands_refuse_what_they_cannot_do(
    bundle_dir: Path, site_dir: Path, tmp_path: Path
) -> None:
    import numpy as np

    key = signer_key(site_dir)
    reports: list[dict[str, Any]] = []
    updater = _updater(bundle_dir, site_dir, tmp_path / "state", reports)

    def cmd(kind: str, **fields: Any) -> bytes:
        return command(key, "ward-a", "ota-04", kind, **fields)

    with pytest.raises(UpdateError, match="no shadow run to stop"):
        updater.handle(cmd("shadow-stop"))
    with pytest.raises(UpdateError, match="no previous bundle to go back to"):
        updater.handle(cmd("rollback-bundle"))
    running = Bundle.load(bundle_dir).id
    with pytest.raises(UpdateError, match=f"bundle {running} is already running"):
        updater.handle(cmd("rollback-bundle", to=running))
    v2 = _variant(bundle_dir, tmp_path / "v2", "99991231.000000", key)
    archive, digest = pack_bundle(v2, tmp_path / "served")
    with BundleServer(archive.parent) as server:
        url = server.url(archive.name)
        updater.handle(cmd("shadow-bundle", url=url, sha256=digest))  # defaults: 25 %, 0.5x
        assert updater.shadow is not None and updater.shadow.share == 0.25
        assert updater.slot._pending is None, "a shadow never swaps"
        again: list[dict[str, Any]] = []  # the agent restarted: its shadow run goes on
        restarted = _updater(bundle_dir, site_dir, tmp_path / "state", again)
        restarted._resume_shadow()
        assert restarted.shadow is not None and restarted.shadow.bundle_id == Bundle.load(v2).id
        assert again == [{**reports[0], "resumed": True}]
        updater.handle(cmd("update-bundle", url=url, sha256=digest))
        assert updater.shadow is None and updater.slot._pending is not None
        updater.slot.select(Sample("next", np.zeros((28, 28), np.uint8)))  # the swap
        assert updater.slot.bundle.id == Bundle.load(v2).id
    with pytest.raises(UpdateError, match="the previous bundle is .*, not nope"):
        updater.handle(cmd("rollback-bundle", to="nope"))
    updater.handle(cmd("rollback-bundle", to=running))
    assert updater.slot._pending.bundle.id == running  # type: ignore[union-attr]
    assert [r["update"] for r in reports] == ["shadow", "shadow_stopped"]
    trusted = [key.public_key()]
    for bad in ({"share": 0}, {"share": 1.5}, {"cpu_budget": 9}, {"share": "half"}):
        body = {"v": 2, "cmd": "shadow-bundle", "site": "ward-a", "device": "ota-04",
                "url": url, "sha256": digest, "issued_ms": 1, **bad}  # fmt: skip
        with pytest.raises(UpdateError, match="malformed command"):
            verify_command(sign_command(body, key), trusted, "ward-a", "ota-04")


def test_the_float_check_runs_the_fp32_twin_of_the_int8_model(  # type: ignore[no-untyped-def]
    bundle_dir: Path, identity, mosquitto: RunningBroker, tmp_path: Path
) -> None:
    """LiteRT int8 publishes; the bundle's ONNX fp32 artifact is its float twin (another
    runtime: this one has no fp32 artifact). On real images they mostly agree."""
    import numpy as np

    cfg = _config(bundle_dir, mosquitto, tmp_path, identity("fc-01"), "fc-01")
    agent = Agent(cfg.model_copy(update={"float_check_share": 1.0}))
    run = agent._float_run()
    assert run is not None and run.kind == "float_check" and run.share == 1.0
    assert run.model.artifact.file == "model_fp32.onnx" and agent.model.artifact.precision == "int8"
    assert agent._float_run() is run, "made once per bundle"
    assert run.cpu_budget == 0.25
    run.cpu_budget = 1000.0  # the budget is CPU time, not for a test: every sample compared
    with np.load(breast_cnn.DATA) as d:
        images = d["val_images"][:60]
    for i, x in enumerate(images):
        w = Work(Sample(f"s{i}", x), agent.model)
        t0 = time.perf_counter()
        w.decoded = agent.model.decode(agent.model.infer(agent.model.prepare(x)))
        w.latency["infer"] = time.perf_counter() - t0
        run.observe(w)
    snap = run.snapshot()
    assert (snap["samples"], snap["skipped"]) == (60, 0)
    assert snap["agreement"] >= 0.9, snap
    off = Agent(cfg.model_copy(update={"float_check_share": 0.0}))
    assert off._float_run() is None


def test_a_shadow_run_keeps_its_share_and_its_cpu_budget(bundle_dir: Path) -> None:
    """Deterministic share (every other sample at 50 %), and the budget: a candidate allowed a
    hundredth of the current model's time runs on the first sample it is due, then skips."""
    import numpy as np

    model = LoadedModel(Bundle.load(bundle_dir))
    with np.load(breast_cnn.DATA) as d:
        images = d["val_images"][:40]

    def works() -> list[Work]:
        out = []
        for i, x in enumerate(images):
            w = Work(Sample(f"s{i}", x), model)
            w.decoded = model.decode(model.infer(model.prepare(x)))
            w.latency["infer"] = 0.001
            out.append(w)
        return out

    half = ShadowRun(model, 0.5, 4.0)
    for w in works():
        half.observe(w)
    snap = half.snapshot()
    assert (snap["samples"], snap["skipped"], snap["agreement"]) == (20, 0, 1.0)
    tight = ShadowRun(model, 1.0, 0.01)
    for w in works():
        tight.observe(w)
    assert tight.samples >= 1 and tight.skipped >= 30 and tight.samples + tight.skipped == 40
