"""Clinical settings are never silently changed on the way to the device.

`medge agent package` writes only the settings the user's config sets, so the packaged ECG
agent cuts its beats as the bundle says (R-90..R+170), not as the source's defaults would
(centred, R-130..R+130). Packaged, installed and run on a real MIT-BIH record, it raises exactly
the events that `medge evaluate BUNDLE --stream REC.npz` reports for the bundle. A config that
does override a window setting makes the agent say so in one warning line.

Measured (/tmp script over the nine MIT-BIH records of ../shared/data, the authors' beat
classifier): PVC beats called V, config as the old packager wrote it (every default) 413/632 =
0.653; as written now 597/632 = 0.945. On record 106 (1:30-2:30): 14 pvc_run events instead of
the 16 annotated couplets."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from mitbih_runs import annotated_recording
from test_events import RECORD, beat_bundle

from edge_agent.bundle import EventRule, WindowSpec
from edge_agent.config import AgentConfig
from edge_agent.sources import EcgSettings, ImuSettings, open_source, window_plan
from gateway import Gateway, Store
from gateway.broker import RunningBroker
from medge.package import shipped_config

DATA = Path(__file__).parent / "data"
PVC_RUN = EventRule(name="pvc_run", label="V", on=0.5, off=0.5, min_windows=2)
BEAT_WINDOW = WindowSpec(length=260, hop=1, rate_hz=360, centre="beat", before=90)
SPAN_S = 260 / 360  # one window


@pytest.fixture(scope="module")
def ecg_bundle(tmp_path_factory: pytest.TempPathFactory, site_dir: Path) -> Path:
    """The authors' beat classifier, unchanged, signed with the bundle's R-90..R+170 window."""
    out = tmp_path_factory.mktemp("clinical") / "ecg-beats"
    return beat_bundle(out, site_dir / "bundle-signer.key", [PVC_RUN], BEAT_WINDOW)


def _ecg_config(**source: object) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "site": "ward-a",
            "device": "ecg-01",
            "bundle": "b",
            "identity": "i",
            "source": {"kind": "ecg", "path": str(RECORD), **source},
        }
    )


def test_the_package_writes_only_what_the_config_sets() -> None:
    data = shipped_config(_ecg_config(), "bundle/b")
    assert data["source"] == {"kind": "ecg", "path": str(RECORD)}  # no length, mode, before
    assert data["outbox"] == {"path": "outbox.sqlite"} and "broker" not in data
    # a value the user wrote stays, even when it equals the default: it is an override
    assert shipped_config(_ecg_config(length=260), "b")["source"]["length"] == 260
    shipped = AgentConfig.model_validate(data)
    [(before,)] = [
        (s.value,) for s in window_plan(shipped.source, BEAT_WINDOW) if s.name == "before"
    ]
    assert before == 90


def test_an_ecg_config_that_overrides_the_bundle_s_window_is_one_warning_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        src = open_source(EcgSettings(path=RECORD, before=130), BEAT_WINDOW)
        quiet = open_source(EcgSettings(path=RECORD), BEAT_WINDOW)
    assert getattr(src.cfg, "before") == 130 and getattr(quiet.cfg, "before") == 90  # noqa: B009
    assert [r.getMessage() for r in caplog.records] == [
        "106_90s-150s:beats: the config overrides the bundle's window before: bundle 90, config 130"
    ]


def test_a_sensor_window_override_names_each_changed_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = DATA / "imu" / "1601_gyro_DE.txt"
    bundle = WindowSpec(length=128, hop=64, rate_hz=20)
    with caplog.at_level(logging.WARNING):
        open_source(ImuSettings(path=path, window={"length": 128, "hop": 32}), bundle)
        open_source(ImuSettings(path=path), bundle)  # the bundle's: nothing to say
    assert [r.getMessage() for r in caplog.records] == [
        "1601_gyro_DE: the config overrides the bundle's window hop: bundle 64, config 32"
    ]


MEDGE = [sys.executable, "-m", "medge"]


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=cwd)


@pytest.mark.slow
def test_a_packaged_ecg_agent_raises_the_events_evaluate_reports(
    tmp_path: Path,
    ecg_bundle: Path,
    identity: Callable[[str], Path],
    opener: object,
    mosquitto: RunningBroker,
) -> None:
    recording = tmp_path / "106_pvc_runs.npz"
    assert annotated_recording(RECORD, recording) == 16
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "site": "ward-a",
                "device": "ecg-pkg",
                "bundle": str(ecg_bundle),
                "identity": str(identity("ecg-pkg")),
                "broker": {"host": mosquitto.host, "port": mosquitto.port},
                "source": {"kind": "ecg", "path": str(RECORD)},  # the window: the bundle's
                "outbox": {"resend_after_s": 0.5},
                "telemetry_interval_s": 0.5,
            }
        )
    )
    pkg = tmp_path / "pkg"
    r = _run([*MEDGE, "agent", "package", "--config", str(cfg), "--out", str(pkg), "--no-tarball"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "window: length 260 (bundle), mode beats (bundle), before 90 (bundle)" in r.stderr
    shipped = yaml.safe_load((pkg / "agent.yaml").read_text())
    assert shipped["source"] == {"kind": "ecg", "path": str(RECORD)}

    prefix = tmp_path / "root"
    env = {**os.environ, "PYTHON": sys.executable, "PIP_NO_INDEX": "1"}
    done = subprocess.run(
        ["sh", str(pkg / "install.sh"), "--prefix", str(prefix), "--no-systemd"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # install.sh ends with the installed check-config: the window it will use, and whence
    assert "window: length 260 (bundle), mode beats (bundle), before 90 (bundle)" in done.stdout
    assert "overrides" not in done.stderr

    medge = prefix / "opt" / "medge-agent" / "venv" / "bin" / "medge"
    conf = prefix / "etc" / "medge-agent" / "agent.yaml"
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port, mosquitto.protocol),
    ):
        run = _run([str(medge), "agent", "run", "--config", str(conf), "--json"], cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        assert json.loads(run.stdout)["pending"] == 0
        rows = store.query(
            "SELECT kind, body FROM results WHERE device=? ORDER BY seq", ("ecg-pkg",)
        )
    bodies = [(row["kind"], json.loads(row["body"])) for row in rows]
    assert sum(1 for k, _ in bodies if k == "result") == 74  # one beat too near the end
    ends = [b for k, b in bodies if k == "event" and b["state"] == "end"]
    agent = [(e["start"], e["end"] + SPAN_S) for e in ends]  # evaluate: to the window's end

    ev = _run([*MEDGE, "evaluate", str(ecg_bundle), "--stream", str(recording), "--json"])
    assert ev.returncode == 0, ev.stderr[-2000:]
    pvc = json.loads(ev.stdout)["events"]["variants"]["litert-fp32"]["pvc_run"]
    [rec] = pvc["recordings"]
    assert (pvc["tp"], pvc["fp"], pvc["fn"]) == (16, 0, 0)
    assert len(agent) == len(rec["detected"]) == 16
    for (a0, a1), (e0, e1) in zip(agent, rec["detected"], strict=True):
        assert abs(a0 - e0) <= SPAN_S and abs(a1 - e1) <= SPAN_S, (a0, a1, e0, e1)
