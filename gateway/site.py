"""A site's trust anchor on the fog node: device CA, revocations, the gateway's HPKE key,
the bundle signer, and the registered devices. `medge site init` / `medge device provision`.

    site/
      site.json                 {"site": NAME}
      ca.key, ca.crt            device CA (ECDSA P-256); ca.key mode 0600
      crl.pem                   revoked device certificates, signed by the CA
      recipient.json            the gateway's HPKE private key (mode 0600); its kid names it
      recipients/<kid>.json     earlier recipient keys, kept for a grace period after rotation
      bundle-signer.key, .pem   Ed25519 key that signs bundles for this site's devices
      devices/<device>.crt      registered device certificates
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from edge_agent import identity as idn
from edge_agent.envelope import Opener
from edge_agent.errors import EnvelopeError, MedgeError
from edge_agent.files import write_atomic
from edge_agent.keys import (
    RecipientKey,
    Suite,
    generate_recipient,
    load_certificate,
    load_recipient,
    load_signer_key,
    write_private_pem,
    write_public_pem,
    write_secret,
)
from edge_agent.reasons import Reason
from edge_agent.topics import check_name

__all__ = [
    "DeviceRegistry",
    "init_site",
    "opener_for",
    "provision_device",
    "recipients",
    "revoke_device",
    "rotate_recipient",
    "signer_key",
    "site_name",
    "write_recipient",
    "write_source_key",
]

_UTC = dt.timezone.utc
_PUBLIC = 0o644  # certificates, public keys, the CRL, site.json
log = logging.getLogger("medge.gateway.site")


def _now() -> dt.datetime:
    return dt.datetime.now(_UTC)


def site_name(site_dir: Path) -> str:
    try:
        return str(json.loads((site_dir / "site.json").read_text())["site"])
    except (OSError, ValueError, KeyError) as exc:
        raise MedgeError(f"{site_dir}: not a medge site directory (run 'medge site init')") from exc


def init_site(site_dir: Path, site: str, suite: Suite = "x25519") -> None:
    """Create the CA, the gateway's recipient key and the bundle signer of a new site."""
    check_name("site", site)
    if (site_dir / "site.json").exists():
        raise MedgeError(f"{site_dir}: a site already exists here")
    site_dir.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, site),
            x509.NameAttribute(NameOID.COMMON_NAME, f"medge device CA {site}"),
        ]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_private_pem(site_dir / "ca.key", ca_key)
    write_atomic(site_dir / "ca.crt", ca.public_bytes(serialization.Encoding.PEM), _PUBLIC)
    _, private = generate_recipient(suite)
    write_secret(site_dir / "recipient.json", json.dumps(private, indent=2).encode())
    signer = ed25519.Ed25519PrivateKey.generate()
    write_private_pem(site_dir / "bundle-signer.key", signer)
    write_public_pem(site_dir / "bundle-signer.pem", signer.public_key())
    (site_dir / "devices").mkdir(exist_ok=True)
    _write_crl(site_dir, [])
    write_atomic(site_dir / "site.json", (json.dumps({"site": site}) + "\n").encode(), _PUBLIC)


