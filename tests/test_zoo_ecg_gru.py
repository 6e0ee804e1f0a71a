"""The zoo's ECG CNN-GRU: its committed data and spec agree (no TensorFlow, no training)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from mitbih_runs import pvc_runs

from converter.stream_eval import load_recording
from edge_agent.bundle import EventRule, WindowSpec
from edge_agent.sources import EcgSettings, EcgSource
from models import ecg_gru as m


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    with np.load(m.DATA, allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


def test_splits_shapes_dtypes_and_finite(data: dict[str, np.ndarray]) -> None:
    assert [str(s) for s in data["labels"]] == m.CLASS_NAMES == ["N", "V"]
    for split, n, pvc in (("calib", 409, 109), ("val", 3543, 523)):
        x, y = data[f"{split}_images"], data[f"{split}_labels"]
        assert x.dtype == np.int16 and x.shape == (n, m.LENGTH, 1) and y.shape == (n,)
        assert set(np.unique(y)) == {0, 1} and int(y.sum()) == pvc
        assert len(data[f"{split}_record"]) == n
    assert float(data["adc_gain"]) == m.ADC_GAIN == 200.0
    assert m.DATA.stat().st_size < 1.5e6 and m.STREAM.stat().st_size < 3e5


def test_split_is_disjoint_by_record(data: dict[str, np.ndarray]) -> None:
    calib = set(data["calib_record"].tolist())
    val = set(data["val_record"].tolist())
    assert calib == set(m.TRAIN_RECORDS) and val == set(m.VAL_RECORDS) == {106, 123}
    assert not calib & val and not set(m.TRAIN_RECORDS) & set(m.VAL_RECORDS)


def test_val_windows_are_the_ecg_source_s_beats_with_its_labels(
    data: dict[str, np.ndarray],
) -> None:
    """The stream recording, cut by the agent's own ECG source with the bundle's window, gives
    the same beats and labels as the committed val windows of record 106 at those times."""
    w = WindowSpec(**m.SPEC.convert["window"])
    cfg = EcgSettings(path=m.STREAM, length=w.length, before=w.before, classes=m.CLASS_NAMES)
    src = EcgSource(cfg, m.CLASS_NAMES)
    got = list(src.stream(threading.Event()))
    with np.load(m.STREAM) as d:
        assert len(got) + src.edge_beats == len(d["r_peaks"])
        pvc = set(d["pvc_peaks"].tolist())
    assert [s.label for s in got] == [int(s.meta["r_peak"] in pvc) for s in got]
    # each beat's samples are, in counts (mV * 200, exact), one committed val window of 106
    val = data["val_record"] == 106
    x, y = data["val_images"][val], data["val_labels"][val]
    committed = {v.tobytes(): label for v, label in zip(x, y, strict=True)}
    for s in got[::25]:
        counts = np.rint(s.data * m.ADC_GAIN).astype(np.int16)
        assert committed[counts.tobytes()] == s.label


def test_the_stream_recording_holds_the_annotated_runs() -> None:
    rule = EventRule(**m.SPEC.convert["events"][0])
    rec = load_recording(m.STREAM, [rule])
    assert rec.rate_hz == m.FS and rec.duration_s == m.STREAM_S[1] - m.STREAM_S[0] == 600
    with np.load(m.STREAM) as d:
        runs = pvc_runs(d["r_peaks"].tolist(), set(d["pvc_peaks"].tolist()))
        assert d["signal"].dtype == np.float32 and np.isfinite(d["signal"]).all()
    assert len(runs) == len(rec.truth("pvc_run")) == 44
    assert rec.truth("pvc_run")[0] == pytest.approx((runs[0][0] / m.FS, runs[0][-1] / m.FS))


def test_spec_matches_weights_and_bundle_fields() -> None:
    spec = m.SPEC
    assert spec.family == "CNN-GRU" and spec.data_kind == "real" and spec.task == "classification"
    c = spec.convert
    assert c["labels"] == m.CLASS_NAMES and c["positive_label"] == "V"
    assert c["preprocess"] == {"kind": "zscore"}
    w = WindowSpec(**c["window"])
    assert (w.length, w.rate_hz, w.centre, w.before) == (540, 360.0, "beat", 270)
    rule = EventRule(**c["events"][0])
    assert rule.name == "pvc_run" and rule.label == "V" and rule.min_windows == 2
    assert [Path(p) for p in c["streams"]] == [m.STREAM]
    with zipfile.ZipFile(spec.weights) as z:
        cfg = json.loads(z.read("config.json"))
    layers = cfg["config"]["layers"]
    assert layers[0]["config"]["batch_shape"] == [None, m.LENGTH, 1]
    assert [ly["config"]["unroll"] for ly in layers if ly["class_name"] == "GRU"] == [True]
    assert layers[-1]["config"]["units"] == len(m.CLASS_NAMES)
    assert layers[-1]["config"]["activation"] == "softmax"
    assert spec.weights.stat().st_size < 1e6


def test_importing_the_model_does_not_import_tensorflow() -> None:
    code = "import sys, models.ecg_gru; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_missing_record_is_one_line_naming_it(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "models.ecg_gru", "--data-root", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "ecg/mitbih/106.npz" in out.stderr


@pytest.mark.slow  # converts the committed weights (cached by content)
def test_int8_bundle_finds_the_runs_on_the_agents_ecg_source(tmp_path: Path) -> None:
    """Full int8 meets the budget, and the agent's own path (the ECG source with the bundle's
    window and labels by name, LiteRT int8, the pvc_run rule) raises as many runs on the
    committed 10 minutes of record 106 as the converter's stream evaluation finds."""
    from conftest import convert_cached

    from edge_agent.bundle import Bundle
    from edge_agent.events import EventTracker
    from edge_agent.model import LoadedModel
    from edge_agent.sources import open_source
    from medge.zoo import request as zoo_request

    # lean: the LiteRT path is what this test is about
    out = convert_cached(zoo_request(m.SPEC, tmp_path / "ecg-gru", lean=True))
    report = json.loads((out / "report.json").read_text())
    assert report["budget"]["winner"] == "int8"
    pvc_run = report["events"]["variants"]["litert-int8"]["pvc_run"]
    bundle = Bundle.load(out)
    man = bundle.manifest
    assert man.labels == ["N", "V"] and man.window is not None and man.window.before == 270
    src = open_source(EcgSettings(path=m.STREAM), man.window)
    assert isinstance(src, EcgSource)
    src = EcgSource(src.cfg, man.labels)  # the bundle's labels, by name
    model = LoadedModel(bundle)
    tracker = EventTracker(man.decode.events, man.labels)
    events, right, n = [], 0, 0
    for w in src.stream(threading.Event()):
        scores = model.infer(model.prepare(w.data))
        right += int(np.argmax(scores) == w.label)
        n += 1
        events += tracker.update(float(w.time or 0), scores, w.id)
    starts = [e for e in events + tracker.finish() if e["state"] == "start"]
    assert n == 642 and right / n > 0.95
    assert len(starts) == pvc_run["tp"] + pvc_run["fp"] >= 40  # of 44 annotated runs
