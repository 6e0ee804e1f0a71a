"""The model watches its own inputs (edge_agent.drift), on real recorded data.

References are made by the converter's own code (edge_agent.reference, converter.reference):
the ECG one from the zoo ECG's calibration beats (7 MIT-BIH training records, in mV), the IMU
one from the zoo wrist model's calibration windows (WISDM training subjects), the image one by
the converter itself (the ``bundle_dir`` BreastMNIST bundle). Faults are put into held-out
recordings: a lead-off stretch and a gain error in ECG, a stuck IMU axis, inverted-contrast
ultrasound images. The unchanged held-out streams (MIT-BIH records 106 and 123, 1 h; WISDM
subjects 1604 and 1605, 1.8 h) raise no warning; the rate is in the assertion message.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.bundle import Bundle, Reference
from edge_agent.drift import DriftMonitor, DriftSettings, WatchInputs
from edge_agent.graph import Work
from edge_agent.model import LoadedModel
from edge_agent.reference import QUANTILE_LEVELS, summarize_signal
from edge_agent.schemas import check_body
from edge_agent.sources import EcgSettings, EcgSource
from edge_agent.sources.base import Sample
from edge_agent.window import sliding_windows
from models import breast_cnn
from models import ecg_gru as ecg
from models import wrist_fall_lstm as wrist


def _reference(windows: np.ndarray) -> Reference:
    return Reference(
        kind="signal",
        source="calibration",
        count=len(windows),
        quantile_levels=list(QUANTILE_LEVELS),
        channels=summarize_signal(windows),
    )


@pytest.fixture(scope="module")
def ecg_data() -> dict[str, np.ndarray]:
    with np.load(ecg.DATA, allow_pickle=False) as d:
        gain = float(d["adc_gain"])  # the committed beats are ADC counts; a device sees mV
        return {
            "calib": d["calib_images"] / gain,
            "val": d["val_images"] / gain,
            "record": d["val_record"],
        }


@pytest.fixture(scope="module")
def ecg_ref(ecg_data: dict[str, np.ndarray]) -> Reference:
    return _reference(ecg_data["calib"])


@pytest.fixture(scope="module")
def imu_ref() -> Reference:
    with np.load(wrist.DATA, allow_pickle=False) as d:
        return _reference(d["calib_images"])


def _imu_windows(path: Path) -> np.ndarray:
    """A recording's (60, 6) windows, one every 10 samples, as the agent cuts them: no
    window spans a gap (the NaN rows between runs)."""
    with np.load(path) as d:
        sig = d["signal"].astype(np.float32)
    runs = np.split(sig, np.flatnonzero(np.isnan(sig).any(axis=1)))
    wins = [sliding_windows(r[~np.isnan(r).any(axis=1)], wrist.LENGTH, 10) for r in runs]
    return np.concatenate([w for w in wins if len(w)])


@pytest.fixture(scope="module")
def imu_val() -> dict[int, np.ndarray]:
    return {s: _imu_windows(p) for s, p in zip(wrist.VAL_SUBJECTS, wrist.STREAMS, strict=True)}


def _replay(monitor: DriftMonitor, samples: Any, scores: Any = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, x in enumerate(samples):
        monitor.observe(x, None if scores is None else scores[i])
        out += monitor.changes()
    return out


def _starts(changes: list[dict[str, Any]], check: str | None = None) -> list[dict[str, Any]]:
    return [c for c in changes if c["state"] == "start" and check in (None, c["check"])]


# -- unchanged streams: no warning ------------------------------------------------------------
def test_unchanged_held_out_streams_raise_no_warning(
    ecg_ref: Reference,
    ecg_data: dict[str, np.ndarray],
    imu_ref: Reference,
    imu_val: dict[int, np.ndarray],
) -> None:
    """MIT-BIH records 106 and 123 (every beat, 30 min each) and WISDM subjects 1604 and 1605
    (their whole real streams, 54 min each), replayed against references made from other
    patients and subjects, with the default settings: no warning of any kind."""
    found: dict[str, list[dict[str, Any]]] = {}
    hours = 0.0
    for rec in (106, 123):
        beats = ecg_data["val"][ecg_data["record"] == rec]
        found[f"ecg {rec}"] = _replay(DriftMonitor(ecg_ref, ecg.CLASS_NAMES), beats)
        hours += 0.5  # every beat of the 30-minute record
    for subject, wins in imu_val.items():
        found[f"imu {subject}"] = _replay(DriftMonitor(imu_ref, wrist.CLASS_NAMES), wins)
        hours += (len(wins) * 10 + wrist.LENGTH) / wrist.RATE_HZ / 3600
    starts = {k: _starts(v) for k, v in found.items()}
    n = sum(len(v) for v in starts.values())
    assert n == 0, (
        f"{n} warnings over {hours:.2f} h of held-out real data ({n / hours:.2f} per hour): "
        + "; ".join(f"{k}: {[(c['check'], c['value']) for c in v]}" for k, v in starts.items())
    )
    assert hours > 2.5, f"false-warning rate 0 per hour over {hours:.2f} h"


# -- ECG: lead off, gain error ---------------------------------------------------------------
def test_ecg_lead_off_is_a_flat_line_warning_that_ends(ecg_ref: Reference, tmp_path: Path) -> None:
    """Ten seconds of record 106 replaced by a lead-off trace (the baseline with one ADC step
    of noise), read by the agent's own ECG source: one flat_line warning, ended after it."""
    with np.load(ecg.STREAM) as d:
        rec = {k: d[k] for k in d.files}
    fs = float(rec["fs"])
    a, b = int(60 * fs), int(70 * fs)
    noise = np.random.default_rng(0).integers(-1, 2, b - a) / ecg.ADC_GAIN
    rec["signal"] = rec["signal"].copy()
    rec["signal"][a:b] = np.median(rec["signal"]) + noise
    path = tmp_path / "106_lead_off.npz"
    np.savez(path, **rec)
    src = EcgSource(EcgSettings(path=path, length=ecg.LENGTH, before=270), ecg.CLASS_NAMES)
    monitor = DriftMonitor(ecg_ref, ecg.CLASS_NAMES)
    changes, times = [], []
    for s in src.stream(threading.Event()):
        monitor.observe(s.data, None)
        for c in monitor.changes():
            changes.append(c)
            times.append(s.time)
    assert [(c["check"], c["state"]) for c in changes] == [
        ("flat_line", "start"),
        ("flat_line", "end"),
    ]
    assert 60 <= times[0] <= 70 and times[1] > 70
    body = changes[0]
    assert body["event"] == "signal_quality" and body["value"] < body["threshold"]
    assert "no longer look like the data this model was validated on" in body["message"]
    check_body("event", body)


