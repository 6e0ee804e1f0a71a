"""A small 1-D CNN + GRU that tells PVC beats (V) from every other beat (N) on one ECG lead.

    python -m models.ecg_gru            # rebuilds models/data/ecg_gru*.npz, retrains the weights

Inter-patient: trained on whole MIT-BIH records, evaluated on other whole records (never split
by beat). Each input is one beat with its context: 540 samples of lead 0 (MLII) at 360 Hz from
R-270 to R+270 (0.75 s each side, so the neighbouring beats and their timing are mostly in view),
z-scored per window on the device (the bundle's ``preprocess: zscore`` and ``window``). Two
strided convolutions and a pooling bring the window to 33 steps for a GRU(24) (unrolled, so
every LiteRT rung converts it); deterministic on CPU.

Train records 100 102 104 105 108 114 121 (109 PVCs); validation records 106 and 123 (523 PVCs,
96 runs of >= 2 PVCs, all in 106). Record 106 is the only one of the nine with PVC runs, so the
run events can only be scored there; its PVCs are never seen in training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from models.spec import ZooModel

__all__ = [
    "BEFORE",
    "CLASS_NAMES",
    "DATA",
    "FS",
    "LENGTH",
    "POSITIVE",
    "SPEC",
    "STREAM",
    "TRAIN_RECORDS",
    "VAL_RECORDS",
    "WEIGHTS",
    "beat_windows",
    "build",
    "derive",
    "train",
]

_HERE = Path(__file__).parent

DATA = _HERE / "data" / "ecg_gru.npz"
STREAM = _HERE / "data" / "ecg_gru_106_stream.npz"  # 10 min of record 106 as a recording
WEIGHTS = _HERE / "weights" / "ecg_gru.keras"
DEFAULT_ROOT = _HERE.parent.parent / "shared" / "data"

CLASS_NAMES = ["N", "V"]  # N: every non-PVC beat; V: premature ventricular contraction
POSITIVE = "V"
FS = 360
LENGTH, BEFORE = 540, 270  # R-270 .. R+270 samples (0.75 s each side)
TRAIN_RECORDS = (100, 102, 104, 105, 108, 114, 121)
VAL_RECORDS = (106, 123)
STREAM_S = (1140.0, 1740.0)  # 19:00-29:00 of record 106: 600 s (see derive())
ADC_GAIN = 200.0  # MIT-BIH counts per mV: the committed windows are int16 counts
CALIB_N, CALIB_SEED = 300, 1  # calibration: every train PVC plus this many other train beats

SPEC = ZooModel(
    name="ecg_gru",
    family="CNN-GRU",
    task="classification",
    summary="ECG beats (MIT-BIH, lead MLII, 360 Hz): PVC (V) vs other (N), and PVC-run events",
    data=DATA,
    data_kind="real",
    split="by record: train 100 102 104 105 108 114 121 / val 106 123 (inter-patient)",
    weights=WEIGHTS,
    convert={
        "preprocess": {"kind": "zscore"},
        "labels": CLASS_NAMES,
        "positive_label": POSITIVE,
        "calib_split": "calib",
        "eval_split": "val",
        "window": {
            "length": LENGTH,
            "hop": 1,
            "rate_hz": FS,
            "centre": "beat",
            "before": BEFORE,
        },
        "events": [{"name": "pvc_run", "label": "V", "on": 0.5, "off": 0.5, "min_windows": 2}],
        "streams": [STREAM],
        "budget": {"auc": 0.005, "sensitivity": 0.02, "event_pvc_run_sensitivity": 0.05},
    },
    anchor="inter-patient PVC detection on MIT-BIH (de Chazal et al. 2004, DS1->DS2): "
    "V sensitivity 77.7%, PPV 81.9%",
    stream="ecg (an MIT-BIH style record or WFDB file; beats centred on R peaks)",
)


def _load(root: Path, rec: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = root / "ecg" / "mitbih" / f"{rec}.npz"
    if not path.is_file():
        sys.exit(f"ecg_gru: missing {path} (MIT-BIH subset; see ../shared/data/README.md)")
    with np.load(path) as d:
        return (
            np.asarray(d["signal"], np.float32),
            np.asarray(d["r_peaks"], np.int64),
            np.asarray(d["pvc_peaks"], np.int64),
        )


def beat_windows(
    signal: np.ndarray, peaks: np.ndarray, shift: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(N, LENGTH) windows from R-BEFORE (plus ``shift``) and the peaks they were cut for;
    beats too near either end of the signal are left out, as the agent's ECG source does."""
    off = np.zeros(len(peaks), np.int64) if shift is None else shift
    starts = peaks - BEFORE + off
    keep = (starts >= 0) & (starts + LENGTH <= len(signal))
    idx = starts[keep][:, None] + np.arange(LENGTH)[None, :]
    return signal[idx], peaks[keep]


