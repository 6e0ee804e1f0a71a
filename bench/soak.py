"""Soak: an agent and a gateway at a fixed rate for a long while, memory over time.

    .venv/bin/python bench/soak.py [--seconds 600] [--rate 20] [--every 30] [--sample 1]

`medge agent run` and `medge gateway run` as their own processes (as a supervisor runs them)
with Mosquitto on loopback; the agent replays the zoo CNN's real validation images in a loop
at ``--rate`` per second. Every ``--sample`` seconds each process's resident memory (VmRSS) is
read; every ``--every`` seconds a row is printed: the latest of each and the results stored.
At the end: the memory growth per hour of each process, the least-squares slope of its samples
after the first third (warm-up) (a leak shows as a steady climb, not a step), the stored rate
against the offered rate, and whether every result the agent made was stored (after its clean
stop its outbox must be empty: only an acknowledgement, sent after the store's commit, takes a
result out of it). A process that dies fails the run with its exit status. Under
``medge bench`` the memory of each process over time (also when a process died) and the
figures go to bench.json (bench/bench_data.py): soak_memory.png is drawn from them.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_data import figure, series

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
AGENT_RSS_MB = 150.0  # the agent's resident memory target (bench/agent_coldstart.py)


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _growth(samples: list[tuple[float, float]]) -> float:
    """MB per hour: least-squares slope of (seconds, MB) after the first third (warm-up)."""
    tail = samples[len(samples) // 3 :]
    if len(tail) < 2:
        return 0.0
    n = len(tail)
    mt, mm = sum(t for t, _ in tail) / n, sum(m for _, m in tail) / n
    var = sum((t - mt) ** 2 for t, _ in tail)
    return 3600 * sum((t - mt) * (m - mm) for t, m in tail) / var if var else 0.0


def _figures(
    samples: dict[str, list[tuple[float, float]]],
    stored: int,
    elapsed: float,
    rate: float,
    left: int,
) -> None:
    """The soak's figures for medge bench (bench_data; nothing when run by hand)."""
    figure(
        "results left unacknowledged in the outbox",
        left,
        target=0,
        better="lower",
        anchor="0: every result stored",
    )
    figure(
        "results stored per second",
        stored / elapsed,
        "/s",
        anchor=f"{rate:g}/s offered (the run's first seconds count too)",
    )
    for name, s in samples.items():
        if not s:
            continue
        figure(
            f"{name} memory growth after warm-up",
            _growth(s),
            "MB/hour",
            anchor="0 MB/hour: a flat line (no threshold: not judged)",
        )
        peak = max(m for _, m in s)
        if name == "agent":
            figure(
                "agent memory peak",
                peak,
                "MB",
                target=AGENT_RSS_MB,
                better="lower",
                anchor=f"<= {AGENT_RSS_MB:.0f} MB (agent_coldstart.py's target)",
            )
        else:
            figure(f"{name} memory peak", peak, "MB")


