"""The envelope every device message travels in. One definition; see docs/envelope.md.

Version 2: a JSON object whose header is in the clear and authenticated, and whose body is
encrypted. Per epoch the device draws a fresh AES-256-GCM key, seals it to the recipient's public
key with HPKE (RFC 9180; X25519 or the ML-KEM-768+X25519 hybrid) and signs that binding with its
own ECDSA P-256 device key; each message then costs one AES-GCM operation. The nonce is the
device's sequence number, which never repeats, and every epoch has a fresh key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge_agent.envelope_header import (
    ALERT,
    KEMS,
    KIND_BYTES,
    MAX_BYTES,
    MAX_SEQ,
    MAX_TIME,
    VERSION,
    as_text,
    canonical,
    decode_json,
    parse_header,
    quote,
    unb64,
)
from edge_agent.errors import EnvelopeError
from edge_agent.keys import RecipientKey
from edge_agent.reasons import Reason
from edge_agent.schemas import check_body, parse_ack, parse_limits
from edge_agent.topics import TopicParts, check_name

__all__ = [
    "MAX_BYTES",
    "VERSION",
    "Envelope",
    "Opener",
    "Sealer",
    "decode_ack",
    "decode_limits",
    "encode_ack",
    "encode_limits",
]


_SIG = ec.ECDSA(hashes.SHA256())


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
                f"{parts.site}/{parts.device}/{parts.kind}",
                Reason.HEADER_MISMATCH,
            )


def _suite(name: str) -> hpke.Suite:
    return hpke.Suite(KEMS[name], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


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


class _Parts(NamedTuple):
    """The canonical header of one epoch, cut around its per-message fields. The header's keys
    sort as alert | ct | ct_sha256 | device ek epoch es | hs | kid kind seq site suite time v,
    so every form (AAD, message, end-to-end signed bytes) is a concatenation of these parts."""

    pre: bytes  # "device":..,"ek":..,"epoch":..,"es":..,
    kid: bytes  # "kid":..,"kind":"
    site: bytes  # ,"site":..,"suite":..,"time":

    @classmethod
    def of(
        cls, site: str, device: str, epoch: int, kid: str, suite: str, ek: str, es: str
    ) -> _Parts:
        q = quote
        return cls(
            f'"device":{q(device)},"ek":{q(ek)},"epoch":{int(epoch)},"es":{q(es)},'.encode(),
            f'"kid":{q(kid)},"kind":"'.encode(),
            f',"site":{q(site)},"suite":{q(suite)},"time":'.encode(),
        )

    def tail(self, kind: str, seq: int, time: bytes) -> bytes:
        """Everything after ``pre`` (and ``hs``): from "kid" to the closing brace."""
        return b'%b%b","seq":%d%b%b,"v":2}' % (self.kid, KIND_BYTES[kind], seq, self.site, time)


def _alert_json(alert: str | None) -> bytes:
    return b"null" if alert is None else quote(alert).encode()


def _time_json(t: Any) -> bytes:
    """``time`` exactly as the JSON encoder writes it; only what a receiver accepts."""
    if type(t) is float and 0 <= t <= MAX_TIME:  # the common case first
        return float.__repr__(t).encode()
    if isinstance(t, float):
        if 0 <= t <= MAX_TIME:
            return float.__repr__(t).encode()
    elif isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TIME:
        return int.__repr__(t).encode()
    raise EnvelopeError(f"time {t!r} must be a non-negative number of seconds")


class Sealer:
    """Device side: seals envelopes for one recipient under rotating epoch keys. Thread-safe.

    Per message: one JSON encoding (the body), one AES-GCM operation and the header built from
    parts made once per epoch; the bytes are exactly those of the canonical JSON (docs/envelope.md).
    """

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
        binding = _binding(self.site, self.device, int(epoch), r.kid, r.suite)
        key = AESGCM.generate_key(bit_length=256)
        ek = base64.b64encode(_suite(r.suite).encrypt(key, r.public, info=canonical(binding)))
        es = self._key.sign(canonical({**binding, "ek": ek.decode()}), _SIG)
        self._set_epoch(int(epoch), key, ek.decode(), base64.b64encode(es).decode())

    def _set_epoch(self, epoch: int, key: bytes, ek: str, es: str) -> None:
        """Install an epoch (its AES key, sealed key and signature) and its header parts."""
        r = self._recipient
        self._parts = _Parts.of(self.site, self.device, epoch, r.kid, r.suite, ek, es)
        self._epoch, self._aead, self._used = epoch, AESGCM(key), 0
        self._ek, self._es = ek, es

    def rotate(self) -> int:
        """Start the next epoch now (a fresh key); returns its number."""
        with self._lock:
            self._start_epoch(self._next_epoch())
            return self._epoch

    def seal(self, env: Envelope) -> bytes:
        if (env.site, env.device) != (self.site, self.device):
            raise EnvelopeError(f"this sealer is {self.site}/{self.device}, not {env.device}")
        seq = env.seq
        if (
            env.kind not in KIND_BYTES
            or not isinstance(seq, int)
            or isinstance(seq, bool)
            or not 0 < seq <= MAX_SEQ
        ):
            raise EnvelopeError(f"cannot seal kind {env.kind!r} seq {seq!r}")
        if env.alert is not None and not ALERT.match(env.alert):
            raise EnvelopeError(f"alert {env.alert!r} must be 1-32 of [a-z0-9_-]")
        alert, when = _alert_json(env.alert), _time_json(env.time)
        try:
            body = canonical(env.body)
        except (TypeError, ValueError, RecursionError) as exc:
            raise EnvelopeError(f"{env.kind} body is not canonical JSON: {exc}") from exc
        with self._lock:
            if self._used >= self._rotate_after:
                self._start_epoch(self._next_epoch())
            self._used += 1
            parts, aead = self._parts, self._aead
        tail = parts.tail(env.kind, seq, when)
        ct = aead.encrypt(_nonce(seq), body, b'{"alert":%b,%b%b' % (alert, parts.pre, tail))
        hs = b""
        if self._end_to_end:
            signed = b'{"alert":%b,"ct_sha256":"%b",%b%b' % (
                alert,
                hashlib.sha256(ct).hexdigest().encode(),
                parts.pre,
                tail,
            )
            hs = b'"hs":"%b",' % binascii.b2a_base64(self._key.sign(signed, _SIG), newline=False)
        ct64 = binascii.b2a_base64(ct, newline=False)
        out = b'{"alert":%b,"ct":"%b",%b%b%b' % (alert, ct64, parts.pre, hs, tail)
        if len(out) > MAX_BYTES:
            raise EnvelopeError(f"envelope of {len(out)} bytes exceeds {MAX_BYTES}", Reason.SIZE)
        return out


DeviceKeyLookup = Callable[[str, str], ec.EllipticCurvePublicKey]


class _Epoch(NamedTuple):
    ek: str
    public: ec.EllipticCurvePublicKey
    aead: AESGCM
    parts: _Parts


class Opener:
    """Receiver side: checks and opens envelopes. ``device_key(site, device)`` returns the
    device's trusted public key or raises EnvelopeError (unknown, revoked...).

    Per message: one parse of the header, one of the body, one AES-GCM operation; the epoch's
    signature and HPKE key are checked once and cached with the epoch's header parts."""

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
        self._epochs: OrderedDict[tuple[str, str, str, int, str], _Epoch] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def open(self, payload: bytes) -> Envelope:
        data = parse_header(payload)
        kid = data["kid"]
        recipient = self._recipients.get(kid)
        if recipient is None and kid in self._relay_kids:
            return self._relay(data, payload)
        if recipient is None:
            raise EnvelopeError(f"unknown key id {kid!r}", Reason.UNKNOWN_KEY)
        if data["suite"] != recipient.suite:
            raise EnvelopeError(
                f"suite {data['suite']!r} does not match key {kid}", Reason.UNKNOWN_KEY
            )
        epoch = self._epoch_key(data, recipient)
        alert, seq = data["alert"], data["seq"]
        tail = epoch.parts.tail(data["kind"], seq, _time_json(data["time"]))
        aad = b'{"alert":%b,%b%b' % (_alert_json(alert), epoch.parts.pre, tail)
        try:
            plain = epoch.aead.decrypt(_nonce(seq), unb64(data["ct"], "ct"), aad)
        except InvalidTag as exc:
            raise EnvelopeError(
                "header or body fails authentication (tampered?)", Reason.AUTHENTICATION
            ) from exc
        try:
            body = decode_json(as_text(plain))
        except (ValueError, RecursionError) as exc:
            raise EnvelopeError(f"body is not JSON ({type(exc).__name__})") from exc
        check_body(data["kind"], body)  # before anything else touches it
        return Envelope(
            data["kind"],
            data["site"],
            data["device"],
            seq,
            float(data["time"]),
            body,
            data["epoch"],
            alert,
        )

    def _relay(self, data: dict[str, Any], payload: bytes) -> Envelope:
        if "hs" not in data:
            raise EnvelopeError(
                "end-to-end message lacks the device's header signature (hs)", Reason.SIGNATURE
            )
        public = self._device_key(data["site"], data["device"])
        hs = unb64(data["hs"], "hs")
        try:
            public.verify(hs, _relay_signed(data, unb64(data["ct"], "ct")), _SIG)
        except InvalidSignature as exc:
            raise EnvelopeError(
                f"header of {data['site']}/{data['device']} is not signed by that device",
                Reason.SIGNATURE,
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

    def _epoch_key(self, data: dict[str, Any], recipient: RecipientKey) -> _Epoch:
        site, device, epoch, kid, es = (data[k] for k in ("site", "device", "epoch", "kid", "es"))
        # the device's key is looked up on every message, so a revocation applies at once
        public = self._device_key(site, device)
        cache_key = (kid, site, device, epoch, es)
        with self._lock:
            hit = self._epochs.get(cache_key)
            if hit is not None:
                self._epochs.move_to_end(cache_key)
        if (
            hit is not None
            and hit.ek == data["ek"]
            and (hit.public is public or _fingerprint(hit.public) == _fingerprint(public))
        ):
            return hit
        binding = _binding(site, device, epoch, kid, data["suite"])
        try:
            public.verify(unb64(es, "es"), canonical({**binding, "ek": data["ek"]}), _SIG)
        except InvalidSignature as exc:
            raise EnvelopeError(
                f"epoch key of {site}/{device} is not signed by that device", Reason.SIGNATURE
            ) from exc
        assert recipient.private is not None  # Opener keeps only keys with their private half
        try:
            key = _suite(recipient.suite).decrypt(
                unb64(data["ek"], "ek"), recipient.private, info=canonical(binding)
            )
        except Exception as exc:  # the HPKE layer raises several types for a bad blob
            raise EnvelopeError(
                f"epoch key cannot be opened with key {recipient.kid}", Reason.AUTHENTICATION
            ) from exc
        parts = _Parts.of(site, device, epoch, kid, data["suite"], data["ek"], es)
        entry = _Epoch(data["ek"], public, AESGCM(key), parts)
        with self._lock:
            self._epochs[cache_key] = entry
            if len(self._epochs) > self._cache_size:
                self._epochs.popitem(last=False)
        return entry


def _relay_signed(data: dict[str, Any], ct: bytes) -> bytes:
    """What the device signs per message in end-to-end mode: the canonical header with
    ``ct_sha256`` (the ciphertext's SHA-256, hex) in place of ``ct``."""
    parts = _Parts.of(
        data["site"],
        data["device"],
        data["epoch"],
        data["kid"],
        data["suite"],
        data["ek"],
        data["es"],
    )
    return b'{"alert":%b,"ct_sha256":"%b",%b%b' % (
        _alert_json(data["alert"]),
        hashlib.sha256(ct).hexdigest().encode(),
        parts.pre,
        parts.tail(data["kind"], data["seq"], _time_json(data["time"])),
    )


def _fingerprint(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)


def encode_ack(seqs: list[int]) -> bytes:
    """Gateway -> device: these sequence numbers are stored; the device may forget them."""
    return json.dumps({"v": VERSION, "seqs": sorted(seqs)}, separators=(",", ":")).encode()


def encode_limits(rate: float, burst: float, since: float | None = None) -> bytes:
    """Gateway -> device (retained): the flood limit this device is held to (messages per
    second, 0: none; burst), so that it drains a backlog at a pace the gateway takes; and
    ``since``, when the gateway began serving (start, or store back): a device that sees it
    change sends what it holds again at once, events first."""
    body: dict[str, float] = {"v": VERSION, "rate": rate, "burst": burst}
    if since is not None:
        body["since"] = round(since, 6)
    return json.dumps(body, separators=(",", ":")).encode()


def decode_limits(payload: bytes) -> tuple[float, float, float | None]:
    """Device side: (rate, burst, since) of a limits message
    (edge_agent.schemas.parse_limits)."""
    return parse_limits(payload, VERSION)


def decode_ack(payload: bytes) -> list[int]:
    """Device side: the seqs of an ack (edge_agent.schemas.parse_ack: strict, bounded)."""
    return parse_ack(payload, VERSION)
