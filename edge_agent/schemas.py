"""Strict shapes of what crosses the edge of trust: the opened body of every upward kind
(``result``, ``event``, ``telemetry``, ``state``) and the two downward messages (``ack``,
``cmd``). Plain functions over parsed JSON, so a receiver pays a few microseconds per message.
See docs/envelope.md ("Body schemas and limits").

Every value is checked by its TYPE before anything hashes, compares or formats it; then its
range: integers within 64 bits (what a database column holds), numbers finite, strings of a
bounded length and valid UTF-8 (no lone surrogates), objects and arrays of a bounded size and
nesting depth. A failure is one :class:`EnvelopeError` with ``Reason.SCHEMA`` (a well-formed
JSON body of the wrong shape) or ``Reason.MALFORMED`` (not JSON at all, too deep, too big).
Fields a device does not send today are allowed in ``result`` and ``event`` bodies (newer
agents add fields), but only as bounded JSON of the same kinds of values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from edge_agent.errors import EnvelopeError
from edge_agent.reasons import Reason

__all__ = [
    "INT_MAX",
    "INT_MIN",
    "MAX_DEPTH",
    "MAX_ITEMS",
    "MAX_KEY",
    "MAX_STRING",
    "MAX_TEXT",
    "check_body",
    "loads_strict",
    "parse_ack",
    "parse_cmd",
]

INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # a signed 64-bit integer: what a database column holds
MAX_DEPTH = 6  # nesting of objects/arrays in a body (a segmentation contour needs 3)
MAX_ITEMS = 4096  # entries of one object or array
MAX_KEY = 128  # characters of an object key
MAX_STRING = 256 * 1024  # characters of any string (a base64 PNG thumbnail is the longest)
MAX_TEXT = 1024  # characters of a named text field (input id, labels, bundle id, ...)
MAX_ACK_BYTES = 256 * 1024
MAX_ACK_SEQS = 20_000
MAX_CMD_BYTES = 16 * 1024
_TELEMETRY_DEPTH = 3  # {"latency_ms": {"total": {"p50": 1.2}}}
_TELEMETRY_STRING = MAX_TEXT
_TELEMETRY_ITEMS = 256
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


_decode = json.JSONDecoder(parse_constant=_reject_constant).decode


def loads_strict(text: str | bytes, what: str) -> Any:
    """JSON without NaN/Infinity; any failure (bad UTF-8, syntax, too deep, an integer of more
    than 4300 digits) is one EnvelopeError(MALFORMED)."""
    try:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        return _decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EnvelopeError(f"{what} is not JSON ({type(exc).__name__})") from exc


def _bad(what: str, reason: Reason = Reason.SCHEMA) -> EnvelopeError:
    return EnvelopeError(what, reason)


def _string(v: str, limit: int, where: str) -> None:
    if len(v) > limit:
        raise _bad(f"{where}: string of {len(v)} characters exceeds {limit}")
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(f"{where}: string is not valid UTF-8 (lone surrogate)") from None


def _value(v: Any, depth: int, where: str, max_depth: int, max_string: int) -> None:
    """A JSON value within the limits: depth counts the containers above ``v``."""
    t = type(v)
    if t is str:
        _string(v, max_string, where)
    elif t is int:
        if not INT_MIN <= v <= INT_MAX:
            raise _bad(f"{where}: integer beyond 64 bits")
    elif t is float:
        if v - v != 0.0:  # inf - inf and nan - nan are NaN
            raise _bad(f"{where}: number is not finite")
    elif t is bool or v is None:
        return
    elif t is list or t is dict:
        _container(v, depth, where, max_depth, max_string)
    else:
        raise _bad(f"{where}: {t.__name__} is not a JSON value")


def _container(v: list | dict, depth: int, where: str, max_depth: int, max_string: int) -> None:
    if depth >= max_depth:
        raise _bad(f"{where}: nested deeper than {max_depth}", Reason.MALFORMED)
    if len(v) > MAX_ITEMS:
        raise _bad(f"{where}: {len(v)} entries exceed {MAX_ITEMS}")
    if isinstance(v, list):
        for x in v:
            _value(x, depth + 1, where, max_depth, max_string)
        return
    for k, x in v.items():
        if len(k) > MAX_KEY:
            raise _bad(f"{where}: key of {len(k)} characters exceeds {MAX_KEY}")
        _value(x, depth + 1, where, max_depth, max_string)


# -- typed fields -----------------------------------------------------------------------------
def _int(v: Any, where: str, low: int = INT_MIN) -> None:
    if type(v) is not int or not low <= v <= INT_MAX:
        raise _bad(f"{where} must be an integer in {low}..2^63-1")


def _num(v: Any, where: str) -> None:
    t = type(v)
    if t is float:
        if v - v == 0.0:  # finite
            return
    elif t is int and INT_MIN <= v <= INT_MAX:
        return
    raise _bad(f"{where} must be a finite number (integers within 64 bits)")


def _text(v: Any, where: str) -> None:
    if type(v) is not str:
        raise _bad(f"{where} must be a string")
    _string(v, MAX_TEXT, where)


def _opt(check: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
    def optional(v: Any, where: str) -> None:
        if v is not None:
            check(v, where)

    return optional


def _nonneg(v: Any, where: str) -> None:
    _int(v, where, 0)


def _numbers(v: Any, where: str) -> None:
    if type(v) is not list or len(v) > MAX_ITEMS:
        raise _bad(f"{where} must be a list of at most {MAX_ITEMS} numbers")
    for x in v:
        _num(x, where)


def _texts(v: Any, where: str) -> None:
    if type(v) is not list or len(v) > MAX_ITEMS:
        raise _bad(f"{where} must be a list of at most {MAX_ITEMS} strings")
    for x in v:
        _text(x, where)


def _one_of(*allowed: str) -> Callable[[Any, str], None]:
    def check(v: Any, where: str) -> None:
        if type(v) is not str or v not in allowed:
            raise _bad(f"{where} must be one of {', '.join(allowed)}")

    return check


def _alert_flag(v: Any, where: str) -> None:
    if type(v) is not bool and v is not None:
        _text(v, where)


Field = Callable[[Any, str], None]

MAX_THUMBNAIL_CHARS = 22 * 1024  # base64 of a 16 KiB PNG: a 64 x 64 RGB one fits uncompressed
MAX_THUMBNAIL_SIDE = 256


def _thumbnail(v: Any, where: str) -> None:
    """A result's input thumbnail (edge_agent.thumbnail): ``png`` base64 text of bounded
    length, ``width`` and ``height`` in 1..256; other keys as bounded JSON (newer agents)."""
    if type(v) is not dict:
        raise _bad(f"{where} must be an object {{png, width, height}}")
    png = v.get("png")
    if type(png) is not str or len(png) > MAX_THUMBNAIL_CHARS:
        raise _bad(f"{where}.png must be base64 text of at most {MAX_THUMBNAIL_CHARS} characters")
    for side in ("width", "height"):
        n = v.get(side)
        if type(n) is not int or not 1 <= n <= MAX_THUMBNAIL_SIDE:
            raise _bad(f"{where}.{side} must be an integer in 1..{MAX_THUMBNAIL_SIDE}")
    _container(v, 1, where, MAX_DEPTH, MAX_STRING)


MAX_SEALED_SOURCE_CHARS = 4096


def _sealed_source(v: Any, where: str) -> None:
    """A result's sealed source UIDs (edge_agent.source_ids): ``kid``, ``suite`` and ``ct``
    text (``ct`` bounded), ``frame`` a frame number or absent; opened on the fog node only.
    Or, from a device without the fog's source key, ``missing`` (why there are no UIDs) and
    ``frame``, nothing else."""
    if type(v) is not dict:
        raise _bad(f"{where} must be an object {{kid, suite, ct, frame}}")
    if "missing" in v:
        _text(v["missing"], f"{where}.missing")
        if set(v) - {"missing", "frame"}:
            raise _bad(f"{where} with 'missing' has only 'frame' beside it")
    else:
        for name in ("kid", "suite"):
            _text(v.get(name), f"{where}.{name}")
        ct = v.get("ct")
        if type(ct) is not str or len(ct) > MAX_SEALED_SOURCE_CHARS:
            raise _bad(
                f"{where}.ct must be base64 text of at most {MAX_SEALED_SOURCE_CHARS} characters"
            )
    if "frame" in v:
        _nonneg(v["frame"], f"{where}.frame")
    _container(v, 1, where, MAX_DEPTH, MAX_STRING)


# what edge_agent.pipeline.result_body (+ decode/cam fields) sends; every field optional
_RESULT: dict[str, Field] = {
    "input": _opt(_text),
    "input_sha256": _opt(_text),
    "sample_time": _opt(_num),
    "pred": _opt(_nonneg),
    "pred_label": _opt(_text),
    "scores": _numbers,
    "label": _opt(_nonneg),
    "label_name": _opt(_text),
    "positive_label": _opt(_text),
    "latency_ms": _opt(_num),
    "bundle": _opt(_text),
    "thumbnail": _opt(_thumbnail),
    "source": _opt(_sealed_source),
}
# what edge_agent.events (start/end), the updater (applied/rejected/rolled_back) and the drift
# monitor (edge_agent.drift: input_drift/signal_quality start/end) send
_EVENT: dict[str, Field] = {
    "event": _text,
    "state": _text,
    "label": _opt(_text),
    "start": _opt(_num),
    "end": _opt(_num),
    "peak": _opt(_num),
    "score": _opt(_num),
    "windows": _opt(_nonneg),
    "duration_s": _opt(_num),
    "ended_by": _opt(_text),
    "alert": _alert_flag,
    "input": lambda v, w: _texts(v, w) if type(v) is list else _opt(_text)(v, w),
    "update": _text,
    "bundle": _opt(_text),
    "previous": _opt(_text),
    "running": _opt(_text),
    "reason": _opt(_text),
    # edge_agent.drift: input_drift / signal_quality warnings
    "severity": _opt(_text),
    "check": _opt(_text),
    "value": _opt(_num),
    "threshold": _opt(_num),
    "message": _opt(_text),
}


def _typed(body: dict[str, Any], kind: str, fields: dict[str, Field]) -> None:
    """One pass: a known field by its own check, any other as bounded JSON."""
    if len(body) > MAX_ITEMS:
        raise _bad(f"{kind}: {len(body)} entries exceed {MAX_ITEMS}")
    for name, value in body.items():
        check = fields.get(name)
        if check is not None:
            check(value, name)  # the message names the field
            continue
        if len(name) > MAX_KEY:
            raise _bad(f"{kind}: key of {len(name)} characters exceeds {MAX_KEY}")
        _value(value, 1, kind, MAX_DEPTH, MAX_STRING)


def _telemetry(body: dict[str, Any]) -> None:
    """Flat-ish device numbers: at most 3 levels, short strings, finite numbers, bools."""
    if len(body) > _TELEMETRY_ITEMS:
        raise _bad(f"telemetry: {len(body)} fields exceed {_TELEMETRY_ITEMS}")
    _value(body, 0, "telemetry", _TELEMETRY_DEPTH, _TELEMETRY_STRING)


def _state(body: dict[str, Any]) -> None:
    for k in body:
        if k not in ("state", "bundle"):
            raise _bad(f"state: unknown field {k[:MAX_KEY]!r}")
    _one_of("online", "offline", "stopped")(body.get("state"), "state.state")
    if body.get("bundle") is not None:
        _text(body["bundle"], "state.bundle")


def check_body(kind: str, body: Any) -> dict[str, Any]:
    """``body`` if it is a valid opened body of ``kind``; else EnvelopeError(SCHEMA/MALFORMED)."""
    if type(body) is not dict:
        raise _bad(f"{kind} body must be a JSON object")
    if kind == "result":
        _typed(body, kind, _RESULT)
    elif kind == "event":
        _typed(body, kind, _EVENT)
    elif kind == "telemetry":
        _telemetry(body)
    elif kind == "state":
        _state(body)
    else:
        raise _bad(f"no body schema for kind {kind[:32]!r}")
    return body


# -- downward messages (checked by the device) -------------------------------------------------
def parse_ack(payload: bytes, version: int) -> list[int]:
    """``{"v": version, "seqs": [positive 64-bit integers]}`` -> the seqs."""
    if len(payload) > MAX_ACK_BYTES:
        raise EnvelopeError(f"ack of {len(payload)} bytes exceeds {MAX_ACK_BYTES}", Reason.SIZE)
    data = loads_strict(payload, "ack")
    if type(data) is not dict or set(data) != {"v", "seqs"}:
        raise _bad(f"ack must be {{'v': {version}, 'seqs': [...]}}")
    if type(data["v"]) is not int or data["v"] != version:
        raise _bad(f"ack version must be {version}")
    seqs = data["seqs"]
    if type(seqs) is not list or len(seqs) > MAX_ACK_SEQS:
        raise _bad(f"ack seqs must be a list of at most {MAX_ACK_SEQS}")
    for s in seqs:
        if type(s) is not int or not 0 < s <= INT_MAX:
            raise _bad("ack seqs must be positive 64-bit integers")
    return seqs


MAX_LIMITS_BYTES = 256
MIN_ANNOUNCED_RATE = 1.0  # a device never paces below this, whatever a message says


def parse_limits(payload: bytes, version: int) -> tuple[float, float, float | None]:
    """``{"v": version, "rate": messages/s (0: no limit), "burst": messages, "since": time}``
    -> (rate, burst, since); ``since`` (optional: None when absent) is the unix time at which
    the gateway began serving (its start, or its store back after an outage). A rate between
    0 and MIN_ANNOUNCED_RATE, or anything else, is refused."""
    if len(payload) > MAX_LIMITS_BYTES:
        raise EnvelopeError(
            f"limits of {len(payload)} bytes exceed {MAX_LIMITS_BYTES}", Reason.SIZE
        )
    data = loads_strict(payload, "limits")
    if type(data) is not dict or set(data) - {"since"} != {"v", "rate", "burst"}:
        raise _bad(f"limits must be {{'v': {version}, 'rate': ..., 'burst': ..., 'since': ...}}")
    if type(data["v"]) is not int or data["v"] != version:
        raise _bad(f"limits version must be {version}")
    rate, burst, since = data["rate"], data["burst"], data.get("since")
    for name, v in (("rate", rate), ("burst", burst)):
        if type(v) not in (int, float) or not 0 <= v <= 1e9:
            raise _bad(f"limits {name} must be a number from 0 to 1e9")
    if 0 < rate < MIN_ANNOUNCED_RATE or burst < 1:
        raise _bad(f"limits rate must be 0 or >= {MIN_ANNOUNCED_RATE:g}, burst >= 1")
    if "since" not in data:
        return float(rate), float(burst), None
    if not isinstance(since, int | float) or isinstance(since, bool) or not 0 < since < 1e11:
        raise _bad("limits since must be a unix time (seconds)")
    return float(rate), float(burst), float(since)


_CMD_COMMON: dict[str, Field] = {
    "v": _nonneg,
    "cmd": _text,
    "site": _text,
    "device": _text,
    "issued_ms": _nonneg,
    "key_id": _text,
    "sig": _text,
}
_CMD_UPDATE: dict[str, Field] = {"url": _text, "sha256": _text}


def _flag(v: Any, where: str) -> None:
    if type(v) is not bool:
        raise _bad(f"{where} must be true or false")


def _fraction(v: Any, where: str) -> None:
    if type(v) not in (int, float) or not 0 < v <= 1:
        raise _bad(f"{where} must be a number in (0, 1]")


def _budget(v: Any, where: str) -> None:
    if type(v) not in (int, float) or not 0 < v <= 4:
        raise _bad(f"{where} must be a number in (0, 4]")


# per command: the fields it must have, and those it may have (edge_agent.update)
_CMDS: dict[str, tuple[dict[str, Field], dict[str, Field]]] = {
    "update-bundle": (_CMD_UPDATE, {"allow_downgrade": _flag}),
    "shadow-bundle": (_CMD_UPDATE, {"share": _fraction, "cpu_budget": _budget}),
    "shadow-stop": ({}, {}),
    "rollback-bundle": ({}, {"to": _text}),
}


def parse_cmd(payload: bytes) -> dict[str, Any]:
    """The shape of a ``cmd`` message (edge_agent.update): an object with ``v``, ``cmd``,
    ``site``, ``device``, ``issued_ms``, ``key_id``, ``sig``, and what its command needs
    (``url`` + ``sha256`` for ``update-bundle`` and ``shadow-bundle``; optional
    ``allow_downgrade``, ``share``, ``cpu_budget``, ``to``), nothing else; typed and bounded.
    The signature is update.py's to check. EnvelopeError(SIZE/MALFORMED/SCHEMA) otherwise."""
    if len(payload) > MAX_CMD_BYTES:
        raise EnvelopeError(f"command of {len(payload)} bytes exceeds {MAX_CMD_BYTES}", Reason.SIZE)
    doc = loads_strict(payload, "command")
    if type(doc) is not dict:
        raise _bad("command must be a JSON object")
    kind = doc.get("cmd")
    required, optional = _CMDS.get(kind, ({}, {})) if type(kind) is str else ({}, {})
    fields = {**_CMD_COMMON, **required}
    for name, check in fields.items():
        if name not in doc:
            raise _bad(f"command lacks {name}")
        check(doc[name], f"command {name}")
    for name, check in optional.items():
        if name in doc:
            check(doc[name], f"command {name}")
    unknown = sorted(k[:MAX_KEY] for k in doc if k not in fields and k not in optional)
    if unknown:
        raise _bad(f"command has unknown field(s) {', '.join(unknown[:5])}")
    if "sha256" in doc and not _HEX64.match(doc["sha256"]):
        raise _bad("command sha256 must be 64 hex digits")
    return doc