def test_ecg_gain_error_is_input_drift(ecg_ref: Reference, ecg_data: dict[str, np.ndarray]) -> None:
    """Record 106 as recorded, then record 123 with its gain 10 times too high: input_drift on
    the channel within 200 beats of the fault, and no signal-quality warning."""
    beats = ecg_data["val"]
    ok, bad = beats[ecg_data["record"] == 106], beats[ecg_data["record"] == 123] * 10
    monitor = DriftMonitor(ecg_ref, ecg.CLASS_NAMES)
    assert _replay(monitor, ok) == []
    changes, at = [], None
    for i, x in enumerate(bad):
        monitor.observe(x, None)
        new = monitor.changes()
        if new and at is None:
            at = i
        changes += new
    assert [(c["event"], c["check"], c["state"]) for c in changes] == [
        ("input_drift", "channel_0", "start")
    ]
    assert at is not None and at < 200
    snap = monitor.snapshot()
    assert snap["state"]["channel_0"] == "warning" and snap["psi"]["channel_0"] > 1.0
    check_body("telemetry", {"inputs": snap})


# -- IMU: a stuck axis -----------------------------------------------------------------------
def test_imu_axis_stuck_is_a_warning(imu_ref: Reference, imu_val: dict[int, np.ndarray]) -> None:
    """Subject 1605's real stream with the gyroscope's y axis stuck at one register value for
    two minutes: stuck_channel naming that axis, which ends when it moves again."""
    wins = imu_val[1605][:3000].copy()
    raw = wins[:, -10:].reshape(-1, 6)  # the new samples of each window, in time order
    a, b = 1000 * 10, 1240 * 10  # two minutes at 20 Hz
    stuck = raw.copy()
    stuck[a:b, 4] = raw[a, 4]
    # the windows the agent makes of the damaged stream (the first 50 samples as recorded)
    stream = np.concatenate([wins[0, :50], stuck])
    faulty = sliding_windows(stream, wrist.LENGTH, 10)
    changes = _replay(DriftMonitor(imu_ref, wrist.CLASS_NAMES), faulty)
    assert [(c["check"], c["state"]) for c in changes] == [
        ("stuck_channel", "start"),
        ("stuck_channel", "end"),
    ]
    assert "channel 4 does not change" in changes[0]["message"]


