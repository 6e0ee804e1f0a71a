"""ECG windows from real MIT-BIH records: the npz subset and native WFDB (format 212 + .atr)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import SourceError
from edge_agent.sources import EcgSettings, EcgSource
from edge_agent.sources.ecg import beat_labels, load_ecg
from edge_agent.sources.wfdb_io import read_annotations, read_header, read_record

DATA = Path(__file__).parent / "data" / "ecg"
NPZ = DATA / "106_90s-150s.npz"  # record 106, 1:30 to 2:30: 75 beats, 42 of them PVCs
HEA = DATA / "100.hea"  # record 100, first 60 s: 74 beats (73 N, 1 A), no PVC


def _all(**kw: object) -> tuple[EcgSource, list]:
    src = EcgSource(EcgSettings.model_validate(kw))
    return src, list(src.stream(threading.Event()))


def test_beat_windows_are_centred_on_r_peaks_and_labelled_pvc() -> None:
    src, out = _all(path=NPZ, length=260)
    rec = np.load(NPZ)
    assert len(rec["r_peaks"]) == 75 and len(rec["pvc_peaks"]) == 42
    assert src.edge_beats == 1 and len(out) == 74  # the last beat is 127 samples from the end
    assert sum(s.label for s in out) == 42
    assert out[0].data.shape == (260, 1) and out[0].data.dtype == np.float32
    for s in out[:10]:
        r = s.meta["r_peak"]
        np.testing.assert_array_equal(s.data[:, 0], rec["signal"][r - 130 : r + 130])
        assert s.label == int(r in set(rec["pvc_peaks"].tolist()))
        assert s.id == f"106_90s-150s@{r}"


def test_fixed_windows_with_a_hop_carry_a_pvc_label() -> None:
    _, out = _all(path=NPZ, mode="fixed", length=720, hop=360)
    assert len(out) == (21600 - 720) // 360 + 1
    pvc = np.load(NPZ)["pvc_peaks"]
    want = [int(((pvc >= s.meta["start"]) & (pvc < s.meta["start"] + 720)).any()) for s in out]
    assert [s.label for s in out] == want and 0 < sum(want) < len(out)


def test_wfdb_format_212_reads_the_same_signal_as_the_npz_subset() -> None:
    head, x, problems = read_record(HEA)
    assert problems == []  # the header's checksums match what was decoded
    assert head.fs == 360 and head.nsamp == 21600
    assert [s.description for s in head.signals] == ["MLII", "V5"] and x.shape == (21600, 2)
    # the first sample of MLII is 995 (initial value in the header): (995 - 1024) / 200 mV
    assert x[0, 0] == pytest.approx((995 - 1024) / 200)
    assert x.dtype == np.float32 and np.isfinite(x).all()


def test_wfdb_annotations_give_the_beats_and_labels() -> None:
    samples, codes = read_annotations(DATA / "100.atr")
    assert len(samples) == 75 and (np.diff(samples) > 0).all()
    assert np.bincount(codes, minlength=29)[[1, 8, 28]].tolist() == [73, 1, 1]  # N, A, rhythm
    src, out = _all(path=HEA, leads=["MLII"])
    assert len(out) + src.edge_beats == 74
    assert {s.label for s in out} == {0} and out[0].data.shape == (260, 1)


def test_checksum_mismatch_is_counted_and_told(tmp_path: Path) -> None:
    for f in ("100.hea", "100.atr"):
        (tmp_path / f).write_bytes((DATA / f).read_bytes())
    raw = bytearray((DATA / "100.dat").read_bytes())
    raw[3000] ^= 0x40  # one bit of one sample
    (tmp_path / "100.dat").write_bytes(bytes(raw))
    src, out = _all(path=tmp_path / "100.hea", mode="fixed", length=3600)
    assert len(out) == 6 and src.errors == {"record": 1}


def test_multi_lead_wfdb_and_lead_names() -> None:
    _, out = _all(path=HEA, leads=[1, "MLII"], mode="fixed", length=360, limit=3)
    assert len(out) == 3 and out[0].data.shape == (360, 2)
    _, x, _ = read_record(HEA)
    np.testing.assert_array_equal(out[1].data, x[360:720, ::-1])
    with pytest.raises(SourceError, match="no lead 'V1'"):
        load_ecg(HEA, ["V1"])
    assert read_header(HEA).index("V5") == 1


def test_short_record_and_unknown_format_are_clear(tmp_path: Path) -> None:
    (tmp_path / "100.hea").write_text((DATA / "100.hea").read_text())
    (tmp_path / "100.dat").write_bytes((DATA / "100.dat").read_bytes()[:30000])
    _, x, problems = read_record(tmp_path / "100.hea")
    assert x.shape == (10000, 2) and problems == [
        "100.dat holds 10000 of 21600 samples; short record"
    ]
    (tmp_path / "100.hea").write_text((DATA / "100.hea").read_text().replace(" 212 ", " 310 "))
    with pytest.raises(SourceError, match="format 310 is not supported"):
        read_record(tmp_path / "100.hea")


def test_realtime_emits_a_window_when_the_recording_reaches_its_end() -> None:
    t0 = time.monotonic()
    _, out = _all(path=HEA, mode="fixed", length=36, realtime=True, limit=5)
    assert len(out) == 5 and time.monotonic() - t0 >= 5 * 0.1 - 0.02


def test_labels_are_the_bundle_s_class_indexes_by_name() -> None:
    # the third-party beat classifier's order: a PVC is 'V' (index 2), not index 1 ('S')
    src, out = _all(path=NPZ, classes=["N", "S", "V", "F", "Q"])
    assert src.label_index == (0, 2)
    with np.load(NPZ) as rec:
        pvc = set(rec["pvc_peaks"].tolist())
    assert [s.label for s in out] == [2 if s.meta["r_peak"] in pvc else 0 for s in out]
    _, fixed = _all(path=NPZ, mode="fixed", length=720, hop=360, classes=["V", "N"])
    _, plain = _all(path=NPZ, mode="fixed", length=720, hop=360)
    assert [s.label for s in fixed] == [1 - s.label for s in plain]  # V first: PVC is 0
    # names of the config's own choosing; classes given to the source override the config's
    cfg = EcgSettings(path=NPZ, classes=["x"], pvc_class="pvc", other_class="normal")
    assert EcgSource(cfg, ["pvc", "normal"]).label_index == (1, 0)


def test_without_classes_a_pvc_is_1_as_before() -> None:
    src, out = _all(path=NPZ)
    assert src.label_index == (0, 1) and {s.label for s in out} == {0, 1}


def test_a_class_name_the_bundle_lacks_is_one_clear_error() -> None:
    with pytest.raises(SourceError, match=r"labels \(N, S, F, Q\) have no 'V' for a PVC beat"):
        EcgSource(EcgSettings(path=NPZ, classes=["N", "S", "F", "Q"]))
    with pytest.raises(SourceError, match="no 'N' for a non-PVC beat; set the ecg source's other"):
        beat_labels(["normal", "V"])
    assert beat_labels(["N", "S", "V", "F", "Q"]) == (0, 2)
