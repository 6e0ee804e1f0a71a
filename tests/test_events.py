"""Events from per-window scores (edge_agent.events): hysteresis, min_windows, refractory time;
and PVC runs found by the real third-party MIT-BIH beat classifier on a real record segment."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mitbih_runs import pvc_runs

from edge_agent.bundle import (
    SCHEMA_VERSION,
    Artifact,
    Bundle,
    Decode,
    EventRule,
    Manifest,
    Preprocess,
    Provenance,
    TensorSpec,
    WindowSpec,
    file_entry,
    sign_bundle,
    write_manifest,
)
from edge_agent.errors import BundleError, SourceError
from edge_agent.events import EventTracker
from edge_agent.keys import load_signer_key
from edge_agent.model import LoadedModel
from edge_agent.pipeline import run_pipeline
from edge_agent.sources import EcgSettings, EcgSource, open_source
from edge_agent.telemetry import PipelineStats

DATA = Path(__file__).parent / "data"
RECORD = DATA / "ecg" / "106_90s-150s.npz"  # MIT-BIH 106, 1:30-2:30: 75 beats, 42 PVCs
MODEL = DATA / "third_party" / "classify_heartbeats_cnn.tflite"
AAMI = ["N", "S", "V", "F", "Q"]


def rule(**kw: Any) -> EventRule:
    base: dict[str, Any] = {"name": "fall", "label": "fall", "on": 0.8, "off": 0.5}
    return EventRule(**{**base, **kw})


def run(tracker: EventTracker, scores: list[float], dt: float = 1.0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, p in enumerate(scores):
        out += tracker.update(i * dt, [1.0 - p, p], f"w{i}")
    return out + tracker.finish()


def test_a_score_flickering_around_the_threshold_is_one_event() -> None:
    scores = [0.1, 0.9, 0.6, 0.85, 0.55, 0.9, 0.7, 0.2, 0.1]
    events = run(EventTracker([rule()], ["adl", "fall"]), scores)
    assert [(e["state"], e["start"]) for e in events] == [("start", 1.0), ("end", 1.0)]
    end = events[1]
    assert (end["end"], end["duration_s"], end["windows"], end["peak"]) == (6.0, 5.0, 6, 0.9)
    assert end["input"] == [f"w{i}" for i in range(1, 7)] and end["ended_by"] == "score"
    assert end["event"] == "fall" and end["alert"] is True
    # without hysteresis (off = on) the same flicker is three events
    flicker = run(EventTracker([rule(off=0.8)], ["adl", "fall"]), scores)
    assert [e["start"] for e in flicker if e["state"] == "start"] == [1.0, 3.0, 5.0]


def test_min_windows_needs_that_many_consecutive_windows() -> None:
    t = EventTracker([rule(min_windows=3)], ["adl", "fall"])
    assert run(t, [0.9, 0.9, 0.1, 0.9, 0.1, 0.9, 0.95, 0.9, 0.3]) == [
        {
            "event": "fall",
            "state": "start",
            "label": "fall",
            "start": 5.0,
            "peak": 0.95,
            "windows": 3,
            "input": ["w5", "w6", "w7"],
            "alert": True,
            "severity": "critical",
        },
        {
            "event": "fall",
            "state": "end",
            "label": "fall",
            "start": 5.0,
            "peak": 0.95,
            "windows": 3,
            "input": ["w5", "w6", "w7"],
            "alert": True,
            "severity": "critical",
            "end": 7.0,
            "duration_s": 2.0,
            "ended_by": "score",
        },
    ]


def test_refractory_time_suppresses_a_second_onset_and_counts_it() -> None:
    t = EventTracker([rule(refractory_s=5.0, alert=False)], ["adl", "fall"])
    scores = [0.9, 0.1, 0.9, 0.9, 0.1, 0.1, 0.9, 0.1]  # onsets at 0, 2 and 6 s
    starts = [e for e in run(t, scores) if e["state"] == "start"]
    assert [e["start"] for e in starts] == [0.0, 6.0]
    assert t.suppressed == {"fall": 1} and all(e["alert"] is False for e in starts)


def test_a_looped_recording_raises_its_events_again() -> None:
    """A replay that loops starts its recorded times again: the refractory time cannot be
    measured across that, so it is cleared (and what was open is ended), not held forever."""
    t = EventTracker([rule(refractory_s=30.0)], ["adl", "fall"])
    one_pass = [0.1, 0.9, 0.9, 0.1, 0.1]
    events: list[dict[str, Any]] = []
    for _ in range(3):
        for i, p in enumerate(one_pass):
            events += t.update(float(i), [1.0 - p, p], f"w{i}")
    starts = [e for e in events if e["state"] == "start"]
    assert [e["start"] for e in starts] == [1.0, 1.0, 1.0]
    assert t.time_resets == 2 and t.suppressed == {}
    mid = EventTracker([rule()], ["adl", "fall"])
    mid.update(5.0, [0.1, 0.9], "a")
    [end] = mid.update(0.0, [0.9, 0.1], "b")  # back in time while an event is open
    assert end["state"] == "end" and end["ended_by"] == "time_reset"


def test_the_pipeline_tells_and_counts_a_window_whose_time_went_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The agent's events stage: a looped recording (time back to 0 with a fall open) ends the
    open event with ``ended_by: time_reset``, says so in one warning line, and the telemetry
    counts it (``events.time_resets``) with the suppressed onsets."""
    from types import SimpleNamespace

    from edge_agent.decode import Classification
    from edge_agent.graph import Work
    from edge_agent.pipeline import Events
    from edge_agent.sources.base import Sample

    manifest = SimpleNamespace(
        task="classification",
        labels=["adl", "fall"],
        decode=SimpleNamespace(events=[rule(min_windows=1, refractory_s=100.0)]),
    )
    model = SimpleNamespace(bundle=SimpleNamespace(manifest=manifest))
    times = [0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0]
    scores = [0.1, 0.9, 0.9, 0.1, 0.9, 0.1, 0.9]  # at 2.0 again: within the refractory time
    works = []
    for i, (t, p) in enumerate(zip(times, scores, strict=True)):
        w = Work(Sample(id=f"w{i}", data=np.zeros(1), time=t), model)  # type: ignore[arg-type]
        w.decoded = Classification(int(p > 0.5), "fall" if p > 0.5 else "adl", [1 - p, p])
        works.append(w)
    stats, emitted = PipelineStats(), []
    with caplog.at_level("WARNING", logger="medge.agent.pipeline"):
        out = list(Events(lambda k, b: emitted.append(b), stats)(works))
    events = [b for w in out for k, b in w.messages if k == "event"]
    # the looped recording's fall starts again (refractory cleared); the third onset is
    # suppressed; no reset ends an open event here (the first fall ended at 3.0)
    assert [(e["state"], e["start"]) for e in events] == [
        ("start", 1.0),
        ("end", 1.0),
        ("start", 0.0),
        ("end", 0.0),
    ]
    assert stats.snapshot()["events"] == {"time_resets": 1, "suppressed": 1}
    said = [r.getMessage() for r in caplog.records if "time went back" in r.getMessage()]
    assert said == [
        "sample w4: time went back from 3.000 to 0.000 (a clock reset; 1 so far): 0 open "
        "event(s) ended, refractory times cleared"
    ]


