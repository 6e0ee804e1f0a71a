"""Train the tiny models that tests/test_convert_recurrent.py, test_convert_tasks.py and
test_stream_eval.py convert, and write them with the data they are converted with into
tests/data/models/ (committed: the tests load these files and never train):

    .venv/bin/python tools/make_test_models.py [OUT_DIR]     # default: tests/data/models

Every npz has a ``calib`` split (the first CALIB = 100 of the samples the model was trained
on: the calibration set, the converter's minimum size) and a ``val`` split (held out, never
trained on: what the tests' thresholds are measured on). The training sets themselves are not
kept; this script makes them again from the seeds.

    imu.npz        synthetic 3-axis accelerometer windows, 32 steps at 20 Hz, labels
                   still/walk/fall; 480 trained on, calib 100, val 160
    lstm.keras     LSTM(8) -> Dense(3) on imu, saved with a static batch of one (the full-int8
                   converter then segfaults calibrating its WHILE loop)
    gru.keras      GRU(8) -> Dense(3) on imu
    bilstm.keras   Bidirectional(LSTM(8)) -> Dense(3) on imu; the one file kept exactly as
                   Keras writes it (optimizer state, members stored): its test compares the
                   int8 artifact's size with this file's
    clip.npz       synthetic clips, 4 frames of 16x16 uint8: a blob that stays, grows or
                   shrinks; 480 trained on, calib 100, val 160
    clip.keras     TimeDistributed(Conv2D(4) + GAP) -> LSTM(8) -> Dense(3) on clip
    image.npz      the first frames of clip.npz's clips: calib 100, val 20
    bicubic.keras  Resizing(8, 8, bicubic) -> Conv2D(4) -> GAP -> Dense(3), never trained: no
                   LiteRT kernel runs its op, so every strategy must fail and weights do not matter
    blobs.npz      simulated 32x32 images, 1-2 bright discs on noise: images (noisy uint8),
                   masks (bool), targets (clean float32); 192 trained on, calib 100, val 48
    unet.keras     a tiny U-Net (Conv 8 / pool / Conv 16 / up / concat / Conv 8 / 1x1
                   sigmoid), segmentation of blobs, 8 epochs
    denoise.keras  the same U-Net with a linear output, noisy -> clean blobs, 8 epochs
    beats.keras    Conv1D(8, 7, stride 2) -> MaxPool(4) -> Dense(5), 20 epochs on the real
                   MIT-BIH beats of tests/data/ecg_beats.npz (per-beat z-score), AAMI classes

All but the beats are synthetic, generated and trained as the tests did before they loaded
these files (the three IMU models now share one data set). Seeds are fixed (numpy default_rng;
keras.utils.set_random_seed before each group): on this TensorFlow the weights come out the
same on every run, the files' bytes differ only by Keras's save date. Other TensorFlow
versions may train slightly different weights; the tests need only the committed files, so
re-run this to change a model, then re-run those three test files (their thresholds were
checked against these exact files). Every .keras but bilstm.keras is saved without optimizer
state, its zip members deflated (the converter loads with compile=False).
"""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "models"
BEATS = ROOT / "tests" / "data" / "ecg_beats.npz"
LABELS = ["still", "walk", "fall"]
CALIB = 100  # calibration samples kept of those a model was trained on (the converter's minimum)
SIZE = 32  # blobs: image side


