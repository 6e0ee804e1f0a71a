"""LiteRT conversion strategies, tried in order until one gives a working artifact.

Every attempt runs in the converter's child process (converter.child.litert), so a converter
that crashes costs one attempt, not the session: measured with TF 2.21, the TFLite converter
segfaults calibrating a Keras 3 LSTM's WHILE loop for full int8. The parent then reads which
strategy was running, records "crashed the converter process (SIGSEGV)" and starts a fresh
child at the next strategy. Strategies that merely fail run on in the same child, so the
TensorFlow import (about 4 s) is paid once per crash, not once per strategy.

A strategy wins only if the agent's own LiteRT runtime loads its artifact and the artifact
agrees with the float model on the evaluation samples (at least ``min_agreement``).
"""

from __future__ import annotations

import json
import re
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from converter.errors import ConversionError
from converter.runner import last_line, spawn

__all__ = [
    "EXIT_INPUT",
    "EXIT_NONE_WORKED",
    "MIN_AGREEMENT",
    "STRATEGIES",
    "Attempt",
    "LitertOutcome",
    "Strategy",
    "convert_litert",
    "first_error_line",
    "strategy",
]

EXIT_INPUT = 3  # the child's inputs are wrong (model, data, labels): no strategy can help
EXIT_NONE_WORKED = 4  # every strategy given to the child failed or did not apply
MIN_AGREEMENT = 0.9
LITERT_CHILD = "converter.child.litert"


@dataclass(frozen=True)
class Strategy:
    key: str
    title: str
    precision: str  # the artifact's manifest precision
    rebuild: str  # none | unroll | legacy | unroll-if-recurrent | batch1
    ops: str  # int8 (builtins int8 only) | int8+float (builtin float fallback) | dynamic
    int8_io: bool  # int8 input and output tensors (else float32)


STRATEGIES: tuple[Strategy, ...] = (
    Strategy("full-int8", "direct full-int8 (TFLiteConverter)", "int8", "none", "int8", True),
    Strategy(
        "unrolled-int8",
        "full-int8 of a batch-1 rebuild with every recurrent layer unrolled",
        "int8",
        "unroll",
        "int8",
        True,
    ),
    Strategy(
        "legacy-lstm-int8",
        "full-int8 of a tf_keras rebuild (fused UNIDIRECTIONAL_SEQUENCE_LSTM op)",
        "int8",
        "legacy",
        "int8",
        True,
    ),
    Strategy(
        "mixed-int8",
        "int8 where LiteRT has an int8 kernel, float elsewhere; float input and output",
        "int8",
        "unroll-if-recurrent",
        "int8+float",
        False,
    ),
    Strategy(
        "dynamic-range",
        "int8 weights, float activations and input/output (dynamic range)",
        "dynamic",
        "batch1",
        "dynamic",
        False,
    ),
)


def strategy(key: str) -> Strategy:
    for s in STRATEGIES:
        if s.key == key:
            return s
    raise ConversionError(
        f"unknown strategy '{key}' (one of {', '.join(s.key for s in STRATEGIES)})"
    )


@dataclass
class Attempt:
    strategy: str
    title: str
    outcome: str = "not tried"  # won | failed | crashed | skipped | not tried
    reason: str | None = None
    bytes: int | None = None
    seconds: float | None = None
    agreement: float | None = None
    ops: list[str] | None = None


@dataclass
class LitertOutcome:
    winner: Strategy
    attempts: list[Attempt] = field(default_factory=list)

    def as_report(self) -> dict[str, Any]:
        return {"strategy": self.winner.key, "attempts": [asdict(a) for a in self.attempts]}


_LOC = re.compile(r"^(?:<unknown>:\d+:\s*)?(?:error:\s*)?")


