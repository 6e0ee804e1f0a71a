"""The one way the converter runs its TensorFlow/ONNX work: a child process per job.

``python -m <module> [args...] JOB.json``: the job is a JSON file the child reads, its results
are files the job names. A crash in the child (the TFLite converter can segfault) kills only
the child; here it becomes one line. The child says what went wrong on its last stderr line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converter import progress
from converter.errors import ConversionError

__all__ = ["CHILD_TIMEOUT_S", "last_line", "run_child", "spawn"]

CHILD_TIMEOUT_S = 600


def spawn(
    module: str, args: Sequence[str], job_file: Path, timeout_s: float = CHILD_TIMEOUT_S
) -> tuple[int | None, str]:
    """Run ``python -m module *args job_file``; its exit status (negative: the signal that
    killed it; None: timed out) and its stderr."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, *args, str(job_file)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, ""
    return proc.returncode, proc.stderr


def last_line(stderr: str) -> str:
    """The child's last non-empty stderr line (its one-line message), or ''."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run_child(
    job: dict[str, Any],
    workdir: Path,
    module: str,
    what: str,
    args: Sequence[str] = (),
    timeout_s: float = CHILD_TIMEOUT_S,
) -> None:
    """Write ``job`` into ``workdir`` and run ``module`` on it as one progress step; raise
    ConversionError with one line when it fails, crashes or times out."""
    job_file = workdir / f"job-{module.rsplit('.', 1)[-1]}{''.join('-' + a for a in args)}.json"
    job_file.write_text(json.dumps(job))
    with progress.step(what):
        rc, stderr = spawn(module, args, job_file, timeout_s)
        if rc is None:
            raise ConversionError(f"{what} timed out after {timeout_s:.0f} s")
        if rc < 0:
            sig = signal.Signals(-rc).name
            raise ConversionError(f"{what} crashed the converter process ({sig})")
        if rc != 0:
            raise ConversionError(last_line(stderr) or f"{what} failed ({rc})")
