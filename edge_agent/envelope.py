"""The envelope every device message travels in. One definition; see docs/envelope.md.

Version 1 is a JSON object with a header (``v``, ``kind``, ``site``, ``device``, ``seq``,
``time``) and a ``body`` object. The receiver checks the header against the topic it came on and
deduplicates by (site, device, seq). Acknowledgements from the gateway are also defined here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from edge_agent.errors import EnvelopeError
from edge_agent.topics import UP_KINDS, TopicParts, check_name

__all__ = [
    "MAX_BYTES",
    "VERSION",
    "Envelope",
    "decode",
    "decode_ack",
    "encode",
    "encode_ack",
]

VERSION = 1
MAX_BYTES = 256 * 1024
_HEADER = ("v", "kind", "site", "device", "seq", "time")
_MAX_SEQ = 2**63 - 1


@dataclass(frozen=True)
class Envelope:
    kind: str
    site: str
    device: str
    seq: int
    time: float
    body: dict[str, Any] = field(default_factory=dict)

    def check_topic(self, parts: TopicParts) -> None:
        """The header must name the same site, device and kind as the topic it arrived on."""
        if (parts.site, parts.device, parts.kind) != (self.site, self.device, self.kind):
            raise EnvelopeError(
                f"header {self.site}/{self.device}/{self.kind} does not match topic "
                f"{parts.site}/{parts.device}/{parts.kind}"
            )


def encode(env: Envelope) -> bytes:
    data = {
        "v": VERSION,
        "kind": env.kind,
        "site": env.site,
        "device": env.device,
        "seq": env.seq,
        "time": env.time,
        "body": env.body,
    }
    out = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    if len(out) > MAX_BYTES:
        raise EnvelopeError(f"envelope of {len(out)} bytes exceeds {MAX_BYTES}")
    return out


def decode(payload: bytes) -> Envelope:
    """Parse and validate strictly; every failure is one EnvelopeError line."""
    if len(payload) > MAX_BYTES:
        raise EnvelopeError(f"message of {len(payload)} bytes exceeds {MAX_BYTES}")
    try:
        data = json.loads(payload, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise EnvelopeError(f"not a JSON envelope ({exc})") from exc
    if not isinstance(data, dict):
        raise EnvelopeError("envelope must be a JSON object")
    missing = [k for k in (*_HEADER, "body") if k not in data]
    if missing:
        raise EnvelopeError(f"envelope lacks {', '.join(missing)}")
    unknown = sorted(set(data) - {*_HEADER, "body"})
    if unknown:
        raise EnvelopeError(f"envelope has unknown field(s) {', '.join(unknown)}")
    if data["v"] != VERSION:
        raise EnvelopeError(f"envelope version {data['v']!r} is not supported (want {VERSION})")
    kind, site, device, seq, t = (data[k] for k in ("kind", "site", "device", "seq", "time"))
    if kind not in UP_KINDS:
        raise EnvelopeError(f"envelope kind {kind!r} is not one a device sends")
    if not isinstance(site, str) or not isinstance(device, str):
        raise EnvelopeError("site and device must be strings")
    check_name("site", site)
    check_name("device", device)
    if type(seq) is not int or not 0 < seq <= _MAX_SEQ:
        raise EnvelopeError(f"seq {seq!r} must be an integer in 1..2^63-1")
    if type(t) not in (int, float) or not math.isfinite(t) or t < 0:
        raise EnvelopeError(f"time {t!r} must be a non-negative number of seconds")
    if not isinstance(data["body"], dict):
        raise EnvelopeError("body must be a JSON object")
    return Envelope(kind=kind, site=site, device=device, seq=seq, time=float(t), body=data["body"])


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
        raise EnvelopeError("ack must be {'v': 1, 'seqs': [...]}")
    seqs = data["seqs"]
    if not all(type(s) is int and s > 0 for s in seqs):
        raise EnvelopeError("ack seqs must be positive integers")
    return seqs


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")
