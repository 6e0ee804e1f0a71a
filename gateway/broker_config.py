"""`medge gateway broker-config`: a Mosquitto configuration for one site.

TLS with client certificates from the site's device CA; the certificate's CN is the MQTT user
name (``use_identity_as_username``) and the client id (``use_username_as_clientid``, so no client
can take over another's session by choosing its client id); ACLs keyed on ``%u`` let a device
publish only under its own topics and read only its own acks and commands; the site's CRL;
queues raised above Mosquitto's default of 1000 messages, with a byte limit; persistence on.

Oversized messages are stopped at the broker before they cost the gateway anything:
``message_size_limit`` refuses a payload over the envelope limit (256 KiB; an MQTT 5 publisher
gets a failing PUBACK, the message goes nowhere) and ``max_packet_size`` disconnects a client
that sends any packet over that plus room for the topic and properties. ``set_tcp_nodelay``:
no Nagle delay on what the broker sends (an ack otherwise waits ~40 ms for a delayed TCP ACK).

The same configuration serves a cloud broker: ``medge-forwarder`` (a fog gateway's forwarder,
certificate from :func:`forwarder_client_files`) may publish device messages of the site and
read the cloud gateway's acks.

File modes: medge creates every file 0600 (umask 077). Mosquitto started as a system service
runs as root only to bind, then as its own user ``mosquitto``, which must read the files
written here (and the site's ``ca.crt`` and ``crl.pem``) and write ``data/`` and the log. So
where a ``mosquitto`` group exists they are handed to it: files 0640 and directories 0750
(``data/`` 0770) with group ``mosquitto``, and the site directory gets group traversal (x,
never read) so that its private keys stay 0600 and unlisted. Where that cannot be done (not
root, not a member) the commands to do it are logged and returned (``BrokerFiles.todo``).
"""

from __future__ import annotations

import datetime as dt
import grp
import ipaddress
import logging
import os
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.envelope import MAX_BYTES
from edge_agent.keys import load_certificate, load_device_key, write_private_pem
from edge_agent.topics import DOWN_KINDS, ROOT, UP_KINDS
from gateway.site import site_name

__all__ = [
    "FORWARDER_CN",
    "GATEWAY_CN",
    "MAX_PACKET_BYTES",
    "BrokerFiles",
    "forwarder_client_files",
    "gateway_client_files",
    "write_broker_config",
]

log = logging.getLogger("medge.gateway.broker_config")

BROKER_GROUP = "mosquitto"
GATEWAY_CN = "medge-gateway"
FORWARDER_CN = "medge-forwarder"
MAX_PACKET_BYTES = MAX_BYTES + 4096  # an envelope, its topic and MQTT 5 properties
_UTC = dt.timezone.utc


@dataclass(frozen=True)
class BrokerFiles:
    conf: Path
    acl: Path
    server_cert: Path
    server_key: Path
    port: int
    todo: tuple[str, ...] = field(default=())
    """Commands still to run so that the ``mosquitto`` user can read these files."""


