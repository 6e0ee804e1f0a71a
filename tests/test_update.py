"""Over-the-air bundle updates: signed command on ``cmd``, archive over HTTP, verified,
self-tested and swapped in between two samples while the stream goes on."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from waiting import wait_for

from edge_agent import Agent, AgentConfig, Bundle
from edge_agent.bundle import MANIFEST_NAME, SIGNATURE_NAME, Manifest, sign_bundle, write_manifest
from edge_agent.model import LoadedModel
from edge_agent.model_slot import ModelSlot
from edge_agent.update import UpdateError, Updater, is_downgrade, sign_command, verify_command
from gateway import Gateway, Store
from gateway.broker import RunningBroker
from gateway.ota import BundleServer, pack_bundle, publish_command, update_command
from gateway.site import signer_key
from models import breast_cnn

pytestmark = pytest.mark.slow


def _variant(src: Path, dst: Path, version: str, key: ed25519.Ed25519PrivateKey | None) -> Path:
    """The same model as a new bundle version, signed by ``key`` (None: unsigned)."""
    shutil.copytree(src, dst)
    m = Manifest.model_validate_json((dst / MANIFEST_NAME).read_text())
    write_manifest(dst, m.model_copy(update={"version": version}))
    (dst / SIGNATURE_NAME).unlink()
    if key is not None:
        sign_bundle(dst, key)
    return dst


def _config(
    bundle: Path, broker: RunningBroker, tmp: Path, ident: Path, device: str
) -> AgentConfig:
    return AgentConfig(
        site="ward-a",
        device=device,
        bundle=bundle,
        identity=ident,
        broker={"host": broker.host, "port": broker.port, "protocol": broker.protocol},
        source={"path": breast_cnn.DATA, "split": "val", "rate_hz": 15},
        outbox={"path": tmp / "state" / "outbox.sqlite", "resend_after_s": 0.5},
        telemetry_interval_s=0.5,
    )


def _events(store: Store, device: str) -> list[dict]:  # type: ignore[type-arg]
    rows = store.query(
        "SELECT body FROM results WHERE device=? AND kind='event' ORDER BY seq", (device,)
    )
    return [json.loads(r["body"]) for r in rows]


def _results(store: Store, device: str) -> list[dict]:  # type: ignore[type-arg]
    return [r for r in store.results(device=device, limit=1000) if r["kind"] == "result"]


def test_signed_bundle_is_applied_mid_stream(  # type: ignore[no-untyped-def]
    bundle_dir: Path, site_dir: Path, identity, opener, mosquitto: RunningBroker, tmp_path: Path
) -> None:
    device = "ota-01"
    new = _variant(bundle_dir, tmp_path / "v2", "99991231.000000", signer_key(site_dir))
    new_id, old_id = Bundle.load(new).id, Bundle.load(bundle_dir).id
    archive, digest = pack_bundle(new, tmp_path / "served")
    cfg = _config(bundle_dir, mosquitto, tmp_path, identity(device), device)
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port, mosquitto.protocol),
        BundleServer(archive.parent) as server,
    ):
        agent = Agent(cfg)
        box: dict[str, object] = {}
        t = threading.Thread(target=lambda: box.update(r=agent.run(threading.Event())))
        t.start()
        wait_for(lambda: len(_results(store, device)) >= 10, 20, "10 results")
        cmd = update_command(
            signer_key(site_dir), "ward-a", device, server.url(archive.name), digest
        )
        publish_command(mosquitto.host, mosquitto.port, "ward-a", device, cmd)
        wait_for(lambda: len(_events(store, device)) >= 1, 20, "the update event")
        publish_command(mosquitto.host, mosquitto.port, "ward-a", device, cmd)  # a replay
        wait_for(lambda: len(_events(store, device)) >= 2, 20, "the replay's event")
        t.join(timeout=60)
        assert not t.is_alive()
        assert box["r"].pending == 0  # type: ignore[attr-defined]
        rows = _results(store, device)
        events = _events(store, device)
    assert len(rows) == 78, "no result lost"
    assert len({r["seq"] for r in rows}) == 78
    by_index = sorted(rows, key=lambda r: int(r["input"].rsplit("#", 1)[1]))
    bundles = [r["bundle"] for r in by_index]
    switch = bundles.index(new_id)
    assert switch >= 10
    assert bundles[:switch] == [old_id] * switch, "before: the old bundle"
    assert bundles[switch:] == [new_id] * (78 - switch), "after: the new one, never back"
    assert events[0] == {"update": "applied", "bundle": new_id, "previous": old_id}
    assert events[1]["update"] == "rejected"
    assert "not newer" in events[1]["reason"]
    assert events[1]["running"] == new_id
    assert agent.bundle.id == new_id


def test_bad_bundles_are_rejected_and_the_old_one_keeps_running(  # type: ignore[no-untyped-def]
    bundle_dir: Path, site_dir: Path, identity, opener, mosquitto: RunningBroker, tmp_path: Path
) -> None:
    device = "ota-02"
    key = signer_key(site_dir)
    stranger = ed25519.Ed25519PrivateKey.generate()
    served = tmp_path / "served"
    tampered = _variant(bundle_dir, tmp_path / "tampered", "t", key)
    art = next(tampered.glob("*.tflite"))
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0xFF
    art.write_bytes(bytes(data))
    cases = {
        "tampered": (tampered, "does not match its hash"),
        "unsigned": (_variant(bundle_dir, tmp_path / "unsigned", "u", None), "not signed"),
        "untrusted": (
            _variant(bundle_dir, tmp_path / "untrusted", "x", stranger),
            "does not trust",
        ),
    }
    served.mkdir()
    packed = {}
    for name, (d, _) in cases.items():  # by hand: pack_bundle refuses a broken bundle
        out = served / f"{name}.tar.gz"
        with tarfile.open(out, "w:gz") as tar:
            for p in sorted(d.iterdir()):
                tar.add(p, arcname=p.name)
        packed[name] = (out, hashlib.sha256(out.read_bytes()).hexdigest())
    good, good_sha = pack_bundle(_variant(bundle_dir, tmp_path / "good", "g", key), served)
    cfg = _config(bundle_dir, mosquitto, tmp_path, identity(device), device)
    old_id = Bundle.load(bundle_dir).id
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port, mosquitto.protocol),
        BundleServer(served) as server,
    ):
        agent = Agent(cfg)
        t = threading.Thread(target=agent.run, args=(threading.Event(),))
        t.start()
        wait_for(lambda: len(_results(store, device)) >= 5, 20, "5 results")
        for out, sha in packed.values():
            cmd = update_command(key, "ward-a", device, server.url(out.name), sha)
            publish_command(mosquitto.host, mosquitto.port, "ward-a", device, cmd)
        # the archive does not match the signed command (swapped on the server)
        cmd = update_command(key, "ward-a", device, server.url(good.name), "0" * 64)
        publish_command(mosquitto.host, mosquitto.port, "ward-a", device, cmd)
        # a command signed by someone else, and one for another device
        for k, dev in ((stranger, device), (key, "ota-99")):
            cmd = update_command(k, "ward-a", dev, server.url(good.name), good_sha)
            publish_command(mosquitto.host, mosquitto.port, "ward-a", device, cmd)
        wait_for(lambda: len(_events(store, device)) >= 6, 20, lambda: _events(store, device))
        t.join(timeout=60)
        assert not t.is_alive()
        events = _events(store, device)
        rows = _results(store, device)
    assert [e["update"] for e in events] == ["rejected"] * 6
    reasons = [e["reason"] for e in events]
    for (_, why), reason in zip(cases.values(), reasons[:3], strict=True):
        assert why in reason
    assert "does not match the command" in reasons[3]
    assert "does not trust" in reasons[4]
    assert "not this device" in reasons[5]
    assert all(e["running"] == old_id for e in events)
    assert len(rows) == 78
    assert {r["bundle"] for r in rows} == {old_id}, "the old bundle kept running"
    left = [p.name for p in (tmp_path / "state" / "bundles").iterdir()]
    assert left == [], f"rejected bundles are deleted: {left}"


def _lut_bundle(
    src: Path, dst: Path, version: str, table: int, key: ed25519.Ed25519PrivateKey
) -> Path:
    """A bundle with an ONNX artifact that ONNX Runtime loads and runs, but whose invoke raises
    on some real inputs: a brightness classifier that looks a factor up in a table indexed by
    the image's mean intensity in tenths, a table only ``table`` long (as if sized from
    calibration data that never saw brighter images). Brighter inputs make Gather index past
    the end, which ONNX Runtime refuses at run time."""
    import onnx
    from onnx import TensorProto, helper

    from edge_agent.bundle import Artifact, TensorSpec, file_entry

    shutil.copytree(src, dst)
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "ten"], ["tenths"]),
        helper.make_node("Floor", ["tenths"], ["bin_f"]),
        helper.make_node("Cast", ["bin_f"], ["bin"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "bin"], ["factor"], axis=0),
        helper.make_node("Mul", ["mean", "w"], ["z0"]),
        helper.make_node("Sub", ["z0", "b"], ["z"]),
        helper.make_node("Neg", ["z"], ["nz"]),
        helper.make_node("Reshape", ["z", "one_one"], ["z11"]),
        helper.make_node("Reshape", ["nz", "one_one"], ["nz11"]),
        helper.make_node("Concat", ["nz11", "z11"], ["logits"], axis=1),
        helper.make_node("Mul", ["logits", "factor"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["scores"], axis=1),
    ]
    init = [
        helper.make_tensor("ten", f, [], [10.0]),
        helper.make_tensor("table", f, [table], [1.0] * table),
        helper.make_tensor("w", f, [], [12.0]),
        helper.make_tensor("b", f, [], [4.0]),
        helper.make_tensor("one_one", TensorProto.INT64, [2], [1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "brightness-lut",
        [helper.make_tensor_value_info("image", f, [1, 28, 28, 1])],
        [helper.make_tensor_value_info("scores", f, [1, 2])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, dst / "model_lut.onnx")
    m = Manifest.model_validate_json((dst / MANIFEST_NAME).read_text())
    art = Artifact(
        file="model_lut.onnx",
        runtime="onnx",
        precision="fp32",
        inputs=[TensorSpec(name="image", shape=[1, 28, 28, 1], dtype="float32")],
        outputs=[TensorSpec(name="scores", shape=[1, 2], dtype="float32")],
    )
    files = {**m.files, "model_lut.onnx": file_entry(dst / "model_lut.onnx")}
    m = m.model_copy(update={"version": version, "artifacts": [art], "files": files})
    write_manifest(dst, m)
    sign_bundle(dst, key)
    return dst


class _GatedReplay:
    """Real BreastMNIST validation images: dim ones (mean below 0.4) over and over until the
    test opens the gate, then ``bright`` bright ones and ``after`` dim ones, then the end."""

    name = "gated breastmnist replay"

    def __init__(self, gate: threading.Event, bright: int, after: int) -> None:
        import numpy as np

        with np.load(breast_cnn.DATA) as d:
            x, y = d["val_images"], d["val_labels"].astype(int).reshape(-1)
        tenths = np.floor(x.reshape(len(x), -1).mean(axis=1) / 255.0 * 10)
        self.dim = [i for i in range(len(x)) if tenths[i] < 4]
        self.bright = [i for i in range(len(x)) if tenths[i] >= 4][:bright]
        self.x, self.y, self.gate, self.after = x, y, gate, after
        self.errors: dict[str, int] = {}

    def stream(self, stop: threading.Event):  # type: ignore[no-untyped-def]
        from edge_agent.sources import Sample

        n = 0
        while not self.gate.is_set() and not stop.is_set():
            i = self.dim[n % len(self.dim)]
            yield Sample(f"gated#{n}:{i}", self.x[i], int(self.y[i]))
            n += 1
            time.sleep(0.05)
        for i in self.bright + self.dim[: self.after]:
            yield Sample(f"gated#{n}:{i}", self.x[i], int(self.y[i]))
            n += 1
            time.sleep(0.02)


def test_a_bundle_that_fails_at_run_time_is_rolled_back(  # type: ignore[no-untyped-def]
    bundle_dir: Path, site_dir: Path, identity, opener, mosquitto: RunningBroker, tmp_path: Path
) -> None:
    device = "ota-03"
    key = signer_key(site_dir)
    v1 = _lut_bundle(bundle_dir, tmp_path / "v1", "lut-wide", 11, key)
    v2 = _lut_bundle(bundle_dir, tmp_path / "v2", "lut-short", 4, key)
    v1_id, v2_id = Bundle.load(v1).id, Bundle.load(v2).id
    archive, digest = pack_bundle(v2, tmp_path / "served")
    state = tmp_path / "state"
    state.mkdir()
    link = state / "bundle"
    link.symlink_to(v1)  # the packaged layout: the configured bundle is a link
    cfg = _config(link, mosquitto, tmp_path, identity(device), device).model_copy(
        update={"runtime": "onnx", "rollback_failures": 3, "rollback_within": 20}
    )
    gate = threading.Event()
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port, mosquitto.protocol),
        BundleServer(archive.parent) as server,
    ):
        agent = Agent(cfg)
        agent.source = _GatedReplay(gate, bright=12, after=10)
        t = threading.Thread(target=agent.run, args=(threading.Event(),))
        t.start()
        wait_for(lambda: len(_results(store, device)) >= 5, 20, "5 results")
        cmd = update_command(key, "ward-a", device, server.url(archive.name), digest)
        publish_command(mosquitto.host, mosquitto.port, "ward-a", device, cmd)
        wait_for(
            lambda: agent.bundle.id == v2_id, 20, "the short-table bundle to pass its self-test"
        )
        gate.set()  # now the bright images come
        t.join(timeout=60)
        assert not t.is_alive()
        events = _events(store, device)
        rows = _results(store, device)
    assert [e["update"] for e in events] == ["applied", "rolled_back"], events
    back = events[1]
    assert (back["bundle"], back["running"]) == (v2_id, v1_id)
    assert "3 run-time failures" in back["reason"] and "out of" in back["reason"], back["reason"]
    assert agent.bundle.id == v1_id, "the previous bundle runs again"
    assert agent.stats.errors.get("preprocess") == 3, "each failing sample rejected and counted"
    seq_order = sorted(rows, key=lambda r: r["seq"])
    bundles = [r["bundle"] for r in seq_order]
    first_v2 = bundles.index(v2_id)
    last_v2 = len(bundles) - 1 - bundles[::-1].index(v2_id)
    assert set(bundles[first_v2 : last_v2 + 1]) == {v2_id}, "one swap each way, between samples"
    assert bundles[last_v2 + 1 :] == [v1_id] * (len(bundles) - last_v2 - 1)
    assert len(bundles) - last_v2 - 1 >= 12 + 10 - 3 - 1, "the rest ran on the restored bundle"
    assert link.resolve() == v1.resolve(), "a restart runs the restored bundle"
    left = [p.name for p in (state / "bundles").iterdir() if not p.name.startswith(".")]
    assert left == [], f"the bad bundle is deleted: {left}"


# -- downgrades and strict parsing, on the Updater itself ----------------------------------
def _updater(bundle: Path, site_dir: Path, state: Path, reports: list[dict]) -> Updater:  # type: ignore[type-arg]
    slot = ModelSlot(LoadedModel(Bundle.load(bundle)), on_swap=lambda old, new: None)
    return Updater(
        slot,
        [signer_key(site_dir).public_key()],
        "ward-a",
        "ota-04",
        state,
        reports.append,
        LoadedModel,
    )


def test_an_older_bundle_needs_allow_downgrade(
    bundle_dir: Path, site_dir: Path, tmp_path: Path
) -> None:
    key = signer_key(site_dir)
    running = Bundle.load(bundle_dir).manifest.version  # the conversion time
    assert is_downgrade("20200101.000000", running) and not is_downgrade(running, running)
    older = _variant(bundle_dir, tmp_path / "old", "20200101.000000", key)
    archive, digest = pack_bundle(older, tmp_path / "served")
    reports: list[dict] = []  # type: ignore[type-arg]
    updater = _updater(bundle_dir, site_dir, tmp_path / "state", reports)
    with BundleServer(archive.parent) as server:
        url = server.url(archive.name)
        cmd = update_command(key, "ward-a", "ota-04", url, digest)  # newer command, older bundle
        with pytest.raises(UpdateError, match="is older than the running .* allow_downgrade"):
            updater.handle(cmd)
        assert updater.slot.bundle.id == Bundle.load(bundle_dir).id
        left = [p.name for p in (tmp_path / "state" / "bundles").iterdir()]
        assert left == [], f"the refused bundle is deleted: {left}"
        # the same archive, with a command that says so, is installed
        updater.handle(update_command(key, "ward-a", "ota-04", url, digest, allow_downgrade=True))
        assert updater.slot._pending is not None  # offered: swapped in before the next sample
        assert updater.slot._pending.bundle.manifest.version == "20200101.000000"


def test_update_commands_are_parsed_strictly(site_dir: Path) -> None:
    key = signer_key(site_dir)
    trusted = [key.public_key()]
    base = {
        "v": 2,
        "cmd": "update-bundle",
        "site": "ward-a",
        "device": "ota-04",
        "url": "http://fog/x.tar.gz",
        "sha256": "a" * 64,
        "issued_ms": 1,
    }
    assert (
        verify_command(sign_command(base, key), trusted, "ward-a", "ota-04").allow_downgrade
        is False
    )
    ok = verify_command(
        sign_command({**base, "allow_downgrade": True}, key), trusted, "ward-a", "ota-04"
    )
    assert ok.allow_downgrade is True
    bad = {
        "deep": b'{"v":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "flag": sign_command({**base, "allow_downgrade": "yes"}, key),
        "unknown": sign_command({**base, "downgrade": True}, key),
        "nan": b'{"v": NaN}',
        "newline key": sign_command({**base, "device": "ota-04\nforged"}, key),
    }
    for name, payload in bad.items():
        with pytest.raises(UpdateError) as exc:
            verify_command(payload, trusted, "ward-a", "ota-04")
        assert "\n" not in str(exc.value), name
