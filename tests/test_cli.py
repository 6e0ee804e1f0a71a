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
        ["gateway", "check-config"],
        ["gateway", "push-bundle"],
        ["gateway", "outputs"],
        ["gateway", "group"],
        ["gateway", "rollout"],
        ["dashboard"],
        ["demo"],
        ["site", "init"],
        ["site", "rotate-key"],
        ["site", "cloud-key"],
        ["site", "source-key"],
        ["device", "provision"],
        ["device", "revoke"],
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
    if argv and argv[0] not in ("agent", "gateway", "site", "device"):
        assert "--log-level" in text


def test_check_config_points_at_the_bad_line(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "site: ward-a\ndevice: us-01\nbundle: b\nidentity: i\nsource:\n  path: x.npz\n"
        "  rate_hz: -3\n"
    )
    r = _run("agent", "check-config", str(cfg))
    assert r.returncode == 2
    assert f"{cfg}:7: source.rate_hz" in r.stderr
    base = "site: ward-a\ndevice: us-01\nbundle: b\nidentity: i\nsource: {path: x.npz}\n"
    cfg.write_text(base + "colour: red\n")
    r = _run("agent", "check-config", str(cfg))
    assert r.returncode == 2 and f"{cfg}:6: colour: Extra inputs are not permitted" in r.stderr
    cfg.write_text(base)
    # valid YAML is not enough: it checks what 'agent run' checks (tests/test_check_config.py)
    r = _run("agent", "check-config", str(cfg))
    assert r.returncode == 2 and f"{tmp_path / 'i'}: no identity directory" in r.stderr


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("report", "file 'report.json' does not match its hash in the manifest"),
        ("manifest", "signature does not match the manifest"),
        ("unsigned", "bundle is not signed (no manifest.sig)"),
        ("resigned", "which this device does not trust"),
    ],
)
def test_agent_refuses_to_start_on_a_bad_bundle(  # type: ignore[no-untyped-def]
    bundle_copy: Path, tmp_path: Path, identity, damage: str, message: str
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from edge_agent.bundle import sign_bundle

    if damage == "report":
        (bundle_copy / "report.json").write_text("{}")
    elif damage == "manifest":  # one byte changed
        m = bundle_copy / "manifest.json"
        m.write_bytes(m.read_bytes().replace(b'"profile": "x86"', b'"profile": "x87"'))
    elif damage == "unsigned":
        (bundle_copy / "manifest.sig").unlink()
    else:  # a valid signature, but by a key the device does not trust
        sign_bundle(bundle_copy, ed25519.Ed25519PrivateKey.generate())
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"site: ward-a\ndevice: us-01\nbundle: {bundle_copy}\nidentity: {identity('us-01')}\n"
        f"source: {{path: {tmp_path / 'x.npz'}}}\n"
    )
    r = _run("agent", "run", "--config", str(cfg))
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"medge: error: {bundle_copy}: "), r.stderr
    assert last.endswith(message), r.stderr


def test_agent_refuses_a_device_key_others_can_read(  # type: ignore[no-untyped-def]
    bundle_dir: Path, tmp_path: Path, site_dir: Path
) -> None:
    import shutil

    from gateway.site import provision_device

    ident = provision_device(site_dir, "us-44", tmp_path / "id")
    assert (ident / "device.key").stat().st_mode & 0o777 == 0o600
    loose = tmp_path / "loose"
    shutil.copytree(ident, loose)
    (loose / "device.key").chmod(0o644)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"site: ward-a\ndevice: us-44\nbundle: {bundle_dir}\nidentity: {loose}\n"
        f"source: {{path: {tmp_path / 'x.npz'}}}\n"
    )
    r = _run("agent", "run", "--config", str(cfg))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"medge: error: {loose / 'device.key'}: private key is readable by others "
        f"(chmod 600 {loose / 'device.key'})"
    )
