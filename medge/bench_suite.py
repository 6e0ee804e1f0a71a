"""``medge bench``: every benchmark of bench/ in one run, on this machine, with the machine.

Each benchmark is a script of bench/ (a source checkout: bench/ is not installed) run as its
own process, in order, one at a time (they measure ratios side by side within themselves, so
they must not share the CPU with each other). ``--quick`` gives each a small size (about a
minute in all on 2 cores); without it they run at their own defaults (tens of minutes). What
each prints is kept as it is, beside what it is compared with; the run is written as JSON
(``bench.json``), one text file per benchmark, and a Markdown page (docs/benchmarks.md with
``--docs``) that says which machine produced it, its load before and after, and the date.

A benchmark that fails (non-zero exit, or past its time limit) is recorded with its output and
makes ``medge bench`` exit non-zero after the others have run: nothing is dropped silently.
Timings are this machine's: a ratio measured side by side holds elsewhere better than an
absolute figure does, and neither is a device's figure.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BENCHES", "Bench", "Outcome", "machine", "markdown", "run_benches"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bench:
    name: str
    script: str  # under bench/
    what: str
    anchor: str  # what its figures are compared with
    quick: tuple[str, ...] | None  # arguments of a quick run (None: left out of --quick)
    full: tuple[str, ...] = ()
    timeout_s: float = 1800.0


BENCHES: tuple[Bench, ...] = (
    Bench(
        "envelope", "envelope_crypto.py",
        "seal and open of one message (AES-GCM in an epoch, HPKE + ECDSA at its start)",
        "the envelope code of an earlier release, same keys, same run",
        ("--n", "300", "--repeat", "1"),
    ),
    Bench(
        "agent", "agent_throughput.py",
        "the agent's pipeline with sealing and the durable outbox, against a bare invoke() loop",
        "issue target: >= 0.75x of bare invoke() for the 0.25 ms zoo CNN",
        ("--n", "300", "--repeat", "1"),
    ),
    Bench(
        "gateway", "gateway_throughput.py",
        "gateway throughput and added latency against the raw broker; 1, 2, 4 workers",
        "issue target: >= 0.8x raw; added p50 <= 2 ms, p99 <= 20 ms at 1,000 msg/s",
        ("--n", "800", "--seconds", "1"),
    ),
    Bench(
        "gateway-pg", "gateway_throughput.py",
        "the same, storing in a durable PostgreSQL (a throwaway server on this machine)",
        "issue target: >= 0.8x raw; added p50 <= 2 ms, p99 <= 20 ms at 1,000 msg/s",
        ("--n", "800", "--seconds", "1", "--postgres"),
        full=("--postgres",),
    ),
    Bench(
        "store", "store_batch.py",
        "the gateway store's batch write, SQLite and PostgreSQL side by side",
        "PostgreSQL as a share of SQLite (issue target for the gateway: >= 0.8x of raw)",
        ("--n", "1000"),
    ),
    Bench(
        "alerts", "alert_latency.py",
        "a fall event on the device -> the alert in the store -> the alert on the page",
        "issue target: an alert on the page within 1 s of the event",
        ("--n", "5"),
    ),
    Bench(
        "fuzz", "fuzz.py",
        "every parser at the edge of trust under seeded mutations",
        "target: 0 exceptions other than the parsers' own errors",
        ("--n", "2000"),
    ),
    Bench(
        "coldstart", "agent_coldstart.py",
        "agent start to first result published and stored; resident memory",
        "targets printed by the script",
        ("--runs", "1"),
    ),
    Bench(
        "soak", "soak.py",
        "agent and gateway processes at 20 results/s for 10 minutes: memory over time",
        "a flat line after warm-up; every result stored",
        ("--seconds", "60", "--every", "15"),
        timeout_s=900.0,
    ),
    Bench(
        "convert", "convert_ratios.py",
        "full int8 against fp32: size, latency (XNNPACK, 1 thread), agreement, metric drop",
        "issue targets printed by the script (no VNNI here: int8 is not faster than fp32)",
        None,
    ),
    Bench(
        "footprint", "device_footprint.py",
        "install size of the device extras in a fresh venv; TensorFlow absent",
        "target: 200 MB",
        None,
    ),
)  # fmt: skip


@dataclass
class Outcome:
    name: str
    command: list[str]
    returncode: int | None  # None: past its time limit
    seconds: float
    output: str
    what: str = ""
    anchor: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass
class Run:
    quick: bool
    machine: dict[str, Any]
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [o.name for o in self.outcomes if not o.ok]


def machine() -> dict[str, Any]:
    """What produced the figures: CPU, cores, memory, load, OS, Python, the commit, the date."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
        check=False,
    ).stdout.strip()  # fmt: skip
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
        "python": platform.python_version(),
        "commit": commit or None,
    }