def recurrent_data(kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic, structured samples with labels 0..2 (no number here is about patients).

    ``imu``: 32 steps of a 3-axis accelerometer at 20 Hz (units of g): still (gravity on a
    random axis + noise), walking (plus a 1.5-2.5 Hz swing) or a fall (an impact spike, then
    gravity on another axis). ``clip``: 4 frames of 16x16 grey images with a bright blob
    that stays, grows or shrinks; ``image``: the first frame of a clip.
    """
    if kind == "image":
        x, y = recurrent_data("clip", n, rng)
        return x[:, 0], y
    y = rng.integers(0, 3, n)
    if kind == "imu":
        t = np.arange(32) / 20.0
        x = 0.05 * rng.normal(size=(n, 32, 3))
        x[:, :, 2] += 1.0  # upright: gravity on z
        for i, c in enumerate(y):
            if c == 1:
                f = rng.uniform(1.5, 2.5)
                x[i] += 0.5 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6, (3, 1))).T
            elif c == 2:
                hit = rng.integers(8, 20)
                x[i, hit:, 2] -= 1.0  # lying: gravity on x
                x[i, hit:, 0] += 1.0
                x[i, hit : hit + 2] += rng.uniform(2.0, 3.0, 3)
        return x.astype(np.float32), y
    yy, xx = np.mgrid[:16, :16]
    clips = np.zeros((n, 4, 16, 16), np.float32)
    for i, c in enumerate(y):
        cy, cx = rng.uniform(5, 11, 2)
        r = rng.uniform(2.5, 4.0)
        for f in range(4):
            rf = r * (1, 1.35, 0.7)[c] ** f
            clips[i, f] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rf**2))
    clips += 0.05 * rng.normal(size=clips.shape)
    return (255 * np.clip(clips, 0, 1)).astype(np.uint8)[..., None], y


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulated images: 1-2 bright discs on Gaussian noise; (noisy uint8, mask, clean float)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    clean = np.zeros((n, SIZE, SIZE), np.float32)
    for i in range(n):
        for _ in range(rng.integers(1, 3)):
            cy, cx = rng.uniform(6, SIZE - 6, 2)
            r = rng.uniform(3, 6)
            clean[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.uniform(0.6, 0.9)
    noisy = np.clip(clean + rng.normal(0.15, 0.08, clean.shape), 0, 1)
    return (noisy * 255).astype(np.uint8), clean > 0, clean


def _save_split(path: Path, x: np.ndarray, y: np.ndarray, n_val: int = 160) -> None:
    """calib = the first CALIB of the 480 training samples, val = the first n_val held out."""
    np.savez_compressed(
        path,
        calib_images=x[:CALIB],
        calib_labels=y[:CALIB],
        val_images=x[480 : 480 + n_val],
        val_labels=y[480 : 480 + n_val],
        labels=np.array(LABELS),
    )


def _save_model(model: Any, path: Path, as_keras_saves: bool = False) -> None:
    """The model without its optimizer state (the converter loads with compile=False), as a
    .keras zip whose members are deflated and dated 1980-01-01 (Keras stores them as they are:
    the weights' HDF5 padding is most of a tiny model's file). ``as_keras_saves``: the file
    exactly as ``model.save`` writes it, optimizer state and all, for a test that compares an
    artifact's size with the Keras file's."""
    import keras

    if as_keras_saves:
        model.save(path)
        return
    plain = keras.models.clone_model(model)
    plain.set_weights(model.get_weights())
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / path.name
        plain.save(saved)
        with zipfile.ZipFile(saved) as z:
            members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for name, data in members:
            z.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED, 9)


def recurrent(out: Path) -> None:
    """tests/test_convert_recurrent.py: lstm, gru, bilstm (one imu set), clip, bicubic."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = recurrent_data("imu", 640, rng)
    _save_split(out / "imu.npz", x, y)

    def fit(model: keras.Model, x: np.ndarray, y: np.ndarray, scale: float) -> keras.Model:
        model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
        model.fit(x[:480] / scale, y[:480], epochs=10, batch_size=32, verbose=0)
        return model

    def rnn(name: str, core: layers.Layer) -> keras.Model:
        inp = keras.Input((32, 3))
        model = keras.Model(inp, layers.Dense(3, activation="softmax")(core(inp)), name=name)
        return fit(model, x, y, 1.0)

    # The LSTM saved with a static batch of one (the trained layers on a batch-1 input): the
    # full-int8 converter then segfaults calibrating its WHILE loop.
    lstm = rnn("lstm", layers.LSTM(8))
    one = keras.Input(batch_shape=(1, 32, 3))
    batch1 = keras.Model(one, lstm.layers[-1](lstm.layers[-2](one)), name="lstm")
    _save_model(batch1, out / "lstm.keras")
    _save_model(rnn("gru", layers.GRU(8)), out / "gru.keras")
    # test_bidirectional_lstm_... checks int8 < 1/3 of the .keras file: keep Keras's own file
    bilstm = rnn("bilstm", layers.Bidirectional(layers.LSTM(8)))
    _save_model(bilstm, out / "bilstm.keras", as_keras_saves=True)

    cx, cy = recurrent_data("clip", 640, rng)
    _save_split(out / "clip.npz", cx, cy)
    inp = keras.Input((4, 16, 16, 1))
    h = layers.TimeDistributed(layers.Conv2D(4, 3, activation="relu"))(inp)
    h = layers.TimeDistributed(layers.GlobalAveragePooling2D())(h)
    clip = keras.Model(inp, layers.Dense(3, activation="softmax")(layers.LSTM(8)(h)), name="clip")
    _save_model(fit(clip, cx, cy, 255.0), out / "clip.keras")

    # A CNN whose bicubic resize has no LiteRT kernel at all: every strategy must fail (so it
    # is left untrained). Its data: the first frames of the clips.
    _save_split(out / "image.npz", cx[:, 0], cy, n_val=20)
    inp = keras.Input((16, 16, 1))
    h = layers.Resizing(8, 8, interpolation="bicubic")(inp)
    h = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3)(h))
    bicubic = keras.Model(inp, layers.Dense(3, activation="softmax")(h), name="bicubic")
    _save_model(bicubic, out / "bicubic.keras")