def main() -> None:  # noqa: PLR0915  (one run, measured in order)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="length of the soak")
    ap.add_argument("--rate", type=float, default=20.0, help="results per second offered")
    ap.add_argument("--every", type=float, default=30.0, help="seconds between printed rows")
    ap.add_argument(
        "--sample", type=float, default=1.0, help="seconds between memory samples (the slope)"
    )
    a = ap.parse_args()

    from edge_agent.bundle import SIGNATURE_NAME, sign_bundle
    from gateway import Store
    from gateway.broker import start_broker
    from gateway.site import init_site, provision_device, signer_key
    from medge.zoo import breast_cnn_bundle
    from models import breast_cnn

    tmp = Path(tempfile.mkdtemp(prefix="medge-soak-"))
    site = tmp / "ward-a"
    init_site(site, "ward-a")
    bundle = tmp / "bundle"
    shutil.copytree(breast_cnn_bundle().directory, bundle)
    (bundle / SIGNATURE_NAME).unlink(missing_ok=True)
    sign_bundle(bundle, signer_key(site))
    ident = provision_device(site, "soak-01", tmp / "id")
    db = tmp / "gw.sqlite"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    samples: dict[str, list[tuple[float, float]]] = {"agent": [], "gateway": []}
    print(f"soak: {a.seconds:g} s at {a.rate:g} results/s (real BreastMNIST images, looped)")
    print(f"{'t s':>7} {'agent MB':>9} {'gateway MB':>11} {'stored':>8}")
    with start_broker() as broker:
        cfg = tmp / "agent.yaml"
        cfg.write_text(
            f"site: ward-a\ndevice: soak-01\nbundle: {bundle}\nidentity: {ident}\n"
            f"broker: {{host: {broker.host}, port: {broker.port}, protocol: auto}}\n"
            f"source: {{path: {breast_cnn.DATA}, split: val, rate_hz: {a.rate}, loop: true}}\n"
            f"outbox: {{path: {tmp / 'outbox.sqlite'}}}\n"
        )
        gw = [sys.executable, "-m", "medge", "gateway", "run", "--site-dir", str(site)]
        gw += ["--broker", f"{broker.host}:{broker.port}", "--db", str(db)]
        ag = [sys.executable, "-m", "medge", "agent", "run", "--config", str(cfg)]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        procs["gateway"] = subprocess.Popen([*gw, "--log-level", "error"], **quiet)  # type: ignore[call-overload]
        time.sleep(2.0)
        procs["agent"] = subprocess.Popen([*ag, "--log-level", "error"], **quiet)  # type: ignore[call-overload]
        t0 = time.monotonic()
        next_row = 0.0
        try:
            while (now := time.monotonic() - t0) < a.seconds:
                for name, p in procs.items():
                    if p.poll() is not None:
                        raise SystemExit(f"soak: {name} exited with {p.returncode} at {now:.0f} s")
                    mb = _rss_mb(p.pid)
                    if mb and mb > 5:  # a process still starting
                        samples[name].append((now, mb))
                if now >= next_row:  # a row of the table every --every s
                    next_row += a.every
                    with Store(db) as store:
                        stored = store.result_count()
                    last = {k: f"{v[-1][1]:.1f}" if v else "-" for k, v in samples.items()}
                    print(
                        f"{now:7.0f} {last['agent']:>9} {last['gateway']:>11} {stored:8d}",
                        flush=True,
                    )
                time.sleep(min(a.sample, max(0.0, a.seconds - now)))
        finally:
            procs["agent"].terminate()
            agent_rc = procs["agent"].wait(60)
            time.sleep(2.0)  # the last acks
            procs["gateway"].terminate()
            procs["gateway"].wait(60)
            for name, s in samples.items():  # kept even when a process died
                series(
                    name,
                    [t for t, _ in s],
                    [m for _, m in s],
                    plot="memory",
                    x_unit="s",
                    y_unit="MB (VmRSS)",
                )
    with Store(db) as store:
        stored = store.result_count()
    elapsed = time.monotonic() - t0
    # the agent stopped cleanly (SIGTERM: it commits and drains); what its outbox still holds
    # was never acknowledged, i.e. not stored
    with sqlite3.connect(tmp / "outbox.sqlite") as box:
        left = int(box.execute("SELECT count(*) FROM outbox").fetchone()[0])
    print(
        f"\nstored {stored} results in {elapsed:.0f} s: {stored / elapsed:.1f}/s of "
        f"{a.rate:g}/s offered; {left} left unacknowledged in the agent's outbox; agent exit "
        f"{agent_rc}"
    )
    for name, s in samples.items():
        if s:
            warm_t, warm_mb = s[len(s) // 3]  # where _growth starts
            print(
                f"{name}: {s[0][1]:.1f} MB at {s[0][0]:.0f} s, {warm_mb:.1f} MB after warm-up "
                f"({warm_t:.0f} s), {s[-1][1]:.1f} MB at the end, {max(m for _, m in s):.1f} MB "
                f"peak; growth after warm-up {_growth(s):+.1f} MB/hour"
            )
    _figures(samples, stored, elapsed, a.rate, left)
    if left or agent_rc != 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
