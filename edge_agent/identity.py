"""A device's identity directory, as `medge device provision` writes it:

identity/
  device.key          ECDSA P-256 private key, mode 0600 (signs epoch keys; TLS client key)
  device.crt          X.509 certificate from the site's device CA: CN=<device>, O=<site>
  ca.crt              the site's device CA (to check the broker and peers)
  recipient.json      the HPKE public key messages are sealed to (gateway or cloud)
  gateway-recipient.json  end-to-end mode: the site gateway's key, for state and telemetry
  source-recipient.json   the fog node's source key: DICOM source UIDs are sealed to it alone
                          (edge_agent.source_ids); absent: results carry no source UIDs
  bundle-signers/     Ed25519 public keys (*.pem) whose bundles this device runs
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from edge_agent.errors import MedgeError
from edge_agent.keys import (
    RecipientKey,
    load_certificate,
    load_device_key,
    load_recipient,
    load_signer_public,
)

__all__ = [
    "DEVICE_CERT",
    "DEVICE_KEY",
    "GATEWAY_RECIPIENT",
    "RECIPIENT",
    "SIGNERS_DIR",
    "SITE_CA",
    "SOURCE_RECIPIENT",
    "DeviceIdentity",
]

DEVICE_KEY = "device.key"
DEVICE_CERT = "device.crt"
SITE_CA = "ca.crt"
RECIPIENT = "recipient.json"
GATEWAY_RECIPIENT = "gateway-recipient.json"
SOURCE_RECIPIENT = "source-recipient.json"
SIGNERS_DIR = "bundle-signers"


def cert_names(cert: x509.Certificate) -> tuple[str | None, str | None]:
    """(site, device) named by a device certificate: O and CN."""

    def one(oid: Any) -> str | None:
        attrs = cert.subject.get_attributes_for_oid(oid)
        return str(attrs[0].value) if attrs else None

    return one(NameOID.ORGANIZATION_NAME), one(NameOID.COMMON_NAME)


@dataclass(frozen=True)
class DeviceIdentity:
    site: str
    device: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    ca: x509.Certificate
    recipient: RecipientKey
    signers: list[ed25519.Ed25519PublicKey]
    directory: Path
    gateway_recipient: RecipientKey | None = None
    source_recipient: RecipientKey | None = None

    @classmethod
    def load(cls, directory: Path, site: str, device: str) -> DeviceIdentity:
        d = Path(directory)
        if not d.is_dir():
            raise MedgeError(f"{d}: no identity directory (run 'medge device provision')")
        key = load_device_key(d / DEVICE_KEY)
        cert = load_certificate(d / DEVICE_CERT)
        ca = load_certificate(d / SITE_CA)
        c_site, c_device = cert_names(cert)
        if (c_site, c_device) != (site, device):
            raise MedgeError(
                f"{d / DEVICE_CERT}: certificate is for {c_site}/{c_device}, "
                f"this device is configured as {site}/{device}"
            )
        if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
            raise MedgeError(f"{d}: {DEVICE_KEY} does not belong to {DEVICE_CERT}")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, Exception) as exc:
            raise MedgeError(f"{d / DEVICE_CERT}: not issued by {d / SITE_CA}") from exc
        recipient = load_recipient(d / RECIPIENT)
        signers_dir = d / SIGNERS_DIR
        signers = [load_signer_public(p) for p in sorted(signers_dir.glob("*.pem"))]
        gw = d / GATEWAY_RECIPIENT
        gateway = load_recipient(gw) if gw.exists() else None
        src = d / SOURCE_RECIPIENT
        source = load_recipient(src) if src.exists() else None
        return cls(site, device, key, cert, ca, recipient, signers, d, gateway, source)
