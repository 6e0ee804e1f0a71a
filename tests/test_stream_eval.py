"""Event detection over recorded streams, scored by `medge convert` and `medge evaluate`
(converter.stream_eval): windows cut as the agent cuts them, events found by the agent's own
tracker, matched against annotated events. Real data: MIT-BIH record 106 (1:30-2:30) and the
third-party beat classifier; a Keras model converted with a stream gets float and int8 rows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import convert_cached
from mitbih_runs import annotated_recording

from converter import ConvertRequest, convert
from converter.errors import ConversionError
from converter.evaluate import evaluate_bundle, format_evaluation
from converter.stream_eval import cut, detect, load_recording, score_streams
from edge_agent.bundle import Bundle, EventRule, Preprocess, WindowSpec

DATA = Path(__file__).parent / "data"
RECORD = DATA / "ecg" / "106_90s-150s.npz"  # 75 beats, 42 PVCs, 16 couplets
MODEL = DATA / "third_party" / "classify_heartbeats_cnn.tflite"
BEATS = DATA / "ecg_beats.npz"  # real MIT-BIH beats (records 106, 108), R-90..R+170
BEATS_MODEL = DATA / "models" / "beats.keras"  # a Conv1D trained on BEATS (models/README.md)
AAMI = ["N", "S", "V", "F", "Q"]
PVC_RUN = EventRule(name="pvc_run", label="V", on=0.5, off=0.5, min_windows=2)
BEAT_WINDOW = WindowSpec(length=260, hop=1, rate_hz=360, centre="beat", before=90)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The record segment as an annotated recording: each run of >= 2 PVCs is one event, from
    its first PVC's R peak to its last's (the annotations' own times)."""
    out = tmp_path_factory.mktemp("stream") / "106_pvc_runs.npz"
    assert annotated_recording(RECORD, out) == 16
    _undate(out)
    return out


def _undate(npz: Path) -> None:
    """Date every member of the zip 1980-01-01: np.savez dates them now, and a recording whose
    bytes change every run would never find its conversion in the bundle cache."""
    with zipfile.ZipFile(npz) as z:
        members = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(npz, "w") as z:
        for info, data in members:
            fixed = zipfile.ZipInfo(info.filename, (1980, 1, 1, 0, 0, 0))
            fixed.compress_type, fixed.external_attr = info.compress_type, info.external_attr
            z.writestr(fixed, data)


@pytest.fixture(scope="module")
def wrapped(tmp_path_factory: pytest.TempPathFactory, recording: Path, site_dir: Path) -> Bundle:
    return convert(
        ConvertRequest(
            model=MODEL,
            calib=BEATS,
            eval=BEATS,
            out=tmp_path_factory.mktemp("w") / "ecg",
            preprocess=Preprocess(kind="zscore"),
            labels=AAMI,
            positive_label="V",
            sign_key=site_dir / "bundle-signer.key",
            window=BEAT_WINDOW,
            events=[PVC_RUN],
            streams=[recording],
        )
    )


def test_a_wrapped_beat_classifier_finds_every_pvc_run_of_a_real_record(wrapped: Bundle) -> None:
    m = wrapped.manifest
    assert m.window == BEAT_WINDOW and m.decode.events == [PVC_RUN]  # the device gets both
    report = json.loads((wrapped.directory / "report.json").read_text())
    ev = report["events"]
    assert ev["recordings"][0]["windows"] == 74 and ev["recordings"][0]["events"] == {"pvc_run": 16}
    assert ev["recordings"][0]["skipped"] == {"edge_beats": 1}  # one beat too near the end
    run = ev["variants"]["litert-fp32"]["pvc_run"]
    # measured: the same 16 couplets the agent finds (tests/test_events.py), nothing else
    assert (run["tp"], run["fp"], run["fn"]) == (16, 0, 0)
    assert run["sensitivity"] == 1.0 and run["false_alarms_per_hour"] == 0.0
    assert run["specificity"] == 1.0 and run["negative_windows"] == 74 - 32
    assert run["sensitivity_ci"][0] < 1.0  # 16 events: the interval says how little that is
    assert m.metrics["litert-fp32"]["event_pvc_run_sensitivity"] == 1.0
    md = (wrapped.directory / "report.md").read_text()
    assert "## Event detection over recorded streams" in md and "| litert-fp32 | pvc_run |" in md
    page = (wrapped.directory / "report.html").read_text()
    assert "<h2>Event detection over recorded streams</h2>" in page


