"""mypy over the public packages, with the tests: the files and the rules are ``[tool.mypy]`` in
pyproject.toml (edge_agent, gateway, medge, converter).
mypy's cache (.mypy_cache) makes a second run take a few seconds."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_passes_on_the_public_packages() -> None:
    assert importlib.util.find_spec("mypy") is not None, (
        "mypy is not installed: pip install -e '.[dev]'"
    )
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
