"""An LSTM wrist fall detector over 3 s windows of watch accelerometer + gyroscope (T=60, 6).

    python -m models.wrist_fall_lstm       # retrains models/weights/wrist_fall_lstm.keras

Data: the real WISDM 2019 smartwatch streams of subjects 1600-1605 (18 daily activities each),
accelerometer and gyroscope aligned and resampled to 20 Hz by the agent's own IMU source
functions (edge_agent.sources.imu: read_track, pair_runs). Train subjects
1600-1603, validation subjects 1604-1605. There are no real wrist falls: the "fall" windows
are SIMULATED by models.fall_sim on top of the same subjects' real streams; every number on
them is a number on simulated falls. Real windows are all labelled "no_fall" (daily
activities); false alarms per hour are counted on the validation subjects' whole real streams.

Windows: 60 samples (3 s) every 10 (0.5 s). A simulated fall window holds the impact at 35-75%
of the window (free fall before it, impact, then lying or getting up). Deterministic on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.spec import ZooModel

__all__ = ["CLASS_NAMES", "DATA", "POSITIVE", "SPEC", "WEIGHTS", "build", "train"]

_HERE = Path(__file__).parent
DATA = _HERE / "data" / "wrist_fall_lstm.npz"
WEIGHTS = _HERE / "weights" / "wrist_fall_lstm.keras"
# the val subjects' whole real streams (no falls), for false alarms per hour (write_streams)
DEFAULT_ROOT = _HERE.parent.parent / "shared" / "data"
CLASS_NAMES = ["no_fall", "fall"]
POSITIVE = "fall"
TRAIN_SUBJECTS = (1600, 1601, 1602, 1603)
VAL_SUBJECTS = (1604, 1605)
RATE_HZ, LENGTH, HOP = 20.0, 60, 10
GAP_PERIODS = 5.0  # a step of more than 5 periods is a gap (the IMU source's default)
# fixed physical scales: accelerometer in g (m/s^2 / 9.81), gyroscope in rad/s
MEAN = [0.0] * 6
STD = [9.81, 9.81, 9.81, 1.0, 1.0, 1.0]
FALL_RULE = {"name": "fall", "label": POSITIVE, "on": 0.5, "off": 0.3, "min_windows": 2}
FALL_RULE |= {"refractory_s": 10.0, "severity": "critical"}

STREAMS = [_HERE / "data" / f"wrist_fall_lstm_real_{s}.npz" for s in (1604, 1605)]

SPEC = ZooModel(
    name="wrist_fall_lstm",
    family="LSTM",
    task="classification",
    summary="wrist falls: LSTM over 3 s of watch accel+gyro (WISDM 2019 + simulated falls)",
    data=DATA,
    data_kind="real + simulated",
    split=(
        "by subject: train 1600-1603, val 1604-1605; val falls are simulated (val_simulated), "
        "val no-fall windows are real daily activities; fall events over the val subjects' "
        "whole real streams (no falls in them): false alarms of real daily activity"
    ),
    weights=WEIGHTS,
    convert={
        "preprocess": {"kind": "mean_std", "mean": MEAN, "std": STD},
        "labels": CLASS_NAMES,
        "positive_label": POSITIVE,
        "calib_split": "calib",
        "eval_split": "val",
        "window": {"length": LENGTH, "hop": HOP, "rate_hz": RATE_HZ, "label": "max"},
        "events": [FALL_RULE],
        # real daily activity only: the converter's false alarms per hour (no falls in them)
        "streams": STREAMS,
        "budget": {"auc": 0.005},
    },
    anchor="seed system's wrist LSTM: sensitivity 93.14%, specificity 98.9%",
    stream="imu (wrist accelerometer + gyroscope files, `gyro` set; or a live feed)",
)


def _files(root: Path, subject: int) -> tuple[Path, Path]:
    d = root / "wearable" / "wisdm2019_watch"
    return d / f"data_{subject}_accel_watch.txt.gz", d / f"data_{subject}_gyro_watch.txt.gz"


@dataclass(frozen=True)
class Run:
    """A stretch of both streams on one 20 Hz clock (as the agent's IMU source makes it)."""

    t: np.ndarray  # (n,) seconds
    v: np.ndarray  # (n, 6) ax, ay, az, gx, gy, gz
    act: list[str]


def pair_files(accel: Path, gyro: Path) -> list[Run]:
    """The two files' runs at 20 Hz, made by the agent's own IMU rules
    (edge_agent.sources.imu: read_track, pair_runs); the problems the files hold (malformed
    lines, gaps) are counted and told as the agent tells them."""
    import gzip
    import logging

    from edge_agent.sources.base import Problems
    from edge_agent.sources.imu import pair_runs, read_track

    tracks = []
    for path in (accel, gyro):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            problems = Problems(path.name, logging.getLogger("medge.models.wrist_fall_lstm"))
            tracks.append(read_track(f, problems, RATE_HZ, GAP_PERIODS))
    return [Run(r.t, r.v, r.act) for r in pair_runs(*tracks, RATE_HZ)]


def load_subject(root: Path, subject: int) -> list[Run]:
    """The subject's paired runs at 20 Hz."""
    return pair_files(*_files(root, subject))


def real_windows(runs: list[Run], hop: int = HOP) -> tuple[np.ndarray, list[str]]:
    """Every (60, 6) window of the runs, one every ``hop``; and each window's activity."""
    xs, acts = [], []
    for run in runs:
        for s in range(0, len(run.t) - LENGTH + 1, hop):
            xs.append(run.v[s : s + LENGTH])
            acts.append(run.act[s + LENGTH - 1])
    return np.stack(xs).astype(np.float32), acts


def fall_windows(runs: list[Run], n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` simulated fall windows on random places of the real runs (models.fall_sim)."""
    from models.fall_sim import simulate_fall

    long = [r for r in runs if len(r.t) >= 3 * LENGTH]
    out: list[np.ndarray] = []
    while len(out) < n:
        run = long[int(rng.integers(len(long)))]
        at = int(rng.integers(LENGTH, len(run.t) - LENGTH))
        sig, impact, _ = simulate_fall(
            run.v[at - LENGTH : at], rng, post=run.v[at:], rate_hz=RATE_HZ
        )
        start = impact - int(rng.integers(int(0.35 * LENGTH), int(0.75 * LENGTH) + 1))
        if start + LENGTH <= len(sig):
            out.append(sig[start : start + LENGTH])
    return np.stack(out).astype(np.float32)


def build(batch: int | None = None) -> Any:
    import keras
    from keras import layers

    inp = keras.Input((LENGTH, 6), batch_size=batch, name="imu")
    x = layers.LSTM(24, name="lstm")(inp)
    x = layers.Dense(16, activation="relu", name="hidden")(x)
    out = layers.Dense(2, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name="wrist_fall_lstm")


def _norm(x: np.ndarray) -> np.ndarray:
    return ((x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)).astype(np.float32)


def event_starts(
    times: np.ndarray, scores: np.ndarray, rule: dict[str, Any] = FALL_RULE
) -> list[int]:
    """The windows at which the agent's event tracker (edge_agent.events.EventTracker),
    fed these window times and positive-class scores, starts an event."""
    from edge_agent.bundle import EventRule
    from edge_agent.events import EventTracker

    tracker = EventTracker([EventRule(**rule)], CLASS_NAMES)
    return [
        k
        for k, (t, p) in enumerate(zip(times.tolist(), np.asarray(scores).tolist(), strict=True))
        for e in tracker.update(t, [1.0 - p, p], str(k))
        if e["state"] == "start"
    ]


def false_alarms(runs: list[Run], scores: Any) -> tuple[int, float, list[str]]:
    """(fall events, hours, the activity at each) on real streams that hold no fall, where
    ``scores(x)`` gives (n, 2) class scores of raw windows: every event is a false alarm. Each
    run (a stretch between gaps) is one stream."""
    events, hours, where = 0, 0.0, list[str]()
    for run in runs:
        hours += len(run.t) / RATE_HZ / 3600
        if len(run.t) < LENGTH:
            continue
        x, acts = real_windows([run])
        p = np.asarray(scores(x))[:, 1]
        times = run.t[np.arange(len(x)) * HOP + LENGTH - 1]
        at = event_starts(times, p)
        events += len(at)
        where += [acts[k] for k in at]
    return events, hours, where


def bundle_scores(bundle_dir: Path) -> Any:
    """``scores(x)`` of a converted bundle's int8 LiteRT artifact (``model_int8.tflite``),
    with the bundle's preprocessing and the artifact's input and output quantization."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(bundle_dir / "model_int8.tflite"))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]

    def run(w: np.ndarray) -> np.ndarray:
        x = _norm(w)[None]
        scale, zero = inp["quantization"]
        if scale:
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        interp.set_tensor(inp["index"], x.astype(inp["dtype"]))
        interp.invoke()
        y = interp.get_tensor(out["index"]).reshape(-1).astype(np.float32)
        scale, zero = out["quantization"]
        return (y - zero) * scale if scale else y

    return lambda x: np.stack([run(w) for w in x])


def val_false_alarms(scores: Any, data_root: Path = DEFAULT_ROOT) -> dict[str, Any]:
    """False alarms per hour over the validation subjects' whole real streams."""
    fa, hours, where = 0, 0.0, list[str]()
    for s in VAL_SUBJECTS:
        e, h, w = false_alarms(load_subject(data_root, s), scores)
        fa, hours, where = fa + e, hours + h, where + w
    return {
        "val_false_alarms": fa,
        "val_real_hours": round(hours, 3),
        "val_false_alarms_per_hour": round(fa / hours, 3),
        "val_false_alarm_activities": "".join(sorted(where)),
    }


def train(
    out: Path = WEIGHTS, epochs: int = 12, seed: int = 0, data_root: Path = DEFAULT_ROOT
) -> dict[str, Any]:
    for s in (*TRAIN_SUBJECTS, *VAL_SUBJECTS):
        for f in _files(data_root, s):
            if not f.is_file():
                raise FileNotFoundError(f"missing data file {f}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    t_start = time.time()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(seed)
    runs = {s: load_subject(data_root, s) for s in (*TRAIN_SUBJECTS, *VAL_SUBJECTS)}

    xr = np.concatenate([real_windows(runs[s], hop=20)[0] for s in TRAIN_SUBJECTS])
    xf = np.concatenate([fall_windows(runs[s], 1000, rng) for s in TRAIN_SUBJECTS])
    x_train = np.concatenate([xr, xf])
    y_train = np.concatenate([np.zeros(len(xr)), np.ones(len(xf))]).astype("int64")
    model = build()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    class_weight = {0: 1.0, 1: float(len(xr) / len(xf)) / 2}
    model.fit(
        _norm(x_train), y_train, batch_size=64, epochs=epochs, shuffle=True,
        class_weight=class_weight, verbose=0,
    )  # fmt: skip

    # validation: real windows of the val subjects (a sample, for the committed npz) + simulated
    val_real, val_acts, val_subj = [], [], []
    for s in VAL_SUBJECTS:
        x, acts = real_windows(runs[s])
        pick = np.sort(rng.choice(len(x), 400, replace=False))
        val_real.append(x[pick])
        val_acts += [acts[i] for i in pick]
        val_subj += [s] * len(pick)
    val_fall = [fall_windows(runs[s], 200, rng) for s in VAL_SUBJECTS]
    x_val = np.concatenate([*val_real, *val_fall])
    sim = np.concatenate([np.zeros(800, bool), np.ones(400, bool)])
    y_val = sim.astype("int64")
    subj = np.array(val_subj + [s for s in VAL_SUBJECTS for _ in range(200)], "int16")
    calib_real = np.concatenate([real_windows(runs[s], hop=20)[0] for s in TRAIN_SUBJECTS])
    calib = np.concatenate([calib_real[rng.choice(len(calib_real), 150, replace=False)], xf[:50]])

    pred = model.predict(_norm(x_val), verbose=0, batch_size=256).argmax(1)
    sens = float((pred[sim] == 1).mean())
    spec = float((pred[~sim] == 0).mean())

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict(_norm(x), verbose=0, batch_size=512))

    all_real = np.concatenate([real_windows(runs[s])[0] for s in VAL_SUBJECTS])
    spec_all = float((predict(all_real).argmax(1) == 0).mean())

    one = keras.Input(batch_shape=(1, LENGTH, 6), name="imu")
    x = one
    for layer in model.layers[1:]:
        x = layer(x)
    batch1 = keras.Model(one, x, name="wrist_fall_lstm")
    out.parent.mkdir(parents=True, exist_ok=True)
    batch1.save(out, include_optimizer=False) if _accepts_optimizer_flag() else batch1.save(out)
    DATA.parent.mkdir(parents=True, exist_ok=True)
    r2 = lambda a: np.round(a, 2).astype("float32")  # noqa: E731 (0.01 units: compresses)
    np.savez_compressed(
        DATA,
        labels=np.array(CLASS_NAMES),
        calib_images=r2(calib),
        calib_labels=np.concatenate([np.zeros(150), np.ones(50)]).astype("int64"),
        train_subjects=np.array(TRAIN_SUBJECTS, "int16"),
        val_images=r2(x_val),
        val_labels=y_val,
        val_simulated=sim,
        val_subject=subj,
        val_activity=np.array([*val_acts, *["fall"] * 400]),
    )
    return {
        "val_sensitivity_simulated_falls": sens,
        "val_specificity_real_sampled_800": spec,
        "val_specificity_real_all_windows": spec_all,
        "val_real_windows_all": len(all_real),
        **val_false_alarms(predict, data_root),
        "train_windows_real": len(xr),
        "train_windows_simulated": len(xf),
        "params": int(model.count_params()),
        "train_seconds": round(time.time() - t_start, 1),
    }


def _accepts_optimizer_flag() -> bool:
    import inspect

    import keras

    return "include_optimizer" in inspect.signature(keras.Model.save).parameters


def write_streams(data_root: Path = DEFAULT_ROOT) -> list[Path]:
    """The val subjects' whole real streams as converter recordings (docs/convert.md): both
    sensors on one 20 Hz clock, (T, 6), stored as float16 (about 0.01 m/s^2 and rad/s
    resolution) to stay small; a NaN sample between runs marks each gap, so no window spans
    one (the converter skips and counts windows with a non-finite sample); no events."""
    for subject, out in zip(VAL_SUBJECTS, STREAMS, strict=True):
        parts: list[np.ndarray] = []
        for run in load_subject(data_root, subject):
            parts += [run.v.astype(np.float32), np.full((1, 6), np.nan, np.float32)]
        np.savez_compressed(
            out,
            signal=np.concatenate(parts).astype(np.float16),
            rate_hz=np.float64(RATE_HZ),
            events=np.zeros((0, 2)),
        )
    return STREAMS


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the wrist fall LSTM of the medge zoo.")
    ap.add_argument("--out", type=Path, default=WEIGHTS, help="where to write the .keras file")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", type=Path, default=DEFAULT_ROOT, help="the shared data folder")
    ap.add_argument(
        "--false-alarms",
        type=Path,
        metavar="BUNDLE",
        help="only count false alarms per hour of a converted bundle (int8, LiteRT) on the "
        "validation subjects' real streams",
    )
    ap.add_argument(
        "--streams",
        action="store_true",
        help="only (re)write the val subjects' real streams (models/data/wrist_fall_lstm_real_*)",
    )
    args = ap.parse_args()
    try:
        if args.streams:
            print(json.dumps([str(p) for p in write_streams(args.data_root)]))
            return
        if args.false_alarms is not None:
            scores = bundle_scores(args.false_alarms)
            print(json.dumps(val_false_alarms(scores, args.data_root)))
            return
        print(json.dumps(train(args.out, args.epochs, args.seed, args.data_root)))
    except FileNotFoundError as exc:
        sys.exit(f"wrist_fall_lstm: {exc}")


if __name__ == "__main__":
    main()