def test_an_event_open_at_the_end_of_the_stream_is_closed() -> None:
    events = run(EventTracker([rule()], ["adl", "fall"]), [0.1, 0.9, 0.9], dt=0.5)
    assert events[-1]["state"] == "end" and events[-1]["ended_by"] == "stream_end"
    assert events[-1]["duration_s"] == 0.5


def test_rules_track_their_own_labels_and_bad_names_are_refused() -> None:
    rules = [rule(name="fall", label="fall"), rule(name="slump", label="slump", on=0.6)]
    t = EventTracker(rules, ["adl", "fall", "slump"])
    got = t.update(0.0, [0.2, 0.1, 0.7], "w0") + t.update(1.0, [0.0, 0.9, 0.1], "w1")
    assert [(e["event"], e["state"]) for e in got] == [
        ("slump", "start"),
        ("fall", "start"),
        ("slump", "end"),
    ]
    with pytest.raises(BundleError, match="event name 'Fall!' must be 1-32 of"):
        EventTracker([rule(name="Fall!")], ["adl", "fall"])


def beat_bundle(out: Path, key: Path, events: list[EventRule], window: WindowSpec) -> Path:
    """The authors' tflite file, unchanged, in a hand-written schema 1.2 manifest."""
    out.mkdir(parents=True)
    shutil.copy(MODEL, out / "model_fp32.tflite")
    art = Artifact(
        file="model_fp32.tflite",
        runtime="litert",
        precision="fp32",
        inputs=[TensorSpec(name="serving_default_input_1:0", shape=[1, 260], dtype="float32")],
        outputs=[TensorSpec(name="StatefulPartitionedCall:0", shape=[1, 5], dtype="float32")],
    )
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        name="ecg-beats-events",
        version="1",
        created="2026-11-26",
        task="classification",
        profile="x86",
        preprocess=Preprocess(kind="zscore"),
        decode=Decode(kind="classification", events=events),
        labels=AAMI,
        positive_label="V",
        artifacts=[art],
        files={art.file: file_entry(out / art.file)},
        provenance=Provenance(
            source_sha256=file_entry(MODEL).sha256,
            source_format="tflite",
            converter_version="hand-written",
        ),
        window=window,
    )
    write_manifest(out, manifest)
    sign_bundle(out, load_signer_key(key))
    return out


