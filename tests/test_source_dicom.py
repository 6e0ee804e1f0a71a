"""The DICOM source on pydicom's real test files: ultrasound cine, CT, MR, RGB, palette, J2K."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from edge_agent.sources import DicomSettings, DicomSource, open_source
from edge_agent.sources.dicom import apply_window

DATA = Path(__file__).parent / "data" / "dicom"
CINE = DATA / "us_cine_30frames_ybr.dcm"


def _all(path: Path, **kw: object) -> tuple[DicomSource, list]:
    src = DicomSource(DicomSettings.model_validate({"path": path, **kw}))
    return src, list(src.stream(threading.Event()))


def test_ultrasound_cine_jpeg_baseline_ybr_comes_out_rgb_frame_by_frame() -> None:
    src, out = _all(CINE)
    assert len(out) == 30 and src.errors == {}
    assert {s.data.shape for s in out} == {(240, 320, 3)} and out[0].data.dtype == np.uint8
    assert [s.meta["frame"] for s in out] == list(range(30))
    assert out[29].time == pytest.approx(29 * 0.033333)
    assert out[0].meta["transfer_syntax"] == "JPEG Baseline (Process 1)"
    # pixel sums of frames 0 and 29 as pydicom + Pillow decode them (YBR_FULL_422 -> RGB)
    assert int(out[0].data.sum(dtype=np.int64)) == pytest.approx(2182169, rel=1e-3)
    assert int(out[29].data.sum(dtype=np.int64)) == pytest.approx(2441113, rel=1e-3)
    # an ultrasound image is grey: in RGB the channels agree; left in YBR they would not
    bright = out[5].data[out[5].data[..., 0] > 60].astype(int)
    assert np.median(np.abs(bright[:, 0] - bright[:, 1])) <= 3


def test_cine_replays_at_its_frame_time_as_grey_resized_clips() -> None:
    t0 = time.monotonic()
    src, out = _all(CINE, realtime=True, limit=7, color="grey", size=(60, 80))
    assert src.errors == {}
    assert time.monotonic() - t0 >= 6 * 0.0333 - 0.01
    assert len(out) == 7 and out[0].data.shape == (60, 80)
    clips = open_source(DicomSettings(path=CINE, clip={"length": 10, "hop": 5}))
    got = list(clips.stream(threading.Event()))
    assert [c.data.shape for c in got] == [(10, 240, 320, 3)] * 5


def test_ct_raw_rescaled_and_windowed() -> None:
    ds = pydicom.dcmread(DATA / "CT_small.dcm")
    raw = ds.pixel_array
    _, (s,) = _all(DATA / "CT_small.dcm")
    np.testing.assert_array_equal(s.data, raw)  # nothing applied unless configured
    _, (hu,) = _all(DATA / "CT_small.dcm", rescale=True)
    assert hu.data.dtype == np.float32
    np.testing.assert_array_equal(hu.data, raw.astype(np.float32) * 1 - 1024)  # slope 1, -1024
    _, (w,) = _all(DATA / "CT_small.dcm", window=[40, 400])  # a soft-tissue window, in HU
    assert w.data.dtype == np.uint8
    hu_v = hu.data
    assert (w.data[hu_v <= 40 - 200] == 0).all() and (w.data[hu_v >= 40 + 200] == 255).all()
    inside = (hu_v > -150) & (hu_v < 230)
    assert inside.any() and ((w.data[inside] > 0) & (w.data[inside] < 255)).all()


def test_mr_window_from_the_file_and_the_window_function() -> None:
    _, (s,) = _all(DATA / "MR_small.dcm", window="file")  # WindowCenter 600, WindowWidth 1600
    raw = pydicom.dcmread(DATA / "MR_small.dcm").pixel_array
    assert s.data.dtype == np.uint8 and s.data.shape == (64, 64)
    assert s.data[raw == raw.min()].max() == apply_window(np.array([127.0]), 600, 1600)[0]
    assert list(apply_window(np.array([-200.0, 600, 1400, 2000]), 600, 1600)) == [0, 128, 255, 255]


def test_folder_of_files_colour_palette_and_an_undecodable_syntax(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from pydicom.pixels import get_decoder

    # a signed JPEG 2000 file: pydicom decodes it with a plug-in (Pillow, which the dev extra
    # brings with matplotlib); without one it is skipped, told and counted (OpenCV's J2K
    # codec is not used for signed data)
    j2k = get_decoder(pydicom.dcmread(DATA / "JPEG2000.dcm").file_meta.TransferSyntaxUID)
    with caplog.at_level(logging.WARNING, "medge.agent.source.dicom"):
        src, out = _all(DATA)
    told = [r.getMessage() for r in caplog.records if "JPEG2000.dcm" in r.getMessage()]
    # cine + CT, big-endian RGB, MR, palette (+ the J2K)
    assert len(out) == 30 + 4 + j2k.is_available
    if j2k.is_available:
        assert src.errors == {} and told == []
        (a,) = [s.data for s in out if s.meta["transfer_syntax"].startswith("JPEG 2000")]
        assert a.shape == (1024, 256) and a.dtype == np.int16
    else:
        assert src.errors == {"undecodable": 1}
        assert len(told) == 1
        assert "cannot decode transfer syntax 'JPEG 2000 Image Compression'" in told[0]
    by_kind = {s.meta["photometric"]: s.data for s in out if s.meta["frame"] == 0}
    assert by_kind["RGB"].shape == (60, 80, 3)  # explicit VR big endian
    pal = by_kind["PALETTE COLOR"]
    assert pal.shape == (350, 800, 3) and pal.dtype == np.uint8
    assert (pal[..., 0] != pal[..., 2]).any()  # really coloured by the LUT


def test_no_patient_identifier_in_ids_or_meta() -> None:
    _, out = _all(DATA)
    said = " ".join(f"{s.id} {s.meta}" for s in out)
    for f in DATA.glob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for tag in ("PatientName", "PatientID", "StudyInstanceUID", "SOPInstanceUID"):
            v = str(ds.get(tag) or "")
            if len(v) > 2:
                assert v not in said, (f.name, tag)
    assert len({s.id for s in out}) == len(out)


def test_truncated_and_foreign_files_are_told_counted_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ct = (DATA / "CT_small.dcm").read_bytes()
    (tmp_path / "a_ct_cut.dcm").write_bytes(ct[:20000])  # inside the pixel data
    cine = CINE.read_bytes()
    (tmp_path / "b_cine_cut.dcm").write_bytes(cine[: len(cine) // 2])  # inside the JPEG frames
    (tmp_path / "c_text.dcm").write_text("not DICOM at all")
    shutil.copy(DATA / "MR_small.dcm", tmp_path / "d_mr.dcm")
    with caplog.at_level(logging.WARNING):
        src, out = _all(tmp_path)
    assert [s.meta["modality"] for s in out] == ["MR"]  # the stream went on to the good file
    assert src.errors == {"truncated": 2, "not_dicom": 1}
    lines = [r.getMessage() for r in caplog.records if r.name == "medge.agent.source.dicom"]
    assert any("a_ct_cut.dcm: truncated: pixel data has 13700 of 32768 bytes" in m for m in lines)
    assert any("b_cine_cut.dcm: truncated" in m for m in lines)
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]  # ours is the one line
