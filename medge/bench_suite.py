"""``medge bench``: every benchmark of bench/ in one run, on this machine, with the machine.

Each benchmark is a script of bench/ (a source checkout: bench/ is not installed) run as its
own process, in order, one at a time (they measure ratios side by side within themselves, so
they must not share the CPU with each other). ``--quick`` gives each a small size (about a
minute in all on 2 cores); without it they run at their own defaults (tens of minutes). What
each prints is kept as it is, beside what it is compared with; the run is written as JSON
(``bench.json``), one text file per benchmark, and a Markdown page (docs/benchmarks.md with
``--docs``) that says which machine produced it, its load before and after, and the date.

Besides what it prints, a benchmark may hand over figures (each with the anchor it is compared
with, and whether it meets it) and series (memory over time) through bench/bench_data.py: each
runs with ``MEDGE_BENCH_DATA`` naming a file of its own, read back into bench.json under its
name; the figures are tabled beside their anchors in the page and plotted
(medge/bench_plots.py).

A benchmark that fails (non-zero exit, past its time limit, or a data file that is not what
bench_data writes) is recorded with its output and makes ``medge bench`` exit non-zero after
the others have run: nothing is dropped silently.
Timings are this machine's: a ratio measured side by side holds elsewhere better than an
absolute figure does, and neither is a device's figure.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BENCHES", "DATA_ENV", "Bench", "Outcome", "Run", "machine", "read_data", "run_benches",
    "save", "state",
]  # fmt: skip

ROOT = Path(__file__).resolve().parent.parent
DATA_ENV = "MEDGE_BENCH_DATA"  # bench/bench_data.py's ENV


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
        "issue target: >= 0.75x of bare invoke() for a 0.25 ms model, >= 0.9x for a 2 ms one",
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
        "chaos", "chaos.py",
        "several devices streaming through each fault: link cut (30 s; 3 s quick), kill -9 of "
        "broker, gateway, agent, forwarder; full outbox; PostgreSQL restart",
        "issue target: every result stored once, events first, drops counted exactly",
        ("--quick",),
        timeout_s=900.0,
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
    data: dict[str, Any] = field(default_factory=dict)  # what it handed over (bench_data)
    data_error: str | None = None  # its data file was not what bench_data writes

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.data_error is None

    @property
    def figures(self) -> list[dict[str, Any]]:
        """Its figures as bench_data writes them (one that is not is left to data_error)."""
        figures = self.data.get("figures", [])
        return [f for f in figures if _figure_ok(f)] if isinstance(figures, list) else []


@dataclass
class Run:
    quick: bool
    machine: dict[str, Any]
    outcomes: list[Outcome] = field(default_factory=list)
    plots: list[dict[str, Any]] = field(default_factory=list)  # medge.bench_plots

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
    """Run each benchmark as its own process, one after the other; keep what each printed and
    what it handed over through bench_data."""
    run = Run(quick, machine())
    with tempfile.TemporaryDirectory(prefix="medge-bench-data-") as scratch:
        for b in benches:
            o = _run_one(b, quick, bench_dir, Path(scratch) / f"{b.name}.json", echo)
            run.outcomes.append(o)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{b.name}.txt").write_text(o.output)
    run.machine["load_after"] = [round(x, 2) for x in os.getloadavg()]
    if out is not None:
        save(run, out)
    return run


def _run_one(b: Bench, quick: bool, bench_dir: Path, data_file: Path, echo: bool) -> Outcome:
    args = b.quick if quick else b.full
    cmd = [sys.executable, str(bench_dir / b.script), *(args or ())]
    if echo:
        print(f"medge bench: {b.name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    timeout = min(b.timeout_s, 600.0) if quick else b.timeout_s
    env = {**os.environ, DATA_ENV: str(data_file)}
    try:
        p = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
        rc, text = p.returncode, p.stdout + (f"\n[stderr]\n{p.stderr}" if p.returncode else "")
    except subprocess.TimeoutExpired as exc:
        rc, text = None, f"{_text(exc.stdout)}\n[stopped after {timeout:.0f} s]"
    shown = [os.path.relpath(cmd[1], ROOT), *cmd[2:]]
    o = Outcome(b.name, shown, rc, round(time.monotonic() - t0, 1), text, b.what, b.anchor)
    o.data, o.data_error = read_data(data_file)
    if echo:
        said = "ok" if o.ok else f"FAILED ({state(o)})"
        print(f"medge bench: {b.name}: {said} in {o.seconds:g} s", file=sys.stderr, flush=True)
    return o


def read_data(path: Path) -> tuple[dict[str, Any], str | None]:
    """What a benchmark handed over through bench_data ({} if nothing), and what is wrong with
    it (None: nothing); a bad file is kept as far as it reads, never dropped silently."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}, None
    try:
        data = json.loads(text)
    except ValueError as exc:
        return {"unread": text[:2000]}, f"data file is not JSON ({exc})"
    if not isinstance(data, dict):
        return {"unread": data}, "data file is not a JSON object"
    figures = data.get("figures", [])
    if isinstance(figures, list):
        bad = [f"figure {i + 1}" for i, f in enumerate(figures) if not _figure_ok(f)]
    else:
        bad = ["figures"]
    series = data.get("series", {})
    if not isinstance(series, dict):
        bad.append("series")
    else:
        bad += [f"series {k!r}" for k, v in series.items() if not _series_ok(v)]
    return data, (f"bad data: {', '.join(bad)}" if bad else None)


def _figure_ok(f: Any) -> bool:
    return (
        isinstance(f, dict)
        and isinstance(f.get("name"), str)
        and _is_number(f.get("value"))
        and (f.get("target") is None or _is_number(f["target"]))
        and f.get("met") in (None, True, False)
    )


def _series_ok(s: Any) -> bool:
    if not isinstance(s, dict):
        return False
    x, y = s.get("x"), s.get("y")
    return (
        isinstance(x, list)
        and isinstance(y, list)
        and len(x) == len(y)
        and all(_is_number(v) for v in (*x, *y))
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def save(run: Run, out: Path) -> None:
    """The run as bench.json in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(asdict(run), indent=2) + "\n")


def state(o: Outcome) -> str:
    """ok, or how it failed."""
    if o.returncode is None:
        return "timed out"
    if o.returncode:
        return f"exit {o.returncode}"
    return o.data_error or "ok"


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b
