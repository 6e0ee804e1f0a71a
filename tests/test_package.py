"""`medge agent package`: build the device package for this machine, install it into a temp
prefix with its own install.sh (a fresh venv from the shipped wheels only), and run the
installed agent against a real Mosquitto and gateway. A LiteRT-only config ships the core
``device`` extra alone: no OpenCV, no ONNX Runtime, no pydicom wheel, and it still runs.

Downloads wheels from PyPI on the first run; they are kept in ~/.cache/medge-wheels
($MEDGE_WHEEL_CACHE), so later runs are offline."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from edge_agent.bundle import Bundle
from edge_agent.config import AgentConfig
from edge_agent.errors import MedgeError
from gateway import Gateway, Store
from gateway.broker import RunningBroker
from medge.package import build_package, device_extras
from models import breast_cnn

pytestmark = pytest.mark.slow

LIMIT = 6
OPTIONAL = ("opencv", "onnxruntime", "pydicom", "pyserial")  # wheel names, lower case


def _cfg(source: dict, **more: object) -> AgentConfig:
    return AgentConfig.model_validate(
        {"site": "ward-a", "device": "d-01", "bundle": "b", "identity": "i", "source": source}
        | more
    )


@pytest.mark.parametrize(
    ("source", "runtime", "want"),
    [
        ({"path": "val.npz"}, "litert", ["device"]),
        ({"kind": "imu", "path": "fall.csv"}, "litert", ["device"]),
        ({"kind": "video", "camera": 0}, "litert", ["device", "device-video"]),
        ({"kind": "images", "path": "frames"}, "onnx", ["device", "device-video", "device-onnx"]),
        ({"path": "val.npz"}, "onnx", ["device", "device-onnx"]),
        ({"kind": "dicom", "path": "cine.dcm"}, "litert", ["device", "device-dicom"]),
        (
            {"kind": "dicom", "path": "cine.dcm", "size": [64, 64]},
            "litert",
            ["device", "device-dicom", "device-video"],
        ),
        ({"kind": "serial", "port": "/dev/ttyUSB0"}, "litert", ["device", "serial"]),
    ],
)
def test_extras_follow_the_config(source: dict, runtime: str, want: list[str]) -> None:
    assert device_extras(_cfg(source, runtime=runtime)) == want


def test_extra_extras_are_added_once_and_checked() -> None:
    cfg = _cfg({"kind": "dicom", "path": "us"})
    assert device_extras(cfg, ["device_video", "device-dicom"]) == [
        "device",
        "device-dicom",
        "device-video",
    ]
    with pytest.raises(MedgeError, match="'gateway' is not a device extra"):
        device_extras(cfg, ["gateway"])


def _du_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) / 1e6


def test_package_installs_and_runs(  # type: ignore[no-untyped-def]
    bundle_dir: Path, identity, opener, mosquitto: RunningBroker, tmp_path: Path
) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "site": "ward-a",
                "device": "pkg-01",
                "bundle": str(bundle_dir),
                "identity": str(identity("pkg-01")),
                "broker": {"host": mosquitto.host, "port": mosquitto.port},
                "source": {"path": str(breast_cnn.DATA), "split": "val", "rate_hz": 0},
                "outbox": {"path": "outbox.sqlite", "resend_after_s": 0.5},
                "telemetry_interval_s": 0.5,
            }
        )
    )
    t0 = time.monotonic()
    report = build_package(cfg, tmp_path / "pkg")
    built = time.monotonic() - t0
    pkg = report.directory

    # what is inside
    names = {w.lower() for w in report.wheels}
    assert any(n.startswith("medge-") for n in names)
    assert not [n for n in names if n.startswith(("tensorflow", "keras", "tf_keras"))]
    assert report.extras == ["device"]  # npz source, LiteRT: the core only
    assert not [n for n in names if n.startswith(OPTIONAL)], sorted(names)
    assert any(n.startswith("ai_edge_litert-") for n in names)
    shipped = yaml.safe_load((pkg / "agent.yaml").read_text())
    assert shipped["bundle"] == f"bundle/{bundle_dir.name}"
    assert shipped["identity"] == "identity"
    # only what the config sets (docs/device.md): no default is written back over the bundle
    assert shipped["source"] == {"path": str(breast_cnn.DATA), "split": "val", "rate_hz": 0}
    assert shipped["outbox"] == {"path": "outbox.sqlite", "resend_after_s": 0.5}
    assert "runtime" not in shipped and "cam" not in shipped
    assert stat.S_IMODE((pkg / "identity" / "device.key").stat().st_mode) == 0o600
    unit = (pkg / "medge-agent.service").read_text()
    for line in ("Restart=always", "ProtectSystem=strict", "NoNewPrivileges=true", "User=@USER@"):
        assert line in unit
    assert "StateDirectory=medge-agent" in unit
    install_sh = (pkg / "install.sh").read_text()
    assert "--no-index" in install_sh
    assert "'medge[device]'" in install_sh and "@EXTRAS@" not in install_sh
    meta = json.loads((pkg / "package.json").read_text())
    assert meta["extras"] == ["device"]
    assert meta["bundle"] == Bundle.load(bundle_dir).id
    assert report.tarball is not None
    with tarfile.open(report.tarball) as tar:
        key = tar.getmember(f"{pkg.name}/identity/device.key")
        assert stat.S_IMODE(key.mode) == 0o600

    # install from the package alone: a fresh venv, no index
    prefix = tmp_path / "root"
    t1 = time.monotonic()
    env = {**os.environ, "PYTHON": sys.executable, "PIP_NO_INDEX": "1"}
    done = subprocess.run(
        ["sh", str(pkg / "install.sh"), "--prefix", str(prefix), "--no-systemd"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    installed = time.monotonic() - t1
    assert done.returncode == 0, done.stderr[-2000:]
    venv = prefix / "opt" / "medge-agent" / "venv"
    site_packages = next((venv / "lib").glob("python3*/site-packages"))
    assert not list(site_packages.glob("tensorflow*")), "no TensorFlow on a device"
    assert not list(site_packages.glob("keras*"))
    for absent in ("cv2", "onnxruntime", "pydicom", "serial"):
        assert not (site_packages / absent).exists(), f"{absent} in a LiteRT-only install"
    state = prefix / "var" / "lib" / "medge-agent"
    assert (state / "bundle").is_symlink()
    key_mode = (prefix / "etc" / "medge-agent" / "identity" / "device.key").stat().st_mode
    assert stat.S_IMODE(key_mode) == 0o600
    size = _du_mb(venv)
    biggest = sorted(
        ((_du_mb(p), p.name) for p in site_packages.iterdir() if p.is_dir()), reverse=True
    )[:6]
    print(f"\nvenv {size:.0f} MB; biggest: {biggest}")
    print(f"build {built:.1f} s, install {installed:.1f} s")
    (tmp_path / "sizes.json").write_text(json.dumps({"venv_mb": size, "biggest": biggest}))

    # run the installed agent, bounded by source.limit, against the gateway in this process
    conf = prefix / "etc" / "medge-agent" / "agent.yaml"
    data = yaml.safe_load(conf.read_text())
    data["source"]["limit"] = LIMIT
    conf.write_text(yaml.safe_dump(data))
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port, mosquitto.protocol),
    ):
        run = subprocess.run(
            [str(venv / "bin" / "medge"), "agent", "run", "--config", str(conf), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        out = json.loads(run.stdout)
        assert out["sent"] == LIMIT and out["pending"] == 0, out
        rows = store.results(device="pkg-01", limit=100)
    assert len(rows) == LIMIT
    assert {r["bundle"] for r in rows} == {Bundle.load(bundle_dir).id}


def test_video_onnx_config_ships_opencv_and_onnxruntime(  # type: ignore[no-untyped-def]
    bundle_dir: Path, identity, tmp_path: Path
) -> None:
    """The extras a config needs reach the wheels and install.sh (built, not installed)."""
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "site": "ward-a",
                "device": "pkg-02",
                "bundle": str(bundle_dir),
                "identity": str(identity("pkg-02")),
                "runtime": "onnx",
                "source": {"kind": "video", "camera": 0},
            }
        )
    )
    report = build_package(cfg, tmp_path / "pkg", tarball=False)
    assert report.extras == ["device", "device-video", "device-onnx"]
    names = {w.lower() for w in report.wheels}
    for wanted in ("opencv_python_headless-", "onnxruntime-", "ai_edge_litert-", "numpy-"):
        assert any(n.startswith(wanted) for n in names), (wanted, sorted(names))
    assert not [n for n in names if n.startswith(("pydicom", "pyserial", "tensorflow"))]
    install_sh = (report.directory / "install.sh").read_text()
    assert "'medge[device,device-video,device-onnx]'" in install_sh
