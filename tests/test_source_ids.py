"""The UIDs of a DICOM source, sealed on the device to the fog node's source key alone."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pydicom
import pytest

from edge_agent.errors import EnvelopeError, MedgeError
from edge_agent.identity import SOURCE_RECIPIENT, DeviceIdentity
from edge_agent.keys import generate_recipient, load_recipient
from edge_agent.reasons import Reason
from edge_agent.schemas import check_body
from edge_agent.source_ids import SourceSealer, SourceUids, open_source, seal_source
from edge_agent.sources import DicomSettings, DicomSource
from edge_agent.sources import open_source as open_input
from gateway.site import init_site, provision_device, write_source_key

DICOM = Path(__file__).parent / "data" / "dicom"
CINE = DICOM / "us_cine_30frames_ybr.dcm"


def _uids(path: Path) -> SourceUids:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return SourceUids(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID)


def test_sealed_uids_open_only_on_the_fog_as_the_device_that_sealed_them() -> None:
    key, _ = generate_recipient()
    other, _ = generate_recipient()
    uids = _uids(CINE)
    field = SourceSealer(key, "ward-a", "us-1")(uids, 7)
    assert field["frame"] == 7 and field["kid"] == key.kid
    text = json.dumps(field)
    for uid in (uids.study, uids.series, uids.instance):
        assert uid not in text
    assert open_source(field, "ward-a", "us-1", {key.kid: key}) == (uids, 7)
    # moved into another device's message, or opened by a node without the key: refused
    with pytest.raises(EnvelopeError, match="as this device's") as exc:
        open_source(field, "ward-a", "us-2", {key.kid: key})
    assert exc.value.reason == Reason.AUTHENTICATION
    with pytest.raises(EnvelopeError, match="does not hold") as exc:
        open_source(field, "ward-a", "us-1", {other.kid: other})
    assert exc.value.reason == Reason.UNKNOWN_KEY
    public_only = load_recipient_public(key)
    with pytest.raises(EnvelopeError, match="does not hold"):
        open_source(field, "ward-a", "us-1", {key.kid: public_only})
    tampered = {**field, "ct": field["ct"][:-8] + "AAAAAAA="}
    with pytest.raises(EnvelopeError, match="do not open"):
        open_source(tampered, "ward-a", "us-1", {key.kid: key})
    for bad in ("x", {"kid": key.kid}, {**field, "frame": -1}, {**field, "frame": True}):
        with pytest.raises(EnvelopeError) as exc:
            open_source(bad, "ward-a", "us-1", {key.kid: key})
        assert exc.value.reason == Reason.SCHEMA


def load_recipient_public(key):  # type: ignore[no-untyped-def]
    from edge_agent.keys import RecipientKey

    return RecipientKey(key.kid, key.suite, key.public)


def test_one_seal_per_instance_and_the_body_schema() -> None:
    key, _ = generate_recipient("mlkem768-x25519")
    sealer = SourceSealer(key, "ward-a", "us-1", keep=2)
    a, b = _uids(CINE), _uids(DICOM / "CT_small.dcm")
    first, again = sealer(a, 0), sealer(a, 1)
    assert first["ct"] == again["ct"] and (first["frame"], again["frame"]) == (0, 1)
    assert sealer(b)["ct"] != first["ct"] and "frame" not in sealer(b)
    assert open_source(sealer(b), "ward-a", "us-1", {key.kid: key}) == (b, None)
    check_body("result", {"pred": 1, "source": first})  # what the gateway's schema accepts
    for bad in ({"kid": 1}, {**first, "ct": "A" * 5000}, {**first, "frame": -2}, "x"):
        with pytest.raises(EnvelopeError) as exc:
            check_body("result", {"pred": 1, "source": bad})
        assert exc.value.reason == Reason.SCHEMA


def test_uids_are_checked() -> None:
    with pytest.raises(ValueError, match="not a DICOM UID"):
        SourceUids("1.2", "1.2..3", "1.2.3", "1.2.4")
    with pytest.raises(ValueError, match="not a DICOM UID"):
        SourceUids("1.2", "1.3", "1.2.3" + "4" * 70, "1.2.4")


def test_the_dicom_source_hands_the_uids_beside_the_sample_not_in_it() -> None:
    src = DicomSource(DicomSettings(path=CINE))
    out = list(src.stream(threading.Event()))
    assert {s.dicom for s in out} == {_uids(CINE)} and src.errors == {}
    said = " ".join(f"{s.id} {s.meta}" for s in out)
    assert _uids(CINE).instance not in said and _uids(CINE).study not in said
    clips = open_input(DicomSettings(path=CINE, clip={"length": 10, "hop": 5}))
    got = list(clips.stream(threading.Event()))
    assert [c.dicom for c in got] == [_uids(CINE)] * 5
    assert [c.meta["frame"] for c in got] == [9, 14, 19, 24, 29]  # a clip names its last frame


def test_a_file_without_uids_is_told_and_its_results_name_no_source(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = pydicom.dcmread(DICOM / "CT_small.dcm")
    del ds.StudyInstanceUID
    ds.save_as(tmp_path / "no-study.dcm")
    src = DicomSource(DicomSettings(path=tmp_path / "no-study.dcm"))
    (s,) = list(src.stream(threading.Event()))
    assert s.dicom is None and src.errors == {"uids": 1}
    assert "no-study.dcm: source study UID '' is not a DICOM UID" in caplog.text


def test_provisioned_devices_get_the_public_half_and_the_private_stays_out_of_the_site(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    init_site(site, "ward-a")
    with pytest.raises(MedgeError, match="must not be inside the site directory"):
        write_source_key(site, site / "source.json")
    before = provision_device(site, "us-0", tmp_path / "id0")
    assert not (before / SOURCE_RECIPIENT).exists()
    kid = write_source_key(site, tmp_path / "fog" / "source.json")
    assert (tmp_path / "fog" / "source.json").stat().st_mode & 0o777 == 0o600
    ident = DeviceIdentity.load(provision_device(site, "us-1", tmp_path / "id1"), "ward-a", "us-1")
    assert ident.source_recipient is not None and ident.source_recipient.private is None
    assert ident.source_recipient.kid == kid
    fog = load_recipient(tmp_path / "fog" / "source.json")
    field = seal_source(_uids(CINE), ident.source_recipient, "ward-a", "us-1")
    assert open_source(field, "ward-a", "us-1", {fog.kid: fog})[0] == _uids(CINE)
    assert "private" not in (site / SOURCE_RECIPIENT).read_text()
