"""Several devices streaming sequence-numbered results at a fixed rate, for the fault tests
(tests/test_chaos_link.py, tests/test_chaos_kills.py) and the fault campaign (bench/chaos.py):
:class:`Fleet` (outboxes, links, streams), :func:`each_once` and :func:`events_first` (what
the store must hold after a fault), :func:`start_fog` (a fog gateway as its own process, for
a kill -9) and :func:`event_bundle` / :func:`agent_config` (a real agent that sends events)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medge_process import start_medge

from edge_agent.bundle import MANIFEST_NAME, sign_bundle
from edge_agent.keys import load_signer_key
from edge_agent.link import DeviceLink
from edge_agent.outbox import Outbox
from gateway import Store
from gateway.broker import RunningBroker

__all__ = [
    "DEVICES",
    "EVENT_EVERY",
    "RATE_HZ",
    "RESUBSCRIBE_RACE_S",
    "SITE",
    "Fleet",
    "agent_config",
    "each_once",
    "each_once_events_first",
    "event_bundle",
    "events_first",
    "produce",
    "sqlite_rows",
    "start_fog",
    "stored_keys",
]

SITE = "ward-a"
DEVICES = ("cx-01", "cx-02")
RATE_HZ = 25.0  # results per second per device
EVENT_EVERY = 10  # one event among every 10 messages
ROOT = Path(__file__).resolve().parents[1]

Made = dict[str, list[tuple[int, str]]]  # per device: (seq, kind) of each durable message


class Fleet:
    """``devices``, each an outbox (``box`` keywords, e.g. a quota) and a link to
    ``host:port`` (reconnecting within 0.5 s; ``link`` keywords), all connected on entry;
    :meth:`stream` starts each device's stream (:func:`produce`, noted in ``made``),
    :meth:`stop_streams` ends them; on exit streams stop, links and outboxes close."""

    def __init__(
        self,
        tmp: Path,
        sealer: Any,
        host: str,
        port: int,
        devices: Sequence[str] = DEVICES,
        rate_hz: float = RATE_HZ,
        box: dict[str, Any] | None = None,
        **link: Any,
    ) -> None:
        self.devices = tuple(devices)
        self.rate_hz = rate_hz
        self.made: Made = {d: [] for d in self.devices}
        self.boxes = {d: Outbox(tmp / f"{d}.sqlite", SITE, d, **(box or {})) for d in devices}
        for d, b in self.boxes.items():
            b.sealer = sealer(d)
        self.links = {
            d: DeviceLink(b, host, port, reconnect_min_s=0.2, reconnect_max_s=0.5, **link)
            for d, b in self.boxes.items()
        }
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Fleet:
        try:
            for link in self.links.values():
                link.__enter__()
            for link in self.links.values():
                assert link.wait_connected(10)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_streams()
        for link in self.links.values():
            link.close()
        for b in self.boxes.values():
            b.close()

    def stream(self) -> None:
        self._stop.clear()
        self._threads = [
            threading.Thread(
                target=produce,
                args=(self.boxes[d], self.links[d], self.made[d], self._stop, self.rate_hz),
                name=f"stream-{d}",
            )
            for d in self.devices
        ]
        for t in self._threads:
            t.start()

    def stop_streams(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self._threads = []

    def mark(self) -> dict[str, int]:
        """How many messages each device has made so far (to slice ``made`` later)."""
        return {d: len(self.made[d]) for d in self.devices}

    def since(self, mark: dict[str, int]) -> dict[str, set[int]]:
        """The sequence numbers each device made after ``mark``."""
        return {d: {seq for seq, _ in self.made[d][mark[d] :]} for d in self.devices}

    def any_connected(self) -> bool:
        return any(k.connected for k in self.links.values())

    def all_connected(self) -> bool:
        return all(k.connected for k in self.links.values())

    def total(self) -> int:
        return sum(len(v) for v in self.made.values())

    def depth(self) -> int:
        """Messages the devices hold that no gateway has acknowledged yet."""
        return sum(b.depth() for b in self.boxes.values())

    def drops(self) -> dict[str, int]:
        """The outboxes' drop counters, summed over the devices, by reason."""
        out: dict[str, int] = {}
        for b in self.boxes.values():
            for reason, n in b.drops.items():
                out[reason] = out.get(reason, 0) + n
        return out


def produce(
    box: Outbox,
    link: DeviceLink,
    made: list[tuple[int, str]],
    stop: threading.Event,
    rate_hz: float = RATE_HZ,
) -> None:
    """A device's stream until ``stop``: ``rate_hz`` messages a second, every EVENT_EVERY-th
    an event; each (seq, kind) noted in ``made`` once it is durable in the outbox."""
    i = 0
    while not stop.is_set():
        i += 1
        kind = "event" if i % EVENT_EVERY == 0 else "result"
        body = {"event": "fall", "state": "start"} if kind == "event" else {"i": i}
        made.append((box.put(kind, body).seq, kind))
        link.notify()
        stop.wait(1 / rate_hz)


def each_once(store: Store, made: Made) -> dict[str, list[dict[str, Any]]]:
    """Assert that every message made is stored once, in seq order with its kind, and nothing
    else is stored for these devices; their rows (seq, kind, received) by device."""
    out = {}
    for d, want in made.items():
        rows = store.query(
            "SELECT seq, kind, received FROM results WHERE site = ? AND device = ? ORDER BY seq",
            (SITE, d),
        )
        got = [(r["seq"], r["kind"]) for r in rows]
        if got != want:
            have, need = {s for s, _ in got}, {s for s, _ in want}
            twice = len(got) - len(have)
            raise AssertionError(
                f"{d}: each exactly once: {len(want)} made, {len(got)} stored; missing "
                f"{sorted(need - have)[:20]}, not made {sorted(have - need)[:20]}, "
                f"{twice} stored twice"
            )
        out[d] = rows
    return out


