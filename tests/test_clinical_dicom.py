"""DICOM to the PACS, against a real Orthanc (tests/orthanc.py): the DICOM fixtures go in as a
modality would send them, their headers come back by UID through gateway.clinical.pacs, the SR,
SEG and SC of medge results are built from them, sent by STOW-RS (and C-STORE), found again by
QIDO-RS in the source's study, retrieved, parsed by highdicom and checked field by field (and by
dciodvfy, from Debian's dicom3tools). A stopped PACS gives a PacsError, quickly."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from orthanc import OrthancServer, orthanc, start_orthanc
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from edge_agent.png import encode_png
from gateway.clinical.dicom_objects import (
    CODING_SCHEME,
    POSITIVE_LABEL,
    DicomObjectError,
    MedgeResult,
    cam_capture,
    dicom_objects,
    label_code,
    segmentation,
    structured_report,
)
from gateway.clinical.pacs import PacsConfig, PacsError, c_store, fetch_header, stow
from gateway.clinical.pixels import fill_contour

__all__ = ["orthanc"]  # the fixture, imported to be used here

DATA = Path(__file__).parent / "data" / "dicom"
CINE, CT = DATA / "us_cine_30frames_ybr.dcm", DATA / "CT_small.dcm"
BUNDLE = "breast_cnn@1.2.0#0123456789ab"
WHEN = datetime(2026, 12, 5, 9, 30, 15, tzinfo=timezone.utc)
PATIENT_STUDY = [
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
]


def _cfg(server: OrthancServer, **kw: Any) -> PacsConfig:
    return PacsConfig(**{**server.pacs_fields(), **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pacs(orthanc: OrthancServer) -> PacsConfig:
    for path in (CINE, CT):
        assert orthanc.upload(path)["Status"] == "Success"
    return _cfg(orthanc)


def _header(cfg: PacsConfig, path: Path) -> Dataset:
    ds = dcmread(path, stop_before_pixels=True)
    return fetch_header(cfg, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def _png(a: np.ndarray) -> str:
    return base64.b64encode(encode_png(a)).decode("ascii")


def _roundtrip(cfg: PacsConfig, obj: Dataset) -> Dataset:
    """STOW-RS ``obj``, find it by QIDO-RS in its study, retrieve it by WADO-RS."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    stow([obj], cfg)
    assert cfg.user is not None and cfg.password_file is not None and cfg.url is not None
    session = create_session_from_user_pass(cfg.user, cfg.password_file.read_text().strip())
    client = DICOMwebClient(cfg.url, session=session, timeout=5)
    found = client.search_for_instances(study_instance_uid=obj.StudyInstanceUID)
    uids = {Dataset.from_json(f).SOPInstanceUID for f in found}
    assert obj.SOPInstanceUID in uids
    return client.retrieve_instance(obj.StudyInstanceUID, obj.SeriesInstanceUID, obj.SOPInstanceUID)


def _texts(item: Dataset, name: Any) -> list[str]:
    found = hd.sr.utils.find_content_items(item, name=name, recursive=True)
    return [str(i.TextValue) for i in found]


def _common_checks(obj: Dataset, source: Dataset, modality: str) -> None:
    for keyword in PATIENT_STUDY:
        assert obj.get(keyword) == source.get(keyword), keyword
    assert obj.Modality == modality
    assert obj.SeriesInstanceUID != source.SeriesInstanceUID
    assert obj.SOPInstanceUID != source.SOPInstanceUID
    assert obj.Manufacturer == "medge"
    assert BUNDLE in list(obj.SoftwareVersions) or obj.SoftwareVersions == BUNDLE
    assert (obj.ContentDate, obj.ContentTime[:6]) == ("20261205", "093015")
    assert obj.TimezoneOffsetFromUTC == "+0000"


def _dciodvfy(obj: Dataset, tmp_path: Path) -> None:
    tool = shutil.which("dciodvfy")
    if tool is None:  # as Orthanc: installed by .ci/run, needed to run these tests
        pytest.fail("dciodvfy not found: apt-get install dicom3tools (Debian)")
    path = tmp_path / f"{obj.Modality}.dcm"
    obj.save_as(path, enforce_file_format=True)
    r = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=30, check=False)
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]
    assert errors == [], "\n".join(errors)


