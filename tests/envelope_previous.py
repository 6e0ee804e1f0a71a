"""The envelope code of release 62caf5d (``edge_agent/envelope.py`` before the encode-once
rewrite), loaded from git history, for the two places that compare the current code with it:
the interop test (tests/test_envelope.py) and the benchmark (bench/envelope_crypto.py, which
puts this folder on ``sys.path``).

Without that commit (a source tarball, a shallow clone) :func:`load_old_envelope` returns
None: the test is skipped with the reason, the benchmark times the current code alone.
"""

from __future__ import annotations

import linecache
import subprocess
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["OLD_COMMIT", "load_old_envelope"]

OLD_COMMIT = "62caf5de6bfcc7942a580a30f048c8d21a239606"
ROOT = Path(__file__).resolve().parents[1]


def load_old_envelope() -> ModuleType | None:
    """``edge_agent/envelope.py`` as it was at OLD_COMMIT, as the module ``envelope_62caf5d``;
    None when git or that commit is not there."""
    where = f"{OLD_COMMIT}:edge_agent/envelope.py"
    try:
        src = subprocess.run(
            ["git", "show", where],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout.decode("utf-8")
    except (OSError, subprocess.SubprocessError):
        return None
    name = f"envelope_{OLD_COMMIT[:7]}"
    mod = ModuleType(name)
    mod.__file__ = where
    linecache.cache[where] = (len(src), None, src.splitlines(keepends=True), where)  # tracebacks
    sys.modules[name] = mod  # dataclasses look their module up
    exec(compile(src, where, "exec"), mod.__dict__)  # noqa: S102 (our own code, from our git)
    return mod
