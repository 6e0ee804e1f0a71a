"""The zoo's video fall CNN-LSTM: its committed data, clip excerpt and spec agree (no
TensorFlow, no training); one slow test runs the converted bundle on the agent's own video
source over the committed fall clip."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.bundle import EventRule, WindowSpec
from edge_agent.sources.video import VideoSettings, VideoSource
from models import video_fall_cnnlstm as m

T, H, W = m.LENGTH, *m.SIZE


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    with np.load(m.DATA, allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


def test_splits_shapes_dtypes_and_labels(data: dict[str, np.ndarray]) -> None:
    assert [str(s) for s in data["labels"]] == m.CLASS_NAMES == ["no_fall", "fall"]
    for split in ("calib", "val"):
        x, y = data[f"{split}_images"], data[f"{split}_labels"]
        assert x.dtype == np.uint8 and x.shape[1:] == (T, H, W, 1) and len(x) == len(y)
        assert set(np.unique(y).tolist()) == {0, 1}
        assert x.std() > 10  # real frames, not a constant
    assert np.bincount(data["calib_labels"]).tolist() == [50, 50]
    assert m.DATA.stat().st_size < 1.5e6


def test_split_is_disjoint_by_subject(data: dict[str, np.ndarray]) -> None:
    """val: every window of subject 1 (hop 2); calib: subjects 2 and 3 only."""
    assert set(data["val_subject"].tolist()) == {m.VAL_SUBJECT} == {1}
    assert {str(c).split("-")[0] for c in data["val_clip"]} == {"Subject_1"}
    assert set(data["calib_subjects"].tolist()) == {2, 3}
    # five clips of subject 1: 2 daily activities, 3 falls, and its empty room; times start at
    # 0 in each clip
    clips = sorted({str(c) for c in data["val_clip"]})
    assert [c.split("-")[1] for c in clips] == ["ADL", "ADL", "Empty", "Fall", "Fall", "Fall"]
    assert data["val_time"].min() == 0.0
    # no calibration window is a validation window
    val = {x.tobytes() for x in data["val_images"]}
    assert not any(x.tobytes() in val for x in data["calib_images"])


def test_val_holds_empty_scene_windows(data: dict[str, np.ndarray]) -> None:
    """val ends with windows of subject 1's empty room (a still image with per-frame noise),
    labelled no_fall: the converter's float vs int8 report covers a room with no one in it."""
    empty = np.array([str(c).startswith("Subject_1-Empty-") for c in data["val_clip"]])
    assert 1 <= empty.sum() <= 8 and empty[-empty.sum() :].all()
    assert (data["val_labels"][empty] == 0).all()
    x = data["val_images"][empty].astype(np.float32)
    assert x.std(axis=1).max() < 5  # still: only the noise changes from frame to frame
    assert x.std() > 10  # a real room, not a constant


def _keras_config(path: Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("config.json"))  # type: ignore[no-any-return]


def test_spec_matches_weights_and_bundle_fields() -> None:
    spec = m.SPEC
    assert spec.family == "CNN-LSTM" and spec.data_kind == "real"
    assert spec.weights.stat().st_size < 1e6
    cfg = _keras_config(spec.weights)["config"]
    layers = cfg["layers"]
    assert layers[0]["config"]["batch_shape"] == [1, T, H, W, 1]  # static batch for the LSTM
    assert layers[-1]["config"]["units"] == len(spec.convert["labels"]) == 2
    assert layers[-1]["config"]["activation"] == "softmax"
    assert spec.convert["positive_label"] == m.POSITIVE == "fall"
    assert spec.convert["preprocess"] == {"kind": "scale01"}
    window = WindowSpec(**spec.convert["window"])
    assert (window.length, window.hop, window.rate_hz) == (T, 1, 5.0)
    (rule,) = [EventRule(**r) for r in spec.convert["events"]]
    assert rule.name == "fall" and rule.label == "fall" and rule.off <= rule.on
    assert "LOSO" in spec.split and "19 clips" in spec.split


