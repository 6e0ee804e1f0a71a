"""Strict parsing at the edge of trust: whatever a message holds, its parser either accepts
it or raises one EnvelopeError carrying a reason code, never another exception. Deterministic:
fixed examples plus seeded mutations (bench/fuzz.py's mutators, fixed seed). Also the files
that hold trust (keys, the CRL) are written atomically and a bad CRL never kills the gateway."""

from __future__ import annotations

import json
import logging
import os
import random
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_agent.envelope import Envelope, Opener, decode_ack, encode_ack
from edge_agent.errors import EnvelopeError, MedgeError
from edge_agent.files import write_atomic
from edge_agent.identity import DeviceIdentity
from edge_agent.reasons import Reason
from edge_agent.schemas import check_body, parse_cmd
from edge_agent.topics import parse

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fuzz  # bench/fuzz.py: the mutators and a sealing rig

HEADER_FIELDS = (
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
    "ct",
)
WRONG = [
    None,
    True,
    0,
    -1,
    2**64,
    -(2**70),
    1.5,
    "",
    "x" * 5000,
    [],
    ["result"],
    {},
    {"kind": "result"},
    [[[[]]]],
    "\ud800",
]
WRONG_TEXT = ["NaN", "Infinity", "-Infinity", "1e400", "1" * 5000, "[" * 5000 + "]" * 5000]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> fuzz.Rig:
    return fuzz.Rig(tmp_path_factory.mktemp("strict"))


def _sealed(rig: fuzz.Rig, kind: str = "result", body: dict[str, Any] | None = None) -> bytes:
    rig.seq += 1
    body = body if body is not None else fuzz.VALID_BODIES[kind][0]
    return rig.sealer.seal(Envelope(kind, fuzz.SITE, fuzz.DEVICE, rig.seq, fuzz.NOW, body))


def _refused(opener: Opener, payload: bytes, *reasons: Reason) -> Reason:
    with pytest.raises(EnvelopeError) as exc:
        opener.open(payload)
    assert isinstance(exc.value.reason, Reason)
    assert "\n" not in str(exc.value) and len(str(exc.value)) <= 300
    if reasons:
        assert exc.value.reason in reasons, (exc.value.reason, str(exc.value))
    return exc.value.reason


# -- the clear header -------------------------------------------------------------------------
def test_the_header_fields_are_these_and_no_more() -> None:
    """The wire format's field list, written out here: a field added or dropped in
    edge_agent.envelope_header is a protocol change this test makes visible."""
    from edge_agent.envelope_header import FIELDS

    assert set(HEADER_FIELDS) == FIELDS


@pytest.mark.parametrize("field", HEADER_FIELDS)
def test_every_header_field_of_every_wrong_type_is_an_envelope_error(
    rig: fuzz.Rig, field: str
) -> None:
    """The bug: a list or object in ``kind`` (or kid, site...) raised TypeError (unhashable)
    before any check. Every field is type-checked first now."""
    good = json.loads(_sealed(rig))
    for value in WRONG:
        if value is None and good[field] is None:  # alert: null is the valid value
            continue
        doc = {**good, field: value}
        payload = json.dumps(doc).encode("utf-8", "surrogatepass")
        _refused(
            rig.opener,
            payload,
            Reason.MALFORMED,
            Reason.AUTHENTICATION,
            Reason.SIZE,
            Reason.UNKNOWN_KEY,
            Reason.SIGNATURE,
        )
    for text in WRONG_TEXT:
        payload = json.dumps({**good, field: "@@"}).replace('"@@"', text).encode()
        _refused(rig.opener, payload, Reason.MALFORMED, Reason.SIZE)


def test_a_list_kind_names_its_fault(rig: fuzz.Rig) -> None:
    payload = json.dumps({**json.loads(_sealed(rig)), "kind": ["result"]}).encode()
    with pytest.raises(EnvelopeError, match="field kind must be a string") as exc:
        rig.opener.open(payload)
    assert exc.value.reason is Reason.MALFORMED


