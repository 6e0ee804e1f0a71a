"""The envelope's clear header: its fields and limits, canonical JSON, and the strict parse.

edge_agent/envelope.py seals and opens envelopes; this module is what both sides agree on about
the bytes before any key is touched (docs/envelope.md). Every check is by type first, before
any lookup, hash or pattern touches a value, and every failure is one EnvelopeError.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sys
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hpke

from edge_agent.errors import EnvelopeError
from edge_agent.reasons import Reason
from edge_agent.topics import UP_KINDS, check_name

VERSION = 2
MAX_BYTES = 256 * 1024
MAX_SEQ = 2**63 - 1
MAX_TIME = sys.float_info.max  # an integer time past it would not convert to float
HEADER = (
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
ALERT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
KEMS = {"x25519": hpke.KEM.X25519, "mlkem768-x25519": hpke.KEM.MLKEM768_X25519}


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
        c = make(None, default, quote, None, ":", ",", True, False, False)
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


quote: Callable[[str], str] = json.encoder.encode_basestring_ascii  # a JSON string literal
_encode = _make_encoder()
decode_json = json.JSONDecoder(parse_constant=_reject_constant).decode  # no NaN/Infinity
KIND_BYTES = {k: k.encode() for k in UP_KINDS}
FIELDS = frozenset((*HEADER, "ct"))
FIELDS_HS = FIELDS | {"hs"}


def canonical(obj: dict[str, Any]) -> bytes:
    return _encode(obj).encode()


def as_text(payload: bytes) -> str:
    """What ``json.loads`` does with bytes (UTF-8, -16 or -32), with the common case first."""
    if isinstance(payload, str):
        return payload
    enc = "utf-8" if payload[:1] == b"{" and payload[1:2] not in (b"", b"\x00") else None
    return payload.decode(enc or json.detect_encoding(payload), "surrogatepass")


def unb64(s: str, name: str) -> bytes:
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


def parse_header(payload: bytes) -> dict[str, Any]:
    """Strict structural checks of the clear header; every failure is one EnvelopeError.
    Every field's type is checked first, before any lookup, hash or pattern touches it."""
    if len(payload) > MAX_BYTES:
        raise EnvelopeError(f"message of {len(payload)} bytes exceeds {MAX_BYTES}", Reason.SIZE)
    try:
        data = decode_json(as_text(payload))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EnvelopeError(f"not a JSON envelope ({type(exc).__name__})") from exc
    if type(data) is not dict:
        raise EnvelopeError("envelope must be a JSON object")
    v = data.get("v")
    if type(v) is not int or v != VERSION:  # 2.0 or true are not 2
        raise EnvelopeError(f"envelope version {show(v)} is not supported (want {VERSION})")
    _check_fields(data)
    return data


def _check_fields(data: dict[str, Any]) -> None:
    """The header's fields, each by type first: the set of names, strings, names, numbers."""
    keys = data.keys()
    if keys not in (FIELDS, FIELDS_HS):
        missing = [k for k in (*HEADER, "ct") if k not in data]
        if missing:
            raise EnvelopeError(f"envelope lacks {', '.join(missing)}")
        unknown = sorted(set(data) - FIELDS_HS)
        raise EnvelopeError(f"envelope has unknown field(s) {show(', '.join(unknown))}")
    for k, limit in _STRINGS:
        if type(data[k]) is not str or len(data[k]) > limit:
            raise EnvelopeError(f"field {k} must be a string of at most {limit} characters")
    if "hs" in data and (type(data["hs"]) is not str or len(data["hs"]) > 256):
        raise EnvelopeError("field hs must be a string of at most 256 characters")
    if data["kind"] not in KIND_BYTES:
        raise EnvelopeError(f"envelope kind {data['kind']!r} is not one a device sends")
    alert = data["alert"]
    if alert is not None and (type(alert) is not str or not ALERT.match(alert)):
        raise EnvelopeError(f"alert {show(alert)} must be null or 1-32 of [a-z0-9_-]")
    check_name("site", data["site"], Reason.MALFORMED)
    check_name("device", data["device"], Reason.MALFORMED)
    _check_numbers(data)


def _check_numbers(data: dict[str, Any]) -> None:
    for k in ("seq", "epoch"):
        if type(data[k]) is not int or not 0 <= data[k] <= MAX_SEQ or (k == "seq" and not data[k]):
            raise EnvelopeError(
                f"{k} {show(data[k])} must be an integer in {int(k == 'seq')}..2^63-1"
            )
    t = data["time"]
    if type(t) not in (int, float) or not 0 <= t <= MAX_TIME:  # not NaN, inf, or 10**400
        raise EnvelopeError(f"time {show(t)} must be a non-negative number of seconds")
    if data["suite"] not in KEMS:
        raise EnvelopeError(f"suite {data['suite']!r} is not supported")


def show(value: Any) -> str:
    """A hostile value in an error message: its type and a short repr, never all of it."""
    if isinstance(value, (dict, list)):
        return f"<{type(value).__name__} of {len(value)}>"
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "<huge int>"
    return text if len(text) <= 60 else text[:57] + "..."