def test_clip_excerpt_is_small_and_frames_match_the_agents_source() -> None:
    """The model's frames are the agent's: the video source with step 3 (15 fps -> 5 Hz),
    grey, 48x64 gives the same frames at the same times as models' clip_frames."""
    assert m.CLIP.stat().st_size < 300e3
    times, frames = m.clip_frames(m.CLIP)
    src = VideoSource(VideoSettings(path=m.CLIP, color="grey", size=(H, W), step=3))
    got = list(src.stream(threading.Event()))
    assert round(src.fps) == 15 and len(got) == len(frames) == 25  # 5 s at 5 Hz
    np.testing.assert_allclose([s.time for s in got], times)
    np.testing.assert_array_equal(np.stack([s.data for s in got]), frames)


def test_missing_data_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "models.video_fall_cnnlstm", "--data-root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"video_fall_cnnlstm: missing data file {tmp_path}/video/gmdcsa24/Subject_1-ADL.csv"
    ]


@pytest.fixture(scope="module")
def video_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo's bundle (lean: the LiteRT pairs), converted once (cached by content)."""
    from conftest import convert_cached

    from medge.zoo import request as zoo_request

    out = tmp_path_factory.mktemp("video") / "video-fall-cnnlstm"
    return convert_cached(zoo_request(m.SPEC, out, lean=True))


def _events_on(bundle_dir: Path, video: Path) -> tuple[list[float], int, float, Any]:
    """(event starts, windows, top fall score, the model) of the agent's own path on a video:
    the video source (step 3, grey, 48x64) with the bundle's window, the bundle's chain and
    its ``fall`` rule."""
    from edge_agent.bundle import Bundle
    from edge_agent.events import EventTracker
    from edge_agent.model import LoadedModel
    from edge_agent.sources import open_source

    bundle = Bundle.load(bundle_dir)
    man = bundle.manifest
    assert man.labels == m.CLASS_NAMES and man.window is not None
    src = open_source(VideoSettings(path=video, color="grey", size=(H, W), step=3), man.window)
    model = LoadedModel(bundle)
    tracker = EventTracker(man.decode.events, man.labels)
    events, n, top = [], 0, 0.0
    for w in src.stream(threading.Event()):
        assert w.data.shape == (T, H, W)
        scores = model.infer(model.prepare(w.data))
        top = max(top, float(scores[1]))
        events += tracker.update(float(w.time or 0), scores, w.id)
        n += 1
    starts = [e["start"] for e in events + tracker.finish() if e["state"] == "start"]
    return starts, n, top, model


@pytest.mark.slow
def test_bundle_raises_the_fall_on_the_agents_video_source(video_bundle: Path) -> None:
    """The agent's own path on the committed excerpt raises one fall event, starting within
    1.6 s (one window) of the labelled fall start (2.0 s) and before 2 s after it; no event
    before the fall. The bundle is two models (schema 2.0): each of the 25 frames ran through
    the frame CNN once, though the 18 windows hold 144. (The clip is in the final model's
    training data: this checks the device path, not the model's accuracy; LOSO numbers are in
    the spec.)"""
    starts, n, _, model = _events_on(video_bundle, m.CLIP)
    assert n == 25 - T + 1
    assert len(starts) == 1, starts
    assert m.CLIP_FALL_S - T / m.RATE_HZ <= starts[0] <= m.CLIP_FALL_S + 2.0
    assert model.bundle.manifest.schema_version == "2.0" and model.feature is not None
    assert (model.feature.runs, model.feature.reused) == (25, T * n - 25)


@pytest.mark.slow
def test_an_empty_room_raises_no_fall(video_bundle: Path, tmp_path: Path) -> None:
    """No person in view, no fall: the room of the committed clip (its per-pixel median over
    all 75 frames: the person stands, falls and lies, and only a faint trace of them is left
    on the floor), 10 s of it with +-3 grey levels of noise per frame. The model was trained
    with empty rooms of its training clips (this room's camera view among them: LOSO's
    held-out rooms are in the spec)."""
    import cv2

    cap = cv2.VideoCapture(str(m.CLIP))
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    room = np.median(np.stack(frames), axis=0)
    video = tmp_path / "empty-room.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), fps, room.shape[1::-1])
    rng = np.random.default_rng(0)
    for _ in range(int(10 * fps)):
        writer.write(np.clip(room + rng.integers(-3, 4, room.shape), 0, 255).astype(np.uint8))
    writer.release()
    starts, n, top, _ = _events_on(video_bundle, video)
    assert n == int(10 * fps) // 3 - T + 1
    assert starts == [] and top < m.FALL_RULE["off"], top