def first_error_line(text: str) -> str:
    """The converter's first ``error:`` line without its MLIR location, else the first line."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = next((ln for ln in lines if "error:" in ln), lines[0] if lines else "")
    line = line[line.find("error:") :] if "error:" in line else line
    line = _LOC.sub("", line)
    if line.startswith("loc("):  # skip the balanced loc(...) and the ": " after it
        depth = 0
        for i, ch in enumerate(line[3:], start=3):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                line = line[i + 1 :].lstrip(": ").strip()
                break
    line = line.replace("\\n", " ").split(" Please consider", 1)[0]
    return line[:300] or "failed without a message"


_UNSUPPORTED = re.compile(r"'(tf\.\w+)' op is neither a custom op nor a flex op")


def _read_progress(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the child died in the middle of a line
            break
    return out


def convert_litert(
    job: dict[str, Any], work: Path, keys: list[str], timeout_s: float
) -> LitertOutcome:
    """Try ``keys`` in order in child processes; return the winner and every attempt.

    Raises ConversionError with one line: the child's own message when the inputs are wrong,
    or every strategy's reason when none worked.
    """
    attempts = {k: Attempt(k, strategy(k).title) for k in keys}
    progress = work / "strategies.jsonl"
    progress.unlink(missing_ok=True)
    remaining = list(keys)
    while remaining:
        job_file = work / f"job-litert-{len(keys) - len(remaining)}.json"
        job_file.write_text(json.dumps({**job, "strategies": remaining, "progress": str(progress)}))
        t0 = time.monotonic()
        rc, stderr = spawn(LITERT_CHILD, (), job_file, timeout_s)
        running = _read_attempts(progress, attempts)
        if rc == 0:
            won = next(a for a in attempts.values() if a.outcome == "won")
            return LitertOutcome(strategy(won.strategy), list(attempts.values()))
        if rc == EXIT_INPUT:
            raise ConversionError(last_line(stderr) or "LiteRT conversion refused its inputs")
        if running is None and rc == EXIT_NONE_WORKED:
            break
        if running is None:  # died before any strategy started: loading the model, the data
            raise _child_failed(rc, stderr, timeout_s)
        reason = _crash_reason(rc, stderr, timeout_s)
        _record_crash(progress, running, reason, round(time.monotonic() - t0, 1))
        remaining = remaining[remaining.index(running.strategy) + 1 :]
    raise _none_worked(list(attempts.values()))


def _read_attempts(progress: Path, attempts: dict[str, Attempt]) -> Attempt | None:
    """Update ``attempts`` from the child's progress lines; the attempt it was still running
    when it ended, if any."""
    running = None
    for rec in _read_progress(progress):
        a = attempts[rec["strategy"]]
        if rec["event"] == "start":
            a.outcome, running = "started", a
            continue
        running = None
        a.outcome = rec["event"]
        for k in ("reason", "bytes", "seconds", "agreement", "ops"):
            if k in rec:
                setattr(a, k, rec[k])
    return running


def _child_failed(rc: int | None, stderr: str, timeout_s: float) -> ConversionError:
    """The error for a child that ended before it started any strategy."""
    if rc is None:
        return ConversionError(f"LiteRT conversion timed out after {timeout_s:.0f} s")
    if rc < 0:
        sig = signal.Signals(-rc).name
        return ConversionError(f"LiteRT conversion crashed the converter process ({sig})")
    return ConversionError(last_line(stderr) or f"LiteRT conversion failed ({rc})")


def _crash_reason(rc: int | None, stderr: str, timeout_s: float) -> str:
    """Why the child ended in the middle of a strategy."""
    if rc is None:
        return f"timed out after {timeout_s:.0f} s"
    if rc < 0:
        return f"crashed the converter process ({signal.Signals(-rc).name})"
    return first_error_line(last_line(stderr)) or f"exit status {rc}"


def _record_crash(progress: Path, running: Attempt, reason: str, seconds: float) -> None:
    """Mark the running attempt crashed, in memory and in the progress file."""
    record = {
        "strategy": running.strategy,
        "event": "crashed",
        "reason": reason,
        "seconds": seconds,
    }
    with progress.open("a", encoding="utf-8") as f:  # read back with the child's lines
        f.write(json.dumps(record) + "\n")
    running.outcome, running.reason, running.seconds = "crashed", reason, seconds


def _none_worked(attempts: list[Attempt]) -> ConversionError:
    """The one-line error listing every strategy's outcome, naming unsupported ops first."""
    reasons = "; ".join(
        f"{a.strategy}: {a.reason}"  # "crashed the converter process (SIGSEGV)"
        if a.outcome == "crashed"
        else f"{a.strategy}: {a.outcome}" + (f" ({a.reason})" if a.reason else "")
        for a in attempts
    )
    ops = sorted({m.group(1) for a in attempts for m in _UNSUPPORTED.finditer(a.reason or "")})
    if ops:
        return ConversionError(
            f"unsupported op {', '.join(ops)}: LiteRT has no builtin kernel for it "
            f"(every strategy failed — {reasons})"
        )
    return ConversionError(f"no LiteRT conversion strategy worked — {reasons}")
