"""The clinical outbox and its senders (gateway.clinical.outbox, .sender, .delivery), against a
real Orthanc (tests/orthanc.py) and a real FHIR receiver (tests/fhir_receiver.py): results
whose source UIDs are sealed as the agent seals them go to the PACS as SR (+ SEG, SC) that
reference the source; ECG results and events go to FHIR in transactions. A PACS that goes
away and comes back on the same ports gets everything exactly once; what cannot be sent is
parked with its reason while the rest goes; an outbox reopened resumes."""

from __future__ import annotations

import base64
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fhir_receiver import FhirReceiver, receiver_fixture  # noqa: F401 (the fhir_receiver fixture)
from orthanc import OrthancServer, orthanc, start_orthanc
from pydantic import ValidationError
from pydicom import Dataset, dcmread
from waiting import wait_for

from edge_agent.bundle import EventRule
from edge_agent.events import EventTracker
from edge_agent.keys import RecipientKey, generate_recipient, write_secret
from edge_agent.png import encode_png
from edge_agent.source_ids import SourceSealer, SourceUids
from gateway.clinical.dicom_objects import MedgeResult, dicom_objects
from gateway.clinical.fhir import site_system
from gateway.clinical.outbox import ClinicalItem, ClinicalOutbox
from gateway.clinical.pacs import fetch_header
from gateway.clinical.sender import ClinicalSender, Row
from gateway.clinical.settings import FhirModel, FhirSettings, OutputsSettings, PacsSettings
from gateway.metrics import ClinicalMetrics

__all__ = ["orthanc"]  # the fixture, imported to be used here

DATA = Path(__file__).parent / "data" / "dicom"
CINE, CT, MR = DATA / "us_cine_30frames_ybr.dcm", DATA / "CT_small.dcm", DATA / "MR_small.dcm"
SITE = "ward-a"
BUNDLE = "breast_cnn@1.2.0#0123456789ab"
ECG = "ecg_gru@1.2#0123456789ab"
T0 = 1_764_900_000.0


def _key(folder: Path, name: str) -> tuple[RecipientKey, Path]:
    key, private = generate_recipient()
    path = folder / f"{name}.json"
    write_secret(path, json.dumps(private).encode())
    return key, path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[RecipientKey, Path]:
    return _key(tmp_path_factory.mktemp("keys"), "source")


@pytest.fixture(scope="module")
def pacs_up(orthanc: OrthancServer) -> OrthancServer:
    for path in (CINE, CT):
        assert orthanc.upload(path)["Status"] == "Success"
    return orthanc


def _pacs(server: OrthancServer, **kw: Any) -> PacsSettings:
    return PacsSettings(**{**server.pacs_fields(timeout_s=2.0), **kw})


def _outputs(key_file: Path, **kw: Any) -> OutputsSettings:
    return OutputsSettings(source_key=[key_file], retry_min_s=0.05, retry_max_s=0.4, **kw)


def _uids(path: Path) -> SourceUids:
    ds = dcmread(path, stop_before_pixels=True)
    return SourceUids(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID)


def _png(a: np.ndarray) -> str:
    return base64.b64encode(encode_png(a)).decode("ascii")


def _body(source: dict[str, Any], mask: bool = False, cam: bool = False) -> dict[str, Any]:
    """A result body of an image model, as the agent sends it (pipeline + decode + CAM)."""
    body: dict[str, Any] = {
        "input": "dicom:0123456789abcdef#0",
        "pred": 1,
        "pred_label": "malignant",
        "scores": [0.125, 0.875],
        "positive_label": "malignant",
        "bundle": BUNDLE,
        "latency_ms": 12.5,
        "source": source,
    }
    if mask:
        contour = [[10, 20], [10, 39], [29, 39], [29, 20]]
        body["mask"] = {"area_px": 400, "bbox": [10, 20, 29, 39], "contour": contour}
        body["mask"]["size"] = [64, 64]
    if cam:
        heat = np.zeros((8, 8), np.uint8)
        heat[2:4, 5:7] = 255
        body["cam"] = {"png": _png(heat), "label": "malignant", "size": [8, 8]}
    return body


