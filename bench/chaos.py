"""Fault campaign: several devices stream sequence-numbered results (every 10th message an
event) at a fixed rate through real Mosquitto, a real gateway and real outboxes while one
fault at a time strikes, then everything is counted.

    .venv/bin/python bench/chaos.py [--quick] [--devices 3] [--rate 25] [--seed 1]
                                    [--only link-cut,gateway-kill,...]

Faults (``--cut`` and ``--down`` seconds; ``--quick``: 3 s and 1 s, else 30 s and 5 s):
  link-cut        a TCP proxy between devices and broker blackholes everything for --cut s
                  (sockets open, nothing through), then drops every connection
  broker-kill     kill -9 of Mosquitto, a new one on the same port --down s later
  gateway-kill    kill -9 of `medge gateway run`, restarted on the same database --down s later
  agent-kill      `medge agent run` (events on): its link dead for --down s, then kill -9 as it
                  writes, while the other devices stream; restarted on the same outbox
  outbox-quota    the link dead for --cut s with an outbox quota of half of what the devices
                  make meanwhile: routine results are dropped and counted, never an event
  pg-restart      PostgreSQL (the gateway's store) stopped as in a crash for --down s
  forwarder-kill  the fog gateway forwarding to a cloud: its acks from the cloud lost, then
                  nothing through, then kill -9 mid-batch; restarted --down s later

Per fault: produced (durable in an outbox), stored, stored twice, lost (missing from the store
and not explained by a drop counter), drops by counter (the devices' outboxes; what a gateway
rejected), miscounted (counted as dropped before it could reach the gateway, yet stored), the
gateway's duplicates (resends it acknowledged again), the time to recover (from the end of
the fault until everything made by then is stored; outbox-quota: until the outboxes hold
nothing made before) and whether the events held through the fault and delivered after it
were stored ahead of the routine results. One verdict line per fault: FAIL when a fault lost
or duplicated a result or a counter does not explain the store (a drop the counters explain
is no loss); exit status 1 after a FAIL, 2 when a fault could not run, else 0. The moment
each fault strikes is jittered by a random generator seeded with --seed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402  (the helpers of tests/ fail a wait with pytest.fail)
from fleet import (  # noqa: E402
    SITE,
    Fleet,
    agent_config,
    event_bundle,
    events_first,
    sqlite_rows,
    start_fog,
    stored_keys,
)
from medge_process import medge_cmd, start_medge  # noqa: E402
from tcp_proxy import TcpProxy  # noqa: E402
from waiting import wait_for  # noqa: E402

from edge_agent.envelope import Sealer  # noqa: E402
from edge_agent.identity import DeviceIdentity  # noqa: E402
from gateway import Gateway, Store  # noqa: E402
from gateway.broker import start_broker  # noqa: E402
from gateway.site import init_site, opener_for, provision_device  # noqa: E402

Failed = pytest.fail.Exception


@dataclass
class Outcome:
    fault: str
    produced: int = 0
    stored: int = 0
    twice: int = 0
    lost: int = 0  # missing from the store and not explained by a drop counter
    miscounted: int = 0  # counted as dropped before it reached the gateway, yet stored
    drops: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0  # resends the gateway acknowledged again without storing them
    recover_s: float | None = None
    events_first: str = "n/a"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.lost == self.twice == self.miscounted == 0

    def line(self) -> str:
        if self.error is not None:
            return f"NOT RUN {self.fault}: {self.error}"
        verdict = "PASS" if self.ok else "FAIL"
        recover = "-" if self.recover_s is None else f"{self.recover_s:.1f} s"
        drops = ",".join(f"{k}={v}" for k, v in sorted(self.drops.items())) or "none"
        return (
            f"{verdict} {self.fault:<15} produced {self.produced:5d}  stored {self.stored:5d}  "
            f"twice {self.twice}  lost {self.lost}  drops {drops}  miscounted {self.miscounted}  "
            f"duplicates acked "
            f"{self.duplicates}  recover {recover}  events first: {self.events_first}"
        )


@dataclass
class Env:
    site: Path
    tmp: Path
    devices: tuple[str, ...]
    rate: float
    cut: float
    down: float
    rng: random.Random
    identities: dict[str, Path] = field(default_factory=dict)

    def identity(self, device: str) -> Path:
        if device not in self.identities:
            self.identities[device] = provision_device(self.site, device, self.tmp / "id" / device)
        return self.identities[device]

    def sealer(self, device: str) -> Sealer:
        ident = DeviceIdentity.load(self.identity(device), SITE, device)
        epochs = itertools.count(1)
        return Sealer(SITE, device, ident.key, ident.recipient, lambda: next(epochs))

    def opener(self) -> Any:
        return opener_for(self.site)

    def warm(self) -> None:
        """Stream a while before the fault strikes: 1 to 2 s, the moment drawn at random."""
        time.sleep(1.0 + self.rng.random())

    def folder(self, fault: str) -> Path:
        d = self.tmp / fault
        d.mkdir()
        return d


# -- counting ---------------------------------------------------------------------------------


def _count(out: Outcome, store: Store, made: dict[str, list[tuple[int, str]]]) -> None:
    """produced, stored, twice and the lost ones (before any drop explains them) of ``made``."""
    for d, msgs in made.items():
        rows = store.query(
            "SELECT seq FROM results WHERE site = ? AND device = ?", (SITE, d)
        )  # fmt: skip
        seqs = [r["seq"] for r in rows]
        want = {s for s, _ in msgs}
        out.produced += len(want)
        out.stored += len(seqs)
        out.twice += len(seqs) - len(set(seqs))
        out.lost += len(want - set(seqs))


def _events(rows: dict[str, list[dict[str, Any]]], held: dict[str, set[int]], after: float) -> str:
    """Whether, of the messages ``held`` through the fault and stored once it was over (at or
    after ``after``, wall clock), the events were stored ahead of the routine results."""
    late = {
        d: {r["seq"] for r in rows[d] if r["seq"] in held[d] and r["received"] >= after}
        for d in held
    }
    try:
        events_first(rows, late)
    except AssertionError as exc:
        return f"NO ({str(exc).splitlines()[0]})"
    return "yes"


def _rows(store: Store, devices: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    return {
        d: store.query(
            "SELECT seq, kind, received FROM results WHERE site = ? AND device = ? ORDER BY seq",
            (SITE, d),
        )
        for d in devices
    }


def _recover(target: set[tuple[str, int]], stored: Callable[[], set[tuple[str, int]]]) -> float:
    """Seconds until everything in ``target`` is stored (the fault ended when called)."""
    t0 = time.monotonic()
    wait_for(lambda: target <= stored(), 180, lambda: f"{len(target - stored())} to be stored")
    return time.monotonic() - t0


def _tally(out: Outcome, store: Store, fleet: Fleet, gateway: dict[str, int]) -> None:
    """What a fault ends with: :func:`_count` of what the devices made, their drops and what
    the gateway(s) rejected, and the gateway's duplicates (its counters: ``rejected``,
    ``duplicates``)."""
    _count(out, store, fleet.made)
    out.drops = _drops(fleet, gateway["rejected"])
    out.duplicates = gateway["duplicates"]


def _drops(fleet: Fleet, rejected: int) -> dict[str, int]:
    """The devices' drop counters by reason, and what the gateway(s) rejected (which the
    devices resend: a rejection loses nothing, but no fault here should cause one)."""
    out = fleet.drops()
    if rejected:
        out["gateway-rejected"] = rejected
    return out


def _made_keys(fleet: Fleet) -> set[tuple[str, int]]:
    return {(d, s) for d, msgs in fleet.made.items() for s, _ in list(msgs)}


def _settle(fleet: Fleet) -> None:
    """Stream a little after the fault, stop, and wait for every device to be acknowledged."""
    time.sleep(0.5)
    fleet.stop_streams()
    wait_for(lambda: fleet.depth() == 0, 180, lambda: f"{fleet.depth()} unacknowledged")


@contextlib.contextmanager
def _process(proc: subprocess.Popen[str]) -> Iterator[None]:
    """SIGINT at the end (SIGKILL if it does not end)."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# -- the faults -------------------------------------------------------------------------------