def run_benches(
    benches: tuple[Bench, ...] | list[Bench],
    quick: bool,
    bench_dir: Path = ROOT / "bench",
    out: Path | None = None,
    echo: bool = True,
) -> Run:
    """Run each benchmark as its own process, one after the other; keep what each printed."""
    run = Run(quick, machine())
    for b in benches:
        args = b.quick if quick else b.full
        cmd = [sys.executable, str(bench_dir / b.script), *(args or ())]
        if echo:
            print(f"medge bench: {b.name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        timeout = min(b.timeout_s, 600.0) if quick else b.timeout_s
        try:
            p = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
            )
            rc, text = p.returncode, p.stdout + (f"\n[stderr]\n{p.stderr}" if p.returncode else "")
        except subprocess.TimeoutExpired as exc:
            rc, text = None, f"{_text(exc.stdout)}\n[stopped after {timeout:.0f} s]"
        shown = [os.path.relpath(cmd[1], ROOT), *cmd[2:]]
        o = Outcome(b.name, shown, rc, round(time.monotonic() - t0, 1), text, b.what, b.anchor)
        run.outcomes.append(o)
        if echo:
            state = "ok" if o.ok else f"FAILED ({'timeout' if rc is None else f'exit {rc}'})"
            print(f"medge bench: {b.name}: {state} in {o.seconds:g} s", file=sys.stderr, flush=True)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{b.name}.txt").write_text(text)
    run.machine["load_after"] = [round(x, 2) for x in os.getloadavg()]
    if out is not None:
        (out / "bench.json").write_text(json.dumps(asdict(run), indent=2) + "\n")
    return run


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def markdown(run: Run) -> str:
    """The run as a page: the machine first, then each benchmark's figures as it printed them."""
    m = run.machine
    lines = [
        "# Benchmarks",
        "",
        "Generated by `medge bench"
        + (" --quick" if run.quick else "")
        + "` (`--docs` writes it here); do not edit it by hand. Figures are this machine's, "
        "measured side by side within each benchmark: ratios, not a device's figures. "
        "Real and simulated data are named by each benchmark.",
        "",
        f"- **Date**: {m['date']}; commit `{m.get('commit')}`",
        f"- **Machine**: {m['cpu'] or 'unknown CPU'}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB; {m['os']}; Python {m['python']}",
        f"- **Load average** (1, 5, 15 min): before {m['load_before']}, after "
        f"{m.get('load_after')}",
        f"- **Size**: {'quick (small runs: wide intervals)' if run.quick else 'full'}",
        "",
        "| benchmark | what | compared with | result | seconds |",
        "|---|---|---|---|---|",
    ]
    for o in run.outcomes:
        state = "ok" if o.ok else ("timed out" if o.returncode is None else f"exit {o.returncode}")
        lines.append(f"| {o.name} | {o.what} | {o.anchor} | {state} | {o.seconds:g} |")
    for o in run.outcomes:
        lines += ["", f"## {o.name}", "", f"`python {' '.join(o.command)}`", "", "```"]
        lines += [o.output.rstrip(), "```"]
    return "\n".join(lines) + "\n"