# -- images: the converter's reference, the real model's scores ----------------------------
@pytest.fixture(scope="module")
def breast(bundle_dir: Path) -> tuple[Bundle, LoadedModel, np.ndarray]:
    bundle = Bundle.load(bundle_dir)
    with np.load(breast_cnn.DATA) as d:
        val = d["val_images"]
    return bundle, LoadedModel(bundle), val


def test_the_converter_writes_a_small_reference(breast: tuple[Bundle, Any, Any]) -> None:
    bundle = breast[0]
    ref = bundle.manifest.reference
    assert ref is not None and bundle.manifest.schema_version == "1.4"
    assert (ref.kind, ref.source, ref.count) == ("image", "calibration", 546)
    assert ref.image is not None and ref.image.range == [0.0, 256.0]
    assert len(ref.image.histogram) == 32 and sum(ref.image.histogram) == pytest.approx(1, abs=1e-4)
    assert ref.scores is not None and ref.scores.source == "evaluation"
    assert ref.scores.count == 78 and ref.scores.score_of == breast_cnn.POSITIVE
    assert sum(ref.scores.class_frequencies.values()) == pytest.approx(1, abs=1e-4)
    assert len(ref.model_dump_json()) < 4096


def _scores(model: LoadedModel, images: np.ndarray) -> list[list[float]]:
    return [model.decode(model.infer(model.prepare(x))).scores for x in images]  # type: ignore[attr-defined]


# 78 held-out images, replayed in turn; every one watched, however fast the test feeds them
IMAGE_SETTINGS = DriftSettings(window=200, every=20, max_hz=None)


def test_images_with_inverted_contrast_drift(breast: tuple[Bundle, LoadedModel, Any]) -> None:
    """The held-out images three times over raise nothing; the same images with inverted
    contrast raise input_drift on the intensity histogram."""
    bundle, model, val = breast
    assert bundle.manifest.reference is not None
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(len(val)) for _ in range(3)])
    monitor = DriftMonitor(bundle.manifest.reference, bundle.manifest.labels, IMAGE_SETTINGS)
    scores = _scores(model, val)
    assert _replay(monitor, val[order], [scores[i] for i in order]) == []
    psi_before = monitor.snapshot()["psi"]
    inverted = 255 - val
    inv_scores = _scores(model, inverted)
    changes = _replay(monitor, inverted[order[:150]], [inv_scores[i] for i in order[:150]])
    started = {c["check"] for c in _starts(changes)}
    assert "intensity" in started, (psi_before, monitor.snapshot()["psi"])
    assert all(c["event"] == "input_drift" for c in changes)
    for body in changes:
        check_body("event", body)