def test_header_reason_codes(rig: fuzz.Rig) -> None:
    good = json.loads(_sealed(rig))
    assert _refused(rig.opener, b"x" * (300 * 1024)) is Reason.SIZE
    assert _refused(rig.opener, json.dumps({**good, "kid": "x-nobody"}).encode()) is (
        Reason.UNKNOWN_KEY
    )
    assert _refused(rig.opener, json.dumps({**good, "device": "fz-stranger"}).encode()) is (
        Reason.DEVICE
    )
    assert _refused(rig.opener, json.dumps({**good, "time": fuzz.NOW + 1}).encode()) is (
        Reason.AUTHENTICATION
    )
    es = good["es"]
    forged = es[:10] + ("A" if es[10] != "A" else "B") + es[11:]
    assert _refused(rig.opener, json.dumps({**good, "es": forged, "epoch": 77}).encode()) in (
        Reason.SIGNATURE,
        Reason.MALFORMED,
    )
    env = rig.opener.open(_sealed(rig))
    with pytest.raises(EnvelopeError) as exc:
        env.check_topic(parse(f"medge/v1/{fuzz.SITE}/other/result"))
    assert exc.value.reason is Reason.HEADER_MISMATCH
    for topic in ("medge/v1/a/b", "medge/v1/a/b/secret", "medge/v1/a b/c/result"):
        with pytest.raises(EnvelopeError) as exc:
            parse(topic)
        assert exc.value.reason is Reason.TOPIC


