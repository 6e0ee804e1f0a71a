"""Gateway throughput and latency next to the raw broker, in one run.

    .venv/bin/python bench/gateway_throughput.py [--n 4000] [--devices 4] [--rate 1000]

1. raw: paho publisher -> Mosquitto -> paho subscriber that only counts (QoS 1, payloads the
   size of a sealed result);
2. gateway: results sealed by real Sealers (sealed before the clock starts, so the generator
   is not the bottleneck), published to Mosquitto; `medge gateway run` (its own process) opens,
   stores (SQLite WAL, synchronous=FULL) and acks; the clock stops at the last ack;
3. latency at two offered rates (--rate, --low-rate): publish -> subscriber (raw) vs
   publish -> ack (gateway), with three ways to batch store commits: the old fixed 5 ms window
   (--batch-when-idle), pure group commit (--batch-window 0: commit at once, whatever queued
   during a commit goes into the next) and adaptive (the default: at once when idle, a 5 ms
   window only when more results are already waiting);
4. the gateway with 1, 2 and 4 workers on an MQTT 5 shared subscription ($share/g/...), with
   the CPU seconds each process used per 1,000 messages, to name the bottleneck.

Flood limiting is turned off (--device-rate 0): the generator is a flood by design. Each
configuration's throughput is a ratio to a raw run made just before it (so a load spike during
one raw run does not skew every ratio). ``--postgres``: the gateways store in a throwaway
PostgreSQL server (tests/pg.py; durable settings, a fresh database per configuration).
"""

from __future__ import annotations

import argparse
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
    window: float = 0.005,
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
            "--batch-window",
            str(window),
            "--metrics-port",
            str(ports[i]),
        ]
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
        "--postgres",
        action="store_true",
        help="store in a throwaway PostgreSQL (durable settings, a fresh database per run) "
        "instead of SQLite",
    )
    a = ap.parse_args()
    pg = None
    if a.postgres:
        import contextlib

        sys.path.insert(0, str(ROOT / "tests"))
        from pg import new_database, start_postgres

        stack = contextlib.ExitStack()
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

    broker = start_broker("mosquitto")
    assert broker.pid is not None
    n_lat, n_low = int(a.rate * a.seconds), int(a.low_rate * a.seconds)
    lat: dict[str, list[float]] = {}
    low: dict[str, list[float]] = {}
    tp: dict[str, float] = {}
    cpu: dict[str, tuple[float, float]] = {}  # gateway, broker CPU s per 1,000 messages
    fixed, group, adaptive = "fixed 5 ms window", "group commit (0 ms)", "adaptive, 1 worker"
    runs = [
        (fixed, 1, 0.005, True),
        (group, 1, 0.0, False),
        (adaptive, 1, 0.005, False),
        ("adaptive, 2 workers", 2, 0.005, False),
        ("adaptive, 4 workers", 4, 0.005, False),
    ]
    try:
        sample = batch(1)[0][1]
        tp["raw"], _ = _raw(broker.port, batch(a.n), None)
        raw_beside: dict[str, float] = {}  # raw measured again just before each configuration
        _, low["raw"] = _raw(broker.port, batch(n_low), a.low_rate)
        _, lat["raw"] = _raw(broker.port, batch(n_lat), a.rate)
        for i, (name, n, window, when_idle) in enumerate(runs):
            print(f"running: {name}", file=sys.stderr, flush=True)
            url = new_database(pg.url) if pg is not None else None
            procs = _workers(site, broker.port, tmp, n, f"run{i}", window, when_idle, url)
            try:
                _, low[name] = _gateway(broker.port, batch(n_low), a.low_rate)
                _, lat[name] = _gateway(broker.port, batch(n_lat), a.rate)
                raw_beside[name], _ = _raw(broker.port, batch(a.n), None)
                before = sum(_cpu(p.pid) for p in procs), _cpu(broker.pid)
                tp[name], _ = _gateway(broker.port, batch(a.n), None)
                after = sum(_cpu(p.pid) for p in procs), _cpu(broker.pid)
                cpu[name] = (
                    (after[0] - before[0]) * 1000 / a.n,
                    (after[1] - before[1]) * 1000 / a.n,
                )
            finally:
                _stop(procs)
    finally:
        broker.stop()
        if pg is not None:
            stack.close()
    cores = os.cpu_count()
    store = "PostgreSQL (durable: fsync, synchronous_commit on)" if pg else "SQLite (WAL, FULL)"
    lo, hi = f"{a.low_rate:.0f}/s", f"{a.rate:.0f}/s"
    print(
        f"payload {len(sample)} B sealed result, QoS 1, {a.devices} devices, {a.n} msgs/run,"
        f" {cores} cores (generator, Mosquitto and gateway share them); store: {store}"
    )
    print(
        f"{'':26s} {'msg/s':>7s} {'of raw':>6s}  {lo + ' p50':>10s} {'p99':>7s}"
        f"  {hi + ' p50':>11s} {'p99':>7s}  {'gw CPU s/1k':>11s} {'broker':>6s}"
    )

    def row(name: str) -> str:
        c = f"{cpu[name][0]:11.3f} {cpu[name][1]:6.3f}" if name in cpu else ""
        beside = raw_beside.get(name, tp["raw"])  # the raw run just before this one
        return (
            f"{name:26s} {tp[name]:7.0f} {tp[name] / beside:6.2f}"
            f"  {_pct(low[name], 0.5):10.2f} {_pct(low[name], 0.99):7.2f}"
            f"  {_pct(lat[name], 0.5):11.2f} {_pct(lat[name], 0.99):7.2f}  {c}"
        )

    print(row("raw") + "  (raw: publish->subscriber; gateway: publish->ack, one more hop)")
    print(
        f"{'':26s} (each 'of raw' is against a raw run just before it: "
        + ", ".join(f"{v:.0f}" for v in raw_beside.values())
        + " msg/s)"
    )
    for name, _, _, _ in runs:
        print(row(name))
    for name in (group, adaptive):
        print(
            f"{name} vs fixed window: p50 at {lo} "
            f"{_pct(low[name], 0.5) / _pct(low[fixed], 0.5):.2f}x, at {hi} "
            f"{_pct(lat[name], 0.5) / _pct(lat[fixed], 0.5):.2f}x; p99 at {hi} "
            f"{_pct(lat[name], 0.99) / _pct(lat[fixed], 0.99):.2f}x; "
            f"throughput {tp[name] / tp[fixed]:.2f}x"
        )
    print(
        f"workers: 2 = {tp['adaptive, 2 workers'] / tp[adaptive]:.2f}x 1 worker, "
        f"4 = {tp['adaptive, 4 workers'] / tp[adaptive]:.2f}x 1 worker"
    )
    busy = cpu[adaptive][0] * tp[adaptive] / 1000  # CPU s per second of one worker, flat out
    print(
        f"one worker at full speed uses {busy:.2f} CPU cores of {cores} (1.0: its GIL-bound "
        "Python is the bottleneck; the rest of the machine runs the broker and generator)"
    )
    print(
        "What this means: the load generator, Mosquitto and the gateway(s) share the same "
        f"{cores} cores, so a second or fourth worker competes with the broker and the "
        "generator for CPU rather than adding a free core, and every commit waits for "
        + (
            "PostgreSQL's WAL flush (a server on the same 2 cores)"
            if pg
            else "the SQLite file's write lock and an fsync"
        )
        + ". A fog node with its own cores for the gateway does better; the ratio to raw is "
        "the portable figure."
    )


if __name__ == "__main__":
    main()
