"""A CNN-LSTM fall detector on real ward-camera style video (GMDCSA24 subjects 1-3).

    python -m models.video_fall_cnnlstm     # LOSO evaluation, then the final model on all 3

Input: a clip of T=8 grey frames of 48x64 pixels sampled at 5 fps (1.6 s), scaled to [0, 1].
A small per-frame CNN under TimeDistributed gives each frame a 32-value feature; an LSTM(24)
runs over the 8 frames; softmax no_fall / fall.

The frames are made exactly as the agent's video source makes them (edge_agent.sources.video's
rules, re-written here; the zoo's test checks the two give the same frames): every
``step``-th frame of the file (step = round(fps / 5): 6 for the 30 fps clips, 3 for the 15
fps ones), resized with cv2.INTER_AREA to 64x48 (the 16:9 clips are squeezed, as the source
squeezes them), then BGR -> grey. The bundle's ``window`` (length 8, hop 1, rate_hz 5) makes
the agent assemble the same clips; the camera config sets ``step`` so that the camera's fps /
step is 5, ``color: grey`` and ``size: [48, 64]``. Events come from the agent's own
EventTracker (edge_agent.events) with the bundle's rule.

Labels: a frame is "fall" inside the CSV's Falling/Fall interval (which runs from the fall's
start to the end of the clip: the falling and the lying after it; an interval that ends
within 1 s of the clip's end, as the CSV's whole seconds do, is taken to its end); a clip is
labelled by its last frame. The event rule ``fall`` (on 0.5, off 0.3, 3 windows in a row,
10 s refractory) was fixed before any evaluation.

Evaluation: leave-one-subject-out over the 3 subjects (train on 2, test on the third; 3 folds,
fixed epochs, nothing tuned on the held-out subject), with the agent's event rule over every
clip window (hop 1): event sensitivity per labelled fall, false alarms per hour of non-fall
video (the ADL clips and the part of each fall clip before its fall starts) and the detection
delay (event start minus labelled fall start; the event's start is its first window's first
frame, as the agent stamps it, so it can be negative: the alarm itself goes out when the
triggering window's last frame is in, reported as ``alarm_after_s``). The data is tiny (19
clips, about 2 minutes of video, 11 falls): the numbers have wide intervals.

Empty-scene negatives: a room with no one in it must give no fall (the first committed model
fired at 0.996 on the demo clip's empty room; tests/test_zoo_video_fall_cnnlstm.py now checks
that it stays quiet). Every epoch adds
EMPTY_PER_SCENE = 8 windows of each training clip's room image (``empty_scenes``), no_fall:
the still image with +-3 grey levels of noise and a small brightness change per frame, then
the same augmentation as the clips (with 13 room images: 104 windows against 271 no_fall clip
windows in the final model). A clip's own temporal median keeps the person where they stay
for over half the clip (a fall clip's person lies still after the fall), so the room image is
the per-pixel median over the frames of all the clips of the same subject in the same camera
view, brightness-matched to the clip; six clips still showed the person by eye and are not
used (EMPTY_DROPPED: subject 1's ADL-16, seated, and its three falls, lying in one spot in the
only views they share; subject 3's ADL-07 and Fall-01, alone in their views). That leaves
room images of 1 / 4 / 8 clips of subjects 1 / 2 / 3, and only 3 rooms among them: subject
1's, a bedroom that subjects 2 and 3 share (other clips, other lighting), subject 3's second
room. The empty-scene test of a LOSO fold runs each held-out clip's room image (made from the
held-out subject's clips only, never trained on in that fold) as a still 10 s video at 5 Hz
with +-3 levels of noise, every window through the fall rule: the highest fall score and the
events raised. Subject 1's room is seen in no other fold's training; subjects 2 and 3's
bedroom is in the other's training data, so their empty-scene results are not a new room.

LOSO, seed 0, 30 epochs (all four fits: about 140 s on 2 shared cores), with the empty-scene
negatives (committed; empty room: the highest fall score and the events over the held-out
subject's room images, 10 s each: 1, 4 and 8 of them):

| held out | falls found | false alarms (non-fall video) | alarm after fall | empty room |
|---|---|---|---|---|
| subject 1 | 3 / 3 | 0 in 0.17 min | 1.4, 1.5, 2.0 s | 0.22, 0 / 10 s |
| subject 2 | 2 / 3 | 0 in 0.33 min | 1.1, 1.1 s | 0.007, 0 / 40 s |
| subject 3 | 4 / 5 | 2 in 0.77 min (1 ADL, 1 pre-fall) | 1.8, 1.5, 0.8, 1.0 s | 0.31, 0 / 80 s |
| pooled | 9 / 11 = 0.82 (CI 0.52-0.95) | 2 in 1.27 min = 94/h | median 1.4 s | 0.31, 0 / 130 s |

(event start minus fall start: median -0.40 s.) The same LOSO without the empty-scene windows
(the previously committed design, re-run with this empty-scene test):

| held out | falls found | false alarms (non-fall video) | alarm after fall | empty room |
|---|---|---|---|---|
| subject 1 | 2 / 3 | 0 in 0.17 min | 1.4, 1.5 s | 0.03, 0 / 10 s |
| subject 2 | 2 / 3 | 0 in 0.33 min | 1.3, 1.3 s | 0.015, 0 / 40 s |
| subject 3 | 4 / 5 | 5 in 0.77 min (4 ADL, 1 pre-fall) | 1.8, 1.1, 0.6, 0.6 s | 0.999, 7 / 80 s |
| pooled | 8 / 11 = 0.73 (CI 0.43-0.90) | 5 in 1.27 min = 236/h | median 1.3 s | 0.999, 7 / 130 s |

Sensitivity did not drop (one more fall found, Subject_1-Fall-15; three fewer false alarms),
but on 11 falls and 1.3 min of non-fall video the difference is within the noise. The empty
room's scores rose on subject 1's room (0.03 -> 0.22) and fell on subject 3's rooms (0.999 ->
0.31); the highest held-out empty-room score, 0.31, is under the rule's ``on`` (0.5) but above
its ``off`` (0.3): a margin, not a wide one. The designs run, all reported: without the shift
augmentation (``SHIFT``) 6 / 11 with 7 false alarms (331 / h); with it, 8 / 11 and 5 (above);
with it and the empty scenes, 9 / 11 and 2 (committed), each chosen after seeing the one
before, so the committed table is somewhat optimistic. EMPTY_PER_SCENE (8) and the dropped
clips were fixed before the first run with the empty scenes, not tuned. The missed falls now:
Subject_2-Fall-14 (backward onto the bed, night), Subject_3-Fall-20 (an event before the fall).

The committed weights are the final model trained on all 3 subjects: its numbers on its own
data are not evaluation numbers. The committed npz holds a calibration subset (subjects 2 and
3) and ``val``: every window of subject 1 at hop 2 (the held-out subject of LOSO fold 1, but
in the final model's training data: the converter's report compares float and int8 on it,
which is what it is for; its absolute numbers are not held-out numbers), then VAL_EMPTY = 4
windows of subject 1's empty-room video (clip ``Subject_1-Empty-ADL-10``, no_fall; also in
the final model's training rooms), so the float vs int8 comparison covers an empty room.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.spec import ZooModel

__all__ = [
    "CLASS_NAMES",
    "CLIP",
    "DATA",
    "POSITIVE",
    "SPEC",
    "WEIGHTS",
    "build",
    "clip_frames",
    "load_intervals",
    "train",
]

_HERE = Path(__file__).parent
DATA = _HERE / "data" / "video_fall_cnnlstm.npz"
WEIGHTS = _HERE / "weights" / "video_fall_cnnlstm.keras"
# a 5 s excerpt of Subject_3-Fall-19 (15 fps, 160x120), the demo's ward camera; fall at 2.0 s
CLIP = _HERE / "data" / "video_fall_clip_s3_19.mp4"
CLIP_SOURCE, CLIP_SECONDS, CLIP_FALL_S = "Subject_3-Fall-19.mp4", 5.0, 2.0
DEFAULT_ROOT = _HERE.parent.parent / "shared" / "data"
CLASS_NAMES = ["no_fall", "fall"]
POSITIVE = "fall"
SUBJECTS = (1, 2, 3)
VAL_SUBJECT = 1
RATE_HZ, LENGTH, HOP = 5.0, 8, 1
SIZE = (48, 64)  # (height, width), as the video source's ``size``
FALL_RULE: dict[str, Any] = {"name": "fall", "label": POSITIVE, "on": 0.5, "off": 0.3}
FALL_RULE |= {"min_windows": 3, "refractory_s": 10.0, "severity": "critical"}
EPOCHS = 30
SHIFT = (4, 6)  # random shift augmentation (rows, columns); run 1 had none
# empty-scene negatives: windows of each training clip's room with no one in it (no_fall)
EMPTY_PER_SCENE = 8  # windows per room image per epoch (fresh noise every epoch)
EMPTY_SECONDS = 10.0  # the held-out empty-scene test: a 10 s video of each room image
VAL_EMPTY = 4  # empty-scene windows of subject 1 in the committed val split
SCENE_DISTANCE = 0.35  # clips of one subject whose medians are this close share a room/camera
# clips whose room image still shows the person, checked by eye (they stay still, or lie where
# the other clips of their room lie too): not used as empty scenes
EMPTY_DROPPED = {
    "Subject_1-ADL-16": "seated on the chair the whole clip",
    "Subject_1-Fall-13": "lying in the same place as in Fall-14, its only room-mate",
    "Subject_1-Fall-14": "lying in the same place as in Fall-13, its only room-mate",
    "Subject_1-Fall-15": "lying for most of the clip, alone in its camera view",
    "Subject_3-ADL-07": "standing still most of the clip, alone in its camera view",
    "Subject_3-Fall-01": "lying for the whole clip, alone in its camera view",
}

# held-out numbers of `python -m models.video_fall_cnnlstm` (seed 0): leave-one-subject-out
LOSO = (
    "LOSO held-out (3 folds, pooled), trained with empty-room negatives: fall events 9/11 "
    "detected (0.82, 95% CI 0.52-0.95), 2 false alarms in 1.27 min of non-fall video (94/h, "
    "both in subject 3: 1 daily-activity clip, 1 before a fall), median alarm 1.4 s after the "
    "labelled fall start; empty-room test (each held-out clip's room image as a still 10 s "
    "video, 13 room images, 130 s): highest fall score 0.31, 0 events (without the empty-room "
    "negatives: 8/11, 236/h, empty room 0.999 with 7 events); bundle val = subject 1 and 4 "
    "windows of its empty room, in the final model's training data (float vs int8 only)"
)

SPEC = ZooModel(
    name="video_fall_cnnlstm",
    family="CNN-LSTM",
    task="classification",
    summary="falls on video: CNN per frame + LSTM over 8 grey 48x64 frames at 5 fps (GMDCSA24)",
    data=DATA,
    data_kind="real",
    split=(
        "leave-one-subject-out over GMDCSA24 subjects 1-3 (19 clips, ~2 min of video: tiny; "
        "plus empty-room windows of 13 clips' room images, no_fall); committed weights trained "
        f"on all 3 and all 13 room images; {LOSO}"
    ),
    weights=WEIGHTS,
    convert={
        "preprocess": {"kind": "scale01"},
        "labels": CLASS_NAMES,
        "positive_label": POSITIVE,
        "calib_split": "calib",
        "eval_split": "val",
        "window": {"length": LENGTH, "hop": HOP, "rate_hz": RATE_HZ, "label": "last"},
        "events": [FALL_RULE],
        "budget": {"auc": 0.01},
        # two models in one bundle: the frame CNN once per frame, the LSTM over 8 features
        "feature_stage": True,
    },
    anchor="GMDCSA24 paper (Alam et al. 2024): dataset only; no CNN-LSTM number to compare",
    stream="video (a ward camera at fps/step = 5 Hz, grey 48x64; or a recorded clip)",
)


# -- the data: clips, their labels, and frames as the agent's video source makes them --------


Interval = tuple[str, float, float]


def load_intervals(csv_path: Path, row: str) -> list[Interval]:
    """(class, start_s, end_s) of one clip of a GMDCSA24 CSV (edge_agent.sources.video's
    load_intervals rule)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = [{k.strip(): (v or "").strip() for k, v in r.items()} for r in csv.DictReader(f)]
    match = [r for r in rows if r.get("File Name") == row]
    if not match:
        raise ValueError(f"{csv_path}: no row with File Name '{row}'")
    out: list[Interval] = []
    for name, spans in re.findall(r"([^\[\];]+?)\s*\[([^\]]*)\]", match[0].get("Classes", "")):
        for span in spans.split(";"):
            a, _, b = span.partition(" to ")
            out.append((name.strip(), float(a), float(b)))
    return out


