"""A fog gateway (`medge gateway run`, its own process) SIGKILLed while a device publishes, then
restarted on the same database: every result is stored exactly once in the fog store and in
the cloud it forwards to. The device resends what was never acknowledged; the store and the
forward outbox are idempotent by (site, device, seq)."""

from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path
from subprocess import Popen

from fleet import start_fog
from waiting import wait_for

from edge_agent.envelope import Sealer
from edge_agent.identity import DeviceIdentity
from edge_agent.link import DeviceLink
from edge_agent.outbox import Outbox
from gateway import Gateway, Store
from gateway.broker import RunningBroker, start_broker
from gateway.site import opener_for

SITE, DEVICE = "ward-a", "fc-01"


def _fog(site_dir: Path, fog: RunningBroker, cloud: RunningBroker, db: Path) -> Popen[str]:
    return start_fog(
        site_dir, fog, db, "--forward-to", f"{cloud.host}:{cloud.port}",
        "--forward-resend-after", "1",
    )  # fmt: skip


def _count(db: Path, device: str) -> int:
    with Store(db) as store:
        return store.result_count(SITE, device)


def test_sigkilled_fog_gateway_loses_and_duplicates_nothing(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto: RunningBroker, site_dir: Path, identity
) -> None:
    db = tmp_path / "fog.sqlite"
    Store(db).close()  # the schema exists before the test reads it
    idn = DeviceIdentity.load(identity(DEVICE), SITE, DEVICE)
    epochs = itertools.count(1)
    box = Outbox(tmp_path / "device.outbox.sqlite", SITE, DEVICE)
    box.sealer = Sealer(SITE, DEVICE, idn.key, idn.recipient, lambda: next(epochs))
    sent: list[int] = []
    with (
        start_broker("mosquitto") as cloud_broker,
        Store(tmp_path / "cloud.sqlite") as cloud_store,
        Gateway(
            cloud_store,
            opener_for(site_dir),
            cloud_broker.host,
            cloud_broker.port,
            client_id="cloud",
        ) as cloud,
    ):
        fog = _fog(site_dir, mosquitto, cloud_broker, db)
        try:
            with box, DeviceLink(box, mosquitto.host, mosquitto.port, resend_after=1.0) as link:
                assert link.wait_connected(10)
                killed_at = restart_at = None
                for i in range(300):  # ~100 results a second while the gateway is killed
                    sent.append(box.put("result", {"input": f"s#{i}", "pred": i % 2}).seq)
                    link.notify()
                    time.sleep(0.01)
                    if killed_at is None and i >= 60 and _count(db, DEVICE) >= 30:
                        fog.send_signal(signal.SIGKILL)  # mid-stream: no cleanup at all
                        fog.wait(10)
                        killed_at, restart_at = _count(db, DEVICE), i + 5
                    if i == restart_at:  # down for 5 results, which wait in the outbox
                        assert box.depth() >= 5, "results made while it was down are held"
                        fog = _fog(site_dir, mosquitto, cloud_broker, db)  # same db
                assert killed_at is not None, "the gateway was killed mid-stream"
                assert killed_at < len(sent)
                assert link.drain(60), "every result acknowledged after the restart"
            wait_for(
                lambda: cloud_store.result_count(SITE, DEVICE) == len(sent),
                60,
                "the cloud to have every result",
            )
        finally:
            fog.send_signal(signal.SIGINT)
            fog.wait(20)
        assert fog.returncode == 0, Path(f"{db}.log").read_text()[-2000:]
        assert cloud.stats.rejected == 0
    with Store(db) as store:
        fog_seqs = [r["seq"] for r in store.results(limit=10_000, device=DEVICE)]
    assert sorted(fog_seqs) == sorted(sent), "fog: every result exactly once"
    with Store(tmp_path / "cloud.sqlite") as store:
        cloud_seqs = [r["seq"] for r in store.results(limit=10_000, device=DEVICE)]
    assert sorted(cloud_seqs) == sorted(sent), "cloud: every result exactly once"
