"""Install footprint of the device extras, measured side by side in one run.

    python bench/device_footprint.py [--extra device --extra device-full] [--offline] [--keep]

For each extra: a fresh virtual environment in /tmp (``python -m venv``, so pip and
setuptools are in it, as on a device), ``pip install 'medge[EXTRA]'`` with medge's wheel
built from this source tree, then ``du -sb`` of the venv, the biggest entries of its
site-packages, a check that ``import tensorflow`` fails and that the agent and LiteRT import.
Wheels come from ~/.cache/medge-wheels ($MEDGE_WHEEL_CACHE) and pip's configured index (a
local mirror here); ``--offline`` uses the cache alone. The 200 MB target is printed beside
each measurement.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medge.package import _own_wheel, default_wheel_cache  # noqa: E402

TARGET_MB = 200.0
TOOLING = ("pip", "setuptools", "_distutils_hack", "distutils-precedence.pth")


def _du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def measure(extra: str, wheels: Path, cache: Path, offline: bool, keep: bool) -> dict:
    venv = Path(tempfile.mkdtemp(prefix=f"medge-fp-{extra}-", dir="/tmp"))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        py = venv / "bin" / "python"
        cmd = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        cmd += ["--find-links", str(wheels), "--find-links", str(cache)]
        cmd += ["--no-index"] if offline else []
        t0 = time.monotonic()
        done = _run([*cmd, f"medge[{extra}]"])
        took = time.monotonic() - t0
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise SystemExit(f"{extra}: pip install failed: {' / '.join(tail)}")
        site = next((venv / "lib").glob("python3*/site-packages"))
        entries = sorted(((_du(p), p.name) for p in site.iterdir()), reverse=True)
        tooling = sum(b for b, n in entries if n.split("-")[0] in TOOLING)
        tf = _run([str(py), "-c", "import tensorflow"])
        smoke = _run([str(py), "-c", "import edge_agent.agent, ai_edge_litert.interpreter"])
        return {
            "extra": extra,
            "venv_bytes": _du(venv),
            "tooling_bytes": tooling,
            "biggest": [(n, b) for b, n in entries[:8]],
            "tensorflow_import_fails": tf.returncode != 0 and "ModuleNotFoundError" in tf.stderr,
            "agent_imports": smoke.returncode == 0,
            "install_s": round(took, 1),
        }
    finally:
        if keep:
            print(f"kept {venv}", file=sys.stderr)
        else:
            shutil.rmtree(venv, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--extra",
        action="append",
        help="extra to measure, repeatable (default: device and device-full)",
    )
    ap.add_argument("--offline", action="store_true", help="install from the wheel cache only")
    ap.add_argument("--keep", action="store_true", help="keep the venvs in /tmp")
    ap.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = ap.parse_args()
    extras = args.extra or ["device", "device-full"]
    cache = default_wheel_cache()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medge-fp-wheel-") as tmp:
        wheels = Path(tmp)
        _own_wheel(ROOT, wheels)
        rows = [measure(e, wheels, cache, args.offline, args.keep) for e in extras]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{'extra':<14}{'venv MB':>9}{'target MB':>11}{'vs target':>11}"
        f"{'w/o pip+setuptools':>20}{'tensorflow':>12}{'agent':>7}"
    )
    for r in rows:
        mb = r["venv_bytes"] / 1e6
        ok = "under" if mb < TARGET_MB else "OVER"
        bare = (r["venv_bytes"] - r["tooling_bytes"]) / 1e6
        tf = "absent" if r["tensorflow_import_fails"] else "PRESENT"
        agent = "ok" if r["agent_imports"] else "FAIL"
        print(
            f"{r['extra']:<14}{mb:>9.1f}{TARGET_MB:>11.0f}{mb / TARGET_MB:>9.2f}x {ok:<5}"
            f"{bare:>14.1f}{tf:>12}{agent:>7}"
        )
    for r in rows:
        top = ", ".join(f"{n} {b / 1e6:.1f}" for n, b in r["biggest"])
        print(f"\n{r['extra']} biggest (MB): {top}")


if __name__ == "__main__":
    main()