def tasks(out: Path) -> None:
    """tests/test_convert_tasks.py: a tiny U-Net (segmentation) and denoiser (image_to_image)."""
    import keras
    from keras import layers

    tx, tm, tc = blobs(192, 1)
    vx, vm, vc = blobs(48, 2)
    np.savez_compressed(
        out / "blobs.npz",
        calib_images=tx[:CALIB],
        calib_masks=tm[:CALIB],
        calib_targets=tc[:CALIB],
        val_images=vx,
        val_masks=vm,
        val_targets=vc,
    )
    for task, name in (("segmentation", "unet"), ("image_to_image", "denoise")):
        keras.utils.set_random_seed(0)
        x = tx[..., None].astype("float32") / 255.0
        y = (tm if task == "segmentation" else tc)[..., None].astype("float32")
        inp = keras.Input((32, 32, 1), name="image")
        a = layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
        b = layers.Conv2D(16, 3, padding="same", activation="relu")(layers.MaxPooling2D()(a))
        u = layers.Concatenate()([a, layers.UpSampling2D()(b)])
        c = layers.Conv2D(8, 3, padding="same", activation="relu")(u)
        act = "sigmoid" if task == "segmentation" else "linear"
        model = keras.Model(
            inp, layers.Conv2D(1, 1, activation=act, name="out")(c), name="tiny_unet"
        )
        loss = "binary_crossentropy" if task == "segmentation" else "mse"
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss=loss)
        model.fit(x, y, epochs=8, batch_size=16, verbose=0)
        _save_model(model, out / f"{name}.keras")


def beats(out: Path) -> None:
    """tests/test_stream_eval.py: a small Conv1D on the real MIT-BIH beats (per-beat z-score)."""
    import keras

    keras.utils.set_random_seed(0)
    with np.load(BEATS) as d:
        x, y = d["x"].astype("float32"), d["y"]
    x = (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-6)
    m = keras.Sequential(
        [
            keras.Input((260, 1)),
            keras.layers.Conv1D(8, 7, strides=2, activation="relu"),
            keras.layers.MaxPooling1D(4),
            keras.layers.Flatten(),
            keras.layers.Dense(5, activation="softmax"),
        ],
        name="beats",
    )
    m.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    m.fit(x[..., None], y, epochs=20, batch_size=32, verbose=0)
    _save_model(m, out / "beats.keras")


def main(argv: list[str]) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    out = Path(argv[0]) if argv else OUT
    out.mkdir(parents=True, exist_ok=True)
    recurrent(out)
    tasks(out)
    beats(out)
    for p in sorted(out.iterdir()):
        if p.suffix in (".keras", ".npz"):
            print(f"{p.stat().st_size:>8}  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
