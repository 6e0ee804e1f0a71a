"""Fog -> cloud forwarding (gateway.forward) and shared-subscription workers, against real
Mosquitto processes: every result reaches the cloud store exactly once, across a SIGKILLed
cloud broker and a stopped cloud gateway; end-to-end bodies are opened only by the cloud."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from waiting import wait_for

from edge_agent.envelope import Sealer
from edge_agent.errors import MedgeError
from edge_agent.identity import DeviceIdentity
from edge_agent.link import DeviceLink
from edge_agent.outbox import Outbox
from gateway import Gateway, Store
from gateway.broker import RunningBroker, free_port, start_broker, start_mosquitto_conf
from gateway.broker_config import forwarder_client_files, gateway_client_files, write_broker_config
from gateway.forward import Forwarder, ForwardOutbox, backfill, parse_since
from gateway.site import opener_for, provision_device, write_recipient

SITE = "ward-a"


@contextmanager
def _device(
    tmp: Path, broker: RunningBroker, ident: Path, device: str, end_to_end: bool = False
) -> Iterator[tuple[Outbox, DeviceLink]]:
    """A device as its agent runs it: sealed results in a disk outbox, pumped by DeviceLink,
    deleted only on the gateway's ack, resent after 0.5 s without one."""
    idn = DeviceIdentity.load(ident, SITE, device)
    epochs = itertools.count(1)
    box = Outbox(tmp / f"{device}.outbox.sqlite", SITE, device)
    box.sealer = Sealer(
        SITE, device, idn.key, idn.recipient, lambda: next(epochs), end_to_end=end_to_end
    )
    if end_to_end:
        assert idn.gateway_recipient is not None
        box.status_sealer = Sealer(
            SITE, device, idn.key, idn.gateway_recipient, lambda: next(epochs)
        )
    with box, DeviceLink(box, broker.host, broker.port, resend_after=0.5) as link:
        assert link.wait_connected(10)
        yield box, link


def _send(box: Outbox, link: DeviceLink, n: int, start: int = 0) -> list[int]:
    """Queue n results; their sequence numbers (state messages take numbers too)."""
    seqs = []
    for i in range(start, start + n):
        env = box.put("result", {"input": f"sample#{i}", "pred": i % 2, "scores": [0.3, 0.7]})
        seqs.append(env.seq)
        link.notify()
    return seqs


def _seqs(store: Store, device: str) -> list[int]:
    return [r["seq"] for r in store.results(limit=100_000, device=device)]


def _fog(tmp: Path, fog: RunningBroker, cloud: RunningBroker, opener, name: str = "fog"):  # type: ignore[no-untyped-def]
    fwd = Forwarder(
        ForwardOutbox(tmp / f"{name}.forward.sqlite"),
        cloud.host,
        cloud.port,
        client_id=f"{name}-forward",
        resend_after=1.0,
    )
    return Gateway(
        Store(tmp / f"{name}.sqlite"), opener, fog.host, fog.port, client_id=name, forward=fwd
    )


def _cloud(tmp: Path, cloud: RunningBroker, opener) -> Gateway:  # type: ignore[no-untyped-def]
    return Gateway(Store(tmp / "cloud.sqlite"), opener, cloud.host, cloud.port, client_id="cloud")


def test_every_result_reaches_the_cloud_once_across_crashes(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto: RunningBroker, site_dir: Path, identity
) -> None:
    cloud_broker = start_broker("mosquitto")
    cloud_key = tmp_path / "cloud.json"
    write_recipient(cloud_key)
    cloud_opener = opener_for(site_dir, keys=(cloud_key,))
    cloud = _cloud(tmp_path, cloud_broker, cloud_opener).start()
    fog = _fog(tmp_path, mosquitto, cloud_broker, opener_for(site_dir)).start()
    fwd = fog.forward
    assert fwd is not None
    try:
        with _device(tmp_path, mosquitto, identity("fw-01"), "fw-01") as (box, link):
            sent = _send(box, link, 40)
            wait_for(lambda: len(_seqs(cloud.store, "fw-01")) >= 10, 20, "first results in cloud")
            cloud_broker.kill()  # SIGKILL: forgets everything it PUBACKed
            cloud_broker.stop()  # only removes its work directory
            sent += _send(box, link, 40, 40)
            # the outage lasts until the forwarder has seen the broker go and the fog has
            # queued all 40 results for it
            wait_for(lambda: not fwd.connected, 20, "the forwarder to see the cloud broker gone")
            wait_for(lambda: len(_seqs(fog.store, "fw-01")) == 80, 20, "80 results in the fog")
            cloud_broker = start_broker("mosquitto", port=cloud_broker.port)
            wait_for(lambda: len(_seqs(cloud.store, "fw-01")) >= 60, 30, "cloud after broker kill")
            cloud.stop()  # the cloud gateway goes away mid-stream; its broker drops for it
            cloud.store.close()
            sent += _send(box, link, 40, 80)
            assert link.drain(20), "the fog acknowledges the device without the cloud"
            # every queued result goes to the cloud broker at least once with no gateway there
            # (due(): queued and never sent, when nothing is ever due for a resend)
            wait_for(lambda: fwd.outbox.due(1e9) == [], 20, "forwarding into an empty cloud")
            assert fwd.outbox.depth() > 0, "nobody in the cloud acknowledged them"
            cloud = _cloud(tmp_path, cloud_broker, cloud_opener).start()  # same store file
            wait_for(lambda: fwd.outbox.depth() == 0, 30, "the forward outbox to drain")
        seqs = _seqs(cloud.store, "fw-01")
        assert len(sent) == 120
        assert sorted(seqs) == sorted(sent), "every result in the cloud, exactly once"
        assert sorted(_seqs(fog.store, "fw-01")) == sorted(sent)
        rows = {r["seq"]: r for r in cloud.store.results(limit=1000, device="fw-01")}
        assert rows[sent[6]]["input"] == "sample#6" and rows[sent[6]]["pred"] == 0, "opened"
        assert cloud.stats.rejected == 0 and fog.stats.rejected == 0
        raw = fog.store.query("SELECT count(*) AS n FROM results WHERE raw IS NOT NULL")
        assert raw[0]["n"] == 120, "the fog keeps every original message"
    finally:
        fog.stop()
        cloud.stop()
        fog.store.close()
        cloud.store.close()
        cloud_broker.stop()


