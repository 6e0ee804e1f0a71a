"""Clinical outputs end to end, through a real agent, broker and fog gateway: a DICOM cine into a
real Orthanc as Structured Reports that reference the frames they are about (Orthanc killed
mid-stream loses nothing; the source UIDs travel sealed to the fog node alone: the cloud tier,
holding the site key, opens the message and still cannot read them); a wearable recording into
a FHIR receiver as Observations, once each, through server errors."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from fhir_receiver import FhirReceiver, receiver_fixture
from orthanc import OrthancServer, start_orthanc
from waiting import wait_for

from edge_agent import Agent, AgentConfig
from edge_agent.bundle import sign_bundle
from edge_agent.errors import EnvelopeError
from edge_agent.identity import SOURCE_RECIPIENT
from edge_agent.keys import generate_recipient, load_recipient, write_secret
from edge_agent.reasons import Reason
from edge_agent.source_ids import NO_SOURCE_KEY, open_source
from gateway import Gateway, Store
from gateway.broker import RunningBroker
from gateway.clinical.fhir import FALL, StoredRow, event_key, site_system
from gateway.clinical.outbox import ClinicalOutbox
from gateway.clinical.sender import ClinicalSender
from gateway.clinical.settings import FhirModel, FhirSettings, OutputsSettings, PacsSettings
from gateway.site import signer_key
from medge.demo_scenarios import scenario

pytestmark = pytest.mark.slow
__all__ = ["receiver_fixture"]  # the fhir_receiver fixture, imported to be used here

CINE = Path(__file__).parent / "data" / "dicom" / "us_cine_30frames_ybr.dcm"
FRAMES = 20


def _instances(server: OrthancServer, study: str, modality: str) -> list[pydicom.Dataset]:
    """Every stored instance of ``modality`` in the study, read back by QIDO-RS + WADO-RS."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    session = create_session_from_user_pass(server.user, server.password)
    client = DICOMwebClient(server.dicomweb_url, session=session, timeout=5)
    found = client.search_for_instances(study_instance_uid=study)
    out = []
    for f in found:
        ds = pydicom.Dataset.from_json(f)
        if ds.get("Modality") == modality:
            out.append(client.retrieve_instance(study, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    return out


def _frames_referenced(sr: pydicom.Dataset, instance: str) -> set[int]:
    """The frame numbers with which an SR's content refers to ``instance``."""
    frames: set[int] = set()
    for item in sr.iterall():
        if item.keyword == "ReferencedSOPSequence":
            for ref in item.value:
                if ref.get("ReferencedSOPInstanceUID") == instance:
                    frames.update(int(f) for f in _as_list(ref.get("ReferencedFrameNumber")))
    return frames


def _cine_agent(
    device: str,
    bundle: Path,
    identity: Path,
    broker: RunningBroker,
    tmp_path: Path,
    frames: int,
    **source: Any,
) -> AgentConfig:
    """An agent on the ultrasound cine fixture, its first ``frames`` frames, grey 28x28."""
    return AgentConfig(
        site="ward-a",
        device=device,
        bundle=bundle,
        identity=identity,
        broker={"host": broker.host, "port": broker.port},
        source={
            "kind": "dicom",
            "path": CINE,
            "color": "grey",
            "size": [28, 28],
            "limit": frames,
            **source,
        },
        outbox={"path": tmp_path / "outbox.sqlite"},
    )


def _sealed_for_the_fog_alone(
    db: Path, rows: list[dict[str, Any]], opener: Any, site_dir: Path, key_file: Path
) -> None:
    """No UID of the source in what the fog stores; the cloud tier, which opens the same
    message with the site key, cannot open the sealed UIDs; the fog's source key can."""
    source = pydicom.dcmread(CINE, stop_before_pixels=True)
    secrets = (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)
    assert not any(s in json.dumps(rows) for s in secrets)
    with Store(db) as store:
        raw = store.query("SELECT raw FROM results LIMIT 1")[0]["raw"]
    body = opener.open(bytes(raw)).body
    assert not any(s in json.dumps(body) for s in secrets)
    cloud = load_recipient(site_dir / "recipient.json")
    with pytest.raises(EnvelopeError) as exc:
        open_source(body["source"], "ward-a", "us-31", {cloud.kid: cloud})
    assert exc.value.reason == Reason.UNKNOWN_KEY
    fog = load_recipient(key_file)
    uids, _ = open_source(body["source"], "ward-a", "us-31", {fog.kid: fog})
    assert uids.instance == source.SOPInstanceUID


def _as_list(v: Any) -> list[Any]:
    if v is None:
        return []
    return list(v) if isinstance(v, pydicom.multival.MultiValue) else [v]


def test_a_cine_through_an_agent_reaches_the_pacs_once_per_frame_through_a_pacs_kill(
    bundle_dir: Path,
    identity: Any,
    opener: Any,
    site_dir: Path,
    mosquitto: RunningBroker,
    tmp_path: Path,
) -> None:
    source = pydicom.dcmread(CINE, stop_before_pixels=True)
    fog_key, private = generate_recipient()
    key_file = tmp_path / "fog" / "source.json"
    write_secret(key_file, json.dumps(private).encode())
    ident = shutil.copytree(identity("us-31"), tmp_path / "identity")
    (ident / SOURCE_RECIPIENT).write_text(json.dumps(fog_key.public_json()))  # as provisioned

    (tmp_path / "pacs").mkdir()
    server = start_orthanc(tmp_path / "pacs")
    try:
        assert server.upload(CINE)["Status"] == "Success"  # the modality's own upload
        settings = OutputsSettings(
            source_key=[key_file],
            pacs=PacsSettings(
                url=server.dicomweb_url,
                user=server.user,
                password_file=server.password_file,
                timeout_s=2.0,
            ),
            retry_min_s=0.1,
            retry_max_s=0.5,
        )
        sender = ClinicalSender(ClinicalOutbox(tmp_path / "clinical.sqlite"), settings)
        cfg = _cine_agent("us-31", bundle_dir, ident, mosquitto, tmp_path, FRAMES, rate_hz=8)
        with (
            Store(tmp_path / "gw.sqlite") as store,
            Gateway(store, opener, mosquitto.host, mosquitto.port, clinical=sender),
        ):
            reports: list[Any] = []
            agent = threading.Thread(
                target=lambda: reports.append(Agent(cfg).run(threading.Event()))
            )
            agent.start()
            stats = sender.stats["pacs"]
            wait_for(lambda: stats.sent >= 3, 30, "three results in the PACS")
            server.stop()  # mid-stream: the agent goes on, the gateway keeps storing
            wait_for(lambda: stats.retried >= 2, 20, "the sender to retry the stopped PACS")
            held = sender.outbox.depth().get("pacs", 0)
            server = server.restart()
            agent.join(timeout=60)
            assert not agent.is_alive() and reports and reports[0].pending == 0
            wait_for(lambda: sender.outbox.depth().get("pacs", 0) == 0, 30, "the outbox to drain")
            rows = store.results(limit=1000)
        assert held >= 1  # something waited for the PACS while it was down
        assert len(rows) == FRAMES and stats.parked == 0
        assert sender.outbox.parked_count() == {}

        srs = _instances(server, source.StudyInstanceUID, "SR")
        frames = [_frames_referenced(sr, source.SOPInstanceUID) for sr in srs]
        # one SR per result, exactly once, each about the frame its result came from (1-based)
        assert len(srs) == FRAMES and len({sr.SOPInstanceUID for sr in srs}) == FRAMES
        assert sorted(f for fs in frames for f in fs) == list(range(1, FRAMES + 1))
        hd.sr.ComprehensiveSR.from_dataset(srs[0])  # highdicom reads it back as an SR
        for sr in srs:
            assert (
                sr.PatientID == source.PatientID and sr.StudyInstanceUID == source.StudyInstanceUID
            )
            assert sr.VerificationFlag == "UNVERIFIED" and sr.PreliminaryFlag == "PRELIMINARY"

        # what the fog stores and forwards: the UIDs only sealed, to the fog node alone
        _sealed_for_the_fog_alone(tmp_path / "gw.sqlite", rows, opener, site_dir, key_file)
    finally:
        server.stop()


def test_a_dicom_device_without_the_source_key_gets_its_results_parked_with_the_reason(
    bundle_dir: Path,
    identity: Any,
    opener: Any,
    mosquitto: RunningBroker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A DICOM device provisioned before the fog's source key existed seals no UIDs. Each of
    its results says so in ``source`` (no UID in it), and the fog parks each for the PACS with
    that reason: the gap shows in ``outputs --parked`` and the metrics, not only in one line
    of the device's log. The PACS is never asked."""
    ident = identity("us-33")
    assert not (ident / SOURCE_RECIPIENT).exists()
    _, private = generate_recipient()
    key_file = tmp_path / "fog" / "source.json"
    write_secret(key_file, json.dumps(private).encode())
    settings = OutputsSettings(
        source_key=[key_file],
        pacs=PacsSettings(url="http://127.0.0.1:9/dicom-web", timeout_s=1.0),  # never asked
    )
    sender = ClinicalSender(ClinicalOutbox(tmp_path / "clinical.sqlite"), settings)
    cfg = _cine_agent("us-33", bundle_dir, ident, mosquitto, tmp_path, 4)
    source = pydicom.dcmread(CINE, stop_before_pixels=True)
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port, clinical=sender),
    ):
        report = Agent(cfg).run(threading.Event())
        assert report.pending == 0
        wait_for(lambda: sender.outbox.parked_count().get("pacs") == 4, 20, "four parked")
        stored = json.dumps(store.results(limit=100))
    said = [r for r in caplog.records if "results will carry no source UIDs" in r.getMessage()]
    assert len(said) == 1
    assert sender.stats["pacs"].parked == 4 and sender.stats["pacs"].sent == 0
    assert source.SOPInstanceUID not in stored and source.StudyInstanceUID not in stored
    parked = sorted(sender.outbox.parked("pacs"), key=lambda p: p.item.seq)
    assert [p.item.body["source"] for p in parked] == [
        {"missing": NO_SOURCE_KEY, "frame": f} for f in range(4)
    ]
    assert {p.reason for p in parked} == {
        "ward-a/us-33: no source UIDs: the device's identity has no source key, so it "
        "sealed no source UIDs (medge site source-key, then medge device provision again)"
    }


# the zoo's wrist LSTM: converted once per session (conftest)
def test_a_wearable_stream_through_an_agent_reaches_fhir_once_through_server_errors(
    wrist_bundle: Any,
    identity: Any,
    opener: Any,
    site_dir: Path,
    mosquitto: RunningBroker,
    fhir_receiver: FhirReceiver,
    tmp_path: Path,
) -> None:
    """The demo's wrist recording (four simulated falls) through a real agent and gateway: every
    result is one Observation, every fall one flagged Observation (final, with its period), the
    device and its bundle two Devices, though the FHIR server answered 503 at first."""
    man = wrist_bundle.manifest
    fhir_receiver.fail_next(3)
    model = FhirModel(
        signal="imu",
        labels=list(man.labels),
        positive_label=man.positive_label,
        label_codings={"fall": FALL},
    )
    settings = OutputsSettings(
        fhir=FhirSettings(
            base_url=fhir_receiver.url, models={man.name: model}, batch=50, timeout_s=5
        ),
        retry_min_s=0.1,
        retry_max_s=0.5,
    )
    sender = ClinicalSender(ClinicalOutbox(tmp_path / "clinical.sqlite"), settings)
    bundle = shutil.copytree(wrist_bundle.directory, tmp_path / "bundle")  # the zoo's is unsigned
    sign_bundle(bundle, signer_key(site_dir))
    source = {**scenario("wrist").source(4.0, None), "realtime": False, "loop": False}
    cfg = AgentConfig(
        site="ward-a",
        device="wr-31",
        bundle=bundle,
        identity=identity("wr-31"),
        broker={"host": mosquitto.host, "port": mosquitto.port},
        source=source,
        outbox={"path": tmp_path / "outbox.sqlite"},
    )
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port, clinical=sender),
    ):
        report = Agent(cfg).run(threading.Event())
        assert report.pending == 0
        wait_for(lambda: sender.outbox.depth().get("fhir", 0) == 0, 60, "the outbox to drain")
        rows = store.results(limit=5000)
        events = [
            StoredRow.from_store(r)
            for r in store.query(
                "SELECT site, device, seq, time, kind, body FROM results WHERE kind='event'"
            )
        ]
    stats = sender.stats["fhir"]
    assert stats.retried >= 1 and stats.parked == 0 and sender.outbox.parked_count() == {}
    results = [r for r in rows if r["kind"] == "result"]
    keys = {event_key(e) for e in events}
    system = site_system("ward-a")
    assert len(results) == (4193 - 60) // 10 + 1 and len(keys) == 4  # the four falls
    # each result and each fall once, whatever was sent again
    assert fhir_receiver.count("Observation") == len(results) + len(keys)
    assert fhir_receiver.count("Device") == 2
    one = fhir_receiver.find("Observation", system, f"wr-31/{results[0]['seq']}")
    assert len(one) == 1 and one[0]["status"] == "final"
    for key in keys:
        [fall] = fhir_receiver.find("Observation", system, key)
        assert fall["status"] == "final" and "end" in fall["effectivePeriod"]
        assert fall["interpretation"][0]["coding"][0]["code"] in ("A", "AA")
        assert fall["valueCodeableConcept"]["coding"][0]["code"] == FALL[1]
