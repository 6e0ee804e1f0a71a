"""Key material on disk: one definition of each key file medge reads or writes.

- device key: PEM, ECDSA P-256 (also the TLS client key); must be mode 0600
- certificates: PEM X.509
- recipient key (HPKE, the gateway's or the cloud's): JSON with a key id and the suite,
  ``x25519`` or the post-quantum hybrid ``mlkem768-x25519``; the private file is mode 0600
- bundle signer key: PEM Ed25519; its public half is what devices trust
"""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mlkem, x25519

from edge_agent.errors import MedgeError
from edge_agent.files import write_atomic

__all__ = [
    "RecipientKey",
    "Suite",
    "generate_recipient",
    "key_id",
    "load_certificate",
    "load_device_key",
    "load_recipient",
    "load_signer_key",
    "load_signer_public",
    "write_private_pem",
    "write_public_pem",
    "write_secret",
]

Suite = Literal["x25519", "mlkem768-x25519"]


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s, validate=True)


def key_id(public_bytes: bytes) -> str:
    """Short stable identity of a public key: 16 hex of its SHA-256."""
    return hashlib.sha256(public_bytes).hexdigest()[:16]


def write_secret(path: Path, data: bytes) -> None:
    """Write a private file with mode 0600 (never readable by others, not even briefly),
    atomically: a crash leaves the old key or the new one, never half of one."""
    write_atomic(path, data, 0o600)


def _read_secret(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise MedgeError(f"{path}: cannot read key ({exc.strerror})") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MedgeError(f"{path}: private key is readable by others (chmod 600 {path})")
    return data


def write_private_pem(path: Path, key: Any) -> None:
    write_secret(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def write_public_pem(path: Path, key: Any) -> None:
    write_atomic(
        path,
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        0o644,
    )


def load_device_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(_read_secret(path), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise MedgeError(f"{path}: device key must be ECDSA P-256")
    return key


def load_signer_key(path: Path) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(_read_secret(path), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise MedgeError(f"{path}: bundle signing key must be Ed25519")
    return key


def load_signer_public(path: Path) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise MedgeError(f"{path}: not a PEM public key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise MedgeError(f"{path}: bundle signer key must be Ed25519")
    return key


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise MedgeError(f"{path}: not a PEM certificate ({exc})") from exc


@dataclass(frozen=True)
class RecipientKey:
    """An HPKE recipient: the public half always, the private half on the receiver only."""

    kid: str
    suite: Suite
    public: Any
    private: Any | None = None

    def public_json(self) -> dict[str, str]:
        if self.suite == "x25519":
            parts = {"x25519": _b64(self.public.public_bytes_raw())}
        else:
            parts = {"mlkem768": _b64(self._mlkem_pub), "x25519": _b64(self._x_pub)}
        return {"kid": self.kid, "suite": self.suite, **parts}

    # the hybrid public key object hides its halves; keep them for serialization
    _mlkem_pub: bytes = b""
    _x_pub: bytes = b""


def generate_recipient(suite: Suite = "x25519") -> tuple[RecipientKey, dict[str, str]]:
    """A new recipient key and its private JSON (to be written with write_secret)."""
    from cryptography.hazmat.primitives import hpke

    xk = x25519.X25519PrivateKey.generate()
    x_pub = xk.public_key().public_bytes_raw()
    priv = {"x25519_private": _b64(xk.private_bytes_raw())}
    if suite == "x25519":
        kid = "x-" + key_id(x_pub)
        rk = RecipientKey(kid, suite, xk.public_key(), xk)
    else:
        mk = mlkem.MLKEM768PrivateKey.generate()
        m_pub = mk.public_key().public_bytes_raw()
        kid = "pq-" + key_id(m_pub + x_pub)
        pub = hpke.MLKEM768X25519PublicKey(mk.public_key(), xk.public_key())
        rk = RecipientKey(
            kid, suite, pub, hpke.MLKEM768X25519PrivateKey(mk, xk), _mlkem_pub=m_pub, _x_pub=x_pub
        )
        priv["mlkem768_private"] = _b64(mk.private_bytes_raw())
    return rk, {**rk.public_json(), **priv}


def load_recipient(path: Path) -> RecipientKey:
    """Read a recipient key JSON; private parts are read (and mode-checked) when present."""
    from cryptography.hazmat.primitives import hpke

    raw = path.read_bytes() if path.exists() else b""
    try:
        data = json.loads(raw)
        suite, kid = data["suite"], data["kid"]
        x_pub_b = _unb64(data["x25519"])
    except (ValueError, KeyError, TypeError) as exc:
        raise MedgeError(f"{path}: not a medge recipient key file") from exc
    private: x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey | None = None
    has_private = "x25519_private" in data
    if has_private:
        _read_secret(path)  # mode check
    x_pub = x25519.X25519PublicKey.from_public_bytes(x_pub_b)
    if suite == "x25519":
        if has_private:
            private = x25519.X25519PrivateKey.from_private_bytes(_unb64(data["x25519_private"]))
        return RecipientKey(kid, suite, x_pub, private)
    if suite != "mlkem768-x25519":
        raise MedgeError(f"{path}: unknown suite '{suite}'")
    m_pub_b = _unb64(data["mlkem768"])
    pub = hpke.MLKEM768X25519PublicKey(mlkem.MLKEM768PublicKey.from_public_bytes(m_pub_b), x_pub)
    if has_private:
        mk = mlkem.MLKEM768PrivateKey.from_seed_bytes(_unb64(data["mlkem768_private"]))
        xk = x25519.X25519PrivateKey.from_private_bytes(_unb64(data["x25519_private"]))
        private = hpke.MLKEM768X25519PrivateKey(mk, xk)
    return RecipientKey(kid, suite, pub, private, _mlkem_pub=m_pub_b, _x_pub=x_pub_b)
