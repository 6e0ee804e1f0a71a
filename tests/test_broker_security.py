"""The site broker as `medge gateway broker-config` writes it, attacked over MQTT 5 by clients
holding real certificates: each attack is refused, and the refusal is visible."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_for, within

from edge_agent.identity import DEVICE_CERT, DEVICE_KEY, SITE_CA
from edge_agent.topics import topic
from gateway import Gateway, Store
from gateway.broker import RunningBroker, free_port, start_mosquitto_conf
from gateway.broker_config import gateway_client_files, write_broker_config
from gateway.site import init_site, provision_device, revoke_device

pytestmark = pytest.mark.slow
NOT_AUTHORIZED = 0x87


@pytest.fixture
def site(tmp_path: Path) -> Path:
    d = tmp_path / "site"
    init_site(d, "ward-b")
    return d


def _start(site: Path, tmp: Path) -> RunningBroker:
    port = free_port()
    files = write_broker_config(site, tmp / "broker", port=port)
    return start_mosquitto_conf(files.conf, "127.0.0.1", port)


@pytest.fixture
def broker(site: Path, tmp_path: Path) -> Iterator[RunningBroker]:
    with _start(site, tmp_path) as b:
        yield b


def _client(
    ident: Path | None, broker: RunningBroker, client_id: str = "", ca: Path | None = None
) -> tuple[mqtt.Client, dict[str, Any]]:
    seen: dict[str, Any] = {"pubacks": {}, "subacks": [], "disconnects": 0, "connack": None}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if ident is not None:
        c.tls_set(
            ca_certs=str(ca or ident / SITE_CA),
            certfile=str(ident / DEVICE_CERT),
            keyfile=str(ident / DEVICE_KEY),
        )
    else:
        c.tls_set(ca_certs=str(ca))

    def on_connect(_c, _u, _f, rc, _p=None):  # type: ignore[no-untyped-def]
        seen["connack"] = rc

    def on_publish(_c, _u, mid, rc, _p=None):  # type: ignore[no-untyped-def]
        seen["pubacks"][mid] = rc

    def on_subscribe(_c, _u, _mid, rcs, _p=None):  # type: ignore[no-untyped-def]
        seen["subacks"].extend(rcs)

    def on_disconnect(_c, _u, _f, _rc, _p=None):  # type: ignore[no-untyped-def]
        seen["disconnects"] += 1

    c.on_connect, c.on_publish = on_connect, on_publish
    c.on_subscribe, c.on_disconnect = on_subscribe, on_disconnect
    return c, seen


def test_device_cannot_publish_or_read_as_another(  # type: ignore[no-untyped-def]
    site: Path, broker: RunningBroker, tmp_path: Path
) -> None:
    a = provision_device(site, "us-01", tmp_path / "a")
    b = provision_device(site, "us-02", tmp_path / "b")
    ca, gw_cert, gw_key = gateway_client_files(site)
    clients = []
    try:
        spy, spy_seen = _client(a, broker)
        owner, owner_seen = _client(b, broker)
        gateway = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        gateway.tls_set(ca_certs=str(ca), certfile=str(gw_cert), keyfile=str(gw_key))
        got: dict[str, list[bytes]] = {"spy": [], "owner": []}
        spy.on_message = lambda _c, _u, m: got["spy"].append(m.payload)
        owner.on_message = lambda _c, _u, m: got["owner"].append(m.payload)
        for c in (spy, owner, gateway):
            c.connect(broker.host, broker.port)
            c.loop_start()
            clients.append(c)
        wait_for(
            lambda: spy_seen["connack"] is not None and owner_seen["connack"] is not None,
            5,
            "both CONNACKs",
        )
        own = spy.publish(topic("ward-b", "us-01", "telemetry"), b"x", qos=1)
        other = spy.publish(topic("ward-b", "us-02", "result"), b"x", qos=1)
        wait_for(lambda: len(spy_seen["pubacks"]) == 2, 5, "two PUBACKs")
        assert not spy_seen["pubacks"][own.mid].is_failure
        assert spy_seen["pubacks"][other.mid].value == NOT_AUTHORIZED, "the denial is visible"
        # reading another device's acks: Mosquitto grants the SUBSCRIBE but delivers nothing
        ack_a, ack_b = topic("ward-b", "us-01", "ack"), topic("ward-b", "us-02", "ack")
        spy.subscribe([(ack_b, 1), (ack_a, 1)])
        owner.subscribe(ack_b, qos=1)
        wait_for(lambda: len(spy_seen["subacks"]) == 2 and owner_seen["subacks"], 5, "all SUBACKs")
        gateway.publish(ack_b, b"for us-02 only", qos=1).wait_for_publish(5)
        # then one for the spy itself: the broker passes one connection's messages on in order,
        # so once this one is in, the one before it was either delivered or never will be
        gateway.publish(ack_a, b"for us-01", qos=1).wait_for_publish(5)
        wait_for(lambda: got["owner"] == [b"for us-02 only"], 5, "the owner's ack")
        wait_for(lambda: got["spy"], 5, "the spy's own ack")
        assert got["spy"] == [b"for us-01"]
    finally:
        for c in clients:
            c.disconnect()  # first: the network thread then ends at once, not within its 1 s poll
            c.loop_stop()


def test_client_id_of_another_device_does_not_take_over_its_session(  # type: ignore[no-untyped-def]
    site: Path, broker: RunningBroker, tmp_path: Path
) -> None:
    a = provision_device(site, "us-01", tmp_path / "a")
    b = provision_device(site, "us-02", tmp_path / "b")
    victim, v_seen = _client(b, broker, client_id="us-02")
    victim.connect(broker.host, broker.port)
    victim.loop_start()
    attacker, a_seen = _client(a, broker, client_id="us-02")  # B's client id, A's certificate
    try:
        wait_for(lambda: v_seen["connack"] is not None, 5, "the victim's CONNACK")
        attacker.connect(broker.host, broker.port)  # after the victim: a takeover would hit it
        attacker.loop_start()
        wait_for(lambda: a_seen["connack"] is not None, 5, "the attacker's CONNACK")
        # A takeover closes the victim's connection before the attacker's CONNACK goes out, so
        # a PUBLISH the victim sends now is answered on the same connection only if it lasted.
        mine = victim.publish(topic("ward-b", "us-02", "telemetry"), b"x", qos=1)
        wait_for(lambda: mine.mid in v_seen["pubacks"], 5, "the victim's PUBACK")
        assert v_seen["disconnects"] == 0, "the victim keeps its session"
        assert victim.is_connected()
    finally:
        for c in (attacker, victim):
            c.disconnect()
            c.loop_stop()


def test_rogue_ca_no_certificate_and_revoked_device_cannot_connect(  # type: ignore[no-untyped-def]
    site: Path, tmp_path: Path
) -> None:
    rogue_site = tmp_path / "rogue"
    init_site(rogue_site, "ward-b")
    rogue = provision_device(rogue_site, "us-01", tmp_path / "rogue-id")
    revoked = provision_device(site, "us-09", tmp_path / "revoked")
    revoke_device(site, "us-09")
    with _start(site, tmp_path) as broker:  # Mosquitto reads the CRL when it starts
        ok = provision_device(site, "us-04", tmp_path / "ok")
        assert not _refused(ok, site / "ca.crt", broker), "a good device gets in"
        assert _refused(rogue, site / "ca.crt", broker), "certificate from a rogue CA"
        assert _refused(None, site / "ca.crt", broker), "no client certificate"
        assert _refused(revoked, site / "ca.crt", broker), "revoked device"


def _refused(ident: Path | None, ca: Path, broker: RunningBroker) -> bool:
    c, seen = _client(ident, broker, ca=ca)
    try:
        c.connect(broker.host, broker.port)
    except (ssl.SSLError, OSError):
        return True
    c.loop_start()
    try:
        accepted = within(
            lambda: seen["connack"] is not None and not seen["connack"].is_failure, 2.0
        )
        return not accepted
    finally:
        c.disconnect()
        c.loop_stop()


def test_whole_chain_over_tls_with_acls(  # type: ignore[no-untyped-def]
    site: Path, broker: RunningBroker, tmp_path: Path, bundle_dir: Path
) -> None:
    """The signed bundle from the session site is re-signed by this site's signer."""
    import shutil

    from edge_agent import Agent, AgentConfig
    from edge_agent.bundle import SIGNATURE_NAME, sign_bundle
    from gateway.site import opener_for, signer_key
    from models import breast_cnn

    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle, ignore=shutil.ignore_patterns(SIGNATURE_NAME))
    sign_bundle(bundle, signer_key(site))
    ident = provision_device(site, "us-03", tmp_path / "id")
    cfg = AgentConfig(
        site="ward-b",
        device="us-03",
        bundle=bundle,
        identity=ident,
        broker={"host": broker.host, "port": broker.port, "tls": True},
        source={"path": breast_cnn.DATA, "split": "val", "rate_hz": 0, "limit": 20},
        outbox={"path": tmp_path / "outbox.sqlite"},
    )
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(
            store, opener_for(site), broker.host, broker.port, tls=gateway_client_files(site)
        ) as gw,
    ):
        report = Agent(cfg).run(threading.Event())
        assert (report.sent, report.acked, report.pending) == (20, 20, 0)
        assert store.result_count() == 20
        assert gw.stats.rejected == 0