def _row(device: str, seq: int, body: dict[str, Any], kind: str = "result") -> Row:
    return (SITE, device, seq, kind, T0 + seq, body.get("bundle"), body)


def _expected(cfg: Any, path: Path, row: Row) -> list[Dataset]:
    """The objects the sender must have built for ``row`` (name-based UIDs: the same)."""
    site, device, seq, _, t, _, body = row
    uids = _uids(path)
    header = fetch_header(cfg, uids.study, uids.series, uids.instance)
    when = datetime.fromtimestamp(t, timezone.utc)
    frame = body["source"].get("frame")
    return dicom_objects(header, MedgeResult(body, when, f"{site}/{device}", frame, seq), [])


def _instances(server: OrthancServer, study: str) -> list[Dataset]:
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    session = create_session_from_user_pass(server.user, server.password)
    client = DICOMwebClient(server.dicomweb_url, session=session, timeout=5)
    found = client.search_for_instances(study_instance_uid=study)
    return [Dataset.from_json(f) for f in found]


def _drained(box: ClinicalOutbox, target: str) -> bool:
    return box.depth().get(target, 0) == 0


def test_results_go_to_the_pacs_as_sr_seg_and_sc_that_reference_the_source(
    pacs_up: OrthancServer, keys: tuple[RecipientKey, Path], tmp_path: Path
) -> None:
    key, key_file = keys
    seal = SourceSealer(key, SITE, "us-1")
    rows = [
        _row("us-1", 1, _body(seal(_uids(CT)), mask=True, cam=True)),  # SR, SEG, SC
        _row("us-1", 2, _body(seal(_uids(CINE), 12), mask=True, cam=True)),  # SEG on cine: not
        _row("us-1", 3, _body(seal(_uids(CINE), 4))),  # SR alone
    ]
    settings = _outputs(key_file, pacs=_pacs(pacs_up))
    metrics = ClinicalMetrics()
    with ClinicalOutbox(tmp_path / "clinical.sqlite") as box:
        sender = ClinicalSender(box, settings, metrics)
        assert sender.put(rows) == 3
        with sender:
            assert set(sender.workers()) == {"clinical-pacs"}
            wait_for(lambda: _drained(box, "pacs"), 20, box.parked)
        assert (sender.stats["pacs"].sent, sender.stats["pacs"].skipped_objects) == (3, 1)
        assert box.parked() == []
    cfg = _pacs(pacs_up).config()
    expected = {
        "CT": _expected(cfg, CT, rows[0]),
        "CINE": _expected(cfg, CINE, rows[1]) + _expected(cfg, CINE, rows[2]),
    }
    assert [o.Modality for o in expected["CT"]] == ["SR", "SEG", "OT"]
    assert [o.Modality for o in expected["CINE"]] == ["SR", "OT", "SR"]
    for path, objects in ((CT, expected["CT"]), (CINE, expected["CINE"])):
        stored = {str(d.SOPInstanceUID): d for d in _instances(pacs_up, _uids(path).study)}
        for obj in objects:
            assert str(obj.SOPInstanceUID) in stored, obj.Modality
            back = fetch_header(
                cfg, obj.StudyInstanceUID, obj.SeriesInstanceUID, obj.SOPInstanceUID
            )
            assert back.StudyInstanceUID == _uids(path).study
            if back.Modality == "SR":
                ref = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
                assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == _uids(path).instance
    assert b'medge_gateway_clinical_sent_total{target="pacs"} 3.0' in _exposition(metrics)


def _exposition(metrics: ClinicalMetrics) -> bytes:
    from prometheus_client import generate_latest

    return bytes(generate_latest(metrics.registry))


def _send_one(settings: OutputsSettings, path: Path, row: Row) -> None:
    with ClinicalOutbox(path) as box:
        sender = ClinicalSender(box, settings)
        sender.put([row])
        with sender:
            wait_for(lambda: sender.stats["pacs"].sent == 1, 20, box.parked)


