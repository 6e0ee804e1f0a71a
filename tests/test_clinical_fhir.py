"""FHIR R4 from stored results and events (gateway.clinical.fhir), POSTed as transactions
(gateway.clinical.fhir_client) to a real HTTP FHIR receiver (tests/fhir_receiver.py).

Bodies are made by the agent's own code: results by edge_agent.pipeline.result_body over a
real Manifest/Bundle and Sample, events by edge_agent.events.EventTracker over per-window
scores; each is checked with edge_agent.schemas.check_body as the gateway checks it.
"""

from __future__ import annotations

import base64
import datetime as dt
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fhir_receiver import FhirReceiver, receiver_fixture  # noqa: F401 (the fhir_receiver fixture)

from edge_agent.bundle import (
    SCHEMA_VERSION,
    Artifact,
    Bundle,
    Decode,
    EventRule,
    FileEntry,
    Manifest,
    Preprocess,
    Provenance,
    TensorSpec,
)
from edge_agent.envelope import Envelope
from edge_agent.errors import ConfigError
from edge_agent.events import EventTracker
from edge_agent.pipeline import result_body
from edge_agent.schemas import check_body
from edge_agent.sources.base import Sample
from gateway.clinical.fhir import (
    FALL,
    LOINC,
    SNOMED,
    FhirBuildError,
    ModelFacts,
    StoredRow,
    result_observation,
    site_system,
    transaction,
)
from gateway.clinical.fhir_client import FhirConfig, FhirError, post_transaction
from gateway.store import Store

SITE = "ward-3"
T0 = 1_764_900_000.0  # 2025-12-05, the live devices' epoch sample times
CLOCK_LAG = 0.2  # a message's time (the device's clock) after its sample's time
LATENCY = {"total": 0.004}
rng = np.random.default_rng(7)

# the zoo's wrist_fall_lstm and ecg_gru labels and event rules (models/*.py)
FALL_RULE = EventRule(
    name="fall", label="fall", on=0.5, off=0.3, min_windows=2, severity="critical"
)
PVC_RULE = EventRule(name="pvc_run", label="V", on=0.5, off=0.5, min_windows=2, severity="warning")


def _bundle(name: str, labels: list[str], positive: str, rule: EventRule) -> Bundle:
    art = Artifact(
        file="model.tflite",
        runtime="litert",
        precision="int8",
        inputs=[TensorSpec(name="x", shape=[1, 60, 6], dtype="float32")],
        outputs=[TensorSpec(name="y", shape=[1, len(labels)], dtype="float32")],
    )
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        name=name,
        version="1.2",
        created="2026-12-01T00:00:00Z",
        task="classification",
        profile="rpi4",
        preprocess=Preprocess(kind="zscore"),
        decode=Decode(kind="classification", events=[rule]),
        labels=labels,
        positive_label=positive,
        artifacts=[art],
        files={art.file: FileEntry(sha256="ab" * 32, bytes=1)},
        provenance=Provenance(
            source_sha256="cd" * 32, source_format="keras", converter_version="t"
        ),
    )
    return Bundle(Path("."), manifest, "0123456789abcdef" * 4)


class _Loaded:
    """What result_body reads of a loaded model: its bundle (nothing runs here)."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle


WRIST = _bundle("wrist_fall_lstm", ["no_fall", "fall"], "fall", FALL_RULE)
ECG = _bundle("ecg_gru", ["N", "V"], "V", PVC_RULE)


def _facts(b: Bundle, signal: Any) -> ModelFacts:
    m = b.manifest
    codings = {"fall": FALL} if signal == "imu" else {}
    return ModelFacts(b.id, m.name, tuple(m.labels), signal, m.positive_label, m.task, codings)


FACTS = {"watch-7": _facts(WRIST, "imu"), "holter-2": _facts(ECG, "ecg")}


def _facts_of(row: StoredRow) -> ModelFacts:
    return FACTS[row.device]


def _stream(device: str, bundle: Bundle, p: list[float], t0: float, dt_s: float) -> list[StoredRow]:
    """Results and events of a stream of positive-class scores ``p`` from sample time ``t0``,
    as the agent makes them, with the device's clock (epoch) as each message's time."""
    m = bundle.manifest
    tracker = EventTracker(m.decode.events, m.labels)
    rows: list[StoredRow] = []

    def add(kind: str, body: dict[str, Any], clock: float) -> None:
        rows.append(StoredRow(SITE, device, len(rows) + 1, clock, kind, check_body(kind, body)))

    for i, score in enumerate(p):
        t, clock = t0 + i * dt_s, T0 + i * dt_s + CLOCK_LAG
        scores = [1.0 - score, score]
        pred = int(np.argmax(scores))
        sample = Sample(f"{device}#{i}", rng.normal(size=(60, 6)).astype("float32"), None, t)
        loaded = _Loaded(bundle)
        add("result", result_body(sample, pred, m.labels[pred], scores, loaded, LATENCY), clock)  # type: ignore[arg-type]
        for ev in tracker.update(t, scores, sample.id):
            add("event", ev, clock)
    for ev in tracker.finish():
        add("event", ev, T0 + len(p) * dt_s + CLOCK_LAG)
    return rows


FALL_P = [0.02, 0.05, 0.8, 0.95, 0.9, 0.1, 0.03]  # one fall: windows 2..4
PVC_P = [0.1, 0.9, 0.85, 0.2, 0.1]  # one run of two PVC beats


@pytest.fixture
def rows(tmp_path: Path) -> list[StoredRow]:
    """The two streams, stored by the gateway's Store and read back as rows."""
    made = _stream("watch-7", WRIST, FALL_P, T0, 0.5) + _stream("holter-2", ECG, PVC_P, 1140.0, 0.8)
    with Store(tmp_path / "gateway.db") as store:
        envs = [Envelope(r.kind, r.site, r.device, r.seq, r.time, r.body) for r in made]
        assert store.add_results([(e, None) for e in envs]) == [True] * len(envs)
        stored = store.query("SELECT site, device, seq, time, kind, body FROM results ORDER BY id")
    back = [StoredRow.from_store(r) for r in stored]
    assert back == made
    return back


