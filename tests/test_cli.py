from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medge.cli import build_parser


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["convert"],
        ["evaluate"],
        ["agent", "run"],
        ["agent", "check-config"],
        ["gateway", "run"],
        ["dashboard"],
        ["demo"],
    ],
)
def test_every_command_has_help_that_teaches(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*argv, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: medge" in text
    if argv and argv[0] not in ("agent", "gateway"):
        assert "--log-level" in text


def test_check_config_points_at_the_bad_line(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "site: ward-a\ndevice: us-01\nbundle: b\nsource:\n  path: x.npz\n  rate_hz: -3\n"
    )
    r = _run("agent", "check-config", str(cfg))
    assert r.returncode == 2
    assert f"{cfg}:6: source.rate_hz" in r.stderr
    cfg.write_text("site: ward-a\ndevice: us-01\nbundle: b\nsource: {path: x.npz}\ncolour: red\n")
    r = _run("agent", "check-config", str(cfg))
    assert r.returncode == 2 and f"{cfg}:5: colour: Extra inputs are not permitted" in r.stderr
    cfg.write_text("site: ward-a\ndevice: us-01\nbundle: b\nsource: {path: x.npz}\n")
    r = _run("agent", "check-config", str(cfg))
    assert r.returncode == 0, r.stderr


def test_agent_refuses_to_start_on_a_tampered_bundle(bundle_copy: Path, tmp_path: Path) -> None:
    (bundle_copy / "report.json").write_text("{}")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"site: ward-a\ndevice: us-01\nbundle: {bundle_copy}\n"
        f"source: {{path: {tmp_path / 'x.npz'}}}\n"
    )
    r = _run("agent", "run", "--config", str(cfg))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"medge: error: {bundle_copy}: file 'report.json' does not match its hash in the manifest"
    )
