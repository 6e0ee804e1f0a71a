"""The video source on a real fall clip (GMDCSA24 Subject_2-Fall-13, re-encoded 160x120)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.errors import SourceError
from edge_agent.sources import VideoSettings, VideoSource, open_source
from edge_agent.sources.video import load_intervals

DATA = Path(__file__).parent / "data" / "video"
CLIP = DATA / "Subject_2-Fall-13.mp4"
LABELS = DATA / "Subject_2-Fall.csv"
FRAMES = 133  # the clip's frame count, at 14.95 fps


def _source(**kw: object) -> VideoSource:
    return VideoSource(VideoSettings.model_validate({"path": CLIP, **kw}))


def test_a_file_yields_every_frame_with_labels_from_the_csv() -> None:
    src = _source(labels=LABELS)
    out = list(src.stream(threading.Event()))
    assert len(out) == FRAMES and src.errors == {}
    assert out[0].data.shape == (120, 160, 3) and out[0].data.dtype == np.uint8
    # "Falling (BW)[2.5 to 8]; Standing[0 to 2.5]": frames 38..119 (t = i / 14.95) fall
    falling = [s.meta["frame"] for s in out if s.label == 1]
    assert falling == list(range(38, 120))
    assert out[10].meta["classes"] == ["Standing"] and out[125].meta["classes"] == []
    assert out[37].time == pytest.approx(37 / src.fps) and out[37].id == "Subject_2-Fall-13#37"


def test_colour_order_grey_resize_and_step() -> None:
    rgb = next(_source().stream(threading.Event())).data
    bgr = next(_source(color="bgr").stream(threading.Event())).data
    np.testing.assert_array_equal(rgb, bgr[..., ::-1])
    out = list(_source(color="grey", size=(60, 80), step=4).stream(threading.Event()))
    assert len(out) == 34 and out[0].data.shape == (60, 80)
    assert [s.meta["frame"] for s in out[:3]] == [0, 4, 8]


def test_realtime_replay_keeps_the_recorded_rate() -> None:
    t0 = time.monotonic()
    out = list(_source(realtime=True, limit=10, step=2).stream(threading.Event()))
    took = time.monotonic() - t0
    assert len(out) == 10
    assert took >= 18 / 14.95 - 0.05  # the 10th kept frame is frame 18
    assert took < 5


def test_live_mode_drops_the_oldest_under_a_slow_consumer_and_counts_it() -> None:
    src = _source(live=True, queue=2)
    got = []
    for s in src.stream(threading.Event()):
        got.append(s.meta["frame"])
        time.sleep(0.01)  # a slow model
    assert src.errors["dropped"] == src.dropped > 0
    assert len(got) + src.dropped == FRAMES  # nothing lost silently, nothing twice
    assert got == sorted(set(got)) and got[-1] == FRAMES - 1  # the newest frame always wins


def test_a_file_never_drops_under_a_slow_consumer() -> None:
    src = _source(limit=20)
    got = []
    for s in src.stream(threading.Event()):
        got.append(s.meta["frame"])
        time.sleep(0.01)
    assert got == list(range(20)) and src.errors == {}


def test_live_stream_stops_on_the_event() -> None:
    stop = threading.Event()
    src = _source(live=True, realtime=True)
    n = 0
    for _ in src.stream(stop):
        n += 1
        if n == 3:
            stop.set()
    assert n == 3


def test_frames_that_fail_to_decode_are_counted_and_the_stream_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the real clip as Motion-JPEG, two frames' JPEG data blanked out
    avi = tmp_path / "clip.avi"
    cap = cv2.VideoCapture(str(CLIP))
    out = cv2.VideoWriter(str(avi), cv2.VideoWriter_fourcc(*"MJPG"), 14.95, (160, 120))
    while (frame := cap.read())[0]:
        out.write(frame[1])
    out.release()
    raw = bytearray(avi.read_bytes())
    soi = [i for i in range(len(raw) - 2) if raw[i : i + 3] == b"\xff\xd8\xff"]
    assert len(soi) == FRAMES
    for k in (50, 90):
        raw[soi[k] : soi[k + 1] - 16] = bytes(soi[k + 1] - 16 - soi[k])
    avi.write_bytes(bytes(raw))
    src = VideoSource(VideoSettings(path=avi))
    with caplog.at_level(logging.WARNING, "medge.agent.source.video"):
        got = [s.meta["frame"] for s in src.stream(threading.Event())]
    assert src.errors == {"decode": 2}
    assert len(got) == FRAMES - 2 and 50 not in got and 90 not in got and got[-1] == FRAMES - 1
    told = [r.getMessage() for r in caplog.records if "failed to decode" in r.getMessage()]
    assert len(told) == 2 and "frame 50" in told[0]


def test_clip_assembly_from_config() -> None:
    src = open_source(
        VideoSettings(path=CLIP, labels=LABELS, size=(32, 32), clip={"length": 8, "hop": 8})
    )
    out = list(src.stream(threading.Event()))
    assert len(out) == FRAMES // 8 and out[0].data.shape == (8, 32, 32, 3)
    assert [c.label for c in out[:6]] == [0, 0, 0, 0, 1, 1]  # clip 4 holds frames 32..39


def test_config_needs_exactly_one_input_and_a_real_file() -> None:
    with pytest.raises(ValueError, match="exactly one of path, camera, url"):
        VideoSettings(path=CLIP, camera=0)
    with pytest.raises(ValueError, match="exactly one"):
        VideoSettings()
    with pytest.raises(SourceError, match="no such video file"):
        VideoSource(VideoSettings(path=DATA / "missing.mp4"))
    assert VideoSource(VideoSettings(url="rtsp://user:secret@cam/1")).name == "rtsp://cam/1"


def test_interval_parser_reads_the_dataset_quirks(tmp_path: Path) -> None:
    csv = tmp_path / "x.csv"
    csv.write_text(
        "File Name,Length (seconds),Time of Recording,Attire,Description, Classes\n"
        "11.mp4,10,Night,J,Falling from bed, Falling (BW[5.9 to 10]; Walking[0 to 1.3]\n"
        "06.mp4,10,Day,J,x, Standing[0 to 0.5; 4.2 to 6.5]; Walking[0.5 to 1.8]\n"
    )
    assert load_intervals(csv, "11.mp4") == [("Falling (BW", 5.9, 10.0), ("Walking", 0.0, 1.3)]
    assert [i[1:] for i in load_intervals(csv, "06.mp4")[:2]] == [(0.0, 0.5), (4.2, 6.5)]
    with pytest.raises(SourceError, match="no row"):
        load_intervals(csv, "99.mp4")


def test_a_recorded_video_at_the_wrong_frame_rate_for_the_model_is_refused() -> None:
    """The bundle's clips are 5 frames/s: a 15 fps file must keep every third frame, or a
    clip of the right length would span a third of the time (a quietly changed window)."""
    from edge_agent.bundle import WindowSpec
    from edge_agent.sources import open_source

    clip = Path(__file__).parent.parent / "models" / "data" / "video_fall_clip_s3_19.mp4"
    window = WindowSpec(length=8, hop=1, rate_hz=5.0)
    ok = open_source(VideoSettings(path=clip, step=3, color="grey", size=(48, 64)), window)
    assert ok is not None
    wrong = r"15[.0-9]* fps with step 1 gives 15[.0-9]* frames/s.*set step: 3"
    with pytest.raises(SourceError, match=wrong):
        open_source(VideoSettings(path=clip, color="grey", size=(48, 64)), window)
    unrated = WindowSpec(length=8, hop=1)  # a bundle that does not say: nothing to check
    assert open_source(VideoSettings(path=clip, size=(48, 64)), unrated) is not None


# -- a live camera's frames, kept by time at the model's clip rate (frame_pacer) -------------


def _pace(times: list[float], hz: float = 5.0) -> list[tuple[float, str]]:
    from edge_agent.sources.frame_pacer import FramePacer

    pacer = FramePacer(hz)
    out = []
    for t in times:
        k = pacer.offer(t)
        if k.keep:
            out.append((t, k.reason))
    return out


@pytest.mark.parametrize("fps", [30.0, 29.97, 25.0, 15.0, 5.0])
def test_a_camera_at_any_rate_gives_frames_at_the_models_rate(fps: float) -> None:
    rng = np.random.default_rng(0)
    times = np.arange(0, 60, 1 / fps)
    times += rng.uniform(-0.004, 0.004, len(times))  # a camera's clock jitters
    kept = _pace(list(np.sort(times)))
    spacing = np.diff([t for t, _ in kept])
    assert len(kept) / 60 == pytest.approx(5.0, abs=0.05)  # the model's 5 Hz, on average
    assert spacing.max() <= 1.25 * 0.2 + 1 / fps and spacing.min() >= 0.75 * 0.2 - 1e-9
    assert {r for _, r in kept} == {""}  # no gap, not slow


def test_a_stall_starts_a_fresh_clip_and_a_slow_camera_makes_none() -> None:
    stall = [i / 30 for i in range(60)] + [3.0 + i / 30 for i in range(60)]  # 1 s without frames
    reasons = [r for _, r in _pace(stall)]
    assert reasons.count("gap") == 1 and "slow" not in reasons
    slow = _pace([i / 4.0 for i in range(30)])  # 4 fps: clips would span 25 % too much time
    assert [r for _, r in slow[:8]] == [""] * 8  # the median needs 8 spacings
    assert {r for _, r in slow[8:]} == {"slow"}


def test_a_live_source_is_paced_by_the_bundles_rate_and_flags_gaps(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """open_source gives a stream source the bundle's rate_hz; the frames it yields are 5 Hz
    from a 30 fps feed, and a stall makes the next frame start afresh (counted, one line),
    so the clip windows never span it."""
    from edge_agent.bundle import WindowSpec

    cfg = VideoSettings(url="rtsp://127.0.0.1:1/ward", color="grey")
    src = open_source(cfg, WindowSpec(length=4, hop=1, rate_hz=5.0), ["no_fall", "fall"])
    inner = src.inner  # type: ignore[attr-defined]
    assert inner.pace_hz == 5.0
    feed = [(i, i / 30, np.zeros((4, 4, 3), np.uint8)) for i in range(60)]
    feed += [(60 + i, 4.0 + i / 30, np.zeros((4, 4, 3), np.uint8)) for i in range(60)]
    inner._live = lambda stop: (f for f in feed)
    with caplog.at_level(logging.WARNING):
        clips = list(src.stream(threading.Event()))
    # 11 frames kept before the stall (0 to 1.97 s), 11 after: 8 + 8 clips of 4, none across
    assert len(clips) == 16
    assert [c.time for c in clips].index(4.0) == 8
    assert all(c.data.shape == (4, 4, 4) for c in clips)
    assert inner.errors == {"gap": 1}
    assert any("no frame for 2.03 s" in r.getMessage() for r in caplog.records)


def test_a_clock_stepped_back_does_not_stall_the_camera() -> None:
    """NTP sets the wall clock back an hour: the next frame is kept at once and starts a
    fresh clip (``clock``), and the 5 Hz rate goes on from the new time."""
    times = [i / 30 for i in range(30)] + [-3600 + i / 30 for i in range(60)]
    kept = _pace(times)
    reasons = [r for _, r in kept]
    assert reasons.count("clock") == 1
    after = [t for t, _ in kept if t < 0]
    assert after[0] == -3600 and len(after) == pytest.approx(10, abs=1)  # 2 s at 5 Hz