def events_first(
    rows: dict[str, list[dict[str, Any]]],
    held: dict[str, set[int]],
    each: bool = True,
    within: float = 0.0,
    need_one: bool = True,
) -> None:
    """Of the messages each device ``held`` through a fault, the events were stored no later
    than any routine result (and there were both, or the check would say nothing). ``each``
    False: a device whose held messages are of one kind only is passed over, but at least one
    device must have held both (a backlog whose size depends on timing; ``need_one`` False:
    not even that, where the caller asserts enough besides). ``within``: seconds
    an event may trail the first held routine result -- where the gateway comes back while a
    device is still sending (see :data:`RESUBSCRIBE_RACE_S`)."""
    checked = 0
    for d, seqs in held.items():
        backlog = [r for r in rows[d] if r["seq"] in seqs]
        events = [r["received"] for r in backlog if r["kind"] == "event"]
        routine = [r["received"] for r in backlog if r["kind"] == "result"]
        if not each and not (events and routine):
            continue
        assert events and routine, f"{d}: the fault held events and routine results"
        checked += 1
        late = [t for t in events if t > min(routine) + within + 1e-6]
        assert not late, (
            f"{d}: {len(late)} of {len(events)} held events stored after the first of "
            f"{len(routine)} held routine results (by up to {max(late) - min(routine):.3f} s)"
        )
    assert checked or not need_one, (
        "no device held both events and routine results: the check says nothing"
    )


RESUBSCRIBE_RACE_S = 0.25
"""When the gateway itself comes back (a broker restart, a gateway restart), what a device
publishes between the gateway's subscription and the device hearing the gateway's new serving
time (its limits, a few milliseconds) is stored at once: a routine result of the held backlog
can get in just ahead of the events the device then sends again first. Measured: up to 13 ms
(bench/chaos.py prints it per fault); before the serving time was announced, 0.5-5 s."""


def each_once_events_first(
    store: Store, made: Made, held: dict[str, set[int]], within: float = 0.0
) -> None:
    """:func:`each_once`, then :func:`events_first` for what was ``held``."""
    events_first(each_once(store, made), held, within=within)


def start_fog(
    site_dir: Path,
    broker: RunningBroker,
    db: Path,
    *extra: str,
    client_id: str = "fog",
) -> subprocess.Popen[str]:
    """``medge gateway run`` as its own process on ``db``, its warnings appended to
    ``db`` + ``.log`` (a file, which never fills up as an unread pipe would)."""
    with open(f"{db}.log", "a", encoding="utf-8") as log:  # the child keeps its own copy
        return start_medge(
            "gateway",
            "run",
            "--site-dir",
            str(site_dir),
            "--broker",
            f"{broker.host}:{broker.port}",
            "--db",
            str(db),
            "--client-id",
            client_id,
            "--log-level",
            "warning",
            *extra,
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=ROOT,
        )


def sqlite_rows(path: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A query on another process's SQLite file (WAL: it may write meanwhile, or have been
    killed in the middle of a write)."""
    db = sqlite3.connect(path, timeout=10)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def stored_keys(store: Store, device: str | None = None) -> set[tuple[str, int]]:
    """(device, seq) of the results and events the store holds for SITE (or one device)."""
    sql, args = "SELECT device, seq FROM results WHERE site = ?", [SITE]
    if device is not None:
        sql, args = sql + " AND device = ?", [SITE, device]
    return {(r["device"], r["seq"]) for r in store.query(sql, args)}


def event_bundle(bundle_dir: Path, site_dir: Path, out: Path) -> Path:
    """A copy of the BreastMNIST CNN bundle with an event rule (a run of 'malignant' is one
    event), signed again by the site: its agent sends events between its routine results."""
    shutil.copytree(bundle_dir, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["decode"]["events"] = [
        {"name": "malignant", "label": "malignant", "on": 0.5, "off": 0.5, "min_windows": 1}
    ]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    sign_bundle(out, load_signer_key(site_dir / "bundle-signer.key"))
    return out


def agent_config(
    path: Path, device: str, bundle: Path, identity: Path, port: int, box: Path, rate_hz: float
) -> Path:
    """agent.yaml for ``medge agent run``: the BreastMNIST validation images in a loop at
    ``rate_hz`` through the broker at 127.0.0.1:``port`` (reconnecting within 0.5 s),
    outbox ``box`` resending after 1 s. Replace ``loop: true`` to end it."""
    from models import breast_cnn

    path.write_text(
        f"site: {SITE}\ndevice: {device}\nbundle: {bundle}\nidentity: {identity}\n"
        f"broker: {{host: 127.0.0.1, port: {port}, keepalive: 2,"
        " reconnect_min_s: 0.2, reconnect_max_s: 0.5}\n"
        f"source: {{path: {breast_cnn.DATA}, split: val, rate_hz: {rate_hz}, loop: true}}\n"
        f"outbox: {{path: {box}, resend_after_s: 1.0}}\n"
        "telemetry_interval_s: 0.5\n"
    )
    return path
