"""``medge gateway push-bundle``: the OTA publisher as a user runs it, against a real Mosquitto,
a real gateway and a real agent whose Updater fetches, verifies and applies the bundle."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from waiting import within

from edge_agent import Agent, AgentConfig, Bundle
from edge_agent.bundle import MANIFEST_NAME, SIGNATURE_NAME, Manifest, sign_bundle, write_manifest
from gateway import Gateway, Store
from gateway.broker import RunningBroker
from gateway.site import signer_key
from medge.cli import main
from models import breast_cnn

pytestmark = pytest.mark.slow


def _newer(src: Path, dst: Path, site_dir: Path) -> Path:
    shutil.copytree(src, dst)
    m = Manifest.model_validate_json((dst / MANIFEST_NAME).read_text())
    write_manifest(dst, m.model_copy(update={"version": "99991231.000000"}))
    (dst / SIGNATURE_NAME).unlink()
    sign_bundle(dst, signer_key(site_dir))
    return dst


def test_push_bundle_updates_a_running_device(  # type: ignore[no-untyped-def]
    bundle_dir: Path,
    site_dir: Path,
    identity,
    opener,
    mosquitto: RunningBroker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    device = "push-01"
    new = _newer(bundle_dir, tmp_path / "v2", site_dir)
    new_id, old_id = Bundle.load(new).id, Bundle.load(bundle_dir).id
    cfg = AgentConfig(
        site="ward-a",
        device=device,
        bundle=bundle_dir,
        identity=identity(device),
        broker={"host": mosquitto.host, "port": mosquitto.port, "protocol": mosquitto.protocol},
        source={"path": breast_cnn.DATA, "split": "val", "rate_hz": 15},
        outbox={"path": tmp_path / "state" / "outbox.sqlite", "resend_after_s": 0.5},
        telemetry_interval_s=0.5,
    )

    def events() -> list[dict]:  # type: ignore[type-arg]
        rows = store.query(
            "SELECT body FROM results WHERE device=? AND kind='event' ORDER BY seq", (device,)
        )
        return [json.loads(r["body"]) for r in rows]

    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port, mosquitto.protocol),
    ):
        agent = Agent(cfg)
        t = threading.Thread(target=agent.run, args=(threading.Event(),))
        t.start()
        try:
            assert within(
                lambda: (
                    store.query("SELECT count(*) AS n FROM results WHERE device=?", (device,))[0][
                        "n"
                    ]
                    >= 5
                ),
                30,
            )
            code = main(
                [
                    "gateway",
                    "push-bundle",
                    str(new),
                    "--site-dir",
                    str(site_dir),
                    "--broker",
                    f"{mosquitto.host}:{mosquitto.port}",
                    "--protocol",
                    mosquitto.protocol,
                    "--device",
                    device,
                    "--http-host",
                    "127.0.0.1",
                    "--timeout",
                    "30",
                    "--json",
                ]
            )
            assert code == 0, capsys.readouterr().err
            out = json.loads(capsys.readouterr().out)
            assert out["device"] == device and out["url"].startswith("http://127.0.0.1:")
            assert within(lambda: len(events()) >= 1, 30), "the device reports the update"
        finally:
            t.join(timeout=60)
        assert not t.is_alive()
        assert events()[0] == {"update": "applied", "bundle": new_id, "previous": old_id}
    assert agent.bundle.id == new_id


def test_push_bundle_says_when_no_device_fetches(  # type: ignore[no-untyped-def]
    bundle_dir: Path,
    site_dir: Path,
    mosquitto: RunningBroker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The site and the broker from gateway.yaml (--config), as `gateway run` reads them."""
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        f"gateway:\n  site_dir: {site_dir}\n  broker:\n    host: {mosquitto.host}\n"
        f"    port: {mosquitto.port}\n"
    )
    code = main(
        [
            "gateway",
            "push-bundle",
            str(bundle_dir),
            "--config",
            str(cfg),
            "--device",
            "nobody",
            "--http-host",
            "127.0.0.1",
            "--timeout",
            "0.5",
        ]
    )
    assert code == 2
    assert "ward-a/nobody did not fetch http://127.0.0.1:" in capsys.readouterr().err