# -- authenticated bodies ---------------------------------------------------------------------
BAD_BODIES = {
    "pred beyond 64 bits": ("result", b'{"pred": 18446744073709551616}', Reason.SCHEMA),
    "telemetry int beyond 64 bits": (
        "telemetry",
        b'{"results": 99999999999999999999}',
        Reason.SCHEMA,
    ),
    "1000 levels": ("telemetry", b'{"a":' + b"[" * 1000 + b"]" * 1000 + b"}", Reason.MALFORMED),
    "60000 levels": ("result", b'{"x":' + b"[" * 60_000 + b"]" * 60_000 + b"}", Reason.MALFORMED),
    "7 levels": ("event", b'{"x":[[[[[[[1]]]]]]]}', Reason.MALFORMED),
    "NaN": ("telemetry", b'{"fps": NaN}', Reason.MALFORMED),
    "Infinity": ("result", b'{"latency_ms": Infinity}', Reason.MALFORMED),
    "1e400 (inf)": ("telemetry", b'{"fps": 1e400}', Reason.SCHEMA),
    "4301 digits": ("result", b'{"pred": ' + b"1" * 4301 + b"}", Reason.MALFORMED),
    "lone surrogate": ("result", b'{"input": "\\ud800"}', Reason.SCHEMA),
    "huge telemetry string": ("telemetry", b'{"bundle": "' + b"x" * 5000 + b'"}', Reason.SCHEMA),
    "state unknown": ("state", b'{"state": "x"}', Reason.SCHEMA),
    "state list": ("state", b'{"state": ["online"]}', Reason.SCHEMA),
    "state extra": ("state", b'{"state": "online", "x": 1}', Reason.SCHEMA),
    "body a list": ("result", b"[1, 2]", Reason.SCHEMA),
    "pred a string": ("result", b'{"pred": "1"}', Reason.SCHEMA),
    "scores of strings": ("result", b'{"scores": ["0.5"]}', Reason.SCHEMA),
    "event name a list": ("event", b'{"event": ["fall"]}', Reason.SCHEMA),
    "not UTF-8": ("result", b'{"input": "\xff"}', Reason.MALFORMED),
    "not JSON": ("result", b"{", Reason.MALFORMED),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_hostile_authenticated_bodies_are_refused_before_use(rig: fuzz.Rig, name: str) -> None:
    kind, plain, reason = BAD_BODIES[name]
    assert _refused(rig.opener, rig.seal_plain(kind, plain)) is reason


def test_every_legitimate_body_still_opens(rig: fuzz.Rig) -> None:
    for kind, bodies in fuzz.VALID_BODIES.items():
        for body in bodies:
            assert rig.opener.open(_sealed(rig, kind, body)).body == body
    for body in (
        {},
        {"pred": 0},
        {"event": "fall", "score": 0.97},
        {"fps": 5.0},
        {"pred": 1, "cam": {"png": "not-a-png"}},
    ):  # a bad cam is the gateway's to drop
        kind = "event" if "event" in body else "telemetry" if "fps" in body else "result"
        assert rig.opener.open(_sealed(rig, kind, body)).body == body


def test_check_body_limits() -> None:
    check_body("result", {"pred": 2**63 - 1, "scores": [1e308, -0.0]})
    with pytest.raises(EnvelopeError):
        check_body("result", {"pred": 2**63})
    with pytest.raises(EnvelopeError):
        check_body("nonsense", {})


# -- seeded mutations: never another exception --------------------------------------------------
@pytest.mark.parametrize(
    "parser",
    ["envelope", "telemetry", "state", "result", "event", "ack", "limits", "cmd", "config"],
)
def test_seeded_mutations_raise_only_our_errors(rig: fuzz.Rig, tmp_path: Path, parser: str) -> None:
    make, check = fuzz.parsers(rig, None, tmp_path)[parser]
    n = 150 if parser == "config" else 1500
    result = fuzz.campaign(parser, make, check, n, seed=20261211)
    assert result["other"] == 0, result["examples"]
    assert result["rejected"] > n // 3


# -- what a device receives -------------------------------------------------------------------
def test_limits_are_strict_and_cannot_stop_a_device() -> None:
    from edge_agent.envelope import decode_limits, encode_limits

    assert decode_limits(encode_limits(100.0, 1000.0)) == (100.0, 1000.0, None)
    assert decode_limits(encode_limits(0, 1000)) == (0.0, 1000.0, None)  # no limit
    assert decode_limits(encode_limits(60, 30, 1796460000.25)) == (60.0, 30.0, 1796460000.25)
    for bad in [
        b'{"v":2,"rate":0.001,"burst":10}',  # would all but stop the device
        b'{"v":2,"rate":10,"burst":0}',
        b'{"v":2,"rate":-1,"burst":10}',
        b'{"v":2,"rate":true,"burst":10}',
        b'{"v":2,"rate":1e400,"burst":10}',
        b'{"v":2,"rate":10,"burst":10,"x":1}',
        b'{"v":2,"rate":10,"burst":10,"since":"now"}',
        b'{"v":2,"rate":10,"burst":10,"since":-1}',
        b'{"v":2,"rate":10,"burst":10,"since":1e300}',
        b'{"v":2,"rate":10,"burst":10,"since":null}',
        b'{"v":1,"rate":10,"burst":10}',
        b"[" * 1000,
    ]:
        with pytest.raises(EnvelopeError):
            decode_limits(bad)


def test_ack_is_strict() -> None:
    assert decode_ack(encode_ack([3, 1, 2])) == [1, 2, 3]
    for bad, reason in [
        (b'{"v":2,"seqs":' + b"[" * 100_000 + b"]" * 100_000 + b"}", Reason.MALFORMED),
        (b'{"v":2,"seqs":[18446744073709551616]}', Reason.SCHEMA),
        (b'{"v":2,"seqs":[1e400]}', Reason.SCHEMA),
        (b'{"v":2,"seqs":[NaN]}', Reason.MALFORMED),
        (b'{"v":true,"seqs":[1]}', Reason.SCHEMA),
        (b'{"v":2,"seqs":[1],"x":1}', Reason.SCHEMA),
        (b'{"v":2,"seqs":[' + b"1," * 200_000 + b"1]}", Reason.SIZE),
        (b"\xff", Reason.MALFORMED),
    ]:
        with pytest.raises(EnvelopeError) as exc:
            decode_ack(bad)
        assert exc.value.reason is reason, bad[:40]


def test_parse_cmd_shape() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from edge_agent.update import sign_command

    key = ed25519.Ed25519PrivateKey.generate()
    body = {k: v for k, v in fuzz.VALID_CMD.items() if k not in ("key_id", "sig")}
    doc = parse_cmd(sign_command(body, key))
    assert doc["url"] == body["url"] and doc["issued_ms"] == body["issued_ms"]
    good = json.dumps(fuzz.VALID_CMD)
    for field in fuzz.VALID_CMD:
        for value in ([], {}, None, 2**64, "x" * 5000):
            if field in ("v", "issued_ms") and value is None:
                continue
            with pytest.raises(EnvelopeError) as exc:
                parse_cmd(json.dumps({**fuzz.VALID_CMD, field: value}).encode())
            assert exc.value.reason in (Reason.SCHEMA, Reason.SIZE)
    with pytest.raises(EnvelopeError) as exc:
        parse_cmd(good.replace('"v": 2', '"v": NaN').encode())
    assert exc.value.reason is Reason.MALFORMED
    with pytest.raises(EnvelopeError) as exc:
        parse_cmd(b"[" * 5000 + b"]" * 5000)
    assert exc.value.reason is Reason.MALFORMED
    with pytest.raises(EnvelopeError) as exc:
        parse_cmd(json.dumps({**fuzz.VALID_CMD, "extra": 1}).encode())
    assert exc.value.reason is Reason.SCHEMA


# -- files that hold trust --------------------------------------------------------------------
def test_write_atomic_replaces_with_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "secret.pem"
    write_atomic(path, b"one")
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_atomic(tmp_path / "public.pem", b"pub", 0o644)
    assert stat.S_IMODE((tmp_path / "public.pem").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "public.pem",
        "secret.pem",
    ]
    (tmp_path / "blocked").write_text("a file, not a directory")
    with pytest.raises(MedgeError, match="cannot write"):
        write_atomic(tmp_path / "blocked" / "x", b"x")


def test_revocation_is_atomic_and_a_bad_crl_keeps_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.site import DeviceRegistry, init_site, provision_device, revoke_device

    site = tmp_path / "site"
    init_site(site, fuzz.SITE)
    for device in ("cr-01", "cr-02"):
        provision_device(site, device, tmp_path / device)
    assert stat.S_IMODE((site / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((site / "recipient.json").stat().st_mode) == 0o600
    registry = DeviceRegistry(site)
    registry.recheck_s = 0.0
    registry.key_for(fuzz.SITE, "cr-01")
    revoke_device(site, "cr-01")
    assert not [p for p in site.iterdir() if p.name.startswith(".")], "no temp file left"
    with pytest.raises(EnvelopeError) as exc:
        registry.key_for(fuzz.SITE, "cr-01")
    assert exc.value.reason is Reason.DEVICE

    # a half-written or empty CRL (an operator's cp, a full disk): the previous one holds
    caplog.set_level(logging.ERROR, logger="medge.gateway.site")
    good = (site / "crl.pem").read_bytes()
    for broken in (b"", good[: len(good) // 2]):
        (site / "crl.pem").write_bytes(broken)
        os.utime(site / "crl.pem", ns=(len(broken), len(broken) + 10**9))
        with pytest.raises(EnvelopeError, match="revoked"):
            registry.key_for(fuzz.SITE, "cr-01")
        registry.key_for(fuzz.SITE, "cr-02")  # and the others still speak
        registry.key_for(fuzz.SITE, "cr-02")
    assert registry.crl_errors == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("previous CRL (1 revoked) stays in force" in x for x in lines)
    # a revocation over a broken CRL would forget cr-01: refused, the file left as it is
    with pytest.raises(MedgeError, match="not a PEM CRL"):
        revoke_device(site, "cr-02")
    # a gateway does not start without the revocations it must enforce
    with pytest.raises(MedgeError, match="CRL"):
        DeviceRegistry(site)
    (site / "crl.pem").write_bytes(good)
    assert DeviceRegistry(site).key_for(fuzz.SITE, "cr-02") is not None


def test_device_key_files_are_written_atomically(tmp_path: Path) -> None:
    from gateway.site import init_site, provision_device

    init_site(tmp_path / "site", fuzz.SITE)
    out = provision_device(tmp_path / "site", "ak-01", tmp_path / "id")
    key = next(p for p in out.iterdir() if p.suffix == ".key" or p.name.endswith("key.pem"))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not [p for p in out.rglob(".*") if p.is_file()]
    DeviceIdentity.load(out, fuzz.SITE, "ak-01")


def test_mutators_are_deterministic() -> None:
    a = [fuzz.mutate(random.Random(5), {"a": [1, 2]}) for _ in range(3)]
    b = [fuzz.mutate(random.Random(5), {"a": [1, 2]}) for _ in range(3)]
    assert a == b