def test_pvc_runs_of_a_real_record_are_found_as_events(tmp_path: Path, site_dir: Path) -> None:
    """MIT-BIH record 106, 60 s of bigeminy and couplets: each annotated run of two or more
    PVCs should be one ``pvc_run`` event, from its first PVC to its last; the record has no run
    of three, so a ``pvc_triplet`` rule (min_windows=3) stays quiet."""
    key = site_dir / "bundle-signer.key"
    events = [
        EventRule(name="pvc_run", label="V", on=0.5, off=0.5, min_windows=2),
        EventRule(name="pvc_triplet", label="V", on=0.5, off=0.5, min_windows=3, alert=False),
    ]
    window = WindowSpec(length=260, hop=1, rate_hz=360, centre="beat")
    path = beat_bundle(tmp_path / "b", key, events, window)
    bundle = Bundle.load(path, [load_signer_key(key).public_key()])
    # the authors' beat window is R-90..R+170 (tests/test_wrap.py), not centred
    source = open_source(EcgSettings(path=RECORD, before=90), bundle.manifest.window)
    assert isinstance(source, EcgSource)
    assert (source.cfg.mode, source.cfg.length) == ("beats", 260)  # from the manifest
    sent: list[tuple[str, dict[str, Any]]] = []
    run_pipeline(
        source.stream(threading.Event()),
        LoadedModel(bundle),
        lambda kind, body: sent.append((kind, body)),
        PipelineStats(),
    )
    results = [b for k, b in sent if k == "result"]
    ends = [b for k, b in sent if k == "event" and b["state"] == "end"]
    starts = [b for k, b in sent if k == "event" and b["state"] == "start"]
    with np.load(RECORD) as d:
        fs, peaks, pvc = float(d["fs"]), d["r_peaks"].tolist(), set(d["pvc_peaks"].tolist())
    beats = [int(r["input"].split("@")[1]) for r in results]
    assert len(results) == 74 and set(beats) <= set(peaks)  # one beat too near the end
    truth = pvc_runs(beats, pvc, 2)
    assert len(truth) == 16 and pvc_runs(beats, pvc, 3) == []
    # measured: every annotated couplet is one event, from its first PVC to its second
    found = [[int(i.split("@")[1]) for i in e["input"]] for e in ends]
    assert found == truth
    assert {e["event"] for e in starts + ends} == {"pvc_run"} and len(starts) == 16
    for e in ends:  # times are the record's, in seconds, not the wall clock
        first, last = int(e["input"][0].split("@")[1]), int(e["input"][-1].split("@")[1])
        assert e["start"] == pytest.approx((first - 90) / fs)
        assert e["duration_s"] == pytest.approx((last - first) / fs, abs=1e-5)
        assert e["alert"] is True and e["windows"] == len(e["input"]) == 2
        assert e["peak"] >= 0.5 and e["ended_by"] == "score"
    # each event message comes right after the result of the window that caused it
    kinds = [k for k, _ in sent]
    first_start = kinds.index("event")
    assert sent[first_start - 1][1]["input"] == starts[0]["input"][-1]