def _config(receiver: FhirReceiver, **kw: Any) -> FhirConfig:
    return FhirConfig(receiver.url, timeout_s=5.0, **kw)


def _time(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _observation(receiver: FhirReceiver, value: str) -> dict[str, Any]:
    found = receiver.find("Observation", site_system(SITE), value)
    assert len(found) == 1, (value, found)
    return found[0]


def test_results_and_events_are_stored_with_their_codes_values_and_devices(
    fhir_receiver: FhirReceiver, rows: list[StoredRow]
) -> None:
    kinds = [(r.kind, r.body.get("state")) for r in rows]
    assert kinds.count(("event", "start")) == 2 and kinds.count(("event", "end")) == 2
    patients = {f"{SITE}/watch-7": "Patient/p-17"}  # the holter has no patient mapped
    answer = post_transaction(_config(fhir_receiver), transaction(rows, _facts_of, patients))
    assert {e["response"]["status"] for e in answer["entry"]} == {"201 Created"}
    # 7 + 5 results, one Observation per event (its end replaced its start), 2 + 2 Devices
    assert fhir_receiver.count("Observation") == 12 + 2
    assert fhir_receiver.count("Device") == 4

    fall = _observation(fhir_receiver, "watch-7/4")  # seq 4: the window of score 0.95
    assert fall["status"] == "final"
    assert fall["category"][0]["coding"][0]["code"] == "activity"
    value = fall["valueCodeableConcept"]["coding"]
    assert (value[0]["system"], value[0]["code"]) == (SNOMED, "1912002")
    assert value[1] == {
        "system": "urn:medge:codesystem:label:wrist_fall_lstm",
        "code": "fall",
        "display": "fall",
    }
    assert [c["valueQuantity"]["value"] for c in fall["component"]] == pytest.approx([0.05, 0.95])
    assert [c["code"]["coding"][0]["code"] for c in fall["component"]] == [
        "score:no_fall",
        "score:fall",
    ]
    assert fall["interpretation"][0]["coding"][0]["code"] == "A"
    assert fall["subject"] == {"reference": "Patient/p-17"}
    assert _time(fall["effectiveDateTime"]) == pytest.approx(T0 + 2 * 0.5)  # the sample's time
    model = fhir_receiver.resources["Device"][fall["device"]["reference"].split("/")[1]]
    assert model["version"] == [{"value": WRIST.id}]
    assert model["identifier"][0]["value"] == f"watch-7/{WRIST.id}"
    parent = fhir_receiver.resources["Device"][model["parent"]["reference"].split("/")[1]]
    assert parent["identifier"] == [{"system": site_system(SITE), "value": "watch-7"}]
    normal = _observation(fhir_receiver, "watch-7/1")
    assert normal["valueCodeableConcept"]["coding"][-1]["code"] == "no_fall"
    assert normal["interpretation"][0]["coding"][0]["code"] == "N"

    event = _observation(fhir_receiver, f"watch-7/event/fall@{T0 + 2 * 0.5!r}")
    assert event["status"] == "final"
    assert event["interpretation"][0]["coding"][0]["code"] == "AA"  # severity critical
    period = {k: _time(v) for k, v in event["effectivePeriod"].items()}
    assert period == pytest.approx({"start": T0 + 1.0, "end": T0 + 2.0})
    assert event["valueCodeableConcept"]["coding"][0]["code"] == FALL[1]

    beat = _observation(fhir_receiver, "holter-2/2")  # ECG, a replay: seconds into record 106
    assert beat["code"]["coding"][0] == {
        "system": LOINC,
        "code": "8601-7",
        "display": "EKG impression",
    }
    assert beat["category"][0]["coding"][0]["code"] == "procedure"
    assert [c["system"] for c in beat["valueCodeableConcept"]["coding"]] == [
        "urn:medge:codesystem:label:ecg_gru"
    ]
    assert "subject" not in beat
    assert "recording offset 1140.8 s" in beat["note"][0]["text"]
    assert _time(beat["effectiveDateTime"]) == pytest.approx(T0 + 0.8 + CLOCK_LAG)  # the clock's
    run = _observation(fhir_receiver, "holter-2/event/pvc_run@1140.8")
    assert run["interpretation"][0]["coding"][0]["code"] == "A"  # severity warning
    end = next(r for r in rows if r.device == "holter-2" and r.body.get("state") == "end")
    period = {k: _time(v) for k, v in run["effectivePeriod"].items()}
    assert period == pytest.approx({"start": end.time - 0.8, "end": end.time})


def test_a_resend_never_duplicates_and_an_end_updates_its_start(
    fhir_receiver: FhirReceiver, rows: list[StoredRow]
) -> None:
    config = _config(fhir_receiver)
    fall_rows = [r for r in rows if r.device == "watch-7"]
    end = next(i for i, r in enumerate(fall_rows) if r.body.get("state") == "end")
    first, later = fall_rows[:end], fall_rows[end:]
    post_transaction(config, transaction(first, _facts_of))
    key = f"watch-7/event/fall@{T0 + 1.0!r}"
    assert _observation(fhir_receiver, key)["status"] == "preliminary"
    assert "end" not in _observation(fhir_receiver, key)["effectivePeriod"]
    counts = (fhir_receiver.count("Observation"), fhir_receiver.count("Device"))
    again = post_transaction(config, transaction(first, _facts_of))  # a resend after a lost answer
    assert {e["response"]["status"] for e in again["entry"]} == {"200 OK"}
    assert (fhir_receiver.count("Observation"), fhir_receiver.count("Device")) == counts
    post_transaction(config, transaction(later, _facts_of))
    post_transaction(config, transaction(fall_rows, _facts_of))  # everything again
    event = _observation(fhir_receiver, key)
    assert event["status"] == "final" and "end" in event["effectivePeriod"]
    assert fhir_receiver.count("Observation") == len(FALL_P) + 1
    assert fhir_receiver.count("Device") == 2


def test_a_server_that_fails_is_a_clear_retryable_error_and_the_retry_stores_once(
    fhir_receiver: FhirReceiver, rows: list[StoredRow]
) -> None:
    bundle = transaction(rows, _facts_of)
    fhir_receiver.fail_next(2)
    for _ in range(2):
        with pytest.raises(FhirError, match=r"HTTP 503: told to fail \(503\)") as err:
            post_transaction(_config(fhir_receiver), bundle)
        assert err.value.status == 503 and err.value.retryable
    assert fhir_receiver.count("Observation") == 0
    post_transaction(_config(fhir_receiver), bundle)
    post_transaction(_config(fhir_receiver), bundle)
    assert fhir_receiver.count("Observation") == 14 and fhir_receiver.transactions == 2


def test_a_server_that_is_down_or_silent_is_a_clear_retryable_error(rows: list[StoredRow]) -> None:
    bundle = transaction(rows[:1], _facts_of)
    receiver = FhirReceiver()
    url = receiver.url
    receiver.close()  # nothing listens on that port now
    with pytest.raises(FhirError, match="refused") as err:
        post_transaction(FhirConfig(url, timeout_s=5.0), bundle)
    assert err.value.retryable and err.value.status is None
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        with pytest.raises(FhirError, match=r"no answer .* in 0\.3 s") as err:
            post_transaction(FhirConfig(f"http://127.0.0.1:{port}/fhir", timeout_s=0.3), bundle)
    assert err.value.retryable


def test_an_invalid_body_is_one_error_naming_the_result(rows: list[StoredRow]) -> None:
    row = next(r for r in rows if r.kind == "result" and r.device == "watch-7")
    facts = FACTS["watch-7"]

    def bad(**change: Any) -> StoredRow:
        return StoredRow(row.site, row.device, 99, row.time, "result", {**row.body, **change})

    cases = [
        (bad(pred=2), "pred is not a class"),
        (bad(scores=[0.5]), "scores do not match the 2 labels"),
        (bad(scores=[0.5, float("nan")]), "finite number"),  # edge_agent.schemas refuses it
        (bad(pred_label="fall", pred=0), "pred_label does not name class 0"),
        (bad(bundle="other@1#000000000000"), "from bundle other@1"),
        (bad(sample_time=1e13), "time 10000000000000.0 is not a date from 2001 to 9999"),
    ]
    unset_clock = StoredRow(SITE, "watch-7", 99, 12.5, "result", {**row.body, "sample_time": 3.0})
    cases.append((unset_clock, "time 12.5 is not a date"))  # a replay on a device at 1970
    for broken, why in cases:
        with pytest.raises(FhirBuildError, match=f"result {SITE}/watch-7/99: .*{why}"):
            result_observation(broken, facts)
        with pytest.raises(FhirBuildError, match=f"result {SITE}/watch-7/99"):
            transaction([row, broken], _facts_of)
    with pytest.raises(FhirBuildError, match="not a result"):
        result_observation(StoredRow(SITE, "watch-7", 5, T0, "event", {}), facts)
    start = next(r for r in rows if r.kind == "event" and r.device == "watch-7")
    for change, why in (({"start": None}, "has no start"), ({"label": "V"}, "not a class")):
        broken = StoredRow(SITE, "watch-7", 98, start.time, "event", {**start.body, **change})
        with pytest.raises(FhirBuildError, match=f"event {SITE}/watch-7/98: .*{why}"):
            transaction([broken], _facts_of)


def test_a_bundle_the_server_refuses_is_a_clear_final_error(
    fhir_receiver: FhirReceiver, rows: list[StoredRow]
) -> None:
    doc = transaction(rows[:1], _facts_of).model_dump(mode="json", exclude_none=True)
    del doc["entry"][-1]["resource"]["code"]  # an Observation without its code
    with pytest.raises(FhirError, match=r"HTTP 400: .*entry.2.resource.code Field required") as err:
        post_transaction(_config(fhir_receiver), doc)
    assert err.value.status == 400 and not err.value.retryable
    assert fhir_receiver.count("Device") == 0  # all or nothing


def test_bearer_and_basic_credentials_come_from_files(
    tmp_path: Path, rows: list[StoredRow]
) -> None:
    bundle = transaction(rows[:1], _facts_of)
    (tmp_path / "token").write_text("s3cret-token\n")
    (tmp_path / "basic").write_text("medge:pa:ss\n")
    bearer = FhirReceiver(auth="Bearer s3cret-token")
    basic = FhirReceiver(auth="Basic " + base64.b64encode(b"medge:pa:ss").decode())
    try:
        post_transaction(FhirConfig(bearer.url, token_file=tmp_path / "token"), bundle)
        post_transaction(FhirConfig(basic.url, basic_auth_file=tmp_path / "basic"), bundle)
        assert bearer.count("Observation") == basic.count("Observation") == 1
        with pytest.raises(FhirError, match="HTTP 401: no valid credentials") as err:
            post_transaction(FhirConfig(bearer.url), bundle)
        assert err.value.retryable  # the credentials are at fault, not the Bundle
        with pytest.raises(FhirError, match="cannot read the token file"):
            post_transaction(FhirConfig(bearer.url, token_file=tmp_path / "nope"), bundle)
    finally:
        bearer.close()
        basic.close()


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[tuple[FhirReceiver, Path]]:
    """A receiver over HTTPS with a self-signed certificate for 127.0.0.1, and its PEM."""
    import ipaddress
    import ssl

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fhir.test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    pem, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem, key_pem)
    receiver = FhirReceiver(context=context)
    try:
        yield receiver, pem
    finally:
        receiver.close()


def test_tls_with_the_sites_ca_and_a_clear_error_without_it(
    tls: tuple[FhirReceiver, Path], rows: list[StoredRow]
) -> None:
    receiver, pem = tls
    bundle = transaction(rows[:1], _facts_of)
    with pytest.raises(
        FhirError, match="TLS to https://127.0.0.1:.* failed: .*CERTIFICATE_VERIFY_FAILED"
    ):
        post_transaction(FhirConfig(receiver.url, timeout_s=5.0), bundle)
    post_transaction(FhirConfig(receiver.url, ca_file=pem, timeout_s=5.0), bundle)
    assert receiver.count("Observation") == 1


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="base url"):
        FhirConfig("ftp://ehr/fhir")
    with pytest.raises(ConfigError, match="not both"):
        FhirConfig("https://ehr/fhir", token_file=Path("a"), basic_auth_file=Path("b"))
    with pytest.raises(ConfigError, match="watch-7"):
        FhirConfig("https://ehr/fhir", patients={"watch-7": "p-17"})
    with pytest.raises(FhirBuildError, match="signal"):
        ModelFacts("x@1#0", "x", ("a", "b"), "eeg")  # type: ignore[arg-type]