def test_evaluate_scores_a_recording_with_the_bundle_s_own_window_and_rules(
    wrapped: Bundle, recording: Path
) -> None:
    got = evaluate_bundle(wrapped.directory, None, streams=[recording])
    run = got["events"]["variants"]["litert-fp32"]["pvc_run"]
    assert (run["tp"], run["fp"], run["fn"]) == (16, 0, 0)
    text = format_evaluation(got)
    assert "event pvc_run" in text and "16 found, 0 missed, 0 false" in text
    # a stricter rule in the data's terms: with a tolerance of 0 and the events moved 2 s
    # later than annotated, every detection becomes a miss and a false alarm
    with np.load(recording) as d:
        moved = {k: d[k] for k in d.files}
    moved["events"] = moved["events"] + 2.0
    late = recording.with_name("late.npz")
    np.savez(late, **moved)
    off = evaluate_bundle(wrapped.directory, None, streams=[late])["events"]["variants"]
    assert off["litert-fp32"]["pvc_run"]["tp"] < 16
    assert off["litert-fp32"]["pvc_run"]["fp"] == 16 - off["litert-fp32"]["pvc_run"]["tp"]


def test_a_bundle_without_rules_cannot_find_events(tmp_path: Path, recording: Path) -> None:
    plain = convert(
        ConvertRequest(
            model=MODEL,
            calib=BEATS,
            eval=BEATS,
            out=tmp_path / "p",
            labels=AAMI,
            preprocess=Preprocess(kind="zscore"),
        )
    )
    with pytest.raises(ConversionError, match="has no window and event rules"):
        evaluate_bundle(plain.directory, None, streams=[recording])


def test_sliding_windows_skip_and_count_invalid_samples_and_time_from_the_first_sample(
    tmp_path: Path,
) -> None:
    sig = np.zeros((1000, 3), np.float32)
    sig[250, 1] = np.nan
    p = tmp_path / "imu.npz"
    np.savez(p, signal=sig, rate_hz=50.0, events=np.array([[4.0, 6.0]]))
    w = cut(load_recording(p, [PVC_RUN]), WindowSpec(length=100, hop=50, rate_hz=50))
    # windows start every 50 samples; the two holding sample 250 are left out and counted
    assert w.skipped == {"invalid": 2} and len(w.x) == 19 - 2 and w.x.shape[1:] == (100, 3)
    assert w.times[:6].tolist() == [0.0, 1.0, 2.0, 3.0, 6.0, 7.0] and w.span_s == 2.0


def test_a_rise_in_false_alarms_is_the_loss_a_budget_counts() -> None:
    from converter.budget import budget_metrics, misses

    assert "event_fall_false_alarms_per_hour" in budget_metrics("classification", ["fall"])
    ref = {"event_fall_false_alarms_per_hour": 1.0, "event_fall_sensitivity": 0.9}
    got = {"event_fall_false_alarms_per_hour": 3.0, "event_fall_sensitivity": 0.95}
    budget = {"event_fall_false_alarms_per_hour": 1.0, "event_fall_sensitivity": 0.0}
    assert misses(budget, ref, got) == ["event_fall_false_alarms_per_hour dropped 2.0000 > 1.0"]
    assert misses(budget, got, ref) == ["event_fall_sensitivity dropped 0.0500 > 0.0"]


def test_an_event_budget_needs_recordings(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="event metric in --budget needs --stream"):
        convert(
            ConvertRequest(
                model=MODEL,
                calib=BEATS,
                eval=BEATS,
                out=tmp_path / "o",
                labels=AAMI,
                events=[PVC_RUN],
                budget={"event_pvc_run_sensitivity": 0.0},
            )
        )