def test_sr_of_a_classification_on_a_cine_frame(pacs: PacsConfig, tmp_path: Path) -> None:
    source = _header(pacs, CINE)
    assert "PixelData" not in source and int(source.NumberOfFrames) == 30
    body = {
        "input": "dicom:0123456789abcdef#12",
        "pred": 1,
        "pred_label": "malignant",
        "scores": [0.125, 0.875],
        "positive_label": "malignant",
        "bundle": BUNDLE,
        "latency_ms": 12.5,
    }
    result = MedgeResult(body, WHEN, "ward-a/us-1", frame=12, seq=41)
    sr = structured_report(source, result)
    _dciodvfy(sr, tmp_path)
    back = hd.sr.ComprehensiveSR.from_dataset(_roundtrip(pacs, sr))
    _common_checks(back, source, "SR")
    assert back.SOPInstanceUID == structured_report(source, result).SOPInstanceUID  # resend
    unnumbered = MedgeResult(body, WHEN, "ward-a/us-1", frame=12)  # no seq: fresh UIDs
    assert structured_report(source, unnumbered).SOPInstanceUID != back.SOPInstanceUID
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    ref = evidence.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == source.SeriesInstanceUID
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    groups = back.content.get_image_measurement_groups()
    assert len(groups) == 1  # the positive label is the predicted one
    g = groups[0]
    assert g.finding_type == hd.sr.CodedConcept("malignant", CODING_SCHEME, "malignant")
    assert g.finding_type == label_code("malignant")
    (prob,) = g.get_measurements(name=codes.DCM.Probability)
    assert prob.value == pytest.approx(0.875)
    (src,) = g.source_images
    assert src.referenced_sop_instance_uid == source.SOPInstanceUID
    assert src.ReferencedSOPSequence[0].ReferencedFrameNumber == 13  # DICOM counts from 1
    assert _texts(g[0], codes.DCM.AlgorithmName) == ["breast_cnn"] * 2  # group, probability
    assert _texts(g[0], codes.DCM.AlgorithmVersion) == ["1.2.0"] * 2
    assert _texts(back, codes.DCM.DeviceObserverName) == ["ward-a/us-1"]
    assert _texts(back, codes.DCM.DeviceObserverManufacturer) == ["medge"]
    assert _texts(g[0], codes.DCM.AlgorithmParameters) == [f"bundle {BUNDLE}"] * 2
    text = back.to_json()
    assert "12.5" not in text and "0123456789abcdef" not in text  # latency, input id: not needed


def test_sr_says_the_positive_label_score_when_another_label_wins(pacs: PacsConfig) -> None:
    source = _header(pacs, CINE)
    body = {"pred": 0, "pred_label": "benign", "scores": [0.7, 0.3], "bundle": BUNDLE}
    result = MedgeResult({**body, "positive_label": "malignant"}, WHEN, "ward-a/us-1", frame=0)
    sr = hd.sr.ComprehensiveSR.from_dataset(structured_report(source, result))
    found, positive = sr.content.get_image_measurement_groups()
    assert found.finding_type.value == "benign"
    assert found.get_measurements(name=codes.DCM.Probability)[0].value == pytest.approx(0.7)
    assert positive.finding_type is None
    (which,) = positive.get_qualitative_evaluations(name=POSITIVE_LABEL)
    assert which.value == label_code("malignant")
    assert positive.get_measurements(name=codes.DCM.Probability)[0].value == pytest.approx(0.3)
    with pytest.raises(DicomObjectError, match="30 frames"):
        structured_report(source, MedgeResult(body, WHEN, "ward-a/us-1"))  # which frame?


def _lesion_result() -> tuple[dict[str, Any], np.ndarray]:
    """A segmentation result on a 64 x 64 model output: a square lesion, as decode.segment
    reports it (outline of the largest component, pixel centres)."""
    mask = np.zeros((64, 64), bool)
    mask[20:40, 10:30] = True  # rows 20..39, columns 10..29
    contour = [[10, 20], [10, 39], [29, 39], [29, 20]]
    body = {
        "pred": 1,
        "pred_label": "lesion",
        "scores": [],
        "bundle": BUNDLE,
        "mask": {"area_px": 400, "bbox": [10, 20, 29, 39], "contour": contour, "size": [64, 64]},
    }
    return body, mask


