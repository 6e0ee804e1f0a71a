"""Conversion sources beyond .keras: a legacy .h5 (tf_keras), a SavedModel directory and an ONNX
model, each the real zoo CNN saved at test time, converted and evaluated on real BreastMNIST."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest

from converter import ConvertRequest, convert
from converter.errors import ConversionError
from converter.inputs import source_format, source_sha256
from edge_agent.bundle import Bundle, Preprocess
from models import breast_cnn

pytestmark = pytest.mark.slow

SAVE = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras, tf_keras
from models import breast_cnn
m = keras.saving.load_model(breast_cnn.WEIGHTS, compile=False)
L = tf_keras.layers
inp = tf_keras.Input((28, 28, 1), name="image")
h = inp
for f in (16, 32):
    for _ in range(2):
        h = L.Conv2D(f, 3, padding="same", use_bias=False)(h)
        h = L.BatchNormalization()(h)
        h = L.ReLU()(h)
    h = L.MaxPooling2D()(h)
h = L.Conv2D(64, 3, padding="same", activation="relu", name="last_conv")(h)
h = L.Dropout(0.3)(L.GlobalAveragePooling2D()(h))
legacy = tf_keras.Model(inp, L.Dense(2, activation="softmax", name="probs")(h))
legacy.set_weights(m.get_weights())
legacy.save(sys.argv[1])  # a Keras 2 HDF5 file
m.export(sys.argv[2])  # a SavedModel directory
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sources")
    h5, sm = d / "breast_cnn.h5", d / "breast_cnn_savedmodel"
    r = subprocess.run(
        [sys.executable, "-c", SAVE, str(h5), str(sm)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return h5, sm


def _request(model: Path, out: Path, **kw: object) -> ConvertRequest:
    return ConvertRequest(
        model=model,
        calib=breast_cnn.DATA,
        eval=breast_cnn.DATA,
        out=out,
        preprocess=Preprocess(kind="scale01"),
        labels=breast_cnn.CLASS_NAMES,
        positive_label=breast_cnn.POSITIVE,
        calib_split="train",
        eval_split="val",
        **kw,  # type: ignore[arg-type]
    )


def _keras_float(bundle_dir: Path) -> dict[str, float]:
    return json.loads((bundle_dir / "report.json").read_text())["float"]


def _calibration_pitfalls(work: Path) -> list[str]:
    """converter.calibration_check (numpy) and converter.child.batchnorm (its child
    process), on calibration data scaled 0-255 (unlike the 0-1 evaluation data) and only 50
    samples."""
    import numpy as np

    from converter.calibrate import calibration_warnings
    from converter.data import Data
    from edge_agent.bundle import Decode

    with np.load(breast_cnn.DATA) as d:
        xc, yc = d["train_images"][:50], d["train_labels"][:50].reshape(-1)
        xe, ye = d["val_images"], d["val_labels"].reshape(-1)
    np.save(work / "calib.npy", xc[..., None].astype(np.float32))  # 0..255, unlike eval
    np.save(work / "eval.npy", xe[..., None].astype(np.float32) / 255.0)
    data = Data("classification", xc, xe, ye, breast_cnn.CLASS_NAMES, 0, Decode(), yc)
    return calibration_warnings(_request(breast_cnn.WEIGHTS, work / "o").model, data, work)


ONNX_TEST = "test_an_onnx_model_is_quantized_and_evaluated"


@pytest.fixture(scope="module", autouse=True)
def converted(
    request: pytest.FixtureRequest,
    side_by_side: Callable[..., dict[str, Future]],  # type: ignore[type-arg]
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Future]:  # type: ignore[type-arg]
    """This module's conversions, two at a time: the ONNX model and the calibration check start
    with the module, the .h5 and the SavedModel ones once ``sources`` has saved them. Test ->
    Future of (the bundle's directory, the bundle) or of the calibration warnings."""
    work = tmp_path_factory.mktemp("converted")

    def conversion(model: Path, out: Path, **kw: object) -> Callable[[], tuple[Path, Bundle]]:
        return lambda: (out, convert(_request(model, out, **kw)))

    calibration = tmp_path_factory.mktemp("calibration")
    jobs: dict[str, Callable[[], object]] = {
        "test_calibration_pitfalls_are_found_in_a_child_process": lambda: _calibration_pitfalls(
            calibration
        ),
    }
    if any(i.module is request.module and i.name == ONNX_TEST for i in request.session.items):
        onnx_source = request.getfixturevalue("bundle_dir") / "model_fp32.onnx"
        jobs[ONNX_TEST] = conversion(onnx_source, work / "onnx", onnx_input="quantize")
    return side_by_side(jobs)


@pytest.fixture(scope="module")
def keras_sources(
    sources: tuple[Path, Path],
    side_by_side: Callable[..., dict[str, Future]],  # type: ignore[type-arg]
) -> dict[str, Future]:  # type: ignore[type-arg]
    """The .h5 and SavedModel conversions, started together once the sources are saved."""
    h5, sm = sources
    work = h5.parent
    return side_by_side(
        {
            # asked for fp16 beside int8: shipped whatever the timing says (the timing is recorded)
            "test_a_legacy_h5_converts_like_the_keras_file": lambda: (
                work / "h5",
                convert(_request(h5, work / "h5", onnx=False, float_artifacts="fp16")),
            ),
            "test_a_savedmodel_converts_to_litert_and_onnx": lambda: (
                work / "sm",
                convert(_request(sm, work / "sm", float_artifacts="none")),
            ),
        }
    )


def test_formats_are_told_apart_in_one_line(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    h5, sm = sources
    assert source_format(h5) == "h5" and source_format(sm) == "savedmodel"
    assert source_format(breast_cnn.WEIGHTS) == "keras"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="without saved_model.pb"):
        source_format(tmp_path / "empty")
    (tmp_path / "m.pt").write_bytes(b"x")
    with pytest.raises(ConversionError, match="unknown model format '.pt'"):
        source_format(tmp_path / "m.pt")
    assert len(source_sha256(sm)) == 64 and source_sha256(sm) != source_sha256(h5)


def test_a_legacy_h5_converts_like_the_keras_file(
    keras_sources: dict[str, Future],  # type: ignore[type-arg]
    bundle_dir: Path,
) -> None:
    out, b = keras_sources["test_a_legacy_h5_converts_like_the_keras_file"].result()
    m = b.manifest
    assert m.provenance.source_format == "h5"
    assert [(a.runtime, a.precision) for a in m.artifacts] == [
        ("litert", "int8"),
        ("litert", "fp16"),
    ]
    report = json.loads((out / "report.json").read_text())
    fp16 = report["float_artifacts"]["fp16"]
    assert fp16["shipped"] and fp16["speedup_vs_winner"] > 0
    assert "--float-artifacts fp16" in fp16["why"]
    assert not report["float_artifacts"]["fp32"]["shipped"]
    assert report["agreement"]["litert-fp16"] >= 0.99
    # the same weights: the float model scores exactly what the .keras one does
    for k in ("accuracy", "sensitivity", "specificity", "auc"):
        assert report["float"][k] == pytest.approx(_keras_float(bundle_dir)[k], abs=1e-9), k
    assert report["agreement"]["litert-int8"] >= 0.95
    assert report["size_bytes"]["h5"] > report["size_bytes"]["litert-int8"]


def test_a_savedmodel_converts_to_litert_and_onnx(
    keras_sources: dict[str, Future],  # type: ignore[type-arg]
    bundle_dir: Path,
) -> None:
    out, b = keras_sources["test_a_savedmodel_converts_to_litert_and_onnx"].result()
    m = b.manifest
    assert m.provenance.source_format == "savedmodel"
    assert [(a.runtime, a.precision) for a in m.artifacts] == [
        ("litert", "int8"),
        ("onnx", "fp32"),
        ("onnx", "int8"),
    ]
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["route"] == "tf2onnx.convert.from_function"
    assert report["float"]["auc"] == pytest.approx(_keras_float(bundle_dir)["auc"], abs=1e-9)
    assert report["agreement"]["onnx-fp32"] == 1.0
    assert report["agreement"]["litert-int8"] >= 0.95
    assert m.name == "breast_cnn_savedmodel"


def test_an_onnx_model_is_quantized_and_evaluated(
    converted: dict[str, Future],  # type: ignore[type-arg]
) -> None:
    out, b = converted[ONNX_TEST].result()
    m = b.manifest
    assert m.provenance.source_format == "onnx"
    assert [(a.runtime, a.precision) for a in m.artifacts] == [("onnx", "fp32"), ("onnx", "int8")]
    report = json.loads((out / "report.json").read_text())
    # the float reference is the ONNX model itself, run by ONNX Runtime
    assert report["float"]["auc"] == pytest.approx(report["onnx-fp32"]["auc"], abs=1e-12)
    assert report["agreement"]["onnx-int8"] >= 0.95
    assert report["onnx-int8"]["auc"] > 0.8
    assert report["size_bytes"]["onnx-int8"] < report["size_bytes"]["onnx-fp32"]
    assert any("needs onnx2tf" in w for w in report["warnings"])
    assert "needs onnx2tf" in (out / "report.md").read_text()
    assert not any("check failed" in w for w in report["warnings"])  # no Keras BN check to run


def test_calibration_pitfalls_are_found_in_a_child_process(
    converted: dict[str, Future],  # type: ignore[type-arg]
) -> None:
    """converter.child.batchnorm runs in its own process (TensorFlow for the BatchNorm
    check); its warnings are what the converter adds to the report."""
    got = converted["test_calibration_pitfalls_are_found_in_a_child_process"].result()
    assert any("only 50 samples" in w for w in got)
    assert any("scaled 0-255 and the other 0-1" in w for w in got)
    assert any(w.startswith("BatchNormalization statistics do not match") for w in got)