@pytest.mark.parametrize(
    ("arrays", "window", "message"),
    [
        ({"signal": np.zeros(100)}, None, "needs its sampling rate"),
        ({"signal": np.zeros(100), "fs": 360}, None, "no annotated events for rule 'pvc_run'"),
        (
            {"signal": np.zeros(100), "fs": 360, "events": np.array([[2.0, 1.0]])},
            None,
            "'events' must be \\(N, 2\\) finite start/end seconds",
        ),
        (
            {
                "signal": np.zeros(100),
                "fs": 360,
                "events": np.zeros((0, 2)),
                "events_fall": np.zeros((0, 2)),
            },
            None,
            "'events_fall' names no event rule",
        ),
        (
            {"signal": np.zeros(100), "fs": 250, "events": np.zeros((0, 2))},
            BEAT_WINDOW,
            "recorded at 250 Hz but the model's window rate_hz is 360 Hz",
        ),
        (
            {"signal": np.zeros(1000), "fs": 360, "events": np.zeros((0, 2))},
            BEAT_WINDOW,
            "beat windows need 'r_peaks'",
        ),
        (
            {"signal": np.zeros(100), "fs": 360, "events": np.zeros((0, 2))},
            WindowSpec(length=260, hop=1),
            "no whole window of 260 samples",
        ),
    ],
)
def test_a_bad_recording_is_one_line_naming_the_problem(
    tmp_path: Path, arrays: dict[str, np.ndarray], window: WindowSpec | None, message: str
) -> None:
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(ConversionError, match=message):
        cut(load_recording(p, [PVC_RUN]), window or WindowSpec(length=10, hop=10))


def test_false_alarms_specificity_and_the_tracker_s_hysteresis_are_scored() -> None:
    """Synthetic per-window scores over a 10-minute recording (1 window per second): one true
    event found, one missed, one false alarm — the numbers follow from the definitions."""
    from converter.stream_eval import Recording, StreamWindows

    n = 600
    fall = np.zeros(n)
    fall[100:104] = 0.9  # event 1 found (4 windows)
    fall[300] = 0.9  # one window only: min_windows=2 ignores it -> event 2 missed
    fall[450:453] = 0.95  # nothing annotated here: a false alarm of 3 windows
    scores = np.stack([1 - fall, fall], axis=1)
    rec = Recording("synthetic", np.zeros(n), 1.0, {"*": [(100.0, 104.0), (300.0, 301.0)]})
    stream = StreamWindows(rec, np.zeros((n, 1)), np.arange(n, dtype=float), 1.0)
    rule = EventRule(name="fall", label="fall", on=0.8, off=0.5, min_windows=2)
    assert detect(scores, stream.times, 1.0, [rule], ["adl", "fall"]) == {
        "fall": [(100.0, 104.0), (450.0, 453.0)]
    }
    sec = score_streams([stream], {"float": [scores]}, lambda x: x, [rule], ["adl", "fall"])
    m = sec["variants"]["float"]["fall"]
    assert (m["tp"], m["fn"], m["fp"]) == (1, 1, 1) and m["sensitivity"] == 0.5
    assert m["false_alarms_per_hour"] == pytest.approx(6.0)  # 1 in 10 minutes
    # windows touching neither annotated event: 600 - 6 - 3; 3 of them are the false alarm
    assert m["negative_windows"] == 591 and m["specificity"] == pytest.approx(588 / 591)


