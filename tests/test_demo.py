"""`medge demo --duration`: the whole chain, as a user starts it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_demo_runs_stops_by_itself_and_loses_nothing(
    bundle_dir: Path, tmp_path: Path, broker: str
) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medge",
            "demo",
            "--duration",
            "5",
            "--port",
            "0",
            "--broker",
            broker,
            "--bundle",
            str(bundle_dir),
            "--workdir",
            str(tmp_path),
            "--rate",
            "10",
            "--devices",
            "2",
            "--json",
            "--log-level",
            "warning",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{") :])
    assert summary["ok"] is True
    assert [d["device"] for d in summary["devices"]] == ["us-01", "us-02"]
    for d in summary["devices"]:
        assert d["sent"] >= 20, d  # ~10/s for 5 s
        assert d["stored"] == d["sent"] and d["pending"] == 0, d
    assert "dashboard at http://127.0.0.1:" in r.stderr + r.stdout


def test_demo_stops_cleanly_on_ctrl_c(bundle_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medge",
            "demo",
            "--port",
            "0",
            "--bundle",
            str(bundle_dir),
            "--workdir",
            str(tmp_path),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ),
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "press Ctrl-C to stop" in line:
            break
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + out
    assert "every result sent was stored" in out
