"""A small CNN for PneumoniaMNIST paediatric chest X-ray (28x28 grey): pneumonia vs normal.

    python -m models.pneumonia_cnn         # retrains models/weights/pneumonia_cnn.keras
                                           # and rewrites models/data/pneumonia_cnn.npz

Training reads the MedMNIST v2 PneumoniaMNIST file from ``--data-root`` (default: the repo's
../shared/data). A seeded, class-stratified subset of the official train split (``CALIB_N``
images) is held out of gradient training: the softmax temperature is fitted on it (and folded
into the last Dense layer, so the saved model's probabilities are calibrated and int8 does not
saturate them at 1.0), and it is the int8 calibration set of the committed npz. The 8 train
images pixel-identical to val images are left out of both. The official val split is the
evaluation split, whole; nothing is tuned on it.

Deterministic on CPU (seeded, deterministic ops). The global-average-pooling head keeps the
model small and lets a class-activation map be read from its last convolution.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.gap_cnn import gap_cnn
from models.spec import ZooModel

__all__ = [
    "CALIB_N",
    "CLASS_NAMES",
    "DATA",
    "POSITIVE",
    "RAW",
    "SPEC",
    "WEIGHTS",
    "build",
    "calib_indices",
    "not_in_val",
    "train",
]

_HERE = Path(__file__).parent

DATA = _HERE / "data" / "pneumonia_cnn.npz"
WEIGHTS = _HERE / "weights" / "pneumonia_cnn.keras"
DEFAULT_ROOT = _HERE.parent.parent / "shared" / "data"
RAW = Path("images") / "pneumoniamnist_dev.npz"  # under the data root
# PneumoniaMNIST: 0 = normal, 1 = pneumonia. The clinically positive finding is pneumonia.
CLASS_NAMES = ["normal", "pneumonia"]
POSITIVE = "pneumonia"
CALIB_N = 500  # train-split images held out for temperature fitting and int8 calibration

SPEC = ZooModel(
    name="pneumonia_cnn",
    family="CNN",
    task="classification",
    summary="paediatric chest X-ray (PneumoniaMNIST 28x28): pneumonia vs normal",
    data=DATA,
    data_kind="real",
    split=(
        "MedMNIST v2 official train (4,690: 4,182 fit + 500 held out for temperature and int8 "
        "calibration; 8 exact duplicates of val images left out) / val (524); MedMNIST has no "
        "patient ids, so not checked by patient"
    ),
    weights=WEIGHTS,
    convert={
        "preprocess": {"kind": "scale01"},
        "labels": CLASS_NAMES,
        "positive_label": POSITIVE,
        "calib_split": "calib",
        "eval_split": "val",
        "cam": True,
        "budget": {"auc": 0.005},
    },
    anchor="MedMNIST v2 PneumoniaMNIST test AUC: ResNet-18 (28) 0.944, AutoML Vision 0.991",
    stream="images (a folder of X-ray frames, or DICOM)",
)


def build() -> Any:
    return gap_cnn("pneumonia_cnn")


def calib_indices(labels: np.ndarray, n: int = CALIB_N, seed: int = 0) -> np.ndarray:
    """``n`` train-split indices, stratified by class (the split's class ratio), sorted."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = round(n * len(idx) / len(labels))
        picked.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(picked))


def not_in_val(train_images: np.ndarray, val_images: np.ndarray) -> np.ndarray:
    """Indices of the train images that are not pixel-identical to a val image. (The official
    PneumoniaMNIST split has 8 such pairs, all pneumonia: they are left out of training and
    calibration, so no val image is trained on; val stays whole.)"""
    seen = {x.tobytes() for x in val_images}
    return np.array([i for i, x in enumerate(train_images) if x.tobytes() not in seen], int)


def _load_raw(root: Path) -> dict[str, np.ndarray]:
    path = root / RAW
    if not path.is_file():
        sys.exit(f"pneumonia_cnn: {path} is missing (PneumoniaMNIST; see ../shared/data/README.md)")
    with np.load(path) as d:
        return {k: d[k] for k in ("train_images", "train_labels", "val_images", "val_labels")}