def test_a_resend_is_one_copy_and_c_store_sends_too(
    pacs_up: OrthancServer, keys: tuple[RecipientKey, Path], tmp_path: Path
) -> None:
    key, key_file = keys
    row = _row("ct-9", 7, _body(SourceSealer(key, SITE, "ct-9")(_uids(CT))))
    for i, send in enumerate(("stow", "c-store", "stow")):  # the same result three times
        _send_one(_outputs(key_file, pacs=_pacs(pacs_up, send=send)), tmp_path / f"{i}.db", row)
    (sr,) = _expected(_pacs(pacs_up).config(), CT, row)
    same = [
        d for d in _instances(pacs_up, sr.StudyInstanceUID) if d.SOPInstanceUID == sr.SOPInstanceUID
    ]
    assert len(same) == 1


def test_a_blob_of_another_device_or_key_is_parked_and_the_rest_goes(
    pacs_up: OrthancServer,
    keys: tuple[RecipientKey, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key, key_file = keys
    other_key, _ = _key(tmp_path, "not-held")
    rows = [
        _row("us-2", 1, _body(SourceSealer(key, SITE, "us-9")(_uids(CT)))),  # sealed as us-9
        _row("us-2", 2, _body(SourceSealer(other_key, SITE, "us-2")(_uids(CT)))),
        _row("us-2", 3, _body(SourceSealer(key, SITE, "us-2")(_uids(CT)))),
    ]
    caplog.set_level(logging.WARNING, logger="medge.gateway.clinical")
    with ClinicalOutbox(tmp_path / "clinical.sqlite") as box:
        sender = ClinicalSender(box, _outputs(key_file, pacs=_pacs(pacs_up)))
        sender.put(rows)
        with sender:
            wait_for(lambda: _drained(box, "pacs"), 20)
        parked = {p.item.seq: p.reason for p in box.parked("pacs")}
        assert sender.stats["pacs"].sent == 1 and sender.stats["pacs"].parked == 2
    assert "do not open with key" in parked[1] and "ward-a/us-2" in parked[1]
    assert f"sealed to key {other_key.kid}, which this node does not hold" in parked[2]
    lines = [r.getMessage() for r in caplog.records if "parked" in r.getMessage()]
    assert len(lines) == 2 and "PACS: parked ward-a/us-2/1 (result)" in lines[0]


def test_a_source_missing_from_the_pacs_is_parked_until_an_operator_unparks_it(
    pacs_up: OrthancServer, keys: tuple[RecipientKey, Path], tmp_path: Path
) -> None:
    key, key_file = keys
    row = _row("mr-1", 1, _body(SourceSealer(key, SITE, "mr-1")(_uids(MR))))
    with ClinicalOutbox(tmp_path / "clinical.sqlite") as box:
        sender = ClinicalSender(box, _outputs(key_file, pacs=_pacs(pacs_up)))
        sender.put([row])
        with sender:
            (parked,) = wait_for(lambda: box.parked("pacs"), 20)
            assert "HTTP 404" in parked.reason and parked.item.seq == 1
            assert box.depth() == {} and box.parked("fhir") == []
            pacs_up.upload(MR)  # the modality's upload arrives late
            assert sender.unpark("pacs") == 1
            wait_for(lambda: sender.stats["pacs"].sent == 1, 20, box.parked)
        assert box.parked() == [] and box.depth() == {}


def test_a_pacs_that_goes_away_gets_everything_once_when_it_is_back(
    keys: tuple[RecipientKey, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key, key_file = keys
    (tmp_path / "pacs").mkdir()
    server = start_orthanc(tmp_path / "pacs")
    caplog.set_level(logging.INFO, logger="medge.gateway.clinical")
    try:
        server.upload(CT)
        seal = SourceSealer(key, SITE, "ct-1")
        rows = [_row("ct-1", seq, _body(seal(_uids(CT)))) for seq in range(1, 6)]
        with ClinicalOutbox(tmp_path / "clinical.sqlite") as box:
            sender = ClinicalSender(box, _outputs(key_file, pacs=_pacs(server)))
            with sender:
                sender.put(rows[:2])
                wait_for(lambda: sender.stats["pacs"].sent == 2, 20)
                server.process.kill()  # gone, as after a crash
                server.process.wait(timeout=10)
                sender.put(rows[2:])
                wait_for(lambda: sender.stats["pacs"].retried >= 3, 10)
                assert box.depth() == {"pacs": 3} and sender.stats["pacs"].parked == 0
                server = server.restart()
                wait_for(lambda: _drained(box, "pacs"), 20, box.parked)
            stats = sender.stats["pacs"]
            assert (stats.sent, stats.parked) == (5, 0) and stats.retried >= 3
        cfg = _pacs(server).config()
        want = {str(_expected(cfg, CT, r)[0].SOPInstanceUID) for r in rows}
        srs = [d for d in _instances(server, _uids(CT).study) if d.Modality == "SR"]
        assert sorted(str(d.SOPInstanceUID) for d in srs) == sorted(want)  # each exactly once
    finally:
        server.stop()
    messages = [r.getMessage() for r in caplog.records]
    down = [m for m in messages if m.startswith("PACS unreachable")]
    back = [m for m in messages if m.startswith("PACS back after")]
    assert len(down) == 1 and "Connection refused" in down[0], messages
    assert len(back) == 1 and back[0].endswith(", 3 sent"), messages


# -- FHIR ----------------------------------------------------------------------------------

PVC = EventRule(name="pvc_run", label="V", on=0.5, off=0.5, min_windows=2, severity="warning")


def _ecg_rows(device: str, p: list[float]) -> list[Row]:
    """ECG results and the events of their scores, as the agent makes them."""
    tracker = EventTracker([PVC], ["N", "V"])
    rows: list[Row] = []
    for i, score in enumerate(p):
        scores = [round(1.0 - score, 6), score]
        pred = int(np.argmax(scores))
        t = T0 + i
        body = {
            "input": f"{device}#{i}",
            "sample_time": t,
            "pred": pred,
            "pred_label": ["N", "V"][pred],
            "scores": scores,
            "positive_label": "V",
            "latency_ms": 1.5,
            "bundle": ECG,
        }
        rows.append((SITE, device, len(rows) + 1, "result", t + 0.2, ECG, body))
        for ev in tracker.update(t, scores, body["input"]):
            rows.append((SITE, device, len(rows) + 1, "event", t + 0.2, ECG, ev))
    return rows


def _fhir(receiver: FhirReceiver, batch: int = 50) -> FhirSettings:
    model = FhirModel(signal="ecg", labels=["N", "V"], positive_label="V")
    return FhirSettings(
        base_url=receiver.url, timeout_s=5.0, models={"ecg_gru": model}, batch=batch
    )


def test_ecg_rows_go_to_fhir_in_transactions_and_a_5xx_is_retried(
    fhir_receiver: FhirReceiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = _ecg_rows("holter-2", [0.1, 0.9, 0.85, 0.2, 0.1])
    assert [r[3] for r in rows].count("event") == 2  # a PVC run: start, end
    wrist = {**rows[0][6], "bundle": "wrist_fall_lstm@1#0123456789ab"}
    broken = {**rows[0][6], "pred": 5}
    extra: list[Row] = [
        (SITE, "watch-7", 1, "result", T0, None, wrist),  # a model not configured: not queued
        (SITE, "holter-2", 99, "result", T0 + 9, ECG, broken),  # cannot be FHIR: parked alone
    ]
    caplog.set_level(logging.INFO, logger="medge.gateway.clinical")
    fhir_receiver.fail_next(2)
    with ClinicalOutbox(tmp_path / "clinical.sqlite") as box:
        sender = ClinicalSender(
            box, OutputsSettings(fhir=_fhir(fhir_receiver, batch=4), retry_min_s=0.05)
        )
        assert sender.put(rows + extra) == len(rows) + 1
        with sender:
            wait_for(lambda: _drained(box, "fhir"), 20, box.parked)
        stats = sender.stats["fhir"]
        (parked,) = box.parked()
    assert (stats.sent, stats.parked, stats.retried) == (len(rows), 1, 8)  # 2 tries of 4
    assert "result ward-a/holter-2/99: pred is not a class" in parked.reason
    assert fhir_receiver.count("Observation") == 5 + 1  # 5 results, the run (start then end)
    run = fhir_receiver.find("Observation", site_system(SITE), f"holter-2/event/pvc_run@{T0 + 1!r}")
    assert len(run) == 1 and run[0]["status"] == "final"
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "unreachable" in m] == [
        "FHIR server unreachable: HTTP 503: told to fail (503); 8 waiting, trying again with "
        "back-off"
    ]
    assert len([m for m in messages if m.startswith("FHIR server back after")]) == 1


def test_an_event_of_no_known_bundle_is_parked_and_input_warnings_stay_out(
    fhir_receiver: FhirReceiver, tmp_path: Path
) -> None:
    """An event whose device never named its bundle cannot be mapped: queued and parked with
    that reason (seen by `medge gateway outputs --parked`), never dropped unseen; a drift or
    signal-quality warning is about the inputs, not the patient: not sent to FHIR."""
    unknown = {"event": "pvc_run", "state": "start", "start": T0, "peak": 0.9, "windows": 2}
    drift = {"event": "input_drift", "state": "start", "check": "channel_0", "alert": True}
    rows: list[Row] = [
        (SITE, "holter-3", 1, "event", T0, None, unknown),
        (SITE, "holter-3", 2, "event", T0, ECG, drift),
    ]
    with ClinicalOutbox(tmp_path / "clinical.sqlite") as box:
        sender = ClinicalSender(box, OutputsSettings(fhir=_fhir(fhir_receiver), retry_min_s=0.05))
        assert sender.put(rows) == 1
        with sender:
            wait_for(lambda: box.parked_count().get("fhir") == 1, 20, box.parked)
        (parked,) = box.parked()
    assert parked.item.seq == 1 and "which bundle made it is not known" in parked.reason
    assert fhir_receiver.count("Observation") == 0


def test_an_outbox_reopened_after_a_stop_resumes_what_was_left(
    fhir_receiver: FhirReceiver, tmp_path: Path
) -> None:
    rows = _ecg_rows("holter-3", [0.1, 0.2, 0.3])
    path = tmp_path / "clinical.sqlite"
    fhir_receiver.fail_next(1)
    settings = OutputsSettings(fhir=_fhir(fhir_receiver), retry_min_s=1.0)
    with ClinicalOutbox(path) as box:
        sender = ClinicalSender(box, settings)
        sender.put(rows)
        sender.start()
        wait_for(lambda: sender.stats["fhir"].retried == 3, 10)
        sender.stop()  # during the back-off: returns at once
        assert not sender.workers()["clinical-fhir"].is_alive()
    assert fhir_receiver.count("Observation") == 0
    with ClinicalOutbox(path) as box:
        assert box.depth() == {"fhir": 3}
        with ClinicalSender(box, settings) as again:
            wait_for(lambda: _drained(box, "fhir"), 10)
            assert again.stats["fhir"].sent == 3
    assert fhir_receiver.count("Observation") == 3


def test_outbox_keeps_one_item_per_target_and_row(tmp_path: Path) -> None:
    item = ClinicalItem("fhir", SITE, "d", 1, "result", T0, ECG, {"pred": 0})
    event = ClinicalItem("fhir", SITE, "d", 2, "event", T0 + 5, ECG, {"state": "start"})
    with ClinicalOutbox(tmp_path / "o.sqlite") as box:
        box.put_many([item, event])
        box.put_many([item, ClinicalItem("pacs", SITE, "d", 1, "result", T0, ECG, {})])
        assert box.depth() == {"fhir": 2, "pacs": 1}
        assert box.due("fhir", 10) == [event, item]  # events first
        box.park([event], "no")
        assert [p.reason for p in box.parked()] == ["no"] and box.unpark("pacs") == 0
        assert box.unpark() == 1 and box.delete([item, event]) == 2
    assert (tmp_path / "o.sqlite").stat().st_mode & 0o777 == 0o600


def test_settings_say_what_is_missing_and_resolve_paths(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="pacs.url"):
        PacsSettings(host="pacs")
    with pytest.raises(ValidationError, match="c-store needs pacs.host"):
        PacsSettings(url="http://pacs/dicom-web", send="c-store")
    with pytest.raises(ValidationError, match="needs source_key"):
        OutputsSettings(pacs=PacsSettings(url="http://pacs/dicom-web"))
    with pytest.raises(ValidationError, match="Extra inputs"):
        OutputsSettings.model_validate({"pacs_url": "x"})
    with pytest.raises(ValidationError, match="base url"):
        FhirSettings(base_url="ftp://x", models={"m": FhirModel(signal="ecg", labels=["a"])})
    with pytest.raises(ValidationError, match="positive_label"):
        FhirModel(signal="ecg", labels=["N"], positive_label="V")
    pacs = PacsSettings(url="http://p/dicom-web", user="u", password_file=Path("pw"))
    out = OutputsSettings(source_key=[Path("k.json"), Path("/abs.json")], pacs=pacs)
    resolved = out.resolve(tmp_path)
    assert resolved.source_key == [tmp_path / "k.json", Path("/abs.json")]
    assert resolved.pacs is not None and resolved.pacs.password_file == tmp_path / "pw"
    assert resolved.pacs.config().password_file == tmp_path / "pw"


def test_one_process_sends_from_an_outbox_and_a_second_is_refused_by_name(
    tmp_path: Path,
) -> None:
    """Two gateway workers given one outbox file would both send every item: the second
    sender refuses to start, naming the process that holds it; once that one stops, a new
    sender starts. The forwarder's outbox is guarded the same way. In another process (as a
    second worker is) the refusal names its pid."""
    import os
    import subprocess
    import sys

    from edge_agent.errors import MedgeError
    from gateway.forward import Forwarder, ForwardOutbox

    model = FhirModel(signal="ecg", labels=["N", "V"], positive_label="V")
    settings = OutputsSettings(
        fhir=FhirSettings(base_url="http://127.0.0.1:9/fhir", models={"ecg": model})
    )
    first = ClinicalSender(ClinicalOutbox(tmp_path / "clinical.sqlite"), settings)
    first.start()
    try:
        second = ClinicalSender(ClinicalOutbox(tmp_path / "clinical.sqlite"), settings)
        said = r"clinical outbox .*clinical.sqlite is already being sent from by pid \d+: give"
        with pytest.raises(MedgeError, match=said):
            second.start()
        code = (
            "import sys; from pathlib import Path; from gateway.outbox_lock import OutboxLock\n"
            "try:\n    OutboxLock(Path(sys.argv[1]), 'clinical outbox').acquire()\n"
            "except Exception as exc:\n    print(exc)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "clinical.sqlite")],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert f"already being sent from by pid {os.getpid()}" in out
    finally:
        first.stop()
    third = ClinicalSender(ClinicalOutbox(tmp_path / "clinical.sqlite"), settings)
    third.start()
    third.stop()
    assert (tmp_path / "clinical.sqlite.lock").stat().st_mode & 0o777 == 0o600

    fwd = Forwarder(ForwardOutbox(tmp_path / "forward.sqlite"), "127.0.0.1", 9)
    fwd.start()
    try:
        again = Forwarder(ForwardOutbox(tmp_path / "forward.sqlite"), "127.0.0.1", 9)
        with pytest.raises(MedgeError, match="forward outbox .* is already being sent from"):
            again.start()
        again.stop()  # as a gateway stopping after a refused start does: no error
    finally:
        fwd.stop()