# -- broker-config's files, for a Mosquitto that runs as its own user -------------------------
def test_a_mosquitto_running_as_its_own_user_reads_what_broker_config_wrote() -> None:
    """As root with a `mosquitto` group (a system service): the broker's files go to that
    group (0640, directories 0750, data/ 0770), the site's private keys stay 0600, and a
    Mosquitto told `user mosquitto` starts on them and accepts the gateway over TLS."""
    import grp
    import os
    import shutil
    import stat
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root: only root can hand files to the mosquitto group")
    try:
        gid = grp.getgrnam("mosquitto").gr_gid
    except KeyError:
        pytest.skip("no mosquitto group on this machine")
    root = Path(tempfile.mkdtemp(prefix="medge-broker-user-"))  # under /tmp: traversable
    old = os.umask(0o077)  # as the medge command runs
    try:
        os.chmod(root, 0o711)  # noqa: S103 (others may traverse, not list)
        site_dir = root / "site"
        init_site(site_dir, "ward-a")
        port = free_port()
        files = write_broker_config(site_dir, root / "broker", port=port)
        assert files.todo == ()

        def mode(p: Path) -> tuple[int, int]:
            st = p.stat()
            return stat.S_IMODE(st.st_mode), st.st_gid

        for p in (files.conf, files.acl, files.server_cert, files.server_key):
            assert mode(p) == (0o640, gid), p
        assert mode(files.conf.parent) == (0o750, gid)
        assert mode(files.conf.parent / "data") == (0o770, gid)
        assert mode(site_dir) == (0o710, gid), "traversal only: the site's names stay unlisted"
        assert stat.S_IMODE((site_dir / "ca.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((site_dir / "bundle-signer.key").stat().st_mode) == 0o600

        head, rest = files.conf.read_text().split("\n", 1)  # as a system service would
        files.conf.write_text(f"{head}\nuser mosquitto\n{rest}")
        with start_mosquitto_conf(files.conf, "127.0.0.1", port):
            ca, cert, key = gateway_client_files(site_dir)
            c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            c.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
            connected = threading.Event()
            c.on_connect = lambda *a: connected.set() if not a[3].is_failure else None
            c.connect("127.0.0.1", port)
            c.loop_start()
            try:
                assert connected.wait(10), "the gateway could not connect"
            finally:
                c.disconnect()
                c.loop_stop()
    finally:
        os.umask(old)
        shutil.rmtree(root, ignore_errors=True)
