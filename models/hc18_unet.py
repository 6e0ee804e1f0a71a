"""A small U-Net segmenting the fetal head in HC18 ultrasound, at half resolution (88x128 grey).

    python -m models.hc18_unet             # retrains models/weights/hc18_unet.keras
                                           # and rewrites models/data/hc18_unet.npz

Training reads ``segmentation/hc18_dev.npz`` from ``--data-root`` (default: the repo's
../shared/data): 250 train and 50 val images (176x256, one per exam, train and val from different
exams). Images and masks are halved to 88x128 by 2x2 averaging (masks: foreground where at least
half the block is), ``pixel_mm`` doubled. The head circumference is read off a mask as
edge_agent.measure does (an ellipse fitted to the largest component's outline, Ramanujan's
perimeter, times ``pixel_mm``): the conversion report scores it (``hc_mae_mm``), training
reports the val Dice only. ``CALIB_N`` seeded train images are the int8 calibration split
of the committed npz (they are trained on too: calibration needs no held-out data); the val split
is the evaluation split, whole; nothing is tuned on it.

Deterministic on CPU (seeded, deterministic ops).
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
    "CALIB_N",
    "DATA",
    "FILTERS",
    "RAW",
    "SHAPE",
    "SPEC",
    "WEIGHTS",
    "build",
    "calib_indices",
    "halve",
    "train",
    "write_data",
]

_HERE = Path(__file__).parent

DATA = _HERE / "data" / "hc18_unet.npz"
WEIGHTS = _HERE / "weights" / "hc18_unet.keras"
DEFAULT_ROOT = _HERE.parent.parent / "shared" / "data"
RAW = Path("segmentation") / "hc18_dev.npz"  # under the data root
SHAPE = (88, 128)  # model input (H, W): half of the 176x256 frames
FILTERS = (8, 16, 32, 64)  # per level; the last is the bottleneck
CALIB_N = 100  # train images in the committed npz's calibration split

SPEC = ZooModel(
    name="hc18_unet",
    family="U-Net",
    task="segmentation",
    summary="fetal head in ultrasound (HC18, 88x128): mask and head circumference in mm",
    data=DATA,
    data_kind="real",
    split="HC18 training set, one image per exam: 250 train / 50 val from different exams",
    weights=WEIGHTS,
    convert={
        "preprocess": {"kind": "scale01"},
        "labels": ["background", "fetal head"],
        "activation": "sigmoid",
        "calib_split": "calib",
        "eval_split": "val",
        "budget": {"dice": 0.01},
    },
    anchor=(
        "HC18 challenge (test set, full resolution): best entries about 2 mm HC MAE, Dice about "
        "0.97 (van den Heuvel et al. 2018; hc18.grand-challenge.org)"
    ),
    stream="images (ultrasound frames, or DICOM)",
)


def halve(images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2H, 2W) uint8 images and 0/1 masks -> (N, H, W): 2x2 means (rounded), masks
    foreground where at least half of the block is."""
    n, h, w = images.shape
    img = images.reshape(n, h // 2, 2, w // 2, 2).astype(np.float32).mean((2, 4))
    msk = masks.reshape(n, h // 2, 2, w // 2, 2).astype(np.float32).mean((2, 4)) >= 0.5
    return np.rint(img).astype(np.uint8), msk.astype(np.uint8)


def calib_indices(n_train: int, n: int = CALIB_N, seed: int = 0) -> np.ndarray:
    """``n`` train indices drawn without replacement, sorted."""
    return np.sort(np.random.default_rng(seed).choice(n_train, size=n, replace=False))


def build():  # type: ignore[no-untyped-def]
    import keras
    from keras import layers

    def block(x, filters: int):  # type: ignore[no-untyped-def]
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
        return x

    inp = keras.Input((*SHAPE, 1), name="image")
    skips, x = [], inp
    for filters in FILTERS[:-1]:
        x = block(x, filters)
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    x = block(x, FILTERS[-1])
    for filters, skip in zip(reversed(FILTERS[:-1]), reversed(skips), strict=True):
        x = layers.UpSampling2D()(x)
        x = layers.Concatenate()([x, skip])
        x = block(x, filters)
    out = layers.Conv2D(1, 1, activation="sigmoid", name="mask")(x)
    return keras.Model(inp, out, name="hc18_unet")


def _load_raw(root: Path) -> dict[str, np.ndarray]:
    path = root / RAW
    if not path.is_file():
        sys.exit(f"hc18_unet: {path} is missing (HC18; see ../shared/data/README.md)")
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def write_data(raw: dict[str, np.ndarray], out: Path = DATA, seed: int = 0) -> None:
    """The committed npz from the raw HC18 arrays: the val split whole and ``CALIB_N`` seeded
    train images as ``calib``, halved to 88x128 with ``pixel_mm`` doubled."""
    x_tr, m_tr = halve(raw["train_images"], raw["train_masks"])
    x_val, m_val = halve(raw["val_images"], raw["val_masks"])
    cal = calib_indices(len(x_tr), CALIB_N, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        calib_images=x_tr[cal],
        calib_masks=m_tr[cal],
        calib_ids=raw["train_ids"][cal],
        calib_pixel_mm=(raw["train_pixel_mm"][cal] * 2).astype(np.float32),
        calib_hc_mm=raw["train_hc_mm"][cal],
        val_images=x_val,
        val_masks=m_val,
        val_ids=raw["val_ids"],
        val_pixel_mm=(raw["val_pixel_mm"] * 2).astype(np.float32),
        val_hc_mm=raw["val_hc_mm"],
    )


def _dice_bce(y, p):  # type: ignore[no-untyped-def]
    import keras
    from keras import ops

    bce = keras.losses.binary_crossentropy(y, p)
    inter = ops.sum(y * p, axis=(1, 2, 3))
    dice = (2 * inter + 1) / (ops.sum(y, axis=(1, 2, 3)) + ops.sum(p, axis=(1, 2, 3)) + 1)
    return ops.mean(bce, axis=(1, 2)) + 1 - dice


def train(
    out: Path = WEIGHTS,
    epochs: int = 40,
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
    x_tr, m_tr = halve(raw["train_images"], raw["train_masks"])
    x_val, m_val = halve(raw["val_images"], raw["val_masks"])

    # The same flip and shift for an image and its mask: they travel as two channels. A
    # horizontal flip only (the probe is at the top of the frame).
    aug = keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomTranslation(
                0.08, 0.08, fill_mode="constant", interpolation="nearest", seed=seed
            ),
        ]
    )
    both = np.stack([x_tr / np.float32(255), m_tr.astype(np.float32)], -1)
    ds = (
        tf.data.Dataset.from_tensor_slices(both)
        .shuffle(len(both), seed=seed)
        .batch(16)
        .map(lambda b: aug(b, training=True))
        .map(lambda b: (b[..., :1], b[..., 1:]))
    )
    model = build()
    steps = epochs * int(np.ceil(len(both) / 16))
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, steps)),
        loss=_dice_bce,
    )
    model.fit(ds, epochs=epochs, verbose=0)

    prob = model.predict(x_val[..., None] / np.float32(255), verbose=0)[..., 0]
    pred = prob >= 0.5
    truth = m_val.astype(bool)
    inter = (pred & truth).sum((1, 2))
    dice = 2 * inter / np.maximum(pred.sum((1, 2)) + truth.sum((1, 2)), 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    bare = build()  # never compiled: the file holds no optimizer state
    bare.set_weights(model.get_weights())
    bare.save(out)
    write_data(raw, data_out, seed)
    return {
        "val_dice": float(dice.mean()),
        "params": float(model.count_params()),
        "train_seconds": round(time.monotonic() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the HC18 fetal head U-Net of the medge zoo.")
    ap.add_argument("--out", type=Path, default=WEIGHTS, help="where to write the .keras file")
    ap.add_argument("--data-root", type=Path, default=DEFAULT_ROOT, help="../shared/data")
    ap.add_argument("--data-out", type=Path, default=DATA, help="where to write the npz")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(train(args.out, args.epochs, args.seed, args.data_root, args.data_out)))


if __name__ == "__main__":
    main()
