"""`medge site ...` and `medge device ...`: trust anchors, device identities, revocation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register", "register_broker_config"]


def cmd_site_init(a: argparse.Namespace) -> int:
    from gateway.site import init_site, recipients

    init_site(a.dir, a.site, "mlkem768-x25519" if a.post_quantum else "x25519")
    r = recipients(a.dir)[0]
    out = {"site": a.site, "dir": str(a.dir), "recipient_kid": r.kid, "suite": r.suite}
    print(
        json.dumps(out)
        if a.json
        else f"site {a.site} created in {a.dir} (gateway key {r.kid}, {r.suite}); keep ca.key, "
        "recipient.json and bundle-signer.key on the fog node only"
    )
    return 0


def cmd_site_rotate(a: argparse.Namespace) -> int:
    from gateway.site import rotate_recipient

    kid = rotate_recipient(a.dir)
    print(
        f"new gateway key {kid}; the previous one stays in {a.dir / 'recipients'} until you "
        "remove it (after every device has the new recipient.json)"
    )
    return 0


def cmd_site_cloud_key(a: argparse.Namespace) -> int:
    from gateway.site import write_recipient

    public = write_recipient(a.out, "mlkem768-x25519" if a.post_quantum else "x25519")
    print(
        f"private key {a.out} (mode 0600: it stays in the cloud); give {public} to sites "
        "('medge device provision --recipient', 'medge gateway run --relay-for')"
    )
    return 0


def cmd_site_source_key(a: argparse.Namespace) -> int:
    from gateway.site import write_source_key

    kid = write_source_key(a.dir, a.out, "mlkem768-x25519" if a.post_quantum else None)
    print(
        f"source key {kid}: private key {a.out} (mode 0600: it stays on the fog node; list it "
        f"in the gateway's outputs.source_key); public half {a.dir / 'source-recipient.json'}, "
        "put into every identity 'medge device provision' writes from now on"
    )
    return 0


def cmd_device_provision(a: argparse.Namespace) -> int:
    from gateway.site import provision_device

    out = provision_device(a.site_dir, a.device, a.out, days=a.days, recipient=a.recipient)
    print(
        f"identity of {a.device} written to {out} (device.key is mode 0600: copy it only "
        "onto the device)"
    )
    return 0


def cmd_device_revoke(a: argparse.Namespace) -> int:
    from gateway.site import revoke_device

    revoke_device(a.site_dir, a.device)
    print(
        f"{a.device} revoked: added to {a.site_dir / 'crl.pem'} (use it as the broker's "
        "crlfile too)"
    )
    return 0


def register(sub: Any, common: Any) -> None:
    s = sub.add_parser(
        "site",
        help="create and manage a site's keys (on the fog node)",
        description="A site holds the device CA, the gateway's HPKE key that "
        "devices seal results to, and the key that signs bundles.",
    )
    ssub = s.add_subparsers(dest="site_command", required=True, metavar="ACTION")
    i = ssub.add_parser("init", help="create a new site directory")
    i.add_argument("--dir", type=Path, required=True, help="site directory to create")
    i.add_argument("--site", required=True, help="site name, e.g. ward-a")
    i.add_argument(
        "--post-quantum",
        action="store_true",
        help="seal to an ML-KEM-768+X25519 hybrid key (for data that must stay "
        "confidential past today's public-key cryptography; ~1.2 KB per message)",
    )
    common(i, json_flag=True)
    i.set_defaults(func=cmd_site_init)
    r = ssub.add_parser("rotate-key", help="replace the gateway's HPKE key, keep the old for grace")
    r.add_argument("--dir", type=Path, required=True, help="site directory")
    common(r)
    r.set_defaults(func=cmd_site_rotate)
    k = ssub.add_parser(
        "cloud-key",
        help="a key for end-to-end mode: only its holder reads bodies",
        description="Create the recipient key of a receiver beyond the fog "
        "gateway (the cloud). Devices provisioned with --recipient seal bodies "
        "to it; the site gateway relays them unread (docs/security.md).",
    )
    k.add_argument("--out", type=Path, required=True, help="private key file to write")
    k.add_argument("--post-quantum", action="store_true", help="ML-KEM-768+X25519 hybrid")
    common(k)
    k.set_defaults(func=cmd_site_cloud_key)
    u = ssub.add_parser(
        "source-key",
        help="a key only the fog node holds, for the UIDs of DICOM sources",
        description="Create the fog node's source key. Devices provisioned after it seal the "
        "study/series/instance UIDs of DICOM results to it, so the fog gateway can write "
        "DICOM objects for the PACS while the cloud tier, which gets the same messages, cannot "
        "read them (docs/outputs.md). The private key must stay outside the site directory.",
    )
    u.add_argument("--dir", type=Path, required=True, help="site directory (gets the public half)")
    u.add_argument("--out", type=Path, required=True, help="private key file to write (fog only)")
    u.add_argument(
        "--post-quantum", action="store_true", help="ML-KEM-768+X25519 hybrid (default: the site's)"
    )
    common(u)
    u.set_defaults(func=cmd_site_source_key)

    d = sub.add_parser(
        "device",
        help="provision and revoke device identities",
        description="Device identity: an ECDSA P-256 key and a certificate "
        "from the site's CA (CN=device, O=site).",
    )
    dsub = d.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    p = dsub.add_parser("provision", help="create a device key and certificate, register it")
    p.add_argument("device", help="device name, unique in its site")
    p.add_argument("--site-dir", type=Path, required=True, help="site directory")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="identity directory to write (goes into the device package)",
    )
    p.add_argument("--days", type=int, default=825, help="certificate lifetime (default 825)")
    p.add_argument(
        "--recipient",
        type=Path,
        help="end-to-end mode: seal to this public key (the cloud's, from 'medge site "
        "cloud-key') instead of the site gateway's",
    )
    common(p)
    p.set_defaults(func=cmd_device_provision)
    v = dsub.add_parser("revoke", help="revoke a device: the gateway refuses it from then on")
    v.add_argument("device")
    v.add_argument("--site-dir", type=Path, required=True, help="site directory")
    common(v)
    v.set_defaults(func=cmd_device_revoke)


def cmd_broker_config(a: argparse.Namespace) -> int:
    from gateway.broker_config import write_broker_config

    files = write_broker_config(
        a.site_dir,
        a.out,
        port=a.port,
        bind=a.bind,
        names=tuple(a.name or ["localhost", "127.0.0.1"]),
    )
    print(f"wrote {files.conf} and {files.acl}; start it with: mosquitto -c {files.conf}")
    if a.forwarder:
        from gateway.broker_config import forwarder_client_files

        ca, cert, key = forwarder_client_files(a.site_dir)
        print(f"fog forwarder identity: --forward-tls {ca} {cert} {key}")
    return 0


def register_broker_config(gsub: Any, common: Any) -> None:
    b = gsub.add_parser(
        "broker-config",
        help="write a Mosquitto configuration for the site",
        description="TLS listener requiring device certificates from the site CA; the "
        "certificate CN is the user name and the client id; ACLs on %u let a device publish "
        "only under medge/v1/<site>/<its name>/ and read only its own ack and cmd; the site's "
        "CRL; raised queue limits with a byte cap; persistence on.",
    )
    b.add_argument("--site-dir", type=Path, required=True, help="site directory")
    b.add_argument("--out", type=Path, required=True, help="directory for the broker's files")
    b.add_argument("--port", type=int, default=8883, help="TLS port (default 8883)")
    b.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    b.add_argument(
        "--name",
        action="append",
        help="host name or IP devices use for the broker (repeatable; first is CN)",
    )
    b.add_argument(
        "--forwarder",
        action="store_true",
        help="for a cloud broker: also issue the fog forwarder's client certificate "
        "(SITE/forwarder.crt, .key; CN medge-forwarder) and print its --forward-tls arguments",
    )
    common(b)
    b.set_defaults(func=cmd_broker_config)