def test_end_to_end_bodies_are_opened_only_in_the_cloud(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto: RunningBroker, site_dir: Path
) -> None:
    cloud_broker = start_broker("mosquitto")
    cloud_key = tmp_path / "cloud.json"
    cloud_pub = write_recipient(cloud_key)
    ident = provision_device(site_dir, "fw-e2e", tmp_path / "id", recipient=cloud_pub)
    relay = opener_for(site_dir, relay_for=(cloud_pub,))
    with (
        cloud_broker,
        _cloud(tmp_path, cloud_broker, opener_for(site_dir, keys=(cloud_key,))) as cloud,
        _fog(tmp_path, mosquitto, cloud_broker, relay) as fog,
        _device(tmp_path, mosquitto, ident, "fw-e2e", end_to_end=True) as (box, link),
    ):
        sent = _send(box, link, 20)
        assert link.drain(20)
        assert fog.forward is not None
        wait_for(lambda: fog.forward.outbox.depth() == 0, 20, "the cloud to ack everything")
        fog_rows = fog.store.results(limit=100, device="fw-e2e")
        cloud_rows = cloud.store.results(limit=100, device="fw-e2e")
        assert len(fog_rows) == 20 and all(r["pred"] is None for r in fog_rows), "fog read nothing"
        assert sorted(r["seq"] for r in cloud_rows) == sent
        assert {r["input"] for r in cloud_rows} == {f"sample#{i}" for i in range(20)}
    fog.store.close()
    cloud.store.close()


def test_shared_subscription_workers_split_and_survive_a_stop(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto: RunningBroker, site_dir: Path, identity
) -> None:
    """Two workers on one $share group and one SQLite file: both store some, every result is
    stored once, and stopping one mid-stream loses nothing (the device resends)."""
    db = tmp_path / "shared.sqlite"
    workers = [
        Gateway(
            Store(db),
            opener_for(site_dir),
            mosquitto.host,
            mosquitto.port,
            client_id=f"w{i}",
            share_group="g",
        ).start()
        for i in range(2)
    ]
    try:
        with _device(tmp_path, mosquitto, identity("fw-sh"), "fw-sh") as (box, link):
            sent = _send(box, link, 60)
            wait_for(lambda: workers[0].stats.stored + workers[1].stats.stored >= 30, 20, "half")
            workers[1].stop()  # in-flight messages of this worker are never acked: resent
            sent += _send(box, link, 60, 60)
            assert link.drain(30), "everything acknowledged by the remaining worker"
        assert workers[0].stats.stored > 0 and workers[1].stats.stored > 0, "both got some"
        with Store(db) as store:
            seqs = _seqs(store, "fw-sh")
        assert sorted(seqs) == sorted(sent), "every result stored exactly once"
    finally:
        for w in workers:
            w.stop()
            w.store.close()


