"""Recurrent models through the converter's LiteRT strategies (converter.strategies).

Tiny models (LSTM, GRU, bidirectional LSTM, a TimeDistributed CNN + LSTM on clips) are trained
here for 10 epochs in one child process, on synthetic but structured data (``_data``; no
number here is about real patients): the subject is the conversion, not the data. Each
conversion must give a bundle whose LiteRT artifact agrees with the float model on at least 95%
of the held-out samples, and the report must say which strategy won and why the ones before it
did not.

    python tests/test_convert_recurrent.py DIR     # trains the models into DIR (what the
                                                    # fixture runs)
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from converter import ConversionError, ConvertRequest, convert
from edge_agent.bundle import Bundle, Preprocess

pytestmark = pytest.mark.slow

LABELS = ["still", "walk", "fall"]


def _data(kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic, structured samples with labels 0..2.

    ``imu``: 32 steps of a 3-axis accelerometer at 20 Hz (units of g): still (gravity on a
    random axis + noise), walking (plus a 1.5-2.5 Hz swing) or a fall (an impact spike, then
    gravity on another axis). ``clip``: 4 frames of 16x16 grey images with a bright blob
    that stays, grows or shrinks; ``image``: the first frame of a clip.
    """
    if kind == "image":
        x, y = _data("clip", n, rng)
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