def _record_beats(root: Path, rec: int) -> tuple[np.ndarray, np.ndarray]:
    sig, peaks, pvc = _load(root, rec)
    x, kept = beat_windows(sig, peaks)
    return x, np.isin(kept, pvc).astype(np.int64)


def derive(root: Path = DEFAULT_ROOT, out: Path = DATA, stream: Path = STREAM) -> dict[str, int]:
    """The committed data: every beat of the val records (val_*), a calibration subset of the
    train records (calib_*: all their PVCs and CALIB_N other beats, seeded), windows as int16
    ADC counts (mV * 200; the device's z-score makes the unit immaterial), and 10 min of
    record 106 as a stream recording that is also an ECG source record (signal in mV, fs,
    r_peaks, pvc_peaks; each run of >= 2 PVCs an event). The 19:00-29:00 excerpt was picked
    by the annotations alone: the 10 min with the most runs."""
    vx, vy, vr = [], [], []
    for rec in VAL_RECORDS:
        x, y = _record_beats(root, rec)
        vx.append(x), vy.append(y), vr.append(np.full(len(y), rec))
    cx, cy, cr = [], [], []
    for rec in TRAIN_RECORDS:
        x, y = _record_beats(root, rec)
        cx.append(x), cy.append(y), cr.append(np.full(len(y), rec))
    tx, ty, tr = np.concatenate(cx), np.concatenate(cy), np.concatenate(cr)
    rng = np.random.default_rng(CALIB_SEED)
    other = rng.choice(np.flatnonzero(ty == 0), CALIB_N, replace=False)
    pick = np.sort(np.concatenate([np.flatnonzero(ty == 1), other]))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        calib_images=_counts(tx[pick])[..., None],
        calib_labels=ty[pick],
        calib_record=tr[pick],
        val_images=_counts(np.concatenate(vx))[..., None],
        val_labels=np.concatenate(vy),
        val_record=np.concatenate(vr),
        labels=np.array(CLASS_NAMES),
        adc_gain=np.float32(ADC_GAIN),
    )
    sig, peaks, pvc = _load(root, 106)
    a, b = int(STREAM_S[0] * FS), int(STREAM_S[1] * FS)
    inside = peaks[(peaks >= a) & (peaks < b)]
    runs = _runs(inside.tolist(), set(pvc.tolist()))
    events = np.array([((r[0] - a) / FS, (r[-1] - a) / FS) for r in runs]).reshape(-1, 2)
    np.savez_compressed(
        stream,
        signal=sig[a:b],
        fs=np.float64(FS),  # as the MIT-BIH npz: read by the ECG source and by stream_eval
        r_peaks=inside - a,
        pvc_peaks=np.intersect1d(pvc, inside) - a,
        events=events,
    )
    return {"val": int(sum(len(y) for y in vy)), "calib": len(pick), "stream_events": len(runs)}


def _counts(mv: np.ndarray) -> np.ndarray:
    """mV as the record's ADC counts (int16, exact: MIT-BIH stores counts / 200): a third
    smaller compressed, and the same model input, since each window is z-scored."""
    counts = np.rint(mv * ADC_GAIN)
    assert np.abs(counts - mv * ADC_GAIN).max() < 1e-2, "signal is not counts / ADC_GAIN"
    return counts.astype(np.int16)


def _runs(peaks: list[int], pvc: set[int], least: int = 2) -> list[list[int]]:
    """Maximal runs of >= least consecutive PVC beats (as tests/mitbih_runs.py counts them)."""
    runs: list[list[int]] = []
    cur: list[int] = []
    for r in [*peaks, -1]:
        if r in pvc:
            cur.append(r)
            continue
        if len(cur) >= least:
            runs.append(cur)
        cur = []
    return runs


def _zscore(x: np.ndarray) -> np.ndarray:
    m = x.mean(axis=1, keepdims=True)
    s = x.std(axis=1, keepdims=True)
    return ((x - m) / (s + np.float32(1e-6))).astype(np.float32)