def test_fill_contour_rebuilds_the_mask_at_the_source_size() -> None:
    body, mask = _lesion_result()
    same = fill_contour(body["mask"]["contour"], [64, 64], (64, 64))
    assert np.array_equal(same.astype(bool), mask)
    big = fill_contour(body["mask"]["contour"], [64, 64], (128, 128))
    assert np.array_equal(big.astype(bool), np.kron(mask, np.ones((2, 2), bool)))


def test_seg_of_a_mask_on_ct(pacs: PacsConfig, tmp_path: Path) -> None:
    source = _header(pacs, CT)
    body, mask = _lesion_result()
    seg = segmentation(source, MedgeResult(body, WHEN, "ward-b/ct-1", seq=7))
    _dciodvfy(seg, tmp_path)
    back = hd.seg.Segmentation.from_dataset(_roundtrip(pacs, seg))
    _common_checks(back, source, "SEG")
    (desc,) = back.SegmentSequence
    assert desc.SegmentLabel == "lesion"
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "lesion"
    algo = desc.SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("breast_cnn", "1.2.0")
    (ref,) = back.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == source.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert back.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert (back.Rows, back.Columns) == (source.Rows, source.Columns) == (128, 128)
    frame = back.pixel_array.reshape(128, 128)  # the 64 x 64 mask, each pixel now 2 x 2
    assert np.array_equal(frame.astype(bool), np.kron(mask, np.ones((2, 2), bool)))


def test_what_cannot_be_built_says_why(pacs: PacsConfig) -> None:
    cine, ct = _header(pacs, CINE), _header(pacs, CT)
    body, _ = _lesion_result()
    empty = {**body, "mask": {**body["mask"], "contour": [], "area_px": 0}}
    with pytest.raises(DicomObjectError, match="SEG for CT .* the mask is empty"):
        segmentation(ct, MedgeResult(empty, WHEN, "ward-b/ct-1"))
    with pytest.raises(DicomObjectError, match="multi-frame"):
        segmentation(cine, MedgeResult(body, WHEN, "ward-a/us-1", frame=0))
    with pytest.raises(DicomObjectError, match="no cam"):
        cam_capture(ct, MedgeResult(body, WHEN, "ward-b/ct-1"))
    broken = {**body, "cam": {"png": "bm90IGEgcG5n", "label": "lesion"}}
    with pytest.raises(DicomObjectError, match="not a PNG"):
        cam_capture(ct, MedgeResult(broken, WHEN, "ward-b/ct-1"))
    with pytest.raises(DicomObjectError, match="no bundle id"):
        structured_report(ct, MedgeResult({"pred": 0, "pred_label": "x"}, WHEN, "ward-b/ct-1"))


def test_sc_of_a_cam_with_its_thumbnail(pacs: PacsConfig, tmp_path: Path) -> None:
    source = _header(pacs, CINE)
    heat = np.zeros((8, 8), np.uint8)
    heat[2:4, 5:7] = 255
    thumb = np.full((48, 64), 90, np.uint8)
    body = {
        "pred": 1,
        "pred_label": "malignant",
        "scores": [0.2, 0.8],
        "bundle": BUNDLE,
        "cam": {"png": _png(heat), "label": "malignant", "size": [8, 8]},
        "thumbnail": {"png": _png(thumb), "width": 64, "height": 48},
    }
    result = MedgeResult(body, WHEN, "ward-a/us-1", frame=3, seq=42)
    objects = dicom_objects(source, result)
    assert [o.Modality for o in objects] == ["SR", "OT"]
    sc = objects[1]
    _dciodvfy(sc, tmp_path)
    back = _roundtrip(pacs, sc)
    _common_checks(back, source, "OT")
    assert back.SeriesDescription == "medge CAM malignant: thumbnail | CAM over it"
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert int(back.SourceImageSequence[0].ReferencedFrameNumber) == 4
    px = back.pixel_array
    assert px.shape == (192, 512, 3)  # two panels of the thumbnail's 48 x 64, scaled by 4
    assert (px[:, :256] == 90).all()  # left: the thumbnail as it was
    overlay = px[:, 256:].astype(int)  # right: 50/50 of the thumbnail and the heat's colour
    peak, cold = overlay[72, 192], overlay[150, 20]  # heat 255 at rows 48..95, cols 160..223
    assert list(peak) == [round(45 + 127.5), 45, 45]  # pure red over grey 90
    assert list(cold) == [45, 45, round(45 + 63.75)]  # dark blue over grey 90
    alone = cam_capture(source, MedgeResult({**body, "thumbnail": None}, WHEN, "w/d", frame=3))
    assert alone.SeriesDescription == "medge CAM malignant: CAM heatmap only"
    assert alone.pixel_array.shape == (256, 256, 3)
    assert isinstance(cam_capture(source, result), hd.sc.SCImage)


