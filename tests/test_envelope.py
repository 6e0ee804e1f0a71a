from __future__ import annotations

import json

import pytest

from edge_agent.envelope import Envelope, decode, decode_ack, encode, encode_ack
from edge_agent.errors import EnvelopeError
from edge_agent.topics import parse, topic

ENV = Envelope("result", "ward-a", "us-01", 7, 1700000000.5, {"pred": 1})


def test_round_trip_and_topic_check() -> None:
    got = decode(encode(ENV))
    assert got == ENV
    got.check_topic(parse(topic("ward-a", "us-01", "result")))
    with pytest.raises(EnvelopeError, match="does not match topic"):
        got.check_topic(parse(topic("ward-a", "us-02", "result")))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(v=2), "version 2"),
        (lambda d: d.update(seq=0), "seq"),
        (lambda d: d.update(seq="7"), "seq"),
        (lambda d: d.update(seq=True), "seq"),
        (lambda d: d.update(kind="ack"), "kind"),
        (lambda d: d.update(device="us/01"), "device name"),
        (lambda d: d.update(device="+"), "device name"),
        (lambda d: d.update(body=[1]), "body"),
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d.pop("time"), "lacks time"),
    ],
)
def test_malformed_envelopes_are_one_clear_error(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(encode(ENV))
    mutate(data)
    with pytest.raises(EnvelopeError, match=message):
        decode(json.dumps(data).encode())


@pytest.mark.parametrize(
    "payload", [b"", b"\xff\xfe", b"[]", b'{"v":1,"time":NaN}', b"x" * 300_000]
)
def test_garbage_is_rejected(payload: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode(payload)


def test_ack_round_trip_and_rejects() -> None:
    assert decode_ack(encode_ack([3, 1, 2])) == [1, 2, 3]
    for bad in (b"{}", b'{"v":1,"seqs":[0]}', b'{"v":1,"seqs":["1"]}', b"nope"):
        with pytest.raises(EnvelopeError):
            decode_ack(bad)


def test_topics() -> None:
    assert topic("ward-a", "us-01", "state") == "medge/v1/ward-a/us-01/state"
    assert parse("medge/v1/ward-a/us-01/ack").kind == "ack"
    for bad in ("medge/v2/a/b/result", "medge/v1/a/b/c/result", "medge/v1/a/b/secret"):
        with pytest.raises(EnvelopeError):
            parse(bad)
