"""The sealed envelope under attack: every forgery is one clear EnvelopeError; every legitimate
message opens."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.envelope import Envelope, decode_ack, encode_ack
from edge_agent.errors import EnvelopeError
from edge_agent.topics import parse, topic

BODY = {"pred": 0, "pred_label": "malignant", "scores": [0.9, 0.1]}


def env(device: str = "us-01", seq: int = 7, kind: str = "result") -> Envelope:
    return Envelope(kind, "ward-a", device, seq, 1_700_000_000.5, BODY)


def test_round_trip_and_topic_check(sealer, opener) -> None:  # type: ignore[no-untyped-def]
    payload = sealer("us-01").seal(env())
    assert b"malignant" not in payload, "the body travels encrypted"
    got = opener.open(payload)
    assert (got.device, got.seq, got.body, got.epoch) == ("us-01", 7, BODY, 1)
    got.check_topic(parse(topic("ward-a", "us-01", "result")))
    with pytest.raises(EnvelopeError, match="does not match topic"):
        got.check_topic(parse(topic("ward-a", "us-02", "result")))


def test_epochs_rotate_and_old_epochs_still_open(sealer, opener) -> None:  # type: ignore[no-untyped-def]
    s = sealer("us-01", rotate_after=3)
    payloads = [s.seal(env(seq=i)) for i in range(1, 8)]
    epochs = [json.loads(p)["epoch"] for p in payloads]
    assert epochs == [1, 1, 1, 2, 2, 2, 3]
    assert len({json.loads(p)["ek"] for p in payloads}) == 3, "a fresh key per epoch"
    assert [opener.open(p).seq for p in payloads] == list(range(1, 8))


def _flip(payload: bytes, field: str) -> bytes:
    data = json.loads(payload)
    if field in ("ct", "ek", "es"):
        raw = bytearray(base64.b64decode(data[field]))
        raw[len(raw) // 2] ^= 0x01
        data[field] = base64.b64encode(bytes(raw)).decode()
    elif field in ("seq", "epoch"):
        data[field] += 1
    elif field == "time":
        data[field] += 1.0
    elif field == "kind":
        data[field] = "event"
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        ("ct", "fails authentication"),
        ("seq", "fails authentication"),
        ("time", "fails authentication"),
        ("kind", "fails authentication"),
        ("epoch", "not signed by that device"),
        ("ek", "not signed by that device"),
        ("es", "not signed by that device"),
    ],
)
def test_one_flipped_bit_or_changed_header_field_is_rejected(  # type: ignore[no-untyped-def]
    sealer, opener, field: str, reason: str
) -> None:
    with pytest.raises(EnvelopeError, match=reason):
        opener.open(_flip(sealer("us-01").seal(env()), field))


def test_device_a_cannot_publish_as_device_b(sealer, opener, identity) -> None:  # type: ignore[no-untyped-def]
    identity("us-02")  # B is registered
    from edge_agent.envelope import Sealer
    from edge_agent.identity import DeviceIdentity

    a = DeviceIdentity.load(identity("us-01"), "ward-a", "us-01")
    forged = Sealer("ward-a", "us-02", a.key, a.recipient, lambda: 1)  # A's key, B's name
    with pytest.raises(EnvelopeError, match="not signed by that device"):
        opener.open(forged.seal(env(device="us-02")))


def test_unknown_device_rogue_ca_revoked_device_and_unknown_key(  # type: ignore[no-untyped-def]
    sealer, identity, site_dir: Path, tmp_path: Path
) -> None:
    from edge_agent.envelope import Sealer
    from edge_agent.identity import DeviceIdentity
    from edge_agent.keys import generate_recipient
    from gateway.site import init_site, opener_for, provision_device, revoke_device

    opener = opener_for(site_dir, recheck_s=0.0)  # re-read the CRL on every message
    # a certificate from a rogue CA that claims our site and a device name we do not know
    rogue_site = tmp_path / "rogue"
    init_site(rogue_site, "ward-a")
    rogue = DeviceIdentity.load(
        provision_device(rogue_site, "us-66", tmp_path / "r"), "ward-a", "us-66"
    )
    me = DeviceIdentity.load(identity("us-01"), "ward-a", "us-01")
    ours = me.recipient  # the gateway's public key is public
    forged = Sealer("ward-a", "us-66", rogue.key, ours, lambda: 1)
    with pytest.raises(EnvelopeError, match="unknown device ward-a/us-66"):
        opener.open(forged.seal(env(device="us-66")))
    # a rogue-CA key using the name of a registered device
    as_us01 = Sealer("ward-a", "us-01", rogue.key, ours, lambda: 1)
    with pytest.raises(EnvelopeError, match="not signed by that device"):
        opener.open(as_us01.seal(env()))
    # registered, then revoked: refused from the next message on, even in an epoch the
    # gateway has already opened
    s05 = sealer("us-05")
    assert opener.open(s05.seal(env(device="us-05"))).device == "us-05"
    revoke_device(site_dir, "us-05")
    with pytest.raises(EnvelopeError, match="ward-a/us-05 is revoked"):
        opener.open(s05.seal(env(device="us-05", seq=8)))
    # sealed to a recipient key the gateway does not hold
    other, _ = generate_recipient()
    wrong = Sealer("ward-a", "us-01", me.key, other, lambda: 1)
    with pytest.raises(EnvelopeError, match=f"unknown key id '{other.kid}'"):
        opener.open(wrong.seal(env()))


def test_post_quantum_hybrid_suite(identity, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.envelope import Sealer
    from edge_agent.identity import DeviceIdentity
    from gateway.site import init_site, opener_for, provision_device

    site = tmp_path / "pq-site"
    init_site(site, "ward-a", suite="mlkem768-x25519")
    ident = DeviceIdentity.load(provision_device(site, "us-01", tmp_path / "id"), "ward-a", "us-01")
    assert ident.recipient.suite == "mlkem768-x25519"
    payload = Sealer("ward-a", "us-01", ident.key, ident.recipient, lambda: 1).seal(env())
    assert len(base64.b64decode(json.loads(payload)["ek"])) == 1120 + 32 + 16
    assert opener_for(site).open(payload).body == BODY


def test_recipient_rotation_keeps_old_key_for_grace(identity, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.envelope import Sealer
    from edge_agent.identity import DeviceIdentity
    from gateway.site import init_site, opener_for, provision_device, rotate_recipient

    site = tmp_path / "rot-site"
    init_site(site, "ward-a")
    ident = DeviceIdentity.load(provision_device(site, "us-01", tmp_path / "id"), "ward-a", "us-01")
    old = Sealer("ward-a", "us-01", ident.key, ident.recipient, lambda: 1).seal(env())
    new_kid = rotate_recipient(site)
    assert new_kid != ident.recipient.kid
    assert opener_for(site).open(old).seq == 7, "messages sealed before rotation still open"
    (site / "recipients" / f"{ident.recipient.kid}.json").unlink()  # grace period over
    with pytest.raises(EnvelopeError, match="unknown key id"):
        opener_for(site).open(old)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(v=1), "version 1 is not supported"),
        (lambda d: d.update(seq=0), "seq"),
        (lambda d: d.update(seq="7"), "seq"),
        (lambda d: d.update(seq=True), "seq"),
        (lambda d: d.update(kind="ack"), "kind"),
        (lambda d: d.update(device="us/01"), "device name"),
        (lambda d: d.update(device="+"), "device name"),
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d.pop("time"), "lacks time"),
        (lambda d: d.update(ct="***"), "not base64"),
        (lambda d: d.update(suite="rot13"), "not supported"),
    ],
)
def test_malformed_envelopes_are_one_clear_error(sealer, opener, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(sealer("us-01").seal(env()))
    mutate(data)
    with pytest.raises(EnvelopeError, match=message):
        opener.open(json.dumps(data).encode())


@pytest.mark.parametrize(
    "payload", [b"", b"\xff\xfe", b"[]", b'{"v":2,"time":NaN}', b"x" * 300_000, b"[" * 100_000]
)
def test_garbage_is_rejected(opener, payload: bytes) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EnvelopeError):
        opener.open(payload)


@settings(
    max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=600))
def test_fuzz_random_bytes_never_crash_the_opener(opener, data: bytes) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EnvelopeError):
        opener.open(data)


_GOOD: dict[str, bytes] = {}


@settings(
    max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(pos=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_fuzz_any_single_bit_flip_is_rejected(sealer, opener, pos: int, bit: int) -> None:  # type: ignore[no-untyped-def]
    if "p" not in _GOOD:
        _GOOD["p"] = sealer("us-01").seal(env())
    good = bytearray(_GOOD["p"])
    i = pos % len(good)
    good[i] ^= 1 << bit
    try:
        got = opener.open(bytes(good))
    except EnvelopeError:
        return
    # JSON allows a few harmless changes (e.g. whitespace); then nothing may differ
    assert (got.site, got.device, got.seq, got.body) == ("ward-a", "us-01", 7, BODY)


@settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    header=st.dictionaries(
        st.sampled_from(
            [
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
                "ct",
                "x",
            ]
        ),
        st.one_of(
            st.none(),
            st.integers(),
            st.floats(),
            st.text(max_size=8),
            st.lists(st.integers(), max_size=2),
        ),
    )
)
def test_fuzz_structured_headers_are_rejected_cleanly(opener, header: dict) -> None:  # type: ignore[no-untyped-def,type-arg]
    try:
        payload = json.dumps(header).encode()
    except ValueError:
        return
    with pytest.raises(EnvelopeError):
        opener.open(payload)


def test_every_legitimate_message_opens(sealer, opener) -> None:  # type: ignore[no-untyped-def]
    s = sealer("us-03", rotate_after=50)
    kinds = ["result", "event", "telemetry", "state"]
    for i in range(1, 401):
        e = Envelope(kinds[i % 4], "ward-a", "us-03", i, time.time(), {"i": i, "x": [i] * 5})
        assert opener.open(s.seal(e)).body == e.body


def test_ack_round_trip_and_rejects() -> None:
    assert decode_ack(encode_ack([3, 1, 2])) == [1, 2, 3]
    for bad in (b"{}", b'{"v":2,"seqs":[0]}', b'{"v":2,"seqs":["1"]}', b"nope"):
        with pytest.raises(EnvelopeError):
            decode_ack(bad)


def test_topics() -> None:
    assert topic("ward-a", "us-01", "state") == "medge/v1/ward-a/us-01/state"
    assert parse("medge/v1/ward-a/us-01/ack").kind == "ack"
    for bad in ("medge/v2/a/b/result", "medge/v1/a/b/c/result", "medge/v1/a/b/secret"):
        with pytest.raises(EnvelopeError):
            parse(bad)


def test_end_to_end_mode_relay_routes_unread_and_cloud_opens(  # type: ignore[no-untyped-def]
    identity, site_dir: Path, tmp_path: Path
) -> None:
    """The fog gateway checks the device's per-message signature and routes on the clear
    header (device, seq, alert) without a key to the body; only the cloud key opens it."""
    from edge_agent.envelope import Opener, Sealer
    from edge_agent.identity import DeviceIdentity
    from edge_agent.keys import load_recipient
    from gateway.site import DeviceRegistry, opener_for, provision_device, write_recipient

    cloud_pub = write_recipient(tmp_path / "cloud.json")
    ident = DeviceIdentity.load(
        provision_device(site_dir, "us-20", tmp_path / "id", recipient=cloud_pub),
        "ward-a", "us-20",
    )
    assert ident.recipient.kid == load_recipient(cloud_pub).kid
    s = Sealer("ward-a", "us-20", ident.key, ident.recipient, lambda: 1, end_to_end=True)
    fall = Envelope("event", "ward-a", "us-20", 3, time.time(), {"event": "fall", "score": 0.97},
                    alert="fall")
    payload = s.seal(fall)
    relay = opener_for(site_dir, relay_for=(cloud_pub,))
    seen = relay.open(payload)
    assert (seen.device, seen.seq, seen.alert, seen.body) == ("us-20", 3, "fall", {})
    assert seen.sealed == payload
    cloud = Opener([load_recipient(tmp_path / "cloud.json")], DeviceRegistry(site_dir).key_for)
    assert cloud.open(payload).body == {"event": "fall", "score": 0.97}
    # the site gateway without relay_for refuses it: it is not sealed to the site's key
    with pytest.raises(EnvelopeError, match="unknown key id"):
        opener_for(site_dir).open(payload)
    # the relay checks every message: header, alert and ciphertext are all signed
    for field, value in (("alert", "none"), ("seq", 4), ("device", "us-01")):
        data = json.loads(payload)
        data[field] = value
        with pytest.raises(EnvelopeError, match="not signed by that device"):
            relay.open(json.dumps(data).encode())
    for field in ("ct", "hs"):
        with pytest.raises(EnvelopeError, match="not signed by that device"):
            relay.open(_flip(payload, field) if field == "ct" else _flip_b64(payload, "hs"))
    no_sig = json.loads(payload)
    del no_sig["hs"]
    with pytest.raises(EnvelopeError, match="lacks the device's header signature"):
        relay.open(json.dumps(no_sig).encode())


def _flip_b64(payload: bytes, field: str) -> bytes:
    data = json.loads(payload)
    raw = bytearray(base64.b64decode(data[field]))
    raw[len(raw) // 2] ^= 0x01
    data[field] = base64.b64encode(bytes(raw)).decode()
    return json.dumps(data).encode()