def fall_interval(intervals: list[Interval]) -> tuple[float, float] | None:
    """The clip's fall: from the first Fall/Falling interval's start to the last one's end."""
    spans = [(a, b) for c, a, b in intervals if c.startswith("Fall")]
    return (min(a for a, _ in spans), max(b for _, b in spans)) if spans else None


def clip_frames(path: Path, size: tuple[int, int] = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(times s, (n, H, W) uint8 grey frames) of every step-th frame (step = round(fps / 5)),
    as edge_agent.sources.video makes them with that ``step``, ``size`` and ``color: grey``."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise FileNotFoundError(f"cannot open video {path}")
    fps = float(cap.get(cv2.CAP_PROP_FPS)) or 0.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    step = max(1, round(fps / RATE_HZ))
    times, frames = [], []
    h, w = size
    for index in range(total):
        ok, frame = cap.read()
        if not ok:
            break
        if index % step:
            continue
        if frame.shape[:2] != size:
            shrink = h * w < frame.shape[0] * frame.shape[1]
            inter = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            frame = cv2.resize(frame, (w, h), interpolation=inter)
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
        times.append(index / fps)
    cap.release()
    return np.asarray(times), np.stack(frames)


@dataclass(frozen=True)
class Clip:
    name: str  # Subject_1-Fall-13
    subject: int
    times: np.ndarray  # (n,) seconds of the kept frames
    frames: np.ndarray  # (n, H, W) uint8
    labels: np.ndarray  # (n,) 1 inside the fall interval
    fall: tuple[float, float] | None
    duration_s: float


def clip_paths(root: Path) -> list[tuple[Path, Path]]:
    """(video, its CSV) of every clip of subjects 1-3 in the shared data; the CSVs must exist."""
    d = root / "video" / "gmdcsa24"
    out = []
    for s in SUBJECTS:
        for kind in ("ADL", "Fall"):
            csv_path = d / f"Subject_{s}-{kind}.csv"
            if not csv_path.is_file():
                raise FileNotFoundError(f"missing data file {csv_path}")
            out += [(v, csv_path) for v in sorted(d.glob(f"Subject_{s}-{kind}-*.mp4"))]
    if not out:
        raise FileNotFoundError(f"missing data: no Subject_<n>-<Fall|ADL>-<clip>.mp4 in {d}")
    return out


def load_clips(root: Path) -> list[Clip]:
    import cv2

    clips = []
    for video, csv_path in clip_paths(root):
        name = video.stem
        subject = int(name.split("-")[0].split("_")[1])
        intervals = load_intervals(csv_path, f"{name.rsplit('-', 1)[1]}.mp4")
        cap = cv2.VideoCapture(str(video))
        dur = float(cap.get(cv2.CAP_PROP_FRAME_COUNT) / cap.get(cv2.CAP_PROP_FPS))
        cap.release()
        fall = fall_interval(intervals)
        if fall is not None and fall[1] >= dur - 1.0:  # "to 4" in a 4.3 s clip: to its end
            fall = (fall[0], max(fall[1], dur))
        times, frames = clip_frames(video)
        labels = np.array([fall is not None and fall[0] <= t <= fall[1] for t in times], "int64")
        clips.append(Clip(name, subject, times, frames, labels, fall, dur))
    return clips


def windows(clip: Clip, hop: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, T, H, W) uint8 clips every ``hop`` frames, their labels (last frame's) and times
    (first frame's, as the agent stamps a window)."""
    starts = np.arange(0, len(clip.frames) - LENGTH + 1, hop)
    x = np.stack([clip.frames[s : s + LENGTH] for s in starts])
    return x, clip.labels[starts + LENGTH - 1], clip.times[starts]


def _standard(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / max(float(a.std()), 1e-6)


def empty_scenes(clips: list[Clip]) -> dict[str, np.ndarray]:
    """Clip name -> (H, W) uint8 image of its room with no one in it, for every clip not in
    EMPTY_DROPPED.

    A clip's own per-pixel temporal median keeps the person wherever they stay for over half
    the clip (a fall clip's person lies still after the fall), so the median is taken over the
    frames of all the clips of the same subject in the same room and camera view (standardised
    medians within SCENE_DISTANCE of each other), 24 frames of each, every clip's frames mapped
    to this clip's brightness by a least-squares gain and offset between the two clips'
    medians: the person lies or sits somewhere else in each. Only the subject's own clips are
    used, so a held-out subject's room images come from its own clips only."""
    med = {c.name: np.median(c.frames, axis=0).astype(np.float32) for c in clips}
    out = {}
    for c in clips:
        if c.name in EMPTY_DROPPED:
            continue
        mc = med[c.name]
        stack = []
        for d in clips:
            md = med[d.name]
            if d.subject != c.subject or np.abs(_standard(md) - _standard(mc)).mean() > (
                SCENE_DISTANCE
            ):
                continue
            a = np.stack([md.ravel(), np.ones(md.size, np.float32)], 1)
            gain, offset = np.linalg.lstsq(a, mc.ravel(), rcond=None)[0]
            pick = np.linspace(0, len(d.frames) - 1, 24).round().astype(int)
            stack.append(d.frames[pick].astype(np.float32) * gain + offset)
        room = np.median(np.concatenate(stack), axis=0)
        out[c.name] = np.clip(np.round(room), 0, 255).astype(np.uint8)
    return out


def empty_windows(rooms: list[np.ndarray], per_room: int, rng: np.random.Generator) -> np.ndarray:
    """(len(rooms) * per_room, T, H, W) uint8 windows of still rooms: each frame the room with
    +-3 grey levels of noise and its own small brightness change (gain 0.97-1.03, offset
    +-3 levels), as a camera's frames of an empty room vary."""
    if not rooms:
        return np.zeros((0, LENGTH, *SIZE), np.uint8)
    base = np.repeat(np.stack(rooms).astype(np.float32), per_room, axis=0)[:, None]
    n = len(base)
    gain = rng.uniform(0.97, 1.03, (n, LENGTH, 1, 1)).astype(np.float32)
    offset = rng.uniform(-3, 3, (n, LENGTH, 1, 1)).astype(np.float32)
    noise = rng.integers(-3, 4, (n, LENGTH, *SIZE)).astype(np.float32)
    return np.clip(np.round(base * gain + offset + noise), 0, 255).astype(np.uint8)


def empty_video(
    room: np.ndarray, rng: np.random.Generator, seconds: float = EMPTY_SECONDS
) -> tuple[np.ndarray, np.ndarray]:
    """(N, T, H, W) uint8 windows (hop 1) and their start times of a ``seconds`` video of the
    still room at 5 Hz with +-3 grey levels of noise per frame (the empty room of
    tests/test_zoo_video_fall_cnnlstm.py, at the model's frame size)."""
    n = round(seconds * RATE_HZ)
    noise = rng.integers(-3, 4, (n, *SIZE))
    frames = np.clip(room.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    starts = np.arange(0, n - LENGTH + 1)
    return np.stack([frames[s : s + LENGTH] for s in starts]), starts / RATE_HZ


# -- the model -------------------------------------------------------------------------------


def build(batch: int | None = None) -> Any:
    import keras
    from keras import layers

    inp = keras.Input((LENGTH, *SIZE, 1), batch_size=batch, name="clip")
    frame = keras.Sequential(
        [
            keras.Input((*SIZE, 1)),
            layers.Conv2D(8, 3, strides=2, padding="same", activation="relu"),  # 24x32
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),  # 12x16
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),  # 6x8: where in the room still counts
            layers.Conv2D(8, 1, activation="relu"),
            layers.Flatten(),
            layers.Dense(32, activation="relu"),
        ],
        name="frame_cnn",
    )
    x = layers.TimeDistributed(frame, name="per_frame")(inp)
    x = layers.LSTM(24, name="lstm")(x)
    x = layers.Dropout(0.3)(x)
    out = layers.Dense(2, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name="video_fall_cnnlstm")


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each clip mirrored left-right or not, shifted by up to 6 pixels across and 4 down or up
    (edges repeated), with one brightness/contrast change for all its frames (day and night
    clips); uint8 in, float32 [0, 1] out."""
    flip = rng.random(len(x)) < 0.5
    x = np.where(flip[:, None, None, None], x[..., ::-1], x)
    if SHIFT:
        dy, dx = SHIFT
        pad = np.pad(x, ((0, 0), (0, 0), (dy, dy), (dx, dx)), mode="edge")
        oy = rng.integers(0, 2 * dy + 1, len(x))
        ox = rng.integers(0, 2 * dx + 1, len(x))
        h, w = x.shape[2:]
        x = np.stack([p[:, a : a + h, b : b + w] for p, a, b in zip(pad, oy, ox, strict=True)])
    x = x.astype(np.float32) / 255.0
    gain = rng.uniform(0.7, 1.3, (len(x), 1, 1, 1)).astype(np.float32)
    bias = rng.uniform(-0.1, 0.1, (len(x), 1, 1, 1)).astype(np.float32)
    return np.clip(x * gain + bias, 0.0, 1.0)


def fit(clips: list[Clip], seed: int, epochs: int = EPOCHS) -> Any:
    """A model trained on these clips' windows (hop 1) and EMPTY_PER_SCENE empty-scene windows
    (no_fall) of each of their room images (empty_scenes), deterministically."""
    import keras

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    parts = [windows(c) for c in clips]
    x = np.concatenate([p[0] for p in parts])
    rooms = list(empty_scenes(clips).values())
    n_empty = len(rooms) * EMPTY_PER_SCENE
    y = np.concatenate([p[1] for p in parts] + [np.zeros(n_empty, "int64")])
    model = build()
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy")
    counts = np.bincount(y, minlength=2)
    class_weight = {i: float(len(y) / (2 * max(c, 1))) for i, c in enumerate(counts)}
    for _ in range(epochs):  # fresh augmentation (and empty-scene noise) every epoch
        xe = np.concatenate([x, empty_windows(rooms, EMPTY_PER_SCENE, rng)])
        model.fit(
            _augment(xe, rng)[..., None], y, batch_size=32, epochs=1, shuffle=True,
            class_weight=class_weight, verbose=0,
        )  # fmt: skip
    return model


# -- events as the agent finds them ----------------------------------------------------------


def clip_events(times: np.ndarray, p_fall: np.ndarray, rule: dict[str, Any] = FALL_RULE) -> list:
    """(start, index of the window that started it) of each event the agent's EventTracker
    raises on these window times and fall scores."""
    from edge_agent.bundle import EventRule
    from edge_agent.events import EventTracker

    tracker = EventTracker([EventRule(**rule)], CLASS_NAMES)
    out = []
    for i, (t, p) in enumerate(zip(times.tolist(), p_fall.tolist(), strict=True)):
        for m in tracker.update(t, [1.0 - p, p], str(i)):
            if m["state"] == "start":
                out.append((float(m["start"]), i))
    return out


def score_clips(clips: list[Clip], predict: Any) -> dict[str, Any]:
    """Event sensitivity, false alarms per hour of non-fall video and delays over the clips.

    A fall is detected by an event that starts between one window span (1.6 s) before the
    labelled start (a window holding the fall's start) and the fall interval's end; any
    other event is a false alarm."""
    span = LENGTH / RATE_HZ
    falls, hits, fa, right, n_windows, nonfall_s = 0, 0, 0, 0, 0, 0.0
    delays: list[float] = []
    alarms: list[float] = []
    per_clip = {}
    for c in clips:
        x, y, t = windows(c)
        p = np.asarray(predict(x))[:, 1]
        right += int(((p >= 0.5) == (y == 1)).sum())
        n_windows += len(y)
        events = clip_events(t, p)
        if c.fall is None:
            nonfall_s += c.duration_s
            fa += len(events)
            per_clip[c.name] = {"events": [round(s, 2) for s, _ in events]}
            continue
        a, b = c.fall
        falls += 1
        nonfall_s += a
        hit = [(s, i) for s, i in events if a - span <= s <= b]
        fa += len(events) - len(hit)
        if hit:
            hits += 1
            s, i = hit[0]
            delays.append(s - a)
            alarms.append(t[i] + (LENGTH - 1) / RATE_HZ - a)
        per_clip[c.name] = {"fall_start": a, "events": [round(s, 2) for s, _ in events]}
    return {
        "falls": falls,
        "detected": hits,
        "event_sensitivity": round(hits / falls, 3) if falls else None,
        "false_alarms": fa,
        "nonfall_minutes": round(nonfall_s / 60, 2),
        "false_alarms_per_hour": round(fa / (nonfall_s / 3600), 1) if nonfall_s else None,
        "delay_s": [round(d, 2) for d in delays],
        "alarm_after_s": [round(d, 2) for d in alarms],
        "window_accuracy": round(right / n_windows, 3),
        "windows": n_windows,
        "clips": per_clip,
    }


def score_empty(clips: list[Clip], predict: Any, seed: int = 0) -> dict[str, Any]:
    """The empty-scene test: each clip's room image (empty_scenes) as a still 10 s video at
    5 Hz, every window through the fall rule: the highest fall score and the events raised."""
    rng = np.random.default_rng(seed + 1)
    per_room, top, events = {}, 0.0, 0
    for name, room in empty_scenes(clips).items():
        x, t = empty_video(room, rng)
        p = np.asarray(predict(x))[:, 1]
        ev = clip_events(t, p)
        per_room[name] = {"max_fall_score": round(float(p.max()), 4), "events": len(ev)}
        top, events = max(top, float(p.max())), events + len(ev)
    return {
        "rooms": len(per_room),
        "seconds": EMPTY_SECONDS * len(per_room),
        "max_fall_score": round(top, 4),
        "events": events,
        "dropped": sorted(c.name for c in clips if c.name in EMPTY_DROPPED),
        "per_room": per_room,
    }


def _predictor(model: Any) -> Any:
    return lambda x: np.asarray(
        model.predict(x[..., None].astype(np.float32) / 255.0, verbose=0, batch_size=64)
    )


def _pooled(folds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    f = list(folds.values())
    falls, hits = sum(x["falls"] for x in f), sum(x["detected"] for x in f)
    fa, minutes = sum(x["false_alarms"] for x in f), sum(x["nonfall_minutes"] for x in f)
    delays = [d for x in f for d in x["delay_s"]]
    alarms = [d for x in f for d in x["alarm_after_s"]]
    lo, hi = _wilson(hits, falls)
    empty = [x["empty_scene"] for x in f if "empty_scene" in x]
    return {
        "falls": falls,
        "detected": hits,
        "event_sensitivity": round(hits / falls, 3),
        "event_sensitivity_95ci": [round(lo, 3), round(hi, 3)],
        "false_alarms": fa,
        "nonfall_minutes": round(minutes, 2),
        "false_alarms_per_hour": round(fa / (minutes / 60), 1),
        "median_delay_s": round(float(np.median(delays)), 2) if delays else None,
        "median_alarm_after_s": round(float(np.median(alarms)), 2) if alarms else None,
        "empty_scene_rooms": sum(e["rooms"] for e in empty),
        "empty_scene_max_fall_score": max((e["max_fall_score"] for e in empty), default=None),
        "empty_scene_events": sum(e["events"] for e in empty),
    }


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(max(0.0, c - h)), float(min(1.0, c + h))


# -- training, evaluation and the committed files --------------------------------------------


def write_clip_excerpt(root: Path, out: Path = CLIP) -> None:
    """The demo's ward-camera clip: the first CLIP_SECONDS of CLIP_SOURCE at 160x120, its fps."""
    import cv2

    cap = cv2.VideoCapture(str(root / "video" / "gmdcsa24" / CLIP_SOURCE))
    fps = float(cap.get(cv2.CAP_PROP_FPS))
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (160, 120))
    for _ in range(round(CLIP_SECONDS * fps)):
        ok, frame = cap.read()
        if not ok:
            break
        writer.write(cv2.resize(frame, (160, 120), interpolation=cv2.INTER_AREA))
    writer.release()
    cap.release()


def save_data(clips: list[Clip], seed: int) -> None:
    """calib: 100 windows of subjects 2 and 3 (half fall: the converter's minimum without a
    warning); val: subject 1's windows, hop 2, then VAL_EMPTY windows (hop 10) of the empty-
    scene test video of subject 1's room image(s), no_fall, clip ``Subject_1-Empty-<clip>``."""
    rng = np.random.default_rng(seed)
    cal = [windows(c) for c in clips if c.subject != VAL_SUBJECT]
    cx, cy = np.concatenate([p[0] for p in cal]), np.concatenate([p[1] for p in cal])
    pick = np.concatenate([rng.choice(np.flatnonzero(cy == k), 50, replace=False) for k in (0, 1)])
    vx, vy, vt, vc = [], [], [], []
    for c in clips:
        if c.subject == VAL_SUBJECT:
            x, y, t = windows(c, hop=2)
            vx.append(x)
            vy.append(y)
            vt.append(t)
            vc += [c.name] * len(y)
    erng = np.random.default_rng(seed + 1)
    for name, room in empty_scenes([c for c in clips if c.subject == VAL_SUBJECT]).items():
        x, t = empty_video(room, erng)
        keep = np.arange(0, len(x), 10)[:VAL_EMPTY]
        vx.append(x[keep])
        vy.append(np.zeros(len(keep), "int64"))
        vt.append(t[keep])
        vc += [f"Subject_1-Empty-{name.split('-', 1)[1]}"] * len(keep)
    DATA.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        DATA,
        labels=np.array(CLASS_NAMES),
        calib_images=cx[np.sort(pick)][..., None],
        calib_labels=cy[np.sort(pick)],
        calib_subjects=np.array(sorted({c.subject for c in clips} - {VAL_SUBJECT}), "int16"),
        val_images=np.concatenate(vx)[..., None],
        val_labels=np.concatenate(vy),
        val_time=np.concatenate(vt).astype(np.float32),
        val_clip=np.array(vc),
        val_subject=np.full(len(vc), VAL_SUBJECT, "int16"),
    )


def train(
    out: Path = WEIGHTS,
    epochs: int = EPOCHS,
    seed: int = 0,
    data_root: Path = DEFAULT_ROOT,
    loso: bool = True,
) -> dict[str, Any]:
    clip_paths(data_root)  # a missing file: one line, before TensorFlow loads
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    t0 = time.time()
    tf.config.experimental.enable_op_determinism()
    clips = load_clips(data_root)
    result: dict[str, Any] = {"clips": len(clips)}
    if loso:
        folds = {}
        for s in SUBJECTS:
            model = fit([c for c in clips if c.subject != s], seed, epochs)
            test = [c for c in clips if c.subject == s]
            folds[f"test_subject_{s}"] = score_clips(test, _predictor(model))
            folds[f"test_subject_{s}"]["empty_scene"] = score_empty(test, _predictor(model), seed)
            print(f"fold {s}: {json.dumps(folds[f'test_subject_{s}'])}", file=sys.stderr)
        result["loso_folds"] = folds
        result["loso_pooled"] = _pooled(folds)
    model = fit(clips, seed, epochs)
    result["final_on_its_own_training_data"] = {
        k: v for k, v in score_clips(clips, _predictor(model)).items() if k != "clips"
    }
    result["final_on_its_own_training_data"]["empty_scene"] = score_empty(
        clips, _predictor(model), seed
    )
    one = keras.Input(batch_shape=(1, LENGTH, *SIZE, 1), name="clip")
    x = one
    for layer in model.layers[1:]:
        x = layer(x)
    batch1 = keras.Model(one, x, name="video_fall_cnnlstm")
    out.parent.mkdir(parents=True, exist_ok=True)
    batch1.save(out)
    save_data(clips, seed)
    write_clip_excerpt(data_root)
    result["params"] = int(model.count_params())
    result["train_seconds"] = round(time.time() - t0, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the video fall CNN-LSTM of the medge zoo.")
    ap.add_argument("--out", type=Path, default=WEIGHTS, help="where to write the .keras file")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", type=Path, default=DEFAULT_ROOT, help="the shared data folder")
    ap.add_argument("--no-loso", action="store_true", help="only the final model (no LOSO)")
    args = ap.parse_args()
    try:
        print(json.dumps(train(args.out, args.epochs, args.seed, args.data_root, not args.no_loso)))
    except FileNotFoundError as exc:
        sys.exit(f"video_fall_cnnlstm: {exc}")


if __name__ == "__main__":
    main()