def provision_device(
    site_dir: Path, device: str, out: Path, days: int = 825, recipient: Path | None = None
) -> Path:
    """Key pair + certificate for a device, registered with the site; the identity directory
    the device package needs is written to ``out``. ``recipient``: seal to this public key (the
    cloud's, for end-to-end mode) instead of the site gateway's."""
    site = site_name(site_dir)
    check_name("device", device)
    if device.startswith("medge-"):
        raise MedgeError(f"device name '{device}': names starting with 'medge-' are reserved")
    registered = site_dir / "devices" / f"{device}.crt"
    if registered.exists():
        raise MedgeError(f"device {site}/{device} is already provisioned (revoke it first)")
    ca_key, ca = _ca(site_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, site),
            x509.NameAttribute(NameOID.COMMON_NAME, device),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    out.mkdir(parents=True, exist_ok=True)
    write_private_pem(out / idn.DEVICE_KEY, key)
    write_atomic(out / idn.DEVICE_CERT, pem, _PUBLIC)
    write_atomic(out / idn.SITE_CA, (site_dir / "ca.crt").read_bytes(), _PUBLIC)
    own = load_recipient(site_dir / "recipient.json").public_json()
    sealed_to = load_recipient(recipient).public_json() if recipient else own
    write_atomic(out / idn.RECIPIENT, _json(sealed_to), _PUBLIC)
    if recipient:  # state and telemetry still go to the site gateway, which must read them
        write_atomic(out / idn.GATEWAY_RECIPIENT, _json(own), _PUBLIC)
    source = site_dir / idn.SOURCE_RECIPIENT
    if source.exists():  # DICOM source UIDs: sealed to the fog node alone (write_source_key)
        write_atomic(out / idn.SOURCE_RECIPIENT, source.read_bytes(), _PUBLIC)
    signer = (site_dir / "bundle-signer.pem").read_bytes()
    write_atomic(out / idn.SIGNERS_DIR / f"{site}.pem", signer, _PUBLIC)
    write_atomic(registered, pem, _PUBLIC)
    return out


def revoke_device(site_dir: Path, device: str) -> None:
    """Add the device's certificate to the site's CRL; the gateway refuses it from then on."""
    path = site_dir / "devices" / f"{device}.crt"
    if not path.exists():
        raise MedgeError(f"device {device} is not registered at {site_dir}")
    serials = _revoked_serials(site_dir)
    serials.add(load_certificate(path).serial_number)
    _write_crl(site_dir, sorted(serials))


def write_recipient(out: Path, suite: Suite = "x25519") -> Path:
    """A recipient key pair for a receiver outside the site (the cloud): the private JSON at
    ``out`` (mode 0600) and the public JSON beside it as ``<stem>.pub.json``."""
    key, private = generate_recipient(suite)
    write_secret(out, json.dumps(private, indent=2).encode())
    public = out.with_name(out.stem + ".pub.json")
    write_atomic(public, _json(key.public_json()), _PUBLIC)
    return public


def write_source_key(site_dir: Path, out: Path, suite: Suite | None = None) -> str:
    """The fog node's source key (edge_agent.source_ids): the private JSON at ``out`` (mode
    0600), which must stay on the fog node and so outside the site directory (the cloud tier
    may hold a copy of that); its public half as ``source-recipient.json`` in the site
    directory, which ``provision_device`` puts into every identity from then on. A previous
    key's file stays where it is: keep it in the gateway's ``outputs.source_key`` until no
    device seals to it. Returns the new key id."""
    site = site_dir.resolve()
    if out.resolve().is_relative_to(site):
        raise MedgeError(
            f"{out}: the source key must not be inside the site directory {site_dir} (the "
            "cloud tier may hold a copy of it, and this key is for the fog node alone)"
        )
    own = load_recipient(site_dir / "recipient.json")
    key, private = generate_recipient(suite or own.suite)
    write_secret(out, json.dumps(private, indent=2).encode())
    write_atomic(site_dir / idn.SOURCE_RECIPIENT, _json(key.public_json()), _PUBLIC)
    return key.kid


def _json(doc: dict[str, str]) -> bytes:
    return (json.dumps(doc, indent=2) + "\n").encode()


def rotate_recipient(site_dir: Path, suite: Suite | None = None) -> str:
    """A new gateway HPKE key; the old one moves to recipients/ and still opens messages."""
    current = site_dir / "recipient.json"
    old = load_recipient(current)
    # the old key is kept first, then the new one replaces it: recipient.json always exists
    write_secret(site_dir / "recipients" / f"{old.kid}.json", current.read_bytes())
    new, private = generate_recipient(suite or old.suite)
    write_secret(site_dir / "recipient.json", json.dumps(private, indent=2).encode())
    return new.kid


