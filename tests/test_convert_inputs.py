"""Conversion sources beyond .keras: a legacy .h5 (tf_keras), a SavedModel directory and an ONNX
model, each the real zoo CNN saved at test time, converted and evaluated on real BreastMNIST."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from converter import ConvertRequest, convert
from converter.errors import ConversionError
from converter.inputs import source_format, source_sha256
from edge_agent.bundle import Preprocess
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
    r = subprocess.run([sys.executable, "-c", SAVE, str(h5), str(sm)],
                       capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return h5, sm


def _request(model: Path, out: Path, **kw: object) -> ConvertRequest:
    return ConvertRequest(
        model=model, calib=breast_cnn.DATA, eval=breast_cnn.DATA, out=out,
        preprocess=Preprocess(kind="scale01"), labels=breast_cnn.CLASS_NAMES,
        positive_label=breast_cnn.POSITIVE, calib_split="train", eval_split="val", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _keras_float(bundle_dir: Path) -> dict[str, float]:
    return json.loads((bundle_dir / "report.json").read_text())["float"]


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
    tmp_path: Path, sources: tuple[Path, Path], bundle_dir: Path
) -> None:
    out = tmp_path / "h5"
    # asked for fp16 beside int8: shipped whatever the timing says (the timing is recorded)
    b = convert(_request(sources[0], out, onnx=False, float_artifacts="fp16"))
    m = b.manifest
    assert m.provenance.source_format == "h5"
    assert [(a.runtime, a.precision) for a in m.artifacts] == [("litert", "int8"),
                                                               ("litert", "fp16")]  # fmt: skip
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
    tmp_path: Path, sources: tuple[Path, Path], bundle_dir: Path
) -> None:
    out = tmp_path / "sm"
    b = convert(_request(sources[1], out, float_artifacts="none"))
    m = b.manifest
    assert m.provenance.source_format == "savedmodel"
    assert [(a.runtime, a.precision) for a in m.artifacts] == [
        ("litert", "int8"), ("onnx", "fp32"), ("onnx", "int8"),
    ]  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["route"] == "tf2onnx.convert.from_function"
    assert report["float"]["auc"] == pytest.approx(_keras_float(bundle_dir)["auc"], abs=1e-9)
    assert report["agreement"]["onnx-fp32"] == 1.0
    assert report["agreement"]["litert-int8"] >= 0.95
    assert m.name == "breast_cnn_savedmodel"


def test_an_onnx_model_is_quantized_and_evaluated(tmp_path: Path, bundle_dir: Path) -> None:
    out = tmp_path / "onnx"
    b = convert(_request(bundle_dir / "model_fp32.onnx", out, onnx_input="quantize"))
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


def test_calibration_pitfalls_are_found_in_a_child_process(tmp_path: Path) -> None:
    """converter.calibration_check runs in its own process (TensorFlow for the BatchNorm
    check); its warnings are what the converter adds to the report."""
    import numpy as np

    from converter.convert import _calibration_warnings, _Data
    from edge_agent.bundle import Decode

    with np.load(breast_cnn.DATA) as d:
        xc, yc = d["train_images"][:50], d["train_labels"][:50].reshape(-1)
        xe, ye = d["val_images"], d["val_labels"].reshape(-1)
    np.save(tmp_path / "calib.npy", xc[..., None].astype(np.float32))  # 0..255, unlike eval
    np.save(tmp_path / "eval.npy", xe[..., None].astype(np.float32) / 255.0)
    data = _Data("classification", xc, xe, ye, breast_cnn.CLASS_NAMES, 0, Decode(), yc)
    got = _calibration_warnings(_request(breast_cnn.WEIGHTS, tmp_path / "o"), data, tmp_path)
    assert any("only 50 samples" in w for w in got)
    assert any("scaled 0-255 and the other 0-1" in w for w in got)
    assert any(w.startswith("BatchNormalization statistics do not match") for w in got)