@pytest.mark.slow
def test_a_converted_model_reports_events_for_float_and_every_artifact(
    tmp_path: Path, recording: Path
) -> None:
    """A small Conv1D trained on the real beats (records 106 and 108, so this checks the
    mechanics, not a held-out result; tools/make_test_models.py, committed), converted with the
    recording (through the bundle cache): the float model's scores come from the conversion
    child, every artifact's from its device runtime."""
    model = tmp_path / "beats.keras"
    shutil.copyfile(BEATS_MODEL, model)
    out = convert_cached(
        ConvertRequest(
            model=model,
            calib=BEATS,
            eval=BEATS,
            out=tmp_path / "b",
            labels=AAMI,
            positive_label="V",
            preprocess=Preprocess(kind="zscore"),
            window=BEAT_WINDOW,
            events=[PVC_RUN],
            streams=[recording],
            event_tolerance_s=0.5,
            float_artifacts="none",
            strategies=["full-int8"],
            fallback=[],
            budget={"event_pvc_run_sensitivity": 0.0, "event_pvc_run_false_alarms_per_hour": 0},
        )
    )
    bundle = Bundle.load(out)
    report = json.loads((bundle.directory / "report.json").read_text())
    # the budget in the events' own terms: int8 finds every run float finds, no extra alarm
    [attempt] = report["budget"]["attempts"]
    assert attempt["met"] and set(attempt["metrics"]) == {
        "event_pvc_run_sensitivity",
        "event_pvc_run_false_alarms_per_hour",
    }
    ev = report["events"]
    variants = {"float", "litert-int8", "onnx-fp32", "onnx-int8"}  # ONNX Runtime's too
    assert set(ev["variants"]) == variants and ev["tolerance_s"] == 0.5
    for variant in sorted(variants):
        run = ev["variants"][variant]["pvc_run"]
        assert run["tp"] + run["fn"] == 16 and run["tp"] + run["fp"] == run["n_detected"]
        assert run["tp"] >= 12  # measured: 16 of 16 for float and int8 alike
        assert bundle.manifest.metrics[variant]["event_pvc_run_sensitivity"] == run["sensitivity"]


def _medge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medge", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_the_cli_writes_window_and_rules_and_evaluate_scores_a_recording(
    tmp_path: Path, recording: Path
) -> None:
    out = tmp_path / "ecg"
    r = _medge(
        "convert",
        str(MODEL),
        "--calib",
        str(BEATS),
        "--eval",
        str(BEATS),
        "--out",
        str(out),
        "--labels",
        ",".join(AAMI),
        "--positive",
        "V",
        "--preprocess",
        "zscore",
        "--window",
        "length=260,rate_hz=360,centre=beat,before=90",
        "--event",
        "name=pvc_run,label=V,on=0.5,min_windows=2",
        "--event",
        "name=pvc_triplet,label=V,on=0.5,min_windows=3,alert=no",
        "--stream",
        str(recording),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["window"]["centre"] == "beat" and manifest["window"]["hop"] == 260
    rules = {e["name"]: e for e in manifest["decode"]["events"]}
    assert rules["pvc_run"]["off"] == 0.5 and rules["pvc_triplet"]["alert"] is False
    metrics = json.loads(r.stdout)["metrics"]["litert-fp32"]
    # the record has 16 couplets and no run of three: the triplet rule raises nothing
    assert metrics["event_pvc_run_sensitivity"] == 1.0
    assert metrics["event_pvc_triplet_false_alarms_per_hour"] == 0.0
    r = _medge("evaluate", str(out), "--stream", str(recording))
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("event pvc_run"))
    assert "sensitivity 1.0000" in line and "16 found, 0 missed, 0 false" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--window", "length=260,centre=middle"], "--window: centre: Input should be 'none'"),
        (["--window", "260"], "--window '260': use KEY=VALUE"),
        (["--window", "length=260", "--event", "name=x,label=V"], "--event: on: Field required"),
        (
            ["--window", "length=260", "--event", "name=fall,label=fall,on=0.5"],
            "event 'fall' names unknown label 'fall'",
        ),
        (["--stream", "rec.npz"], "--stream needs --window"),
    ],
)
def test_bad_window_event_or_stream_options_are_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    r = _medge(
        "convert",
        str(MODEL),
        "--calib",
        str(BEATS),
        "--eval",
        str(BEATS),
        "--out",
        str(tmp_path / "o"),
        "--labels",
        ",".join(AAMI),
        *args,
    )
    assert r.returncode != 0 and not (tmp_path / "o").exists()
    assert message in r.stderr, r.stderr
    assert len([x for x in r.stderr.splitlines() if x.strip()]) == 1, r.stderr
