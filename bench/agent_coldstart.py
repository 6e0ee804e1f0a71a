"""Cold start and resident memory of the edge agent with the zoo CNN, measured in one run.

    python bench/agent_coldstart.py [--runs 3] [--bundle DIR]

Each run starts ``python -m medge agent run`` as a fresh process against a broker and a gateway
on this machine and times, from the moment the process is spawned: the first result seen on
the broker (published) and the first result in the gateway's store (stored). While the agent
streams real BreastMNIST images (10/s, 40 of them) its resident memory is sampled from /proc;
the peak (VmHWM) is read just before it exits. Medians over the runs, with the targets beside;
under ``medge bench`` also as figures, and each run's resident memory over time as a series
(bench/bench_data.py).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from bench_data import figure, series
from paho.mqtt.enums import CallbackAPIVersion

TARGET_START_S = 2.0
TARGET_RSS_MB = 150.0


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="fresh agent processes")
    ap.add_argument("--bundle", type=Path, help="bundle dir (default: the zoo CNN, built once)")
    args = ap.parse_args()

    import logging

    logging.getLogger("medge").setLevel(logging.ERROR)  # the gateway's offline alerts
    from gateway import Gateway, Store
    from gateway.broker import start_broker
    from gateway.site import init_site, opener_for, provision_device, signer_key
    from models import breast_cnn

    tmp = Path(tempfile.mkdtemp(prefix="medge-coldstart-"))
    site = tmp / "ward-a"
    init_site(site, "ward-a")
    if args.bundle:
        bundle_dir = args.bundle
    else:
        import shutil

        from edge_agent.bundle import MANIFEST_NAME, SIGNATURE_NAME, sign_bundle
        from medge.zoo import breast_cnn_bundle

        bundle_dir = tmp / "bundle"  # the zoo bundle, signed by this throwaway site
        shutil.copytree(breast_cnn_bundle().directory, bundle_dir)
        (bundle_dir / SIGNATURE_NAME).unlink(missing_ok=True)
        assert (bundle_dir / MANIFEST_NAME).exists()
        sign_bundle(bundle_dir, signer_key(site))

    starts: list[float] = []
    stored: list[float] = []
    peaks: list[float] = []
    steady: list[float] = []
    with start_broker() as broker:
        for run in range(args.runs):
            device = f"cs-{run + 1:02d}"  # a fresh device per run: its own sequence numbers
            ident = provision_device(site, device, tmp / f"id-{device}")
            cfg = tmp / f"agent{run}.yaml"
            cfg.write_text(
                f"site: ward-a\ndevice: {device}\nbundle: {bundle_dir}\nidentity: {ident}\n"
                f"broker: {{host: {broker.host}, port: {broker.port}, protocol: auto}}\n"
                f"source: {{path: {breast_cnn.DATA}, split: val, rate_hz: 10, limit: 40}}\n"
                f"outbox: {{path: {tmp / f'outbox{run}.sqlite'}}}\n"
            )
            first = threading.Event()
            seen: list[float] = []
            sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)

            def on_message(_c, _u, _m, seen=seen, first=first):  # type: ignore[no-untyped-def]
                if not seen:
                    seen.append(time.perf_counter())
                    first.set()

            sub.on_message = on_message
            sub.connect(broker.host, broker.port)
            sub.subscribe(f"medge/v1/ward-a/{device}/result", qos=1)
            sub.loop_start()
            time.sleep(0.3)
            with (
                Store(tmp / f"gw{run}.sqlite") as store,
                Gateway(store, opener_for(site), broker.host, broker.port, broker.protocol),
            ):
                t0 = time.perf_counter()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "medge", "agent", "run", "--config", str(cfg)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                t_stored = None
                rss: list[int] = []
                rss_t: list[float] = []
                hwm = None
                while proc.poll() is None:
                    if t_stored is None and store.result_count() > 0:
                        t_stored = time.perf_counter()
                    kb = _status_kb(proc.pid, "VmRSS")
                    if kb:
                        rss.append(kb)
                        rss_t.append(time.perf_counter() - t0)
                        hwm = _status_kb(proc.pid, "VmHWM") or hwm
                    time.sleep(0.02)
                series(
                    f"run {run + 1}",
                    rss_t,
                    [kb / 1024 for kb in rss],
                    plot="memory",
                    x_unit="s since spawn",
                    y_unit="MB (VmRSS)",
                )
                if proc.returncode != 0:
                    raise SystemExit(f"agent exited with {proc.returncode}")
            sub.loop_stop()
            sub.disconnect()
            if not seen or t_stored is None:
                raise SystemExit("no result arrived")
            starts.append(seen[0] - t0)
            stored.append(t_stored - t0)
            peaks.append((hwm or max(rss)) / 1024)
            steady.append(statistics.median(rss[len(rss) // 2 :]) / 1024)
            print(
                f"run {run + 1}: first result published {starts[-1]:.2f} s, stored "
                f"{stored[-1]:.2f} s, RSS steady {steady[-1]:.0f} MB, peak {peaks[-1]:.0f} MB"
            )

    def verdict(ok: bool) -> str:
        return "meets" if ok else "MISSES"

    s, st, p = statistics.median(starts), statistics.median(stored), max(peaks)
    print(f"\nmedian of {args.runs} cold starts (zoo CNN int8, LiteRT, {broker.kind} broker):")
    print(
        f"  spawn -> first result published  {s:6.2f} s    target < {TARGET_START_S:.0f} s: "
        f"{verdict(s < TARGET_START_S)}"
    )
    print(
        f"  spawn -> first result stored     {st:6.2f} s    target < {TARGET_START_S:.0f} s: "
        f"{verdict(st < TARGET_START_S)}"
    )
    print(
        f"  resident memory, peak (VmHWM)    {p:6.0f} MB   target <= {TARGET_RSS_MB:.0f} MB: "
        f"{verdict(p <= TARGET_RSS_MB)}"
    )
    print(f"  resident memory, steady          {statistics.median(steady):6.0f} MB")
    start_anchor = f"< {TARGET_START_S:.0f} s (issue target)"
    figure(
        "spawn -> first result published, median",
        s,
        "s",
        target=TARGET_START_S,
        better="lower",
        met=s < TARGET_START_S,
        anchor=start_anchor,
    )
    figure(
        "spawn -> first result stored, median",
        st,
        "s",
        target=TARGET_START_S,
        better="lower",
        met=st < TARGET_START_S,
        anchor=start_anchor,
    )
    figure(
        "resident memory, peak (VmHWM)",
        p,
        "MB",
        target=TARGET_RSS_MB,
        better="lower",
        anchor=f"<= {TARGET_RSS_MB:.0f} MB (issue target)",
    )
    figure("resident memory, steady", statistics.median(steady), "MB")


if __name__ == "__main__":
    main()
