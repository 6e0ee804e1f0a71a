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
import re
import sys
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

from edge_agent.errors import EnvelopeError
from edge_agent.keys import RecipientKey
from edge_agent.reasons import Reason
from edge_agent.schemas import check_body, parse_ack
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
_MAX_TIME = sys.float_info.max  # an integer time past it would not convert to float
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
                f"{parts.site}/{parts.device}/{parts.kind}",
                Reason.HEADER_MISMATCH,
            )


def _make_encoder() -> Callable[[Any], str]:
    """Canonical JSON (keys sorted, no spaces, ASCII, no NaN/Infinity) as one call into the C
    encoder: ``json.dumps`` builds a new encoder object per call, which costs about as much as
    encoding a result body. Falls back to the standard encoder wherever the two could differ."""
    slow = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False).encode
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return slow

    def default(o: Any) -> Any:
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")

    try:
        c = make(None, default, _quote, None, ":", ",", True, False, False)
        probe = {"b": [1.5, None, True, "\u00e9\n", -0.0, 10**20], "a": {"y": 1, "x": 1e-7}}
        if "".join(c(probe, 0)) != slow(probe):
            return slow
    except (TypeError, ValueError):
        return slow
    try:
        c({"nan": float("nan")}, 0)
        return slow  # NaN must be refused: the arguments did not mean what they say here
    except ValueError:
        return lambda obj: "".join(c(obj, 0))


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii  # a JSON string literal
_encode = _make_encoder()
_decode_header = json.JSONDecoder(parse_constant=_reject_constant).decode
_decode_body = _decode_header  # NaN/Infinity are refused in a body too
_SIG = ec.ECDSA(hashes.SHA256())
_KIND_BYTES = {k: k.encode() for k in UP_KINDS}
_FIELDS = frozenset((*_HEADER, "ct"))
_FIELDS_HS = _FIELDS | {"hs"}


def _canon(obj: dict[str, Any]) -> bytes:
    return _encode(obj).encode()


def _text(payload: bytes) -> str:
    """What ``json.loads`` does with bytes (UTF-8, -16 or -32), with the common case first."""
    if isinstance(payload, str):
        return payload
    enc = "utf-8" if payload[:1] == b"{" and payload[1:2] not in (b"", b"\x00") else None
    return payload.decode(enc or json.detect_encoding(payload), "surrogatepass")


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
        q = _quote
        return cls(
            f'"device":{q(device)},"ek":{q(ek)},"epoch":{int(epoch)},"es":{q(es)},'.encode(),
            f'"kid":{q(kid)},"kind":"'.encode(),
            f',"site":{q(site)},"suite":{q(suite)},"time":'.encode(),
        )

    def tail(self, kind: str, seq: int, time: bytes) -> bytes:
        """Everything after ``pre`` (and ``hs``): from "kid" to the closing brace."""
        return b'%b%b","seq":%d%b%b,"v":2}' % (self.kid, _KIND_BYTES[kind], seq, self.site, time)


def _alert_json(alert: str | None) -> bytes:
    return b"null" if alert is None else _quote(alert).encode()


