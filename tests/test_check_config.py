"""`medge agent check-config` checks what `medge agent run` checks on start: a bundle whose
hashes or signer the identity refuses, and a device key others can read, fail it in one line
with a non-zero exit, as they stop the agent; an unreachable broker is one warning line. It
prints the window (each setting from the bundle or the config) and the preprocessing.

Real parts: the authors' MIT-BIH beat classifier in a signed bundle, MIT-BIH record 106, a
provisioned identity, a real Mosquitto."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_events import RECORD, beat_bundle

from edge_agent import Agent, load_config
from edge_agent.bundle import EventRule, WindowSpec
from edge_agent.errors import MedgeError
from gateway.broker import RunningBroker

Identity = Callable[[str], Path]  # the conftest fixture: device name -> identity directory
PVC_RUN = EventRule(name="pvc_run", label="V", on=0.5, off=0.5, min_windows=2)
BEAT_WINDOW = WindowSpec(length=260, hop=1, rate_hz=360, centre="beat", before=90)


@pytest.fixture(scope="module")
def ecg_bundle(tmp_path_factory: pytest.TempPathFactory, site_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("check") / "ecg-beats"
    return beat_bundle(out, site_dir / "bundle-signer.key", [PVC_RUN], BEAT_WINDOW)


def _config(tmp: Path, bundle: Path, ident: Path, port: int, **source: Any) -> Path:
    cfg = tmp / "agent.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "site": "ward-a",
                "device": ident.name,
                "bundle": str(bundle),
                "identity": str(ident),
                "broker": {"host": "127.0.0.1", "port": port},
                "source": {"kind": "ecg", "path": str(RECORD), **source},
            }
        )
    )
    return cfg


def _check(cfg: Path, *more: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medge", "agent", "check-config", str(cfg), *more],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _lines(text: str, word: str) -> list[str]:
    return [x for x in text.splitlines() if word in x]


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_good_config_shows_the_bundle_s_window_and_preprocessing(
    tmp_path: Path, ecg_bundle: Path, identity: Identity, mosquitto: RunningBroker
) -> None:
    cfg = _config(tmp_path, ecg_bundle, identity("chk-01"), mosquitto.port)
    r = _check(cfg, "--broker-timeout", "20")  # a loaded CI machine may be slow to answer
    assert r.returncode == 0, r.stderr
    assert "window: length 260 (bundle), mode beats (bundle), before 90 (bundle)" in r.stdout
    assert "preprocess: zscore (bundle)" in r.stdout
    assert "signature verified against 1 trusted signer(s), 1 file hash(es) checked" in r.stdout
    assert "event pvc_run on 0.5 off 0.5 (bundle)" in r.stdout
    assert _lines(r.stderr, "WARNING") == [], r.stderr  # the broker answers
    out = json.loads(_check(cfg, "--json", "--broker-timeout", "20").stdout)
    assert out["ok"] and out["preprocess"] == {"kind": "zscore"} and out["warnings"] == []
    assert {w["name"]: (w["value"], w["origin"]) for w in out["window"]} == {
        "length": (260, "bundle"),
        "mode": ("beats", "bundle"),
        "before": (90, "bundle"),
    }


def test_a_config_that_overrides_the_bundle_s_window_says_so_in_one_line(
    tmp_path: Path, ecg_bundle: Path, identity: Identity, mosquitto: RunningBroker
) -> None:
    cfg = _config(tmp_path, ecg_bundle, identity("chk-01"), mosquitto.port, before=130)
    r = _check(cfg, "--broker-timeout", "20")
    assert r.returncode == 0, r.stderr
    assert "before 130 (config; the bundle says 90)" in r.stdout
    [warning] = _lines(r.stderr, "WARNING")
    assert "the config overrides the bundle's window before: bundle 90, config 130" in warning


def test_an_unreachable_broker_is_one_warning_not_a_failure(
    tmp_path: Path, ecg_bundle: Path, identity: Identity
) -> None:
    port = _closed_port()
    r = _check(_config(tmp_path, ecg_bundle, identity("chk-01"), port), "--broker-timeout", "1")
    assert r.returncode == 0, r.stderr
    [warning] = _lines(r.stderr, "WARNING")
    assert f"broker 127.0.0.1:{port} not reachable (Connection refused)" in warning


def _refused_by_run(cfg: Path) -> str:
    """The one-line error `agent run` stops with (Agent's constructor, as the CLI builds it)."""
    with pytest.raises(MedgeError) as exc:
        Agent(load_config(cfg))
    return str(exc.value)


def _fails_in_one_line(cfg: Path, message: str) -> None:
    r = _check(cfg)
    assert r.returncode == 2, r.stdout
    [line] = [x for x in r.stderr.splitlines() if x.strip()]
    assert line == f"medge: error: {message}"


def test_a_bundle_run_refuses_for_its_hashes_fails_check_config(
    tmp_path: Path, ecg_bundle: Path, identity: Identity
) -> None:
    bad = tmp_path / "bundle"
    shutil.copytree(ecg_bundle, bad)
    art = bad / "model_fp32.tflite"
    art.write_bytes(art.read_bytes()[:-1] + bytes([art.read_bytes()[-1] ^ 1]))  # one bit
    cfg = _config(tmp_path, bad, identity("chk-01"), _closed_port())
    message = _refused_by_run(cfg)
    assert "model_fp32.tflite" in message
    _fails_in_one_line(cfg, message)


def test_a_bundle_from_an_untrusted_signer_fails_check_config(
    tmp_path: Path, identity: Identity
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from edge_agent.keys import write_private_pem

    stranger = tmp_path / "stranger.key"
    write_private_pem(stranger, ed25519.Ed25519PrivateKey.generate())
    bundle = beat_bundle(tmp_path / "b", stranger, [PVC_RUN], BEAT_WINDOW)
    cfg = _config(tmp_path, bundle, identity("chk-01"), _closed_port())
    message = _refused_by_run(cfg)
    assert "which this device does not trust" in message
    _fails_in_one_line(cfg, message)


def test_a_device_key_others_can_read_fails_check_config(
    tmp_path: Path, ecg_bundle: Path, identity: Identity
) -> None:
    ident = tmp_path / "chk-01"
    shutil.copytree(identity("chk-01"), ident)
    (ident / "device.key").chmod(0o644)
    cfg = _config(tmp_path, ecg_bundle, ident, _closed_port())
    message = _refused_by_run(cfg)
    assert "device.key" in message
    _fails_in_one_line(cfg, message)
