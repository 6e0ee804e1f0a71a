"""Gateway throughput and latency next to the raw broker, in one run.

    .venv/bin/python bench/gateway_throughput.py [--n 4000] [--devices 4] [--rate 1000]
        [--store sqlite|postgresql|both] [--repeat 3]

1. raw: paho publisher -> Mosquitto -> paho subscriber that only counts (QoS 1, payloads the
   size of a sealed result);
2. gateway: results sealed by real Sealers (sealed before the clock starts, so the generator
   is not the bottleneck), published to Mosquitto; `medge gateway run` (its own process) opens,
   stores (SQLite WAL, synchronous=FULL, or PostgreSQL with fsync and synchronous_commit on)
   and acks; the clock stops at the last ack;
3. latency at two offered rates (--rate, --low-rate): publish -> subscriber (raw) vs
   publish -> ack (gateway), with two ways to batch store commits: a fixed 5 ms window before
   every commit (--batch-when-idle, as earlier versions did) and group commit (the gateway's
   default: commit at once what is waiting; what arrives during a commit goes into the next);
4. the gateway with 1, 2 and 4 workers on an MQTT 5 shared subscription ($share/g/...), each
   configuration against a fresh database (PostgreSQL: one database the workers share);
5. CPU seconds per 1,000 messages of the gateway process(es), Mosquitto and PostgreSQL (the
   postmaster and its children) during the steady --rate run, and of the gateway flat out.

Every gateway figure is measured next to a raw one taken just before it, at the same rate
(throughput: "of raw" is the ratio; latency: "added" is the gateway's p50/p99 minus raw's), so
a load spike hits both; ``--repeat`` measures each configuration again (medians shown). The
last lines check the targets: >= 0.8x raw throughput, added p50 <= 2 ms and p99 <= 20 ms at
1,000 msg/s. Flood limiting is turned off (--device-rate 0): the generator is a flood by design.
``--postgres`` is ``--store postgresql``.

Measured 2026-12-05, ``--n 2000 --seconds 2 --store both --repeat 3`` (medians), a 2-core VM
shared with other work; latency in ms at 1,000 msg/s, "added" = gateway - raw beside it; CPU
s/1k at 1,000 msg/s of the gateway(s), Mosquitto and PostgreSQL:

    store       configuration       of raw  p50   p99  added p50  p99   CPU gw  broker  db
    SQLite      fixed 5 ms window    0.73   5.52  9.74    5.29   8.51   0.405   0.070   -
    SQLite      group commit, 1      0.74   1.53  8.07    1.32   7.61   0.640   0.100   -
    SQLite      group commit, 2      0.85   3.10 77.28    2.89  76.93   0.635   0.095   -
    SQLite      group commit, 4      0.45   1.11 15.73    0.94  15.31   0.755   0.110   -
    PostgreSQL  fixed 5 ms window    0.89   5.60 10.22    5.38   7.32   0.340   0.080  0.070
    PostgreSQL  group commit, 1      0.73   1.73  9.78    1.51   8.22   0.630   0.110  0.210
    PostgreSQL  group commit, 2      0.85   1.55  5.18    1.34   4.70   0.730   0.110  0.230
    PostgreSQL  group commit, 4      0.65   2.33  9.90    2.11   9.37   0.905   0.110  0.305

Targets met by one worker (the default): added p50 and p99 on both stores; NOT throughput
(0.73-0.74x raw: the gateway's paho network thread, which receives, opens and PUBACKs every
message, fills a core). 2 and 4 workers do not scale here: they share 2 cores with the broker,
the generator and the database (2 workers: 1.23-1.24x one, 4: 0.69-0.88x). Before this
version (``--n 800 --seconds 1 --postgres``, the old code run beside the new one): PostgreSQL
p50 at 1,000 msg/s 7.0 ms (adaptive 5 ms window) -> 1.7-2.3 ms; single runs vary a lot here.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_data import figure  # noqa: E402  (bench/, next to this file)

from edge_agent.envelope import Envelope, Sealer, decode_ack  # noqa: E402
from edge_agent.identity import DeviceIdentity  # noqa: E402
from edge_agent.topics import topic  # noqa: E402
from gateway.broker import free_port, start_broker  # noqa: E402
from gateway.site import init_site, provision_device  # noqa: E402

SITE = "bench"
BODY = {  # a realistic result body; sealed it is ~750 B
    "input": "breastmnist_dev:val#17",
    "input_sha256": "9f" * 32,
    "pred": 1,
    "pred_label": "benign/normal",
    "scores": [0.12890625, 0.87109375],
    "label": 1,
    "label_name": "benign/normal",
    "latency_ms": 3.21,
    "bundle": "breast-cnn@1.0.0+" + "ab" * 8,
}


def _client(cid: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(100)
    return c


def _no_delay(c: mqtt.Client) -> None:
    """TCP_NODELAY, as the gateway sets it: without it a small publish can wait ~40 ms for a
    delayed TCP ACK (Nagle), which would be measured as gateway latency."""
    sock = c.socket()
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Counter:
    """Subscribes and records the arrival time of each message key."""

    def __init__(self, port: int, sub: str, key) -> None:  # type: ignore[no-untyped-def]
        self.times: dict[object, float] = {}
        self._lock = threading.Lock()
        self._key = key
        self.c = _client(f"counter-{os.getpid()}-{time.monotonic_ns()}")
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", port)
        _no_delay(self.c)
        self.c.subscribe(sub, qos=1)
        self.c.loop_start()
        time.sleep(0.3)

    def _on(self, _c, _u, msg) -> None:  # type: ignore[no-untyped-def]
        now = time.perf_counter()
        with self._lock:
            for k in self._key(msg):
                self.times.setdefault(k, now)

    def wait(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.times) < n and time.monotonic() < deadline:
            time.sleep(0.005)
        return len(self.times) >= n

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _publish(port: int, msgs: list[tuple[str, bytes, object]], rate: float | None) -> dict:  # type: ignore[type-arg]
    """Publish (topic, payload, key) at ``rate`` msg/s (None: as fast as possible)."""
    pub = _client(f"gen-{time.monotonic_ns()}")
    pub.connect("127.0.0.1", port)
    _no_delay(pub)
    pub.loop_start()
    sent: dict[object, float] = {}
    t0 = time.perf_counter()
    for i, (t, p, k) in enumerate(msgs):
        if rate:
            due = t0 + i / rate
            while (d := due - time.perf_counter()) > 0:
                time.sleep(min(d, 0.002))
        sent[k] = time.perf_counter()
        pub.publish(t, p, qos=1)
    return {"client": pub, "t0": t0, "sent": sent}


def _done(pub: dict) -> None:  # type: ignore[type-arg]
    pub["client"].loop_stop()
    pub["client"].disconnect()


def _raw(port: int, msgs: list, rate: float | None) -> tuple[float, list[float]]:  # type: ignore[type-arg]
    c = Counter(port, "rawbench/#", lambda m: [m.topic + "#" + m.payload[:12].decode()])
    raw = [
        (f"rawbench/{k[0]}", f"{k[1]:012d}".encode() + p[12:], f"rawbench/{k[0]}#{k[1]:012d}")
        for t, p, k in msgs
    ]
    pub = _publish(port, raw, rate)
    ok = c.wait(len(raw), 120)
    t_end = max(c.times.values())
    lat = [c.times[k] - pub["sent"][k] for k in pub["sent"] if k in c.times]
    _done(pub)
    c.close()
    assert ok, f"raw: {len(c.times)} of {len(raw)} arrived"
    return len(raw) / (t_end - pub["t0"]), lat


def _gateway(port: int, msgs: list, rate: float | None) -> tuple[float, list[float]]:  # type: ignore[type-arg]
    c = Counter(
        port,
        f"medge/v1/{SITE}/+/ack",
        lambda m: [(m.topic.split("/")[3], s) for s in decode_ack(m.payload)],
    )
    pub = _publish(port, msgs, rate)
    ok = c.wait(len(msgs), 90)
    keys = [k for _, _, k in msgs]
    t_end = max(c.times[k] for k in keys if k in c.times)
    lat = [c.times[k] - pub["sent"][k] for k in keys if k in c.times]
    _done(pub)
    c.close()
    assert ok, f"gateway: {len(c.times)} of {len(msgs)} acked"
    return len(msgs) / (t_end - pub["t0"]), lat


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _workers(
    site: Path,
    port: int,
    tmp: Path,
    n: int,
    tag: str,
    window: float | None = None,
    when_idle: bool = False,
    db_url: str | None = None,
) -> list[subprocess.Popen]:  # type: ignore[type-arg]
    db = db_url or tmp / f"gw-{tag}.sqlite"
    procs = []
    ports = [free_port() for _ in range(n)]
    for i in range(n):
        cmd = [
            sys.executable,
            "-m",
            "medge",
            "gateway",
            "run",
            "--site-dir",
            str(site),
            "--broker",
            f"127.0.0.1:{port}",
            "--db",
            str(db),
            "--client-id",
            f"gw-{tag}-{i}",
            "--log-level",
            "warning",
            "--device-rate",
            "0",
            "--metrics-port",
            str(ports[i]),
        ]
        if window is not None:  # else the gateway's default batching
            cmd += ["--batch-window", str(window)]
        if n > 1:
            cmd += ["--share-group", "g"]
        if when_idle:
            cmd += ["--batch-when-idle"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL))
    deadline = time.monotonic() + 120
    for p, port_ in zip(procs, ports, strict=True):  # the metrics endpoint starts once subscribed
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port_}/metrics", timeout=1).close()
                break
            except OSError:
                assert p.poll() is None and time.monotonic() < deadline, "a worker did not start"
                time.sleep(0.1)
    time.sleep(0.5)
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:  # type: ignore[type-arg]
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(10)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def _postgres_pids(folder: Path) -> list[int]:
    """The PostgreSQL server's processes: the postmaster and its children (backends, WAL
    writer, checkpointer...), for their CPU time."""
    pid = int((folder / "data" / "postmaster.pid").read_text().split()[0])
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return [pid, *kids]


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


RUNS = [  # name, workers, --batch-window (None: the gateway's default), --batch-when-idle
    ("fixed 5 ms window", 1, 0.005, True),
    ("group commit, 1 worker", 1, None, False),
    ("group commit, 2 workers", 2, None, False),
    ("group commit, 4 workers", 4, None, False),
]
TARGET_RATIO, TARGET_P50, TARGET_P99 = 0.8, 2.0, 20.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="messages per throughput run")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--rate", type=float, default=1000.0, help="offered rate of the latency run")
    ap.add_argument(
        "--low-rate", type=float, default=100.0, help="offered rate of the light-load latency run"
    )
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each latency run")
    ap.add_argument(
        "--store",
        choices=["sqlite", "postgresql", "both"],
        default="sqlite",
        help="where the gateways store: a SQLite file (WAL, synchronous=FULL), a throwaway "
        "PostgreSQL (durable settings, a fresh database per configuration), or both in turn",
    )
    ap.add_argument("--postgres", action="store_true", help="same as --store postgresql")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each configuration this many times (raw beside it each time); the "
        "table shows medians",
    )
    a = ap.parse_args()
    stores = ["sqlite", "postgresql"] if a.store == "both" else [a.store]
    if a.postgres:
        stores = ["postgresql"]
    stack = contextlib.ExitStack()
    pg = None
    if "postgresql" in stores:
        sys.path.insert(0, str(ROOT / "tests"))
        from pg import new_database, start_postgres

        pg = stack.enter_context(start_postgres(durable=True))
    tmp = Path(tempfile.mkdtemp(prefix="medge-bench-"))
    site = tmp / "site"
    init_site(site, SITE)
    sealers = []
    for d in range(a.devices):
        name = f"dev{d:02d}"
        idn = DeviceIdentity.load(provision_device(site, name, tmp / name), SITE, name)
        epochs = itertools.count(1)
        sealers.append(Sealer(SITE, name, idn.key, idn.recipient, lambda e=epochs: next(e)))
    seq = itertools.count(1)

    def batch(n: int) -> list:  # type: ignore[type-arg]
        out = []
        for i in range(n):
            s = sealers[i % len(sealers)]
            q = next(seq)
            env = Envelope("result", SITE, s.device, q, time.time(), BODY)
            out.append((topic(SITE, s.device, "result"), s.seal(env), (s.device, q)))
        return out

    broker = stack.enter_context(_broker())
    assert broker.pid is not None
    n_lat, n_low = int(a.rate * a.seconds), int(a.low_rate * a.seconds)
    # per (store, configuration): lists of one figure per repetition
    got: dict[tuple[str, str], dict[str, list[float]]] = {}
    sample = batch(1)[0][1]
    try:
        for store in stores:
            for i, (name, n, window, when_idle) in enumerate(RUNS):
                print(f"running: {store}, {name}", file=sys.stderr, flush=True)
                url = new_database(pg.url) if store == "postgresql" and pg is not None else None
                tag = f"{store}{i}"
                procs = _workers(site, broker.port, tmp, n, tag, window, when_idle, url)
                f = got.setdefault((store, name), {})
                try:
                    for _ in range(a.repeat):
                        _measure(a, f, broker, procs, batch, n_low, n_lat, pg, store)
                finally:
                    _stop(procs)
    finally:
        stack.close()
    _report(a, got, stores, len(sample))


@contextlib.contextmanager
def _broker():  # type: ignore[no-untyped-def]
    broker = start_broker("mosquitto")
    try:
        yield broker
    finally:
        broker.stop()


def _measure(a, f, broker, procs, batch, n_low, n_lat, pg, store) -> None:  # type: ignore[no-untyped-def]
    """One repetition of one configuration: each gateway figure next to a raw one taken
    just before it (the same rate, the same machine load)."""

    def add(key: str, value: float) -> None:
        f.setdefault(key, []).append(value)

    def cpu() -> tuple[float, float, float]:
        db = sum(_cpu(p) for p in _postgres_pids(pg.folder)) if store == "postgresql" else 0.0
        return sum(_cpu(p.pid) for p in procs), _cpu(broker.pid), db

    _, raw_low = _raw(broker.port, batch(n_low), a.low_rate)
    _, gw_low = _gateway(broker.port, batch(n_low), a.low_rate)
    _, raw_hi = _raw(broker.port, batch(n_lat), a.rate)
    before = cpu()
    _, gw_hi = _gateway(broker.port, batch(n_lat), a.rate)
    after = cpu()
    for key, b, e in zip(("cpu_gw", "cpu_broker", "cpu_db"), before, after, strict=True):
        add(key, (e - b) * 1000 / n_lat)
    raw_tp, _ = _raw(broker.port, batch(a.n), None)
    before = cpu()
    tp, _ = _gateway(broker.port, batch(a.n), None)
    after = cpu()
    add("cpu_gw_flat", (after[0] - before[0]) * 1000 / a.n)
    add("tp", tp)
    add("raw_tp", raw_tp)
    add("ratio", tp / raw_tp)
    for key, xs in (("low", gw_low), ("raw_low", raw_low), ("hi", gw_hi), ("raw_hi", raw_hi)):
        add(f"{key}_p50", _pct(xs, 0.5))
        add(f"{key}_p99", _pct(xs, 0.99))
    add("added_p50", _pct(gw_hi, 0.5) - _pct(raw_hi, 0.5))
    add("added_p99", _pct(gw_hi, 0.99) - _pct(raw_hi, 0.99))


def _report(a, got, stores, payload: int) -> None:  # type: ignore[no-untyped-def]
    cores = os.cpu_count()
    lo, hi = f"{a.low_rate:.0f}/s", f"{a.rate:.0f}/s"
    print(
        f"payload {payload} B sealed result, QoS 1, {a.devices} devices, {a.n} msgs per "
        f"throughput run, {a.seconds:g} s per latency run, {a.repeat} repetition(s) (medians "
        f"shown), {cores} cores (generator, Mosquitto, PostgreSQL and gateways share them)"
    )
    print(
        "raw: paho publish -> Mosquitto -> paho subscriber; gateway: publish -> stored -> ack "
        "received (one more hop). Each gateway figure is next to a raw one measured just "
        "before it: 'of raw' = its throughput / raw's, 'added' = its latency - raw's."
    )
    for store in stores:
        title = (
            "PostgreSQL (durable: fsync on, synchronous_commit on)"
            if store == "postgresql"
            else "SQLite (WAL, synchronous=FULL)"
        )
        print(f"\nstore: {title}")
        print(
            f"{'':22s} {'msg/s':>6s} {'raw/s':>6s} {'of raw':>6s}  {lo + ' p50':>9s} {'p99':>6s}"
            f"  {hi + ' p50':>10s} {'p99':>6s} {'added':>6s} {'p99':>6s}"
            f"  {'CPU s/1k at ' + hi + ': gw':>22s} {'broker':>6s} {'db':>5s}  {'flat gw':>7s}"
        )
        for name, *_ in RUNS:
            m = {k: _median(v) for k, v in got[(store, name)].items()}
            print(
                f"{name:22s} {m['tp']:6.0f} {m['raw_tp']:6.0f} {m['ratio']:6.2f}"
                f"  {m['low_p50']:9.2f} {m['low_p99']:6.2f}"
                f"  {m['hi_p50']:10.2f} {m['hi_p99']:6.2f} {m['added_p50']:6.2f} "
                f"{m['added_p99']:6.2f}  {m['cpu_gw']:22.3f} {m['cpu_broker']:6.3f} "
                f"{m['cpu_db']:5.3f}  {m['cpu_gw_flat']:7.3f}"
            )
        raw_lat = {k: _median(got[(store, RUNS[1][0])][k]) for k in ("raw_hi_p50", "raw_hi_p99")}
        print(
            f"raw latency at {hi} beside '{RUNS[1][0]}': p50 {raw_lat['raw_hi_p50']:.2f}"
            f" ms, p99 {raw_lat['raw_hi_p99']:.2f} ms"
        )
        one = _median(got[(store, RUNS[1][0])]["tp"])
        print(
            "workers on one shared subscription: 2 = "
            f"{_median(got[(store, RUNS[2][0])]['tp']) / one:.2f}x 1 worker, 4 = "
            f"{_median(got[(store, RUNS[3][0])]['tp']) / one:.2f}x 1 worker"
        )
        print(
            f"targets (>= {TARGET_RATIO}x raw, added p50 <= {TARGET_P50:g} ms and p99 <= "
            f"{TARGET_P99:g} ms at {hi}):"
        )
        for name, *_ in RUNS:
            m = {k: _median(v) for k, v in got[(store, name)].items()}
            checks = [
                ("throughput", m["ratio"] >= TARGET_RATIO),
                ("p50", m["added_p50"] <= TARGET_P50),
                ("p99", m["added_p99"] <= TARGET_P99),
            ]
            missed = [c for c, ok in checks if not ok]
            print(f"  {name:22s} " + ("all met" if not missed else "NOT met: " + ", ".join(missed)))
            if name != RUNS[0][0]:  # the fixed window is the comparison, not a configuration
                where = f"{store}, {name}"
                figure(
                    f"{where}: throughput of raw",
                    round(m["ratio"], 3),
                    "x",
                    target=TARGET_RATIO,
                    better="higher",
                )
                figure(
                    f"{where}: added p50 at {hi}",
                    round(m["added_p50"], 2),
                    "ms",
                    target=TARGET_P50,
                    better="lower",
                )
                figure(
                    f"{where}: added p99 at {hi}",
                    round(m["added_p99"], 2),
                    "ms",
                    target=TARGET_P99,
                    better="lower",
                )
                figure(f"{where}: CPU s per 1,000 at {hi} (gateway)", round(m["cpu_gw"], 3), "s")
    print(
        "\nThe load generator, Mosquitto, PostgreSQL and the gateway(s) share the same "
        f"{cores} cores (and, here, the machine with other work), so a second or fourth "
        "worker competes with them for CPU rather than adding a free core; every commit "
        "waits for a WAL flush or an fsync. Compare ratios within one run; repeat runs."
    )


if __name__ == "__main__":
    main()