def _time_json(t: Any) -> bytes:
    """``time`` exactly as the JSON encoder writes it; only what a receiver accepts."""
    if type(t) is float and 0 <= t <= _MAX_TIME:  # the common case first
        return float.__repr__(t).encode()
    if isinstance(t, float):
        if 0 <= t <= _MAX_TIME:
            return float.__repr__(t).encode()
    elif isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= _MAX_TIME:
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
        ek = base64.b64encode(_suite(r.suite).encrypt(key, r.public, info=_canon(binding)))
        es = self._key.sign(_canon({**binding, "ek": ek.decode()}), _SIG)
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
            env.kind not in _KIND_BYTES
            or not isinstance(seq, int)
            or isinstance(seq, bool)
            or not 0 < seq <= _MAX_SEQ
        ):
            raise EnvelopeError(f"cannot seal kind {env.kind!r} seq {seq!r}")
        if env.alert is not None and not _ALERT.match(env.alert):
            raise EnvelopeError(f"alert {env.alert!r} must be 1-32 of [a-z0-9_-]")
        alert, when = _alert_json(env.alert), _time_json(env.time)
        try:
            body = _canon(env.body)
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
        data = _parse(payload)
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
            plain = epoch.aead.decrypt(_nonce(seq), _unb64(data["ct"], "ct"), aad)
        except InvalidTag as exc:
            raise EnvelopeError(
                "header or body fails authentication (tampered?)", Reason.AUTHENTICATION
            ) from exc
        try:
            body = _decode_body(_text(plain))
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
        hs = _unb64(data["hs"], "hs")
        try:
            public.verify(hs, _relay_signed(data, _unb64(data["ct"], "ct")), _SIG)
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
            public.verify(_unb64(es, "es"), _canon({**binding, "ek": data["ek"]}), _SIG)
        except InvalidSignature as exc:
            raise EnvelopeError(
                f"epoch key of {site}/{device} is not signed by that device", Reason.SIGNATURE
            ) from exc
        assert recipient.private is not None  # Opener keeps only keys with their private half
        try:
            key = _suite(recipient.suite).decrypt(
                _unb64(data["ek"], "ek"), recipient.private, info=_canon(binding)
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


def _unb64(s: str, name: str) -> bytes:
    try:
        return binascii.a2b_base64(s, strict_mode=True)  # type: ignore[call-arg]  # 3.11+; one C call
    except (ValueError, TypeError):
        pass  # Python 3.10, or an odd form the non-strict check below still accepts
    try:
        return base64.b64decode(s, validate=True)
    except (ValueError, TypeError) as exc:
        raise EnvelopeError(f"field {name} is not base64") from exc


_STRINGS = (  # every header string, its maximum length, checked by type before anything else
    ("kind", 16),
    ("site", 64),
    ("device", 64),
    ("kid", 64),
    ("suite", 32),
    ("ek", 4096),  # the ML-KEM-768+X25519 encapsulation is ~1.5 KB in base64
    ("es", 256),  # a DER ECDSA P-256 signature is at most 72 bytes
    ("ct", MAX_BYTES),
)


def _parse(payload: bytes) -> dict[str, Any]:
    """Strict structural checks of the clear header; every failure is one EnvelopeError.
    Every field's type is checked first, before any lookup, hash or pattern touches it."""
    if len(payload) > MAX_BYTES:
        raise EnvelopeError(f"message of {len(payload)} bytes exceeds {MAX_BYTES}", Reason.SIZE)
    try:
        data = _decode_header(_text(payload))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EnvelopeError(f"not a JSON envelope ({type(exc).__name__})") from exc
    if type(data) is not dict:
        raise EnvelopeError("envelope must be a JSON object")
    v = data.get("v")
    if type(v) is not int or v != VERSION:  # 2.0 or true are not 2
        raise EnvelopeError(f"envelope version {_show(v)} is not supported (want {VERSION})")
    _check_fields(data)
    return data


def _check_fields(data: dict[str, Any]) -> None:
    """The header's fields, each by type first: the set of names, strings, names, numbers."""
    keys = data.keys()
    if keys not in (_FIELDS, _FIELDS_HS):
        missing = [k for k in (*_HEADER, "ct") if k not in data]
        if missing:
            raise EnvelopeError(f"envelope lacks {', '.join(missing)}")
        unknown = sorted(set(data) - _FIELDS_HS)
        raise EnvelopeError(f"envelope has unknown field(s) {_show(', '.join(unknown))}")
    for k, limit in _STRINGS:
        if type(data[k]) is not str or len(data[k]) > limit:
            raise EnvelopeError(f"field {k} must be a string of at most {limit} characters")
    if "hs" in data and (type(data["hs"]) is not str or len(data["hs"]) > 256):
        raise EnvelopeError("field hs must be a string of at most 256 characters")
    if data["kind"] not in _KIND_BYTES:
        raise EnvelopeError(f"envelope kind {data['kind']!r} is not one a device sends")
    alert = data["alert"]
    if alert is not None and (type(alert) is not str or not _ALERT.match(alert)):
        raise EnvelopeError(f"alert {_show(alert)} must be null or 1-32 of [a-z0-9_-]")
    check_name("site", data["site"], Reason.MALFORMED)
    check_name("device", data["device"], Reason.MALFORMED)
    _check_numbers(data)


def _check_numbers(data: dict[str, Any]) -> None:
    for k in ("seq", "epoch"):
        if type(data[k]) is not int or not 0 <= data[k] <= _MAX_SEQ or (k == "seq" and not data[k]):
            raise EnvelopeError(
                f"{k} {_show(data[k])} must be an integer in {int(k == 'seq')}..2^63-1"
            )
    t = data["time"]
    if type(t) not in (int, float) or not 0 <= t <= _MAX_TIME:  # not NaN, inf, or 10**400
        raise EnvelopeError(f"time {_show(t)} must be a non-negative number of seconds")
    if data["suite"] not in _KEMS:
        raise EnvelopeError(f"suite {data['suite']!r} is not supported")


def _show(value: Any) -> str:
    """A hostile value in an error message: its type and a short repr, never all of it."""
    if isinstance(value, (dict, list)):
        return f"<{type(value).__name__} of {len(value)}>"
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "<huge int>"
    return text if len(text) <= 60 else text[:57] + "..."


def encode_ack(seqs: list[int]) -> bytes:
    """Gateway -> device: these sequence numbers are stored; the device may forget them."""
    return json.dumps({"v": VERSION, "seqs": sorted(seqs)}, separators=(",", ":")).encode()


def decode_ack(payload: bytes) -> list[int]:
    """Device side: the seqs of an ack (edge_agent.schemas.parse_ack: strict, bounded)."""
    return parse_ack(payload, VERSION)
