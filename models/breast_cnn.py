"""A small CNN for BreastMNIST breast ultrasound (28x28 grey): malignant vs normal/benign.

    python -m models.breast_cnn            # retrains models/weights/breast_cnn.keras

Deterministic on CPU (seeded, deterministic ops). The global-average-pooling head keeps the
model small and lets a class-activation map be read from its last convolution later.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from models.gap_cnn import gap_cnn
from models.spec import ZooModel

__all__ = ["CLASS_NAMES", "DATA", "POSITIVE", "SPEC", "WEIGHTS", "build", "train"]

_HERE = Path(__file__).parent

DATA = _HERE / "data" / "breastmnist_dev.npz"
WEIGHTS = _HERE / "weights" / "breast_cnn.keras"
# BreastMNIST: 0 = malignant, 1 = normal/benign. The clinically positive finding is malignant.
CLASS_NAMES = ["malignant", "benign"]
POSITIVE = "malignant"

SPEC = ZooModel(
    name="breast_cnn",
    family="CNN",
    task="classification",
    summary="breast ultrasound (BreastMNIST 28x28): malignant vs normal/benign",
    data=DATA,
    data_kind="real",
    split="MedMNIST v2 official train (546) / val (78)",
    weights=WEIGHTS,
    convert={
        "preprocess": {"kind": "scale01"},
        "labels": CLASS_NAMES,
        "positive_label": POSITIVE,
        "calib_split": "train",
        "eval_split": "val",
        "cam": True,
        "budget": {"auc": 0.005},
    },
    anchor="MedMNIST v2 BreastMNIST test AUC: ResNet-18 (28) 0.901, AutoML Vision 0.919",
    stream="images (a folder of ultrasound frames, or DICOM)",
)


def build() -> Any:
    return gap_cnn("breast_cnn")


def train(out: Path = WEIGHTS, epochs: int = 60, seed: int = 0) -> dict[str, float]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    with np.load(DATA) as d:
        x_train = d["train_images"][..., None].astype("float32") / 255.0
        y_train = d["train_labels"].astype("int64")
        x_val = d["val_images"][..., None].astype("float32") / 255.0
        y_val = d["val_labels"].astype("int64")
    # Flip and shift augmentation: ultrasound has no canonical left/right.
    aug = keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomTranslation(0.1, 0.1, seed=seed),
        ]
    )
    model = build()
    inp = keras.Input((28, 28, 1))
    trainer = keras.Model(inp, model(aug(inp)))
    trainer.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    counts = np.bincount(y_train, minlength=2)
    class_weight = {i: float(len(y_train) / (2 * c)) for i, c in enumerate(counts)}
    trainer.fit(
        x_train,
        y_train,
        batch_size=32,
        epochs=epochs,
        shuffle=True,
        class_weight=class_weight,
        verbose=0,
        callbacks=[keras.callbacks.ReduceLROnPlateau("loss", factor=0.5, patience=6)],
    )
    probs = model.predict(x_val, verbose=0)
    acc = float((probs.argmax(1) == y_val).mean())
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    return {"val_accuracy": acc, "params": float(model.count_params())}


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the BreastMNIST CNN of the medge zoo.")
    ap.add_argument("--out", type=Path, default=WEIGHTS, help="where to write the .keras file")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(train(args.out, args.epochs, args.seed)))


if __name__ == "__main__":
    main()