def test_black_and_frozen_frames(breast: tuple[Bundle, LoadedModel, Any]) -> None:
    bundle, _, val = breast
    assert bundle.manifest.reference is not None
    monitor = DriftMonitor(bundle.manifest.reference, bundle.manifest.labels)
    black = np.zeros_like(val[:5])
    frozen = np.repeat(val[:1], 12, axis=0)
    changes = _replay(monitor, [*val[:20], *black, *val[20:40], *frozen, *val[40:60]])
    assert [(c["check"], c["state"]) for c in changes] == [
        ("black_frame", "start"),
        ("black_frame", "end"),
        ("frozen_frame", "start"),
        ("frozen_frame", "end"),
    ]


def test_watch_inputs_stage_tags_and_closes(breast: tuple[Bundle, LoadedModel, Any]) -> None:
    """The stage: warnings ride with the sample's messages, tagged with the sample and the
    bundle; one still open at the end of the stream ends through ``emit``."""
    bundle, model, val = breast
    emitted: list[tuple[str, dict[str, Any]]] = []
    stage = WatchInputs(lambda k, b: emitted.append((k, b)), IMAGE_SETTINGS)
    works = []
    for i, x in enumerate([*val[:10], *np.zeros_like(val[:4])]):
        w = Work(Sample(f"img/{i}", x, time=float(i)), model)
        w.decoded = model.decode(model.infer(model.prepare(x)))
        works.append(w)
    out = list(stage(works))
    messages = [b for w in out for k, b in w.messages if k == "event"]
    assert [(b["check"], b["state"], b["input"]) for b in messages] == [
        ("black_frame", "start", "img/12")
    ]
    assert messages[0]["bundle"] == bundle.id
    assert [(k, b["check"], b["state"]) for k, b in emitted] == [("event", "black_frame", "end")]
    snap = stage.snapshot()
    assert snap is not None and snap["samples"] == 14 and snap["bad"]["black_frame"] == 4
    check_body("telemetry", {"inputs": snap})


def test_at_most_max_hz_samples_a_second_are_watched(
    breast: tuple[Bundle, LoadedModel, Any],
) -> None:
    """40 samples 10 ms apart with max_hz 20: one every 50 ms is watched (8), the rest are
    counted as unwatched; a slow stream (one a second) is watched whole."""
    _, model, val = breast
    now = [0.0]
    settings = DriftSettings(window=200, every=20, max_hz=20)
    stage = WatchInputs(lambda k, b: None, settings, clock=lambda: now[0])

    def feed(n: int, step: float) -> None:
        works = []
        for x in val[:n]:
            w = Work(Sample("img", x), model)
            w.decoded = model.decode(model.infer(model.prepare(x)))
            works.append(w)
        for _ in stage(works):
            now[0] += step

    feed(40, 0.01)
    snap = stage.snapshot()
    assert snap is not None and (snap["samples"], snap["unwatched"]) == (8, 32)
    slow = WatchInputs(lambda k, b: None, settings, clock=lambda: now[0])
    stage = slow
    feed(10, 1.0)
    snap = slow.snapshot()
    assert snap is not None and snap["samples"] == 10 and "unwatched" not in snap


def _without_reference(bundle: Path) -> Bundle:
    """The bundle at ``bundle`` rewritten as from before schema 1.4: no reference summary."""
    import json

    path = bundle / "manifest.json"
    doc = json.loads(path.read_text())
    doc.pop("reference")
    doc["schema_version"] = "1.3"
    path.write_text(json.dumps(doc))
    return Bundle.load(bundle)


def test_a_bundle_without_reference_is_not_watched(bundle_copy: Path) -> None:
    """A bundle from before schema 1.4 loads, and is not watched."""
    manifest = _without_reference(bundle_copy).manifest
    assert manifest.reference is None and DriftMonitor.for_manifest(manifest) is None