def link_cut(env: Env, out: Outcome) -> None:
    tmp = env.folder(out.fault)
    with (
        start_broker("mosquitto") as broker,
        Store(tmp / "gw.sqlite") as store,
        Gateway(store, env.opener(), broker.host, broker.port) as gw,
        TcpProxy((broker.host, broker.port)) as proxy,
        Fleet(tmp, env.sealer, "127.0.0.1", proxy.port, env.devices, env.rate, keepalive=1,
              resend_after=2.0) as fleet,
    ):  # fmt: skip
        fleet.stream()
        env.warm()
        mark = fleet.mark()
        proxy.blackhole()
        time.sleep(env.cut)
        proxy.cut()
        proxy.restore()
        ended = time.time()
        held = fleet.since(mark)
        out.recover_s = _recover(_made_keys(fleet), lambda: stored_keys(store))
        _settle(fleet)
        wait_for(lambda: store.result_count() == fleet.total(), 60, "every message stored")
        _tally(out, store, fleet, gw.metrics.totals())
        out.events_first = _events(_rows(store, env.devices), held, ended)


def broker_kill(env: Env, out: Outcome) -> None:
    tmp = env.folder(out.fault)
    with (
        start_broker("mosquitto") as broker,
        Store(tmp / "gw.sqlite") as store,
        Gateway(store, env.opener(), broker.host, broker.port) as gw,
        Fleet(tmp, env.sealer, broker.host, broker.port, env.devices, env.rate) as fleet,
    ):
        fleet.stream()
        env.warm()
        broker.kill()
        mark = fleet.mark()
        time.sleep(env.down)
        with start_broker("mosquitto", broker.host, broker.port):
            ended = time.time()
            held = fleet.since(mark)
            out.recover_s = _recover(_made_keys(fleet), lambda: stored_keys(store))
            _settle(fleet)
            wait_for(lambda: store.result_count() == fleet.total(), 60, "every message stored")
        _tally(out, store, fleet, gw.metrics.totals())
        out.events_first = _events(_rows(store, env.devices), held, ended)