def test_results_state_and_telemetry_forwarded_over_tls(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto: RunningBroker, site_dir: Path, identity
) -> None:
    """The cloud broker as 'medge gateway broker-config' writes it (TLS, client certificates,
    ACLs): the forwarder connects as medge-forwarder, the cloud gateway as medge-gateway; the
    cloud's fleet view gets each device's latest state and telemetry."""
    port = free_port()
    files = write_broker_config(site_dir, tmp_path / "cloud-broker", port=port)
    fwd = Forwarder(
        ForwardOutbox(tmp_path / "fog.forward.sqlite"),
        "127.0.0.1",
        port,
        client_id="fog-forward",
        resend_after=1.0,
        tls=forwarder_client_files(site_dir),
    )
    with (
        start_mosquitto_conf(files.conf, "127.0.0.1", port) as cloud_broker,
        Gateway(
            Store(tmp_path / "cloud.sqlite"),
            opener_for(site_dir),
            cloud_broker.host,
            cloud_broker.port,
            client_id="cloud",
            tls=gateway_client_files(site_dir),
        ) as cloud,
        Gateway(
            Store(tmp_path / "fog.sqlite"),
            opener_for(site_dir),
            mosquitto.host,
            mosquitto.port,
            client_id="fog",
            forward=fwd,
        ) as fog,
        _device(tmp_path, mosquitto, identity("fw-tls"), "fw-tls") as (box, link),
    ):
        sent = _send(box, link, 30)
        for fps in (4.0, 5.0, 6.0):
            link.publish_direct("telemetry", {"fps": fps, "outbox_depth": 0})
        assert link.drain(20)
        wait_for(lambda: fwd.outbox.depth() == 0, 20, "the cloud to ack every result")
        assert fwd.connected
        wait_for(
            lambda: any(
                d["device"] == "fw-tls"
                and (d["telemetry"] or {}).get("fps") == 6.0
                and d["state"] == "online"
                for d in cloud.store.devices()
            ),
            20,
            "the cloud's fleet view: online, latest telemetry",
        )
        assert sorted(_seqs(cloud.store, "fw-tls")) == sent
        assert fwd.outbox.latest_pending() == 0
        assert cloud.stats.rejected == 0 and fog.stats.rejected == 0
        latest = fog.metrics.registry.get_sample_value(
            "medge_gateway_forward_latest_total", {"kind": "telemetry"}
        )
        assert latest == 3
    cloud.store.close()
    fog.store.close()


def test_backfill_queues_what_was_stored_before_forwarding(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto: RunningBroker, site_dir: Path, identity
) -> None:
    cloud_broker = start_broker("mosquitto")
    db = tmp_path / "fog.sqlite"
    with cloud_broker, _cloud(tmp_path, cloud_broker, opener_for(site_dir)) as cloud:
        with (
            Gateway(
                Store(db), opener_for(site_dir), mosquitto.host, mosquitto.port, client_id="fog"
            ) as fog,
            _device(tmp_path, mosquitto, identity("fw-bf"), "fw-bf") as (box, link),
        ):
            sent = _send(box, link, 25)
            assert link.drain(20)
        fog.store.close()
        assert _seqs(cloud.store, "fw-bf") == [], "nothing forwarded yet"
        with _fog(tmp_path, mosquitto, cloud_broker, opener_for(site_dir)) as fog:
            assert fog.forward is not None
            assert backfill(fog.store, fog.forward.outbox, parse_since("1h")) == 25
            fog.forward.put_many([])  # wakes the pump
            wait_for(lambda: fog.forward.outbox.depth() == 0, 20, "the backfill to be acked")
            assert backfill(fog.store, fog.forward.outbox, parse_since("all")) == 25
            wait_for(lambda: fog.forward.outbox.depth() == 0, 20, "the second backfill")
            wait_for(lambda: cloud.stats.duplicates == 25, 10, "duplicates acked again")
        fog.store.close()
        assert sorted(_seqs(cloud.store, "fw-bf")) == sorted(sent), "each result once"
        with Store(db) as store, ForwardOutbox(tmp_path / "x.sqlite") as outbox:
            assert backfill(store, outbox, time.time() + 60) == 0, "nothing after SINCE"
    cloud.store.close()


def test_parse_since() -> None:
    now = 1_700_000_000.0
    assert parse_since("all", now) == 0.0
    assert parse_since("30m", now) == now - 1800
    assert parse_since("24h", now) == now - 86400
    assert parse_since("1.5d", now) == now - 1.5 * 86400
    assert parse_since("1700000000", now) == now
    assert parse_since("2023-11-14T22:13:20", now) == now  # UTC unless it says
    assert parse_since("2023-11-14T23:13:20+01:00", now) == now
    with pytest.raises(MedgeError, match="--backfill 'yesterday'"):
        parse_since("yesterday", now)


def test_backfill_needs_forward_to(site_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medge.cli import main

    code = main(["gateway", "run", "--site-dir", str(site_dir), "--backfill", "all"])
    assert code == 2
    assert "--backfill re-queues stored results for the cloud: add --forward-to" in (
        capsys.readouterr().err
    )


def test_broker_config_issues_the_forwarder_identity(
    site_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from medge.cli import main

    out = tmp_path / "cloud-broker"
    code = main(
        ["gateway", "broker-config", "--site-dir", str(site_dir), "--out", str(out), "--forwarder"]
    )
    assert code == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "--forward-tls" in ln)
    ca, cert, key = (Path(p) for p in line.split("--forward-tls ", 1)[1].split())
    assert ca.is_file() and key.is_file()
    assert key.stat().st_mode & 0o077 == 0
    crt = x509.load_pem_x509_certificate(cert.read_bytes())
    assert crt.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "medge-forwarder"
    issuer = x509.load_pem_x509_certificate(ca.read_bytes()).subject
    assert crt.issuer == issuer