def test_c_store_to_orthanc(pacs: PacsConfig, orthanc: OrthancServer) -> None:
    source = _header(pacs, CT)
    body = {"pred": 0, "pred_label": "normal", "scores": [0.9, 0.1], "bundle": BUNDLE}
    sr = structured_report(source, MedgeResult(body, WHEN, "ward-b/ct-1", seq=99))
    with pytest.raises(PacsError, match="HTTP 404"):  # not there before
        fetch_header(pacs, sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID)
    c_store([sr], pacs)
    stored = fetch_header(pacs, sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID)
    assert (stored.Modality, stored.PatientID) == ("SR", source.PatientID)
    wrong = _cfg(orthanc, called_ae="NOT-ORTHANC")
    for _ in range(3):  # Orthanc rejects and closes at once: under load the transport can see
        with pytest.raises(PacsError) as err:  # the close first ("aborted", retried later)
            c_store([sr], wrong)
        if "aborted" not in str(err.value):
            break
    assert re.search("association rejected: .*Permanent.*Called AE", str(err.value)), err.value
    assert not err.value.retry, str(err.value)  # a wrong AE title stays wrong


def test_errors_name_the_reason(pacs: PacsConfig, orthanc: OrthancServer, tmp_path: Path) -> None:
    with pytest.raises(PacsError, match="HTTP 404") as err:
        fetch_header(pacs, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert (err.value.status, err.value.retry) == (404, False)
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password")
    with pytest.raises(PacsError, match="HTTP 401") as err:
        _header(_cfg(orthanc, password_file=wrong), CT)
    assert err.value.retry  # an operator fixes the password; the items wait, not parked


def test_a_malformed_object_is_refused_for_good(pacs: PacsConfig) -> None:
    bad = Dataset()  # no SOP class, no patient, no study: Orthanc answers 400
    bad.file_meta = FileMetaDataset()
    bad.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    bad.SOPInstanceUID, bad.Modality = generate_uid(), "OT"
    with pytest.raises(PacsError, match=f"STOW-RS of OT {bad.SOPInstanceUID}: HTTP 400") as err:
        stow([bad], pacs)
    assert (err.value.status, err.value.retry) == (400, False)


def test_a_stopped_pacs_raises_quickly(tmp_path: Path) -> None:
    server = start_orthanc(tmp_path)
    server.upload(CT)
    cfg = _cfg(server, timeout_s=2.0)
    source = _header(cfg, CT)
    body = {"pred": 0, "pred_label": "normal", "scores": [0.9, 0.1], "bundle": BUNDLE}
    sr = structured_report(source, MedgeResult(body, WHEN, "ward-b/ct-1"))
    server.process.kill()  # gone, as after a crash (a clean stop takes Orthanc ~3 s)
    server.process.wait(timeout=10)
    t0 = time.monotonic()
    with pytest.raises(PacsError, match="Connection refused") as err:
        stow([sr], cfg)
    assert err.value.retry and sr.SOPInstanceUID in str(err.value)
    with pytest.raises(PacsError, match="Connection refused") as err:
        c_store([sr], cfg)
    assert err.value.retry
    assert time.monotonic() - t0 < 5.0