def _training_set(root: Path, seed: int, copies: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Train-record beats, z-scored: every non-PVC beat once (shifted up to +-4 samples) and
    every PVC ``copies`` times, each copy shifted (+-8), half of them in a made-up couplet
    (:func:`_couplets`), scaled, with noise and baseline drift."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for rec in TRAIN_RECORDS:
        sig, peaks, pvc = _load(root, rec)
        is_v = np.isin(peaks, pvc)
        n = peaks[~is_v]
        x, _ = beat_windows(sig, n, rng.integers(-4, 5, len(n)))
        xs.append(x), ys.append(np.zeros(len(x), np.int64))
        v = np.repeat(peaks[is_v], copies)
        x, _ = beat_windows(sig, v, rng.integers(-8, 9, len(v)))
        x = _couplets(sig, x, peaks[is_v], rng)
        t = np.linspace(0.0, 1.0, LENGTH, dtype=np.float32)[None, :]
        drift = rng.normal(0, 0.1, (len(x), 1)).astype(np.float32) * t
        x = x * rng.uniform(0.7, 1.4, (len(x), 1)).astype(np.float32) + drift
        x = x + rng.normal(0, 0.02, x.shape).astype(np.float32)
        xs.append(x), ys.append(np.ones(len(x), np.int64))
    return _zscore(np.concatenate(xs))[..., None], np.concatenate(ys)


def _couplets(
    sig: np.ndarray, x: np.ndarray, pvc: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Half the PVC windows given a second PVC as neighbour: the training records hold one
    couplet in all, so without this the model would only know PVCs between normal beats.
    The signal from 60 samples before another PVC of the record (its R 140-230 samples,
    0.39-0.64 s, after the centre) replaces the window's rest, or the signal up to 120 samples
    after one (that far before the centre) its start; shifted to meet the window's level."""
    ok = pvc[(pvc >= 2 * LENGTH) & (pvc + 2 * LENGTH <= len(sig))]
    out = x.copy()
    if len(ok) == 0:
        return out
    for i in np.flatnonzero(rng.random(len(x)) < 0.5):
        v, d = int(rng.choice(ok)), int(rng.integers(140, 231))
        w = out[i]
        if rng.random() < 0.5:  # the centre PVC is the first of the two
            j = BEFORE + d - 60
            seg = sig[v - 60 : v - 60 + LENGTH - j]
            w[j:] = seg + (w[j - 1] - sig[v - 61])
        else:  # the second
            j = BEFORE - d + 120
            seg = sig[v - (BEFORE - d) : v - (BEFORE - d) + j]
            w[:j] = seg + (w[j] - sig[v - (BEFORE - d) + j])
    return out


def build():  # type: ignore[no-untyped-def]
    import keras
    from keras import layers

    inp = keras.Input((LENGTH, 1), name="beat")
    x = layers.Conv1D(16, 7, strides=2, padding="same", activation="relu")(inp)  # 130
    x = layers.Conv1D(24, 5, strides=2, padding="same", activation="relu")(x)  # 135
    x = layers.MaxPooling1D(4)(x)  # 33
    x = layers.GRU(24, unroll=True, name="gru")(x)  # unrolled: no WHILE loop to convert
    x = layers.Dropout(0.2)(x)
    out = layers.Dense(2, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name="ecg_gru")


def train(
    out: Path = WEIGHTS, epochs: int = 12, seed: int = 0, root: Path = DEFAULT_ROOT
) -> dict[str, float]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    t0 = time.monotonic()
    x, y = _training_set(root, seed)
    model = build()
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    counts = np.bincount(y, minlength=2)
    class_weight = {i: float(len(y) / (2 * c)) for i, c in enumerate(counts)}
    model.fit(
        x,
        y,
        batch_size=64,
        epochs=epochs,
        shuffle=True,
        class_weight=class_weight,
        verbose=2,
    )
    with np.load(DATA) as d:
        xv = _zscore(d["val_images"][..., 0].astype(np.float32))[..., None]
        yv = d["val_labels"]
    pv = model.predict(xv, batch_size=256, verbose=0)[:, 1] >= 0.5
    tp = int((pv & (yv == 1)).sum())
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out, include_optimizer=False)
    return {
        "train_windows": float(len(y)),
        "train_pvc_windows": float(counts[1]),
        "val_pvc_sensitivity": tp / max(int((yv == 1).sum()), 1),
        "val_pvc_ppv": tp / max(int(pv.sum()), 1),
        "params": float(model.count_params()),
        "train_s": round(time.monotonic() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the ECG PVC CNN-GRU of the medge zoo.")
    ap.add_argument("--data-root", type=Path, default=DEFAULT_ROOT, help="../shared/data")
    ap.add_argument("--out", type=Path, default=WEIGHTS, help="where to write the .keras file")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(derive(args.data_root)))
    print(json.dumps(train(args.out, args.epochs, args.seed, args.data_root)))


if __name__ == "__main__":
    main()