def test_an_event_message_seals_with_its_name_in_the_clear_alert_header(
    tmp_path: Path,
    sealer,
    opener,  # type: ignore[no-untyped-def]
) -> None:
    from edge_agent.outbox import Outbox

    [start] = EventTracker([rule(name="pvc_run", label="V", on=0.5, min_windows=1)], AAMI).update(
        12.5, [0.1, 0.0, 0.9, 0.0, 0.0], "106@4551"
    )
    with Outbox(tmp_path / "o.sqlite", "ward-a", "ecg-01") as box:
        box.sealer = sealer("ecg-01")
        box.put("event", start)
        [pending] = box.due(resend_after=0)
    env = opener.open(pending.payload)
    assert (env.kind, env.alert, env.body) == ("event", "pvc_run", start)


def test_centred_beat_windows_follow_the_manifest_and_a_wrong_rate_is_refused(
    tmp_path: Path, site_dir: Path
) -> None:
    key = site_dir / "bundle-signer.key"
    bundle = Bundle.load(
        beat_bundle(tmp_path / "c", key, [], WindowSpec(length=200, hop=50, rate_hz=360)), None
    )
    fixed = open_source(EcgSettings(path=RECORD), bundle.manifest.window)
    assert isinstance(fixed, EcgSource) and (fixed.cfg.mode, fixed.cfg.hop) == ("fixed", 50)
    starts = [s.meta["start"] for s in fixed.stream(threading.Event())]
    assert starts[:3] == [0, 50, 100] and len(starts) == 1 + (21600 - 200) // 50
    # the config's own window settings win over the manifest's
    own = open_source(EcgSettings(path=RECORD, mode="beats", length=100), bundle.manifest.window)
    assert isinstance(own, EcgSource) and (own.cfg.mode, own.cfg.length) == ("beats", 100)
    with pytest.raises(
        SourceError,
        match=r"source rate 360 Hz does not match the model's "
        r"window rate_hz 250 Hz \(bundle manifest\)",
    ):
        open_source(EcgSettings(path=RECORD), WindowSpec(length=200, hop=50, rate_hz=250))


@pytest.mark.slow
def test_the_agent_windows_as_the_manifest_says_and_the_gateway_alerts_on_pvc_runs(
    tmp_path: Path,
    site_dir: Path,
    identity,
    opener,
    mosquitto,  # type: ignore[no-untyped-def]
) -> None:
    """End to end on a real broker and gateway: the agent's ECG source takes its beat windows
    from the bundle (agent config: path and offset only), events reach the store sealed, and
    the gateway raises a pvc_run alert."""
    import json

    from edge_agent import Agent, AgentConfig
    from gateway import Gateway, Store
    from gateway.alerts import AlertRules, list_alerts

    events = [EventRule(name="pvc_run", label="V", on=0.5, off=0.5, min_windows=2)]
    window = WindowSpec(length=260, hop=1, rate_hz=360, centre="beat")
    bundle = beat_bundle(tmp_path / "b", site_dir / "bundle-signer.key", events, window)
    cfg = AgentConfig(
        site="ward-a",
        device="ecg-01",
        bundle=bundle,
        identity=identity("ecg-01"),
        broker={"host": mosquitto.host, "port": mosquitto.port, "protocol": mosquitto.protocol},
        source={"kind": "ecg", "path": RECORD, "before": 90},
        outbox={"path": tmp_path / "outbox.sqlite", "resend_after_s": 0.5},
    )
    rules = AlertRules(events={"pvc_run": "critical"})
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port, mosquitto.protocol, rules=rules),
    ):
        report = Agent(cfg).run(threading.Event(), drain_timeout=30)
        rows = store.query(
            "SELECT kind, body FROM results WHERE device=? ORDER BY seq", ("ecg-01",)
        )
        alerts = [a for a in list_alerts(store) if a["rule"] == "event:pvc_run"]
    assert report.pending == 0
    bodies = [(r["kind"], json.loads(r["body"])) for r in rows]
    assert sum(1 for k, _ in bodies if k == "result") == 74
    got = [b for k, b in bodies if k == "event"]
    assert [b["state"] for b in got] == ["start", "end"] * 16
    assert all(b["event"] == "pvc_run" and b["windows"] == 2 for b in got)
    assert len(alerts) == 1 and alerts[0]["severity"] == "critical"
