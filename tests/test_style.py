"""The style that tooling can check, checked with the tests: ``ruff check`` and
``ruff format --check`` over the whole tree (rules in pyproject.toml). The import rules
between packages are tests/test_import_contracts.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
    beside = Path(sys.executable).with_name("ruff")  # the venv's, from the dev extra
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("ruff")
    assert found, "ruff is not installed: pip install -e '.[dev]'"
    return [found]


def test_ruff_check_passes_on_the_whole_tree() -> None:
    r = subprocess.run(
        [*_ruff(), "check", "--no-cache", "--output-format", "concise", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_ruff_format_leaves_the_whole_tree_as_it_is() -> None:
    r = subprocess.run(
        [*_ruff(), "format", "--check", "--no-cache", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, "run `ruff format .`:\n" + r.stdout[-4000:] + r.stderr[-2000:]