def _issue(
    site_dir: Path, cn: str, key_path: Path, cert_path: Path, server: bool, names: list[str]
) -> None:
    ca_key = load_device_key(site_dir / "ca.key")
    ca = load_certificate(site_dir / "ca.crt")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(_UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, site_name(site_dir)),
                    x509.NameAttribute(NameOID.COMMON_NAME, cn),
                ]
            )
        )
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if names:
        alt: list[x509.GeneralName] = []
        for n in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    write_private_pem(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def gateway_client_files(site_dir: Path) -> tuple[Path, Path, Path]:
    """(ca, cert, key) the gateway connects to the site broker with; issued on first use."""
    cert, key = site_dir / "gateway.crt", site_dir / "gateway.key"
    if not cert.exists():
        _issue(site_dir, GATEWAY_CN, key, cert, server=False, names=[])
    return site_dir / "ca.crt", cert, key


def forwarder_client_files(site_dir: Path) -> tuple[Path, Path, Path]:
    """(ca, cert, key) a fog gateway's forwarder connects to a cloud broker with (one written
    by :func:`write_broker_config` for the same site); issued on first use."""
    cert, key = site_dir / "forwarder.crt", site_dir / "forwarder.key"
    if not cert.exists():
        _issue(site_dir, FORWARDER_CN, key, cert, server=False, names=[])
    return site_dir / "ca.crt", cert, key


def write_broker_config(
    site_dir: Path,
    out: Path,
    port: int = 8883,
    bind: str = "127.0.0.1",
    names: tuple[str, ...] = ("localhost", "127.0.0.1"),
    max_queued_messages: int = 100_000,
    max_queued_bytes: int = 256 * 2**20,
) -> BrokerFiles:
    """Write mosquitto.conf, the ACL file and the broker's server certificate into ``out``."""
    site = site_name(site_dir)
    out.mkdir(parents=True, exist_ok=True)
    server_cert, server_key = out / "server.crt", out / "server.key"
    _issue(site_dir, names[0], server_key, server_cert, server=True, names=list(names))
    gateway_client_files(site_dir)
    base = f"{ROOT}/{site}"
    acl_lines = [
        "# Written by 'medge gateway broker-config'. %u is the client certificate's CN.",
        f"user {GATEWAY_CN}",
        *[f"topic read {base}/+/{k}" for k in UP_KINDS],
        *[f"topic write {base}/+/{k}" for k in DOWN_KINDS],
        "",
        "# a fog gateway forwarding to this broker as the cloud (docs/forwarding.md)",
        f"user {FORWARDER_CN}",
        *[f"topic write {base}/+/{k}" for k in UP_KINDS],
        f"topic read {base}/+/ack",
        "",
        "# every device: its own topics only",
        *[f"pattern write {base}/%u/{k}" for k in UP_KINDS],
        *[f"pattern read {base}/%u/{k}" for k in DOWN_KINDS],
        "",
    ]
    acl = out / "acl"
    acl.write_text("\n".join(acl_lines))
    (out / "data").mkdir(exist_ok=True)
    conf = out / "mosquitto.conf"
    conf.write_text(
        "\n".join(
            [
                f"# medge site {site}: written by 'medge gateway broker-config'",
                "per_listener_settings false",
                "allow_anonymous false",
                f"acl_file {acl}",
                "persistence true",
                f"persistence_location {out / 'data'}/",
                "autosave_interval 30",
                f"max_queued_messages {max_queued_messages}",
                f"max_queued_bytes {max_queued_bytes}",
                "max_inflight_messages 100",
                f"message_size_limit {MAX_BYTES}",
                f"max_packet_size {MAX_PACKET_BYTES}",
                "set_tcp_nodelay true",
                f"log_dest file {out / 'mosquitto.log'}",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "",
                f"listener {port} {bind}",
                f"cafile {site_dir / 'ca.crt'}",
                f"certfile {server_cert}",
                f"keyfile {server_key}",
                f"crlfile {site_dir / 'crl.pem'}",
                "require_certificate true",
                "use_identity_as_username true",
                "use_username_as_clientid true",
                "tls_version tlsv1.2",
                "",
            ]
        )
    )
    log_file = out / "mosquitto.log"  # the broker appends to it as its own user
    log_file.touch()
    shared = [(out, 0o750), (out / "data", 0o770), (site_dir, 0o710), (log_file, 0o660)]
    shared += [
        (p, 0o640)
        for p in (conf, acl, server_cert, server_key, site_dir / "ca.crt", site_dir / "crl.pem")
    ]
    todo = share_with_broker(shared)
    return BrokerFiles(conf, acl, server_cert, server_key, port, todo)


def share_with_broker(paths: list[tuple[Path, int]], group: str = BROKER_GROUP) -> tuple[str, ...]:
    """Give ``group`` (the broker's) the access each mode's group bits say, keeping the
    owner's and taking away everyone else's; the shell commands that could not be done here
    (logged at warning). Nothing to do where the group does not exist (the broker then runs as
    whoever runs medge)."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return ()
    todo: list[str] = []
    for path, mode in paths:
        if not path.exists():
            continue
        keep = stat.S_IMODE(path.stat().st_mode) & 0o700
        want = keep | (mode & 0o070)
        try:
            os.chown(path, -1, gid)
            os.chmod(path, want)
        except OSError:
            quoted = shlex.quote(str(path))
            todo.append(f"chgrp {group} {quoted} && chmod {want:o} {quoted}")
    if todo:
        log.warning("for a Mosquitto that runs as user %s, run: %s", group, "; ".join(todo))
    return tuple(todo)