def recipients(site_dir: Path) -> list[RecipientKey]:
    """The current recipient key and those kept from earlier rotations."""
    keys = [load_recipient(site_dir / "recipient.json")]
    keys += [load_recipient(p) for p in sorted((site_dir / "recipients").glob("*.json"))]
    return keys


def signer_key(site_dir: Path) -> ed25519.Ed25519PrivateKey:
    return load_signer_key(site_dir / "bundle-signer.key")


def _ca(site_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    from edge_agent.keys import load_device_key  # same format: ECDSA P-256, mode 0600

    return load_device_key(site_dir / "ca.key"), load_certificate(site_dir / "ca.crt")


def _revoked_serials(site_dir: Path) -> set[int]:
    """The serials on the site's CRL; a CRL that exists but cannot be read is an error (a
    revocation written over it would silently un-revoke every device on it)."""
    path = site_dir / "crl.pem"
    if not path.exists():
        return set()
    _, ca = _ca(site_dir)
    return {r.serial_number for r in _load_crl(path, ca)}


def _load_crl(path: Path, ca: x509.Certificate) -> x509.CertificateRevocationList:
    """The CRL at ``path``, signed by the site CA; MedgeError (one line) otherwise."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except OSError as exc:
        raise MedgeError(f"{path}: cannot read the CRL ({exc.strerror})") from exc
    except ValueError as exc:
        raise MedgeError(f"{path}: not a PEM CRL (empty or half written?)") from exc
    if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise MedgeError(f"{path}: CRL is not signed by the site CA")
    return crl


def _write_crl(site_dir: Path, serials: list[int]) -> None:
    ca_key, ca = _ca(site_dir)
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(_now())
        .next_update(_now() + dt.timedelta(days=30))
    )
    for s in serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(s).revocation_date(_now()).build()
        )
    pem = b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    write_atomic(site_dir / "crl.pem", pem, _PUBLIC)  # readers see the old CRL or the new


# (checked at, certificate file mtime, serial, not valid after, public key)
_Entry = tuple[float, float, int, dt.datetime, ec.EllipticCurvePublicKey]


class DeviceRegistry:
    """Which devices may speak, and with which key: registered certificates issued by the site
    CA, valid now, not on the CRL (re-read when the file changes)."""

    def __init__(self, site_dir: Path) -> None:
        """MedgeError if the CRL cannot be read now: a gateway does not start without the
        revocations it must enforce."""
        self.site_dir = site_dir
        self.site = site_name(site_dir)
        self._ca = load_certificate(site_dir / "ca.crt")
        self._lock = threading.Lock()
        self._crl_seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._revoked: set[int] = set()
        self._certs: dict[str, _Entry] = {}
        self.recheck_s = 1.0
        self.crl_errors = 0  # CRL files that could not be read (the previous CRL was kept)
        self._refresh_crl(first=True)

    def _refresh_crl(self, first: bool = False) -> None:
        """Re-read crl.pem when it changed. One that cannot be read (empty, half written by a
        copy, not signed by the CA) leaves the previous revocations in force: said in one
        line, counted, read again once the file changes."""
        path = self.site_dir / "crl.pem"
        try:
            st = path.stat()
        except FileNotFoundError:
            seen: tuple[int, int] = (0, -1)
        except OSError as exc:
            seen = (-1, -1)
            if seen != self._crl_seen:
                self._crl_unreadable(path, MedgeError(f"{path}: {exc.strerror}"), first)
                self._crl_seen = seen
            return
        else:
            seen = (st.st_mtime_ns, st.st_size)
        if seen == self._crl_seen:
            return
        self._crl_seen = seen
        if seen[1] == -1:
            self._revoked = set()
            return
        try:
            crl = _load_crl(path, self._ca)
        except MedgeError as exc:
            self._crl_unreadable(path, exc, first)
            return
        self._revoked = {r.serial_number for r in crl}

    def _crl_unreadable(self, path: Path, exc: MedgeError, first: bool) -> None:
        if first:
            raise exc
        self.crl_errors += 1
        log.error(
            "%s; the previous CRL (%d revoked) stays in force (%d unreadable so far)",
            exc,
            len(self._revoked),
            self.crl_errors,
        )

    def key_for(self, site: str, device: str) -> ec.EllipticCurvePublicKey:
        """The device's trusted key. Registration and the CRL are re-read from disk at most
        once per ``recheck_s`` (1 s), so a revocation takes effect within a second."""
        if site != self.site:
            raise EnvelopeError(
                f"device {site}/{device} is not of this site ({self.site})", Reason.DEVICE
            )
        now = time.monotonic()
        with self._lock:
            cached = self._certs.get(device)
        if cached is None or now - cached[0] >= self.recheck_s:
            cached = self._reload(site, device, now)
        _, _, serial, not_after, key = cached
        with self._lock:
            revoked = serial in self._revoked
        if revoked:
            raise EnvelopeError(f"device {site}/{device} is revoked", Reason.DEVICE)
        if _now() > not_after:
            raise EnvelopeError(f"certificate of {site}/{device} has expired", Reason.DEVICE)
        return key

    def _reload(self, site: str, device: str, now: float) -> _Entry:
        path = self.site_dir / "devices" / f"{device}.crt"
        try:
            mtime = path.stat().st_mtime
        except OSError:
            with self._lock:
                self._certs.pop(device, None)
            raise EnvelopeError(f"unknown device {site}/{device}", Reason.DEVICE) from None
        with self._lock:
            self._refresh_crl()
            old = self._certs.get(device)
        if old is not None and old[1] == mtime:
            entry: _Entry = (now, *old[1:])
        else:
            try:
                cert = load_certificate(path)
            except MedgeError as exc:  # a registration file being written, or damaged
                raise EnvelopeError(f"{exc}", Reason.DEVICE) from exc
            entry = (now, mtime, *self._check(site, device, cert))
        with self._lock:
            self._certs[device] = entry
        return entry

    def _check(
        self, site: str, device: str, cert: x509.Certificate
    ) -> tuple[int, dt.datetime, ec.EllipticCurvePublicKey]:
        try:
            cert.verify_directly_issued_by(self._ca)
        except Exception as exc:  # ValueError, TypeError, InvalidSignature
            raise EnvelopeError(
                f"certificate of {site}/{device} is not from the site CA", Reason.DEVICE
            ) from exc
        if _now() < cert.not_valid_before_utc:
            raise EnvelopeError(f"certificate of {site}/{device} is not valid yet", Reason.DEVICE)
        if idn.cert_names(cert) != (site, device):
            raise EnvelopeError(
                f"certificate registered for {device} names another device", Reason.DEVICE
            )
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise EnvelopeError(f"certificate of {site}/{device} has no ECDSA key", Reason.DEVICE)
        return cert.serial_number, cert.not_valid_after_utc, key


def opener_for(
    site_dir: Path,
    recheck_s: float = 1.0,
    relay_for: tuple[Path, ...] = (),
    keys: tuple[Path, ...] = (),
) -> Opener:
    """What the gateway of this site opens device envelopes with. Registrations and the CRL
    are re-read at most every ``recheck_s`` seconds. ``relay_for``: public keys (the cloud's)
    whose end-to-end messages the gateway relays without reading them. ``keys``: further
    private recipient keys to open with (the cloud tier's own key, docs/forwarding.md)."""
    registry = DeviceRegistry(site_dir)
    registry.recheck_s = recheck_s
    relay = tuple(load_recipient(p).kid for p in relay_for)
    own = recipients(site_dir) + [load_recipient(p) for p in keys]
    return Opener(own, registry.key_for, relay_kids=relay)
