"""Files at rest: whatever medge creates — stores with their -wal/-shm, outboxes, keys,
the users file — is readable by its owner only (the `medge` command sets umask 077; public
certificates and keys stay 0644 on purpose), checked after a real run of the whole chain
(`medge demo`: a real broker, gateway, dashboard and devices), a running `medge gateway run`,
`medge site init` and `medge dashboard add-user`."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from medge_process import start_medge

from gateway.broker import RunningBroker

pytestmark = pytest.mark.slow


def _medge(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    return subprocess.run(
        [sys.executable, "-m", "medge", *argv],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        check=False,
        env=env,
    )


PUBLIC = (".crt", ".pem")  # certificates, public keys and the CRL: written 0644 on purpose
PUBLIC_NAMES = ("recipient.json", "site.json")  # the gateway's public HPKE key, the site name


def _open_to_others(root: Path) -> list[str]:
    """Every file (and directory) under ``root`` with any group or other permission bit,
    but public certificates and keys."""
    return sorted(
        f"{p.relative_to(root)} {stat.S_IMODE(p.lstat().st_mode):o}"
        for p in [root, *root.rglob("*")]
        if not p.is_symlink()
        and stat.S_IMODE(p.lstat().st_mode) & 0o077
        and not (p.is_file() and (p.suffix in PUBLIC or p.name in PUBLIC_NAMES))
    )


def test_a_real_run_leaves_every_file_owner_only(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto: RunningBroker, bundle_dir: Path
) -> None:
    old = os.umask(0o022)  # as a typical login shell: the files must not inherit it
    try:
        work = tmp_path / "demo"
        r = _medge(
            "demo",
            "--duration",
            "6",
            "--devices",
            "1",
            "--port",
            "0",
            "--bundle",  # the session's bundle: the demo's zoo conversions are test_demo's
            str(bundle_dir),
            "--workdir",
            str(work),
            "--log-level",
            "warning",
        )
        assert r.returncode == 0, r.stderr[-2000:]
        site = tmp_path / "site"
        r = _medge("site", "init", "--dir", str(site), "--site", "ward-a")
        assert r.returncode == 0, r.stderr[-2000:]
        # a gateway that is running has its store's -wal and -shm open: look at them then
        db = tmp_path / "gw" / "gateway.sqlite"
        db.parent.mkdir(mode=0o700)
        gw = start_medge(
            "gateway", "run", "--site-dir", str(site), "--db", str(db),
            "--broker", f"{mosquitto.host}:{mosquitto.port}", "--log-level", "warning",
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wal, shm = db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")
            deadline = time.monotonic() + 60
            while not (wal.exists() and shm.exists()) and gw.poll() is None:
                assert time.monotonic() < deadline, "the gateway made no -wal/-shm"
                time.sleep(0.1)
            assert gw.poll() is None, gw.stderr.read().decode()[-2000:] if gw.stderr else ""
            running = _open_to_others(db.parent)
        finally:
            gw.send_signal(signal.SIGTERM)
            gw.wait(30)
        assert running == [], "while running: the store, its -wal and -shm"
        users = tmp_path / "users.json"
        r = _medge(
            "dashboard",
            "add-user",
            "nurse",
            "--users",
            str(users),
            "--password-stdin",
            stdin="a long enough password\n",
        )
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        os.umask(old)
    made = {p.name for p in work.rglob("*")}
    for name in (
        "gateway.sqlite",
        "outbox-us-01.sqlite",
        "device.key",
        "ca.key",
        "bundle-signer.key",
        "dashboard-users.json",
    ):
        assert name in made, f"the demo made no {name}: {sorted(made)}"
    assert _open_to_others(work) == []
    assert _open_to_others(site) == []
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
