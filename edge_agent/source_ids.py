"""The identifiers of a result's source image, sealed so that only the fog node reads them.

A result of a DICOM source must say which image it is about (study, series and SOP instance
UIDs) for the fog gateway to write DICOM objects that reference it (gateway.clinical). Those
UIDs identify a patient's study, and the result body reaches the cloud tier unchanged (the
forwarder relays the device's original message; in the default mode the cloud holds the site
key). So the device seals the UIDs once more, with HPKE (RFC 9180, base mode, single shot) to
the fog node's **source key**, which never leaves the fog node: the cloud carries the sealed
blob and cannot open it. This is DICOM PS3.15's own pattern (original values kept encrypted,
for the recipients allowed to re-identify, in the Encrypted Attributes Sequence).

The body field ``source`` (docs/envelope.md)::

    {"kid": "x-...", "suite": "x25519", "ct": "<base64 HPKE enc||ciphertext>", "frame": 3}

- ``ct`` seals the canonical JSON ``{"instance", "series", "sop_class", "study"}`` with
  ``info`` = the canonical binding ``{"device", "kid", "site", "suite", "use", "v"}``
  (``use`` = ``"source-uids"``), so a blob opens only as the device that sealed it;
- ``frame`` (0-based frame of a multi-frame source) is in the clear: it identifies nothing.

A device seals each source instance once (:class:`SourceSealer` keeps the last few), so a cine
of 100 frames costs one HPKE seal. The body itself is authenticated by the envelope, so a
blob cannot be moved to another device's message without the gateway seeing it.
"""

from __future__ import annotations

import base64
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hpke

from edge_agent.envelope_header import KEMS, canonical
from edge_agent.errors import EnvelopeError, one_line
from edge_agent.keys import RecipientKey
from edge_agent.reasons import Reason

__all__ = [
    "NO_SOURCE_KEY",
    "USE",
    "SourceSealer",
    "SourceUids",
    "no_source_key",
    "open_source",
    "seal_source",
]

USE = "source-uids"
_VERSION = 1
_UID_MAX = 64  # DICOM UI: at most 64 characters of digits and dots
_CT_MAX = 4096


@dataclass(frozen=True)
class SourceUids:
    """The DICOM identity of a source image: what a derived object must reference."""

    study: str
    series: str
    instance: str
    sop_class: str

    def __post_init__(self) -> None:
        for name in ("study", "series", "instance", "sop_class"):
            uid = getattr(self, name)
            if not _is_uid(uid):
                raise ValueError(f"source {name} UID {uid!r:.80} is not a DICOM UID")

    def as_json(self) -> dict[str, str]:
        return {
            "instance": self.instance,
            "series": self.series,
            "sop_class": self.sop_class,
            "study": self.study,
        }


def _is_uid(uid: object) -> bool:
    return (
        isinstance(uid, str)
        and 0 < len(uid) <= _UID_MAX
        and all(c.isdigit() or c == "." for c in uid)
        and not uid.startswith(".")
        and not uid.endswith(".")
        and ".." not in uid
    )


def _suite(name: str) -> hpke.Suite:
    return hpke.Suite(KEMS[name], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _info(site: str, device: str, kid: str, suite: str) -> bytes:
    return canonical(
        {"device": device, "kid": kid, "site": site, "suite": suite, "use": USE, "v": _VERSION}
    )


def seal_source(uids: SourceUids, key: RecipientKey, site: str, device: str) -> dict[str, str]:
    """The sealed ``source`` field (without ``frame``) of ``uids``, to ``key``."""
    ct = _suite(key.suite).encrypt(
        canonical(uids.as_json()), key.public, info=_info(site, device, key.kid, key.suite)
    )
    return {"ct": base64.b64encode(ct).decode("ascii"), "kid": key.kid, "suite": key.suite}


class SourceSealer:
    """Seals the UIDs of each source instance once, for one device and one fog source key."""

    def __init__(self, key: RecipientKey, site: str, device: str, keep: int = 64) -> None:
        self.key, self.site, self.device, self.keep = key, site, device, keep
        self._sealed: OrderedDict[SourceUids, dict[str, str]] = OrderedDict()

    def __call__(self, uids: SourceUids, frame: int | None = None) -> dict[str, Any]:
        sealed = self._sealed.get(uids)
        if sealed is None:
            sealed = self._sealed[uids] = seal_source(uids, self.key, self.site, self.device)
            if len(self._sealed) > self.keep:
                self._sealed.popitem(last=False)
        else:
            self._sealed.move_to_end(uids)
        return {**sealed, "frame": frame} if frame is not None else dict(sealed)


NO_SOURCE_KEY = (
    "the device's identity has no source key, so it sealed no source UIDs "
    "(medge site source-key, then medge device provision again)"
)


def no_source_key(uids: SourceUids, frame: int | None = None) -> dict[str, Any]:
    """The ``source`` field of a DICOM sample's result on a device without the fog's source
    key: no UID, only why, so that the fog node parks the result with that reason (seen in
    ``medge gateway outputs --parked`` and its metrics) instead of never hearing of it."""
    return {"missing": NO_SOURCE_KEY, **({"frame": frame} if frame is not None else {})}


def open_source(
    field: Any, site: str, device: str, keys: Mapping[str, RecipientKey]
) -> tuple[SourceUids, int | None]:
    """The UIDs and frame of a result's ``source`` field, with the fog's source keys (by key
    id, each with its private half). One :class:`EnvelopeError` names what is wrong: not a
    sealed source, a key this node does not hold, a blob that does not open as this device's,
    or UIDs that are not UIDs."""
    who = f"{site}/{device}"
    if not isinstance(field, Mapping):
        raise EnvelopeError(f"{who}: 'source' is not an object", Reason.SCHEMA)
    missing = field.get("missing")
    if isinstance(missing, str):
        raise EnvelopeError(f"{who}: no source UIDs: {one_line(missing, 200)}", Reason.SCHEMA)
    kid, suite, ct, frame = (
        field.get("kid"),
        field.get("suite"),
        field.get("ct"),
        field.get("frame"),
    )
    if not (isinstance(kid, str) and isinstance(suite, str) and isinstance(ct, str)):
        raise EnvelopeError(f"{who}: 'source' lacks kid, suite or ct", Reason.SCHEMA)
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int) or frame < 0):
        raise EnvelopeError(f"{who}: 'source.frame' is not a frame number", Reason.SCHEMA)
    key = keys.get(kid)
    if key is None or key.private is None:
        raise EnvelopeError(
            f"{who}: source UIDs are sealed to key {kid:.64}, which this node does not hold",
            Reason.UNKNOWN_KEY,
        )
    if suite != key.suite or len(ct) > _CT_MAX:
        raise EnvelopeError(f"{who}: 'source' suite or size does not fit key {kid}", Reason.SCHEMA)
    try:
        blob = base64.b64decode(ct, validate=True)
        plain = _suite(suite).decrypt(blob, key.private, info=_info(site, device, kid, suite))
    except Exception as exc:  # bad base64, and the several types the HPKE layer raises
        raise EnvelopeError(
            f"{who}: source UIDs do not open with key {kid} as this device's",
            Reason.AUTHENTICATION,
        ) from exc
    try:
        data = json.loads(plain)
        uids = SourceUids(data["study"], data["series"], data["instance"], data["sop_class"])
    except (ValueError, KeyError, TypeError) as exc:
        raise EnvelopeError(f"{who}: sealed source UIDs are malformed", Reason.SCHEMA) from exc
    return uids, frame
