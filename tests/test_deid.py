"""Nothing derived from a DICOM leaves the device with a patient identifier: real DICOM files
(CT, MR, ultrasound cine) through the real agent, broker and gateway; then the gateway's whole
store is searched for every identifying value in those files."""

from __future__ import annotations

import re
import sqlite3
import threading
from pathlib import Path

import pydicom
import pytest

from edge_agent import Agent, AgentConfig
from gateway import Gateway, Store
from gateway.broker import RunningBroker

pytestmark = pytest.mark.slow

DICOM = Path(__file__).parent / "data" / "dicom"
# DICOM PS3.15 Annex E basic profile: a selection of what must never be forwarded
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "StationName",
    "DeviceSerialNumber",
    "StudyID",
    "FrameOfReferenceUID",
    "MediaStorageSOPInstanceUID",
)


def _identifiers() -> set[str]:
    found: set[str] = set()
    for path in sorted(DICOM.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        for name in IDENTIFYING:
            for holder in (ds, getattr(ds, "file_meta", None)):
                value = holder.get(name) if holder is not None else None
                text = str(value).strip() if value is not None else ""
                if len(text) >= 3:
                    found.add(text)
    return found


def test_results_from_dicom_carry_no_patient_identifiers(  # type: ignore[no-untyped-def]
    bundle_dir: Path, tmp_path: Path, mosquitto: RunningBroker, identity, opener
) -> None:
    secrets = _identifiers()
    assert any("^" in s for s in secrets) and any(s.count(".") > 5 for s in secrets), secrets
    cfg = AgentConfig(
        site="ward-a",
        device="us-11",
        bundle=bundle_dir,
        identity=identity("us-11"),
        broker={"host": mosquitto.host, "port": mosquitto.port},
        source={"kind": "dicom", "path": DICOM, "color": "grey", "size": [28, 28]},
        outbox={"path": tmp_path / "outbox.sqlite"},
    )
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port),
    ):
        report = Agent(cfg).run(threading.Event())
        assert report.sent >= 30 and report.pending == 0  # the 30-frame cine and more
        rows = store.results(limit=1000)
    assert len(rows) == report.sent
    stored = "\n".join(repr(r) for r in rows)
    with sqlite3.connect(tmp_path / "gw.sqlite") as db:
        stored += "\n".join(repr(r) for r in db.execute("SELECT body FROM results"))
        stored += "\n".join(repr(r) for r in db.execute("SELECT * FROM devices"))
    # whole tokens only: a patient id "204" must not match inside 0.2043 or a hex digest
    leaked = sorted(
        s for s in secrets if re.search(rf"(?<![0-9A-Za-z.]){re.escape(s)}(?![0-9A-Za-z])", stored)
    )
    assert leaked == []
    assert all(r["input"].startswith("dicom:") for r in rows)