def gateway_kill(env: Env, out: Outcome) -> None:
    tmp = env.folder(out.fault)
    db = tmp / "fog.sqlite"
    Store(db).close()  # the schema, before this process reads it
    with (
        start_broker("mosquitto") as broker,
        Store(db) as store,
        Fleet(tmp, env.sealer, broker.host, broker.port, env.devices, env.rate,
              resend_after=1.0) as fleet,
    ):  # fmt: skip
        fog = start_fog(env.site, broker, db)
        with _process(fog):
            fleet.stream()
            wait_for(lambda: store.result_count() > 0, 60, "the gateway to store")
            env.warm()
            fog.send_signal(signal.SIGKILL)
            fog.wait(10)
            mark = fleet.mark()
            time.sleep(env.down)
            held = fleet.since(mark)
            ended = time.time()
            fog = start_fog(env.site, broker, db)
            with _process(fog):
                out.recover_s = _recover(_made_keys(fleet), lambda: stored_keys(store))
                _settle(fleet)
        devices = store.devices()
        _tally(
            out, store, fleet, {k: sum(d[k] for d in devices) for k in ("rejected", "duplicates")}
        )
        out.events_first = _events(_rows(store, env.devices), held, ended)


def agent_kill(env: Env, out: Outcome) -> None:
    from medge.zoo import breast_cnn_bundle

    tmp = env.folder(out.fault)
    device, others = env.devices[0], env.devices[1:]
    box = tmp / "agent.outbox.sqlite"
    bundle = event_bundle(breast_cnn_bundle().directory, env.site, tmp / "bundle")
    config = tmp / "agent.yaml"
    with (
        start_broker("mosquitto") as broker,
        Store(tmp / "gw.sqlite") as store,
        Gateway(store, env.opener(), broker.host, broker.port) as gw,
        TcpProxy((broker.host, broker.port)) as proxy,
        Fleet(tmp, env.sealer, broker.host, broker.port, others, env.rate) as fleet,
    ):
        agent_config(config, device, bundle, env.identity(device), proxy.port, box, env.rate)
        fleet.stream()
        with (tmp / "agent.log").open("a") as log:
            agent = start_medge(
                "agent", "run", "--config", str(config), "--log-level", "warning",
                stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT,
            )  # fmt: skip
        with _process(agent):
            wait_for(lambda: store.result_count(SITE, device) > 0, 90, "the agent's results")
            env.warm()
            proxy.blackhole()
            time.sleep(env.down)  # a backlog builds on its disk
            agent.send_signal(signal.SIGKILL)  # it commits every 50 ms at most: mid-write
            agent.wait(10)
        before = {s for _, s in stored_keys(store, device)}
        pending = {s for (s,) in sqlite_rows(box, "SELECT seq FROM outbox")}
        made = before | pending
        proxy.cut()
        proxy.restore()
        config.write_text(config.read_text().replace("loop: true", "limit: 1"))
        ended = time.time()
        again = subprocess.Popen(
            [*medge_cmd("agent", "run", "--config", str(config)), "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        with _process(again):
            want = {(device, s) for s in made} | _made_keys(fleet)
            out.recover_s = _recover(want, lambda: stored_keys(store))
            _, err = again.communicate(timeout=120)
        if again.returncode != 0:
            raise RuntimeError(f"the restarted agent exited {again.returncode}: {err[-500:]}")
        _settle(fleet)
        _count(out, store, fleet.made)
        rows = _rows(store, (device,))[device]
        seqs = [r["seq"] for r in rows]
        new = set(seqs) - made
        out.produced += len(made) + len(new)
        out.stored += len(seqs)
        out.twice += len(seqs) - len(set(seqs))
        out.lost += len(made - set(seqs))
        out.drops = _drops(fleet, gw.metrics.totals()["rejected"])
        out.duplicates = gw.metrics.totals()["duplicates"]
        out.events_first = _events({device: rows}, {device: pending - before}, ended)


def outbox_quota(env: Env, out: Outcome) -> None:
    tmp = env.folder(out.fault)
    quota = max(20, int(env.rate * env.cut / 2))
    with (
        start_broker("mosquitto") as broker,
        Store(tmp / "gw.sqlite") as store,
        Gateway(store, env.opener(), broker.host, broker.port) as gw,
        TcpProxy((broker.host, broker.port)) as proxy,
        Fleet(tmp, env.sealer, "127.0.0.1", proxy.port, env.devices, env.rate,
              box={"max_messages": quota}, keepalive=1, resend_after=2.0) as fleet,
    ):  # fmt: skip
        fleet.stream()
        env.warm()
        proxy.blackhole()
        time.sleep(env.cut)
        proxy.cut()
        proxy.restore()
        t0 = time.monotonic()
        last = {d: max(s for s, _ in fleet.made[d]) for d in env.devices}

        def held_back() -> int:  # messages made before the end of the fault still unacked
            return sum(
                sqlite_rows(b.path, "SELECT count(*) FROM outbox WHERE seq <= ?", (last[d],))[0][0]
                for d, b in fleet.boxes.items()
            )

        wait_for(lambda: held_back() == 0, 180, lambda: f"{held_back()} held back")
        out.recover_s = time.monotonic() - t0
        _settle(fleet)
        _tally(out, store, fleet, gw.metrics.totals())
        stored = stored_keys(store)
        out.lost = 0
        for d, b in fleet.boxes.items():  # what the counters must explain, device by device
            lacking = sum((d, s) not in stored for s, _ in fleet.made[d])
            events = {(d, s) for s, k in fleet.made[d] if k == "event"}
            counted = b.drops.get("quota", 0) + b.drops.get("refused", 0)  # surely not stored
            maybe = b.drops.get("quota_sent", 0)  # sent before the drop: stored, or not
            out.lost += max(0, lacking - counted - maybe) + len(events - stored)
            out.miscounted += max(0, counted - lacking)
        out.events_first = "n/a (the quota keeps events)"


def pg_restart(env: Env, out: Outcome) -> None:
    from pg import PostgresMissing, new_database, require_postgres, restart, start_postgres

    try:
        require_postgres()
    except PostgresMissing as exc:
        raise RuntimeError(str(exc)) from exc
    tmp = env.folder(out.fault)
    with (
        start_postgres(durable=True) as server,
        start_broker("mosquitto") as broker,
        Store(new_database(server.url)) as store,
        Gateway(store, env.opener(), broker.host, broker.port) as gw,
        Fleet(tmp, env.sealer, broker.host, broker.port, env.devices, env.rate,
              resend_after=1.0) as fleet,
    ):  # fmt: skip
        fleet.stream()
        env.warm()
        mark = fleet.mark()
        restart(server, down_s=env.down)
        ended = time.time()
        held = fleet.since(mark)
        out.recover_s = _recover(_made_keys(fleet), lambda: stored_keys(store))
        _settle(fleet)
        _tally(out, store, fleet, gw.metrics.totals())
        out.events_first = _events(_rows(store, env.devices), held, ended)


def forwarder_kill(env: Env, out: Outcome) -> None:
    tmp = env.folder(out.fault)
    db, forward_db = tmp / "fog.sqlite", tmp / "fog.forward.sqlite"
    Store(db).close()
    with (
        start_broker("mosquitto") as broker,
        start_broker("mosquitto") as cloud_broker,
        Store(tmp / "cloud.sqlite") as cloud_store,
        Gateway(cloud_store, env.opener(), cloud_broker.host, cloud_broker.port,
                client_id="cloud") as cloud,
        TcpProxy((cloud_broker.host, cloud_broker.port)) as proxy,
        Fleet(tmp, env.sealer, broker.host, broker.port, env.devices, env.rate,
              resend_after=1.0) as fleet,
    ):  # fmt: skip
        fog_args = ("--forward-to", f"127.0.0.1:{proxy.port}", "--forward-resend-after", "5")
        fog = start_fog(env.site, broker, db, *fog_args)
        with _process(fog):
            fleet.stream()
            wait_for(lambda: cloud_store.result_count() > 0, 60, "forwarding")
            env.warm()
            proxy.blackhole(down_only=True)  # the cloud stores, no ack comes back

            def unacked_in_cloud() -> int:
                sent = sqlite_rows(forward_db, "SELECT device, seq FROM forward WHERE attempts > 0")
                return len(set(sent) & stored_keys(cloud_store))

            wait_for(lambda: unacked_in_cloud() >= 10, 60, "the cloud to store unacked ones")
            proxy.blackhole()
            time.sleep(env.down / 2)
            fog.send_signal(signal.SIGKILL)  # mid-batch
            fog.wait(10)
            backlog = set(sqlite_rows(forward_db, "SELECT device, seq FROM forward"))
            proxy.cut()
            proxy.restore()
            time.sleep(env.down / 2)
            restarted = time.time()
            fog = start_fog(env.site, broker, db, *fog_args)
            with _process(fog):
                out.recover_s = _recover(_made_keys(fleet), lambda: stored_keys(cloud_store))
                _settle(fleet)
                wait_for(
                    lambda: cloud_store.result_count() >= fleet.total(), 60, "the cloud to have all"
                )
        _count(out, cloud_store, fleet.made)
        with Store(db) as fog_store:
            fog_out = Outcome("fog")
            _count(fog_out, fog_store, fleet.made)
            out.lost += fog_out.lost
            out.twice += fog_out.twice
        with Store(db) as fog_store:
            fog_rejected = sum(d["rejected"] for d in fog_store.devices())
        out.drops = _drops(fleet, cloud.stats.rejected + fog_rejected)
        out.duplicates = cloud.stats.duplicates
        queued = {d: {s for dd, s in backlog if dd == d} for d in env.devices}
        out.events_first = _events(_rows(cloud_store, env.devices), queued, restarted)


FAULTS: dict[str, Callable[[Env, Outcome], None]] = {
    "link-cut": link_cut,
    "broker-kill": broker_kill,
    "gateway-kill": gateway_kill,
    "agent-kill": agent_kill,
    "outbox-quota": outbox_quota,
    "pg-restart": pg_restart,
    "forwarder-kill": forwarder_kill,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short faults: --cut 3 --down 1")
    ap.add_argument("--devices", type=int, default=3, help="devices streaming (at least 2)")
    ap.add_argument("--rate", type=float, default=25.0, help="messages per second per device")
    ap.add_argument("--cut", type=float, default=None, help="seconds the link is dead (30)")
    ap.add_argument("--down", type=float, default=None, help="seconds a killed part is down (5)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the moments faults strike")
    ap.add_argument("--only", default=",".join(FAULTS), help="comma-separated faults to run")
    ap.add_argument(
        "--log-level",
        default="critical",
        choices=["debug", "info", "warning", "error", "critical"],
        help="the parts' log lines on stderr (the faults make them warn: critical by default)",
    )
    a = ap.parse_args()
    logging.basicConfig(level=a.log_level.upper(), format="%(name)s %(levelname)s %(message)s")
    only = [f.strip() for f in a.only.split(",") if f.strip()]
    unknown = [f for f in only if f not in FAULTS]
    if unknown or a.devices < 2:
        ap.error(f"unknown fault(s) {unknown}; choose from {', '.join(FAULTS)}" if unknown
                 else "--devices: at least 2")  # fmt: skip
    cut = a.cut if a.cut is not None else (3.0 if a.quick else 30.0)
    down = a.down if a.down is not None else (1.0 if a.quick else 5.0)
    tmp = Path(tempfile.mkdtemp(prefix="medge-chaos-"))
    try:
        site = tmp / SITE
        init_site(site, SITE)
        devices = tuple(f"ch-{i:02d}" for i in range(1, a.devices + 1))
        env = Env(site, tmp, devices, a.rate, cut, down, random.Random(a.seed))
        print(
            f"chaos: {len(devices)} devices at {a.rate:g} messages/s each (every 10th an "
            f"event), link cut {cut:g} s, kills down {down:g} s, seed {a.seed}",
            flush=True,
        )
        outcomes = []
        for name in only:
            out = Outcome(name)
            t0 = time.monotonic()
            try:
                FAULTS[name](env, out)
            except (Exception, Failed) as exc:
                out.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(out.line() + f"  ({time.monotonic() - t0:.0f} s)", flush=True)
            outcomes.append(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if any(o.error is None and not o.ok for o in outcomes):
        return 1
    return 2 if any(o.error is not None for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
