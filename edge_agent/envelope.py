"""The envelope every device message travels in. One definition; see docs/envelope.md.

Version 2: a JSON object whose header is in the clear and authenticated, and whose body is
encrypted. Per epoch the device draws a fresh AES-256-GCM key, seals it to the recipient's public
key with HPKE (RFC 9180; X25519 or the ML-KEM-768+X25519 hybrid) and signs that binding with its
own ECDSA P-256 device key; each message then costs one AES-GCM operation. The nonce is the
device's sequence number, which never repeats, and every epoch has a fresh key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge_agent.errors import EnvelopeError
from edge_agent.keys import RecipientKey
from edge_agent.topics import UP_KINDS, TopicParts, check_name

__all__ = [
    "MAX_BYTES",
    "VERSION",
    "Envelope",
    "Opener",
    "Sealer",
    "decode_ack",
    "encode_ack",
]

VERSION = 2
MAX_BYTES = 256 * 1024
_MAX_SEQ = 2**63 - 1
_HEADER = (
    "v",
    "kind",
    "site",
    "device",
    "seq",
    "time",
    "kid",
    "suite",
    "epoch",
    "ek",
    "es",
    "alert",
)
_ALERT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_KEMS = {"x25519": hpke.KEM.X25519, "mlkem768-x25519": hpke.KEM.MLKEM768_X25519}


@dataclass(frozen=True)
class Envelope:
    """An opened message: the header fields and the plaintext body."""

    kind: str
    site: str
    device: str
    seq: int
    time: float
    body: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    alert: str | None = None
    """The minimal event field carried in the clear header (e.g. "fall"), for routing and
    alerts by a relay that cannot read the body."""
    sealed: bytes | None = None
    """End-to-end mode, at a relay: the whole message, whose body only its recipient opens."""

    def check_topic(self, parts: TopicParts) -> None:
        """The header must name the same site, device and kind as the topic it arrived on."""
        if (parts.site, parts.device, parts.kind) != (self.site, self.device, self.kind):
            raise EnvelopeError(
                f"header {self.site}/{self.device}/{self.kind} does not match topic "
                f"{parts.site}/{parts.device}/{parts.kind}"
            )


def _canon(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _suite(name: str) -> hpke.Suite:
    return hpke.Suite(_KEMS[name], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _binding(site: str, device: str, epoch: int, kid: str, suite: str) -> dict[str, Any]:
    return {
        "v": VERSION,
        "site": site,
        "device": device,
        "epoch": epoch,
        "kid": kid,
        "suite": suite,
    }


def _nonce(seq: int) -> bytes:
    return b"\x00\x00\x00\x00" + seq.to_bytes(8, "big")


class Sealer:
    """Device side: seals envelopes for one recipient under rotating epoch keys. Thread-safe."""

    def __init__(
        self,
        site: str,
        device: str,
        device_key: ec.EllipticCurvePrivateKey,
        recipient: RecipientKey,
        next_epoch: Callable[[], int],
        rotate_after: int = 100_000,
        end_to_end: bool = False,
    ) -> None:
        """``end_to_end``: the recipient is the cloud and the fog gateway only relays, so every
        message also carries ``hs``, the device's signature over its header and ciphertext,
        which the relay checks without being able to read the body."""
        self.site, self.device = check_name("site", site), check_name("device", device)
        self._end_to_end = end_to_end
        self._key = device_key
        self._recipient = recipient
        self._next_epoch = next_epoch
        self._rotate_after = rotate_after
        self._lock = threading.Lock()
        self._start_epoch(next_epoch())

    @property
    def epoch(self) -> int:
        return self._epoch

    def _start_epoch(self, epoch: int) -> None:
        r = self._recipient
        binding = _binding(self.site, self.device, epoch, r.kid, r.suite)
        key = AESGCM.generate_key(bit_length=256)
        ek = _suite(r.suite).encrypt(key, r.public, info=_canon(binding))
        es = self._key.sign(
            _canon({**binding, "ek": base64.b64encode(ek).decode()}), ec.ECDSA(hashes.SHA256())
        )
        self._epoch, self._aead, self._used = epoch, AESGCM(key), 0
        self._ek = base64.b64encode(ek).decode()
        self._es = base64.b64encode(es).decode()

    def rotate(self) -> int:
        """Start the next epoch now (a fresh key); returns its number."""
        with self._lock:
            self._start_epoch(self._next_epoch())
            return self._epoch

    def seal(self, env: Envelope) -> bytes:
        if (env.site, env.device) != (self.site, self.device):
            raise EnvelopeError(f"this sealer is {self.site}/{self.device}, not {env.device}")
        if env.kind not in UP_KINDS or not 0 < env.seq <= _MAX_SEQ:
            raise EnvelopeError(f"cannot seal kind {env.kind!r} seq {env.seq!r}")
        if env.alert is not None and not _ALERT.match(env.alert):
            raise EnvelopeError(f"alert {env.alert!r} must be 1-32 of [a-z0-9_-]")
        with self._lock:
            if self._used >= self._rotate_after:
                self._start_epoch(self._next_epoch())
            self._used += 1
            r = self._recipient
            header = {
                "v": VERSION,
                "kind": env.kind,
                "site": env.site,
                "device": env.device,
                "seq": env.seq,
                "time": env.time,
                "kid": r.kid,
                "suite": r.suite,
                "epoch": self._epoch,
                "ek": self._ek,
                "es": self._es,
                "alert": env.alert,
            }
            ct = self._aead.encrypt(_nonce(env.seq), _canon(env.body), _canon(header))
        message: dict[str, Any] = {**header, "ct": base64.b64encode(ct).decode()}
        if self._end_to_end:
            sig = self._key.sign(_relay_signed(header, ct), ec.ECDSA(hashes.SHA256()))
            message["hs"] = base64.b64encode(sig).decode()
        out = _canon(message)
        if len(out) > MAX_BYTES:
            raise EnvelopeError(f"envelope of {len(out)} bytes exceeds {MAX_BYTES}")
        return out


DeviceKeyLookup = Callable[[str, str], ec.EllipticCurvePublicKey]


class Opener:
    """Receiver side: checks and opens envelopes. ``device_key(site, device)`` returns the
    device's trusted public key or raises EnvelopeError (unknown, revoked...)."""

    def __init__(
        self,
        recipients: list[RecipientKey],
        device_key: DeviceKeyLookup,
        cache_size: int = 4096,
        relay_kids: tuple[str, ...] = (),
    ) -> None:
        """``relay_kids``: recipient keys (e.g. the cloud's) whose messages this receiver
        accepts without opening them, checking the device's per-message signature instead."""
        self._recipients = {r.kid: r for r in recipients if r.private is not None}
        self._relay_kids = set(relay_kids) - set(self._recipients)
        self._device_key = device_key
        self._epochs: OrderedDict[bytes, tuple[Any, AESGCM]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def open(self, payload: bytes) -> Envelope:
        data = _parse(payload)
        kid = data["kid"]
        recipient = self._recipients.get(kid)
        if recipient is None and kid in self._relay_kids:
            return self._relay(data, payload)
        if recipient is None:
            raise EnvelopeError(f"unknown key id {kid!r}")
        if data["suite"] != recipient.suite:
            raise EnvelopeError(f"suite {data['suite']!r} does not match key {kid}")
        aead = self._epoch_key(data, recipient)
        header = {k: data[k] for k in _HEADER}
        try:
            plain = aead.decrypt(_nonce(data["seq"]), _unb64(data["ct"], "ct"), _canon(header))
        except InvalidTag as exc:
            raise EnvelopeError("header or body fails authentication (tampered?)") from exc
        try:
            body = json.loads(plain)
        except ValueError as exc:
            raise EnvelopeError("body is not JSON") from exc
        if not isinstance(body, dict):
            raise EnvelopeError("body must be a JSON object")
        return Envelope(
            kind=data["kind"],
            site=data["site"],
            device=data["device"],
            seq=data["seq"],
            time=float(data["time"]),
            body=body,
            epoch=data["epoch"],
            alert=data["alert"],
        )

    def _relay(self, data: dict[str, Any], payload: bytes) -> Envelope:
        if "hs" not in data:
            raise EnvelopeError("end-to-end message lacks the device's header signature (hs)")
        public = self._device_key(data["site"], data["device"])
        header = {k: data[k] for k in _HEADER}
        try:
            public.verify(
                _unb64(data["hs"], "hs"),
                _relay_signed(header, _unb64(data["ct"], "ct")),
                ec.ECDSA(hashes.SHA256()),
            )
        except InvalidSignature as exc:
            raise EnvelopeError(
                f"header of {data['site']}/{data['device']} is not signed by that device"
            ) from exc
        return Envelope(
            kind=data["kind"],
            site=data["site"],
            device=data["device"],
            seq=data["seq"],
            time=float(data["time"]),
            epoch=data["epoch"],
            alert=data["alert"],
            sealed=payload,
        )

    def _epoch_key(self, data: dict[str, Any], recipient: RecipientKey) -> AESGCM:
        binding = _binding(data["site"], data["device"], data["epoch"], data["kid"], data["suite"])
        signed = _canon({**binding, "ek": data["ek"]})
        cache_key = hashlib.sha256(signed + data["es"].encode()).digest()
        # the device's key is looked up on every message, so a revocation applies at once
        public = self._device_key(data["site"], data["device"])
        with self._lock:
            hit = self._epochs.get(cache_key)
        if hit is not None and (hit[0] is public or _fingerprint(hit[0]) == _fingerprint(public)):
            with self._lock:
                self._epochs.move_to_end(cache_key)
            return hit[1]
        try:
            public.verify(_unb64(data["es"], "es"), signed, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise EnvelopeError(
                f"epoch key of {data['site']}/{data['device']} is not signed by that device"
            ) from exc
        try:
            key = _suite(recipient.suite).decrypt(
                _unb64(data["ek"], "ek"), recipient.private, info=_canon(binding)
            )
        except Exception as exc:  # the HPKE layer raises several types for a bad blob
            raise EnvelopeError(f"epoch key cannot be opened with key {recipient.kid}") from exc
        aead = AESGCM(key)
        with self._lock:
            self._epochs[cache_key] = (public, aead)
            if len(self._epochs) > self._cache_size:
                self._epochs.popitem(last=False)
        return aead


def _relay_signed(header: dict[str, Any], ct: bytes) -> bytes:
    """What the device signs per message in end-to-end mode: the header and the ciphertext."""
    return _canon({**header, "ct_sha256": hashlib.sha256(ct).hexdigest()})


def _fingerprint(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)


def _unb64(s: str, name: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (ValueError, TypeError) as exc:
        raise EnvelopeError(f"field {name} is not base64") from exc


def _parse(payload: bytes) -> dict[str, Any]:
    """Strict structural checks of the clear header; every failure is one EnvelopeError."""
    if len(payload) > MAX_BYTES:
        raise EnvelopeError(f"message of {len(payload)} bytes exceeds {MAX_BYTES}")
    try:
        data = json.loads(payload, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EnvelopeError(f"not a JSON envelope ({type(exc).__name__})") from exc
    if not isinstance(data, dict):
        raise EnvelopeError("envelope must be a JSON object")
    if data.get("v") != VERSION:
        raise EnvelopeError(f"envelope version {data.get('v')!r} is not supported (want {VERSION})")
    missing = [k for k in (*_HEADER, "ct") if k not in data]
    if missing:
        raise EnvelopeError(f"envelope lacks {', '.join(missing)}")
    unknown = sorted(set(data) - {*_HEADER, "ct", "hs"})
    if unknown:
        raise EnvelopeError(f"envelope has unknown field(s) {', '.join(unknown)}")
    if data["kind"] not in UP_KINDS:
        raise EnvelopeError(f"envelope kind {data['kind']!r} is not one a device sends")
    for k in ("site", "device", "kid", "suite", "ek", "es", "ct", "hs"):
        if k in data and not isinstance(data[k], str):
            raise EnvelopeError(f"field {k} must be a string")
    alert = data["alert"]
    if alert is not None and (not isinstance(alert, str) or not _ALERT.match(alert)):
        raise EnvelopeError(f"alert {alert!r} must be null or 1-32 of [a-z0-9_-]")
    check_name("site", data["site"])
    check_name("device", data["device"])
    for k in ("seq", "epoch"):
        if type(data[k]) is not int or not 0 <= data[k] <= _MAX_SEQ or (k == "seq" and not data[k]):
            raise EnvelopeError(f"{k} {data[k]!r} must be an integer in {int(k == 'seq')}..2^63-1")
    t = data["time"]
    if type(t) not in (int, float) or not math.isfinite(t) or t < 0:
        raise EnvelopeError(f"time {t!r} must be a non-negative number of seconds")
    if data["suite"] not in _KEMS:
        raise EnvelopeError(f"suite {data['suite']!r} is not supported")
    return data


def encode_ack(seqs: list[int]) -> bytes:
    """Gateway -> device: these sequence numbers are stored; the device may forget them."""
    return json.dumps({"v": VERSION, "seqs": sorted(seqs)}, separators=(",", ":")).encode()


def decode_ack(payload: bytes) -> list[int]:
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnvelopeError(f"not a JSON ack ({exc})") from exc
    if (
        not isinstance(data, dict)
        or data.get("v") != VERSION
        or not isinstance(data.get("seqs"), list)
    ):
        raise EnvelopeError(f"ack must be {{'v': {VERSION}, 'seqs': [...]}}")
    seqs = data["seqs"]
    if not all(type(s) is int and s > 0 for s in seqs):
        raise EnvelopeError("ack seqs must be positive integers")
    return seqs


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")
