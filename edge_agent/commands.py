"""The signed commands a gateway sends a device on its ``cmd`` topic (docs/device.md):
their one definition, how they are signed (:func:`sign_command`) and how a device checks one
(:func:`verify_command`); :mod:`edge_agent.update` carries them out.

A command is signed with the site's bundle signer (Ed25519, the key whose public half is in the
identity's ``bundle-signers/``)::

    {"v": 2, "cmd": "update-bundle", "site": S, "device": D, "url": "http://fog/x.tar.gz",
     "sha256": "<of the archive>", "issued_ms": 1764000000000, "key_id": K, "sig": "<b64>"}

``cmd`` is one of :data:`COMMANDS`: ``update-bundle`` (url, sha256, optional
``allow_downgrade``), ``shadow-bundle`` (url, sha256, optional ``share``, ``cpu_budget``),
``shadow-stop``, ``rollback-bundle`` (optional ``to``). The payload's shape is checked strictly
first (``edge_agent.schemas.parse_cmd``: bounded size and depth, typed fields, nothing
unknown). The signature covers the canonical JSON of every other field (sorted keys, no
spaces), so a command is bound to one device; the updater refuses one whose ``issued_ms`` is
not newer than the last command it took (no replays).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_agent.errors import EnvelopeError, MedgeError, one_line
from edge_agent.keys import key_id
from edge_agent.schemas import parse_cmd

__all__ = [
    "COMMANDED",
    "COMMANDS",
    "COMMAND_VERSION",
    "SHADOW_CPU_BUDGET",
    "SHADOW_SHARE",
    "UpdateCommand",
    "UpdateError",
    "sign_command",
    "verify_command",
]

COMMAND_VERSION = 2


class UpdateError(MedgeError):
    """An update command or bundle was refused; the message is the reason reported."""


COMMANDS = ("update-bundle", "shadow-bundle", "shadow-stop", "rollback-bundle")
SHADOW_SHARE = 0.25  # a shadow-bundle command without ``share``
COMMANDED = "commanded"  # the reason of a rolled_back event the gateway asked for
SHADOW_CPU_BUDGET = 0.5  # ... without ``cpu_budget``


class UpdateCommand:
    def __init__(
        self,
        url: str,
        sha256: str,
        issued_ms: int,
        signer: str,
        allow_downgrade: bool = False,
        cmd: str = "update-bundle",
        share: float = SHADOW_SHARE,
        cpu_budget: float = SHADOW_CPU_BUDGET,
        to: str | None = None,
    ) -> None:
        self.url, self.sha256, self.issued_ms, self.signer = url, sha256, issued_ms, signer
        self.allow_downgrade, self.cmd = allow_downgrade, cmd
        self.share, self.cpu_budget, self.to = share, cpu_budget, to


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_command(body: dict[str, Any], key: ed25519.Ed25519PrivateKey) -> bytes:
    """The wire form of a command: ``body`` plus ``key_id`` and its Ed25519 ``sig``."""
    doc = {**body, "key_id": key_id(key.public_key().public_bytes_raw())}
    doc["sig"] = base64.b64encode(key.sign(_canonical(doc))).decode()
    return _canonical(doc)


def _authenticate(
    payload: bytes, trusted: list[ed25519.Ed25519PublicKey]
) -> tuple[dict[str, Any], str]:
    """The command's fields and its signer's key id, once its Ed25519 signature verifies."""
    try:
        doc = parse_cmd(payload)  # size, depth, types, no unknown fields: one EnvelopeError
        sig = base64.b64decode(doc.pop("sig"), validate=True)
        signer = str(doc["key_id"])
    except EnvelopeError as exc:
        raise UpdateError(one_line(f"malformed command: {exc}")) from exc
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise UpdateError(f"malformed command ({exc.__class__.__name__})") from exc
    by_id = {key_id(k.public_bytes_raw()): k for k in trusted}
    if signer not in by_id:
        raise UpdateError(
            one_line(f"command signed by key {signer!r}, which this device does not trust")
        )
    try:
        by_id[signer].verify(sig, _canonical(doc))
    except InvalidSignature as exc:
        raise UpdateError("command signature does not verify") from exc
    return doc, signer


def verify_command(
    payload: bytes, trusted: list[ed25519.Ed25519PublicKey], site: str, device: str
) -> UpdateCommand:
    """Parse and authenticate a command for this device (:data:`COMMANDS`); UpdateError says
    why not."""
    doc, signer = _authenticate(payload, trusted)
    kind = doc.get("cmd")
    if doc.get("v") != COMMAND_VERSION or kind not in COMMANDS:
        raise UpdateError(one_line(f"unsupported command {kind!r} version {doc.get('v')!r}"))
    if (doc.get("site"), doc.get("device")) != (site, device):
        raise UpdateError(
            one_line(f"command is for {doc.get('site')!r}/{doc.get('device')!r}, not this device")
        )
    issued = doc.get("issued_ms")
    if not isinstance(issued, int):
        raise UpdateError("command issued_ms must be an integer")
    if kind == "shadow-stop":
        return UpdateCommand("", "", issued, signer, cmd=kind)
    if kind == "rollback-bundle":
        to = doc.get("to")
        return UpdateCommand(
            "", "", issued, signer, cmd=kind, to=to if isinstance(to, str) else None
        )
    url, digest = doc.get("url"), doc.get("sha256")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise UpdateError("command url must be http:// or https://")
    if not isinstance(digest, str) or len(digest) != 64:
        raise UpdateError("command sha256 must be 64 hex digits")
    allow = doc.get("allow_downgrade", False)
    if not isinstance(allow, bool):
        raise UpdateError("command allow_downgrade must be true or false")
    share = float(doc.get("share", SHADOW_SHARE))  # typed and bounded by parse_cmd
    budget = float(doc.get("cpu_budget", SHADOW_CPU_BUDGET))
    return UpdateCommand(url, digest.lower(), issued, signer, allow, kind, share, budget)