def test_an_unwatched_bundle_says_so_once_and_in_its_telemetry(
    bundle_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stage over a bundle without a reference: samples go through untouched, one warning
    line says why its inputs are not watched, and the telemetry section says it too (the
    dashboard shows "inputs not watched"), where it used to be absent."""
    model = LoadedModel(_without_reference(bundle_copy))
    with np.load(breast_cnn.DATA) as d:
        images = d["val_images"][:5]
    stage = WatchInputs(lambda k, b: None, IMAGE_SETTINGS)
    assert stage.snapshot() is None  # before the first sample: nothing to say yet
    works = []
    for i, x in enumerate(images):
        w = Work(Sample(f"s{i}", x), model)
        w.decoded = model.decode(model.infer(model.prepare(x)))
        works.append(w)
    out = list(stage(iter(works)))
    assert out == works and all(w.messages == [] for w in out)
    snap = stage.snapshot()
    assert snap is not None and snap["watched"] is False
    assert snap["why"].startswith(f"bundle {model.bundle.id} has no reference summary")
    said = [r for r in caplog.records if "are not watched" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING"


class _Inverted:
    """Real BreastMNIST validation images as the agent's source: as they are, then with their
    contrast inverted (a probe set to the wrong polarity), ``n`` of each."""

    name = "breastmnist, then inverted"

    def __init__(self, n: int) -> None:
        with np.load(breast_cnn.DATA) as d:
            x = d["val_images"]
        order = np.random.default_rng(0).permutation(len(x))
        self.images = [x[order[i % len(x)]] for i in range(n)]
        self.errors: dict[str, int] = {}

    def stream(self, stop: threading.Event) -> Any:
        for i, x in enumerate(self.images + [255 - x for x in self.images]):
            if stop.is_set():
                return
            yield Sample(f"img#{i}", x, None, float(i))


@pytest.mark.slow
def test_an_agent_warns_of_inverted_images_and_the_gateway_raises_a_warning(  # type: ignore[no-untyped-def]
    bundle_dir: Path, identity, opener, mosquitto, tmp_path: Path
) -> None:
    """The whole path: the agent's monitor (in its pipeline) sees the inverted images drift,
    sends an input_drift warning event, the gateway stores it and raises a warning alert; the
    telemetry's ``inputs`` section says which check."""
    import json

    from edge_agent import Agent, AgentConfig
    from gateway import Gateway, Store

    cfg = AgentConfig(
        site="ward-a",
        device="dr-01",
        bundle=bundle_dir,
        identity=identity("dr-01"),
        broker={"host": mosquitto.host, "port": mosquitto.port},
        source={"path": breast_cnn.DATA, "split": "val"},
        outbox={"path": tmp_path / "outbox.sqlite"},
        drift={"window": 150, "every": 25, "max_hz": None},
        telemetry_interval_s=0.2,
    )
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port),
    ):
        agent = Agent(cfg)
        agent.source = _Inverted(150)
        report = agent.run(threading.Event())
        assert report.pending == 0
        events = [
            json.loads(r["body"])
            for r in store.query("SELECT body FROM results WHERE kind='event' ORDER BY seq")
        ]
        alerts = store.query("SELECT rule, severity, device FROM alerts")
        telemetry = json.loads(store.query("SELECT telemetry FROM devices")[0]["telemetry"])
    starts = [e for e in events if e.get("event") == "input_drift" and e["state"] == "start"]
    assert starts, events
    first = starts[0]
    assert first["check"] in ("intensity", "scores") and first["severity"] == "warning"
    assert int(first["input"].split("#")[1]) >= 150, "not before the images were inverted"
    assert "inputs no longer look like the data this model was validated on" in first["message"]
    assert ("event:input_drift", "warning", "dr-01") in {tuple(a.values()) for a in alerts}
    assert telemetry["inputs"]["warning"] in (True, False)  # the section is there