def _fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of ``y`` (golden-section search
    over log T in [-3, 3])."""

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean())

    lo, hi = -3.0, 3.0
    g = (np.sqrt(5) - 1) / 2
    for _ in range(80):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC of scores ``s`` for binary labels ``y`` (ties counted half)."""
    pos, neg = s[y == 1], s[y == 0]
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(gt / (len(pos) * len(neg)))


def train(
    out: Path = WEIGHTS,
    epochs: int = 20,
    seed: int = 0,
    data_root: Path = DEFAULT_ROOT,
    data_out: Path = DATA,
) -> dict[str, float]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    raw = _load_raw(data_root)
    import keras
    import tensorflow as tf

    t0 = time.monotonic()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    y_all = raw["train_labels"].reshape(-1).astype("int64")
    pool = not_in_val(raw["train_images"], raw["val_images"])
    held = pool[calib_indices(y_all[pool], CALIB_N, seed)]
    fit = np.setdiff1d(pool, held)
    x_all = raw["train_images"][..., None].astype("float32") / 255.0
    x_fit, y_fit = x_all[fit], y_all[fit]
    x_cal, y_cal = x_all[held], y_all[held]
    x_val = raw["val_images"][..., None].astype("float32") / 255.0
    y_val = raw["val_labels"].reshape(-1).astype("int64")

    # Small shifts, rotations and zooms; no flip (a chest X-ray has a left and a right).
    aug = keras.Sequential(
        [
            keras.layers.RandomTranslation(0.08, 0.08, seed=seed),
            keras.layers.RandomRotation(0.03, seed=seed),
            keras.layers.RandomZoom(0.08, seed=seed),
        ]
    )
    model = build()
    inp = keras.Input((28, 28, 1))
    trainer = keras.Model(inp, model(aug(inp)))
    steps = epochs * int(np.ceil(len(y_fit) / 64))
    trainer.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, steps)),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    counts = np.bincount(y_fit, minlength=2)
    class_weight = {i: float(len(y_fit) / (2 * c)) for i, c in enumerate(counts)}
    trainer.fit(
        x_fit,
        y_fit,
        batch_size=64,
        epochs=epochs,
        shuffle=True,
        class_weight=class_weight,
        verbose=0,
    )

    # Temperature scaling on the held-out train images, folded into the softmax layer:
    # softmax((W x + b) / T) = softmax((W / T) x + b / T).
    head = model.get_layer("probs")
    logits_model = keras.Model(model.input, head.input)
    w, b = head.get_weights()
    feats = logits_model.predict(x_cal, verbose=0)
    temperature = _fit_temperature(feats @ w + b, y_cal)
    head.set_weights([w / temperature, b / temperature])

    probs = model.predict(x_val, verbose=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    data_out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        data_out,
        calib_images=raw["train_images"][held],
        calib_labels=y_all[held].astype("uint8"),
        calib_index=held.astype("int32"),
        val_images=raw["val_images"],
        val_labels=y_val.astype("uint8"),
    )
    return {
        "val_accuracy": float((probs.argmax(1) == y_val).mean()),
        "val_auc": _auc(y_val, probs[:, 1]),
        "temperature": temperature,
        "val_max_prob_over_0.996": float((probs.max(1) > 0.996).mean()),
        "params": float(model.count_params()),
        "train_fit": float(len(fit)),
        "train_left_out_as_val_duplicates": float(len(y_all) - len(pool)),
        "train_seconds": round(time.monotonic() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the PneumoniaMNIST CNN of the medge zoo.")
    ap.add_argument("--out", type=Path, default=WEIGHTS, help="where to write the .keras file")
    ap.add_argument("--data-root", type=Path, default=DEFAULT_ROOT, help="../shared/data")
    ap.add_argument("--data-out", type=Path, default=DATA, help="where to write the npz")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(train(args.out, args.epochs, args.seed, args.data_root, args.data_out)))


if __name__ == "__main__":
    main()