def _train(out: Path) -> None:
    """Train the tiny models and write <name>.keras and <name>.npz (train/val splits)."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)

    def recurrent(name: str, core: layers.Layer) -> keras.Model:
        inp = keras.Input((32, 3))
        model = keras.Model(inp, layers.Dense(3, activation="softmax")(core(inp)), name=name)
        return fit(model, "imu", name)

    def fit(model: keras.Model, kind: str, name: str, epochs: int = 10) -> keras.Model:
        x, y = _data(kind, 640, rng)
        scale = 1.0 if kind == "imu" else 255.0
        model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
        if epochs:
            model.fit(x[:480] / scale, y[:480], epochs=epochs, batch_size=32, verbose=0)
        model.save(out / f"{name}.keras")
        np.savez(
            out / f"{name}.npz",
            train_images=x[:480],
            train_labels=y[:480],
            val_images=x[480:],
            val_labels=y[480:],
            labels=np.array(LABELS),
        )
        return model

    # The LSTM saved with a static batch of one (the trained layers on a batch-1 input): the
    # full-int8 converter then segfaults calibrating its WHILE loop.
    lstm = recurrent("lstm", layers.LSTM(8))
    one = keras.Input(batch_shape=(1, 32, 3))
    keras.Model(one, lstm.layers[-1](lstm.layers[-2](one))).save(out / "lstm.keras")
    recurrent("gru", layers.GRU(8))
    recurrent("bilstm", layers.Bidirectional(layers.LSTM(8)))
    inp = keras.Input((4, 16, 16, 1))
    h = layers.TimeDistributed(layers.Conv2D(4, 3, activation="relu"))(inp)
    h = layers.TimeDistributed(layers.GlobalAveragePooling2D())(h)
    clip = keras.Model(inp, layers.Dense(3, activation="softmax")(layers.LSTM(8)(h)))
    fit(clip, "clip", "clip")
    # A CNN whose bicubic resize has no LiteRT kernel at all: every strategy must fail (so it
    # is left untrained).
    inp = keras.Input((16, 16, 1))
    h = layers.Resizing(8, 8, interpolation="bicubic")(inp)
    h = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3)(h))
    fit(keras.Model(inp, layers.Dense(3, activation="softmax")(h)), "image", "bicubic", 0)


def _convert(models: Path, name: str, out: Path, **kw: object) -> dict:  # type: ignore[type-arg]
    scale = Preprocess(kind="none" if name in ("lstm", "gru", "bilstm") else "scale01")
    convert(
        ConvertRequest(
            model=models / f"{name}.keras",
            calib=models / f"{name}.npz",
            eval=models / f"{name}.npz",
            calib_split="train",
            eval_split="val",
            out=out,
            preprocess=scale,
            positive_label="fall",
            onnx=False,
            **kw,  # type: ignore[arg-type]
        )
    )
    return json.loads((out / "report.json").read_text())


def _cli_convert(models: Path, name: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "medge",
            "convert",
            str(models / f"{name}.keras"),
            "--calib",
            str(models / f"{name}.npz"),
            "--calib-split",
            "train",
            "--eval",
            str(models / f"{name}.npz"),
            "--eval-split",
            "val",
            "--no-onnx",
            "--preprocess",
            "scale01",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# job -> (its test, model, strategies or "cli"): each conversion once, two at a time (each is
# mostly one single-threaded converter child), the longest first, each in its own directory;
# a test waits for its own conversion only.
JOBS = {
    "bilstm": (
        "test_bidirectional_lstm_through_the_fused_legacy_lstm",
        "bilstm",
        ["full-int8", "legacy-lstm-int8"],
    ),
    "lstm": ("test_keras3_lstm_crashes_full_int8_and_the_unrolled_rebuild_wins", "lstm", None),
    "gru": ("test_gru_fails_full_int8_with_the_converters_error_and_unrolls", "gru", None),
    "clip": (
        "test_cnn_lstm_clip_falls_back_to_dynamic_range",
        "clip",
        ["full-int8", "dynamic-range"],
    ),
    "gru-legacy": (
        "test_a_strategy_that_does_not_apply_is_skipped_with_its_reason",
        "gru",
        ["legacy-lstm-int8"],
    ),
    "bicubic": ("test_unsupported_op_is_one_clear_line", "bicubic", "cli"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models, trained in one child (one TensorFlow start)."""
    models = tmp_path_factory.mktemp("recurrent")
    r = subprocess.run(
        [sys.executable, __file__, str(models)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return models


@pytest.fixture(scope="module")
def runs(
    models: Path,
    side_by_side: Callable[..., dict[str, Future]],  # type: ignore[type-arg]
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Future]:  # type: ignore[type-arg]
    """Job -> Future of (its directory, the report, the error or the CLI run)."""

    def job(key: str) -> Callable[[], tuple[Path, object]]:
        _, name, strategies = JOBS[key]
        work = tmp_path_factory.mktemp(key)

        def run() -> tuple[Path, object]:
            if strategies == "cli":
                return work, _cli_convert(models, name, work / key)
            try:
                return work, _convert(models, name, work / key, strategies=strategies)
            except ConversionError as exc:
                return work, exc

        return run

    started = side_by_side({test: job(key) for key, (test, _, _) in JOBS.items()})
    return {key: started[test] for key, (test, _, _) in JOBS.items() if test in started}


def _result(runs: dict[str, Future], key: str) -> tuple[Path, object]:  # type: ignore[type-arg]
    """The job's conversion, once done: (its bundle directory, the report or what failed)."""
    work, got = runs[key].result()
    return work / key, got


def _report(runs: dict[str, Future], key: str) -> tuple[Path, dict]:  # type: ignore[type-arg]
    bundle, got = _result(runs, key)
    assert isinstance(got, dict), f"{key}: {got}"
    return bundle, got


def _outcomes(report: dict) -> dict[str, tuple[str, str | None]]:  # type: ignore[type-arg]
    return {a["strategy"]: (a["outcome"], a["reason"]) for a in report["litert"]["attempts"]}


def test_keras3_lstm_crashes_full_int8_and_the_unrolled_rebuild_wins(
    runs: dict[str, Future],  # type: ignore[type-arg]
) -> None:
    bundle, report = _report(runs, "lstm")
    got = _outcomes(report)
    assert got["full-int8"] == ("crashed", "crashed the converter process (SIGSEGV)")
    assert report["litert"]["strategy"] == "unrolled-int8"
    assert got["unrolled-int8"][0] == "won"
    assert got["legacy-lstm-int8"][0] == "not tried"
    assert report["agreement"]["litert-int8"] >= 0.95
    m = Bundle.load(bundle).manifest
    assert m.provenance.strategy == "litert unrolled-int8"
    assert m.artifacts[0].inputs[0].shape == [1, 32, 3] and m.artifacts[0].inputs[0].layout == "NTC"
    md = (bundle / "report.md").read_text()
    assert "strategy `unrolled-int8` won" in md
    assert "`full-int8` (direct full-int8 (TFLiteConverter)): **crashed** — crashed the" in md


def test_gru_fails_full_int8_with_the_converters_error_and_unrolls(
    runs: dict[str, Future],  # type: ignore[type-arg]
) -> None:
    _, report = _report(runs, "gru")
    outcome, reason = _outcomes(report)["full-int8"]
    assert outcome == "failed"
    assert reason == (
        "'tf.TensorListReserve' op requires element_shape to be static during TF Lite "
        "transformation pass"
    )
    assert report["litert"]["strategy"] == "unrolled-int8"
    assert report["agreement"]["litert-int8"] >= 0.95


def test_bidirectional_lstm_through_the_fused_legacy_lstm(
    runs: dict[str, Future],  # type: ignore[type-arg]
) -> None:
    """The tf_keras rebuild: two fused LSTM ops. Their state lives in variable tensors that
    LiteRT keeps across invokes; the agent's backend zeroes them per sample, or the second
    sample would start from the first one's state (measured: agreement 35% without)."""
    _, report = _report(runs, "bilstm")
    won = next(a for a in report["litert"]["attempts"] if a["outcome"] == "won")
    assert won["strategy"] == "legacy-lstm-int8"
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM" in won["ops"] and "WHILE" not in won["ops"]
    assert report["agreement"]["litert-int8"] >= 0.95
    assert report["size_bytes"]["litert-int8"] < report["size_bytes"]["keras"] / 3


def test_cnn_lstm_clip_falls_back_to_dynamic_range(
    runs: dict[str, Future],  # type: ignore[type-arg]
) -> None:
    """The last resort: int8 weights, float activations and float input/output."""
    bundle, report = _report(runs, "clip")
    assert _outcomes(report)["full-int8"][0] == "failed"
    assert report["litert"]["strategy"] == "dynamic-range"
    assert report["agreement"]["litert-dynamic"] >= 0.95
    art = Bundle.load(bundle).manifest.artifacts[0]
    assert (art.file, art.precision) == ("model_dynamic.tflite", "dynamic")
    inp = art.inputs[0]
    assert (inp.shape, inp.dtype, inp.layout) == ([1, 4, 16, 16, 1], "float32", "NTHWC")
    assert inp.quantization is None


def test_a_strategy_that_does_not_apply_is_skipped_with_its_reason(
    runs: dict[str, Future],  # type: ignore[type-arg]
) -> None:
    bundle, got = _result(runs, "gru-legacy")
    assert isinstance(got, ConversionError)
    assert str(got) == (
        "no LiteRT conversion strategy worked — legacy-lstm-int8: skipped "
        "(not applicable: GRU has no fused int8 LiteRT op)"
    )
    assert not bundle.exists()
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")], "no staging left"


def test_unsupported_op_is_one_clear_line(
    runs: dict[str, Future],  # type: ignore[type-arg]
) -> None:
    bundle, r = _result(runs, "bicubic")
    assert isinstance(r, subprocess.CompletedProcess)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("medge: error:")]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith(
        "medge: error: unsupported op tf.ResizeBicubic: LiteRT has no builtin kernel for it"
    )
    assert "Traceback" not in r.stderr
    assert not bundle.exists()
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")], "no staging left"


if __name__ == "__main__":
    _train(Path(sys.argv[1]))
