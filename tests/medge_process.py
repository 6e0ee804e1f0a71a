"""How a test runs a ``medge`` command as its own process (``python -m medge ...``, as a user
or a supervisor runs it) and waits for it to serve, failing with the tail of its stderr when
it dies first."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

import pytest

__all__ = ["medge_cmd", "start_medge", "wait_serving"]

T = TypeVar("T")


def medge_cmd(*args: str) -> list[str]:
    """The command line of ``medge ARGS`` with this interpreter."""
    return [sys.executable, "-m", "medge", *args]


def start_medge(
    *args: str,
    stdout: int | IO[Any] | None = subprocess.PIPE,
    stderr: int | IO[Any] | None = subprocess.PIPE,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.Popen[str]:
    """``medge ARGS`` started in the background, text mode, this environment."""
    return subprocess.Popen(
        medge_cmd(*args), stdout=stdout, stderr=stderr, text=True, cwd=cwd, env=dict(os.environ)
    )


def _stderr_tail(proc: subprocess.Popen[str]) -> str:
    if proc.stderr is None:
        return f"(exit {proc.returncode}; its stderr went elsewhere)"
    return f"(exit {proc.returncode}) {proc.stderr.read()[-3000:]}"


def wait_serving(
    proc: subprocess.Popen[str],
    probe: Callable[[], T | None],
    timeout: float = 30.0,
    what: str = "the process to serve",
) -> T:
    """Poll ``probe`` (an OSError counts as not yet) until it returns something; fail the test
    when ``proc`` exits first (with the tail of its stderr) or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = probe()
        except OSError:
            got = None
        if got is not None:
            return got
        if proc.poll() is not None:
            pytest.fail(f"medge exited before {what}: {_stderr_tail(proc)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)
