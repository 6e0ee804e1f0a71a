"""A ready third-party model wrapped into a signed bundle, unconverted: the real ECG beat
classifier of on-device-ai/ClassifyHeartbeats (Apache-2.0) on real MIT-BIH beats.

The model was trained by its authors on MIT-BIH beats (a random 90/10 split of 48 records,
these two among them), so the numbers here are not a held-out evaluation: they show that the
bundle runs the model as its authors did (window R-90..R+170, z-score per window).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converter import ConvertRequest, convert
from edge_agent.bundle import Bundle, Preprocess, file_entry
from edge_agent.keys import load_signer_key
from edge_agent.preprocess import normalize
from models import breast_cnn

DATA = Path(__file__).parent / "data"
ECG = DATA / "ecg_beats.npz"
MODEL = DATA / "third_party" / "classify_heartbeats_cnn.tflite"
QUANTIZED = DATA / "third_party" / "classify_heartbeats_cnn_quantized.tflite"
AAMI = ["N", "S", "V", "F", "Q"]


def medge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medge", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _wrap(model: Path, out: Path, sign_key: Path | None = None) -> Bundle:
    return convert(
        ConvertRequest(
            model=model,
            calib=ECG,
            eval=ECG,
            out=out,
            preprocess=Preprocess(kind="zscore"),
            labels=AAMI,
            positive_label="V",
            name="ecg-beats",
            sign_key=sign_key,
        )
    )


@pytest.fixture(scope="module")
def ecg_bundle(tmp_path_factory: pytest.TempPathFactory, site_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("wrap") / "ecg-beats"
    _wrap(MODEL, out, site_dir / "bundle-signer.key")
    return out


def test_the_slice_is_real_mitbih_beats_labelled_n_and_v() -> None:
    with np.load(ECG) as d:
        x, y, names = d["x"], d["y"], d["labels"].tolist()
        assert x.shape == (400, 260) and names == AAMI
        assert sorted(set(y.tolist())) == [0, 2], "only N and V are labelled in this data"
        assert int((y == 2).sum()) == 94
        assert sorted(set(d["record"].tolist())) == [106, 108]


def test_zscore_is_the_normalization_the_model_was_trained_with() -> None:
    """Its authors: (w - mean(w)) / std(w) over each 260-sample window (numpy's std)."""
    with np.load(ECG) as d:
        beats = d["x"][:20].astype(np.float32)
    for w in beats:
        ours = normalize(Preprocess(kind="zscore"), w)
        np.testing.assert_allclose(ours, (w - w.mean()) / w.std(), rtol=1e-4, atol=1e-4)


def test_wrapped_bundle_is_signed_and_describes_the_model(ecg_bundle: Path, site_dir: Path) -> None:
    b = Bundle.load(ecg_bundle, [load_signer_key(site_dir / "bundle-signer.key").public_key()])
    m = b.manifest
    assert (m.provenance.source_format, m.provenance.strategy) == ("tflite", "wrapped")
    assert m.provenance.source_sha256 == file_entry(MODEL).sha256
    [art] = m.artifacts
    assert (art.file, art.runtime, art.precision) == ("model_fp32.tflite", "litert", "fp32")
    assert m.files[art.file] == file_entry(MODEL), "the artifact is the author's file, unchanged"
    assert (art.inputs[0].shape, art.inputs[0].dtype) == ([1, 260], "float32")
    assert art.outputs[0].shape == [1, 5]
    assert m.labels == AAMI and m.positive_label == "V" and m.preprocess.kind == "zscore"
    assert m.cam is None


def test_wrapped_ecg_classifier_finds_the_pvcs(ecg_bundle: Path) -> None:
    report = json.loads((ecg_bundle / "report.json").read_text())
    got = report["litert-fp32"]
    assert report["variants"] == ["litert-fp32"] and report["eval"]["n"] == 400
    # measured: 90 of 94 PVCs found, 302 of 306 other beats left alone, AUC 0.994
    assert got["sensitivity"] >= 0.93 and got["specificity"] >= 0.97, got
    assert got["auc"] > 0.98
    md = (ecg_bundle / "report.md").read_text()
    assert "Wrapped as it is" in md and "| sensitivity | 0.9574 |" in md
    r = medge("evaluate", str(ecg_bundle), "--data", str(ECG), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sensitivity"] == got["sensitivity"]


def test_weight_only_quantized_variant_reads_as_dynamic(tmp_path: Path) -> None:
    b = _wrap(QUANTIZED, tmp_path / "q")
    art = b.manifest.artifacts[0]
    assert (art.file, art.precision, art.inputs[0].dtype) == (
        "model_dynamic.tflite",
        "dynamic",
        "float32",
    )
    assert b.manifest.metrics["litert-dynamic"]["sensitivity"] >= 0.93


@pytest.mark.slow
def test_an_onnx_model_is_wrapped_and_run_by_onnx_runtime(bundle_dir: Path, tmp_path: Path) -> None:
    """The zoo bundle's own fp32 ONNX file, wrapped: same metrics as in that bundle."""
    b = convert(
        ConvertRequest(
            model=bundle_dir / "model_fp32.onnx",
            calib=breast_cnn.DATA,
            eval=breast_cnn.DATA,
            calib_split="train",
            eval_split="val",
            out=tmp_path / "o",
            preprocess=Preprocess(kind="scale01"),
            labels=breast_cnn.CLASS_NAMES,
            positive_label=breast_cnn.POSITIVE,
        )
    )
    m = b.manifest
    assert m.provenance.source_format == "onnx" and m.provenance.strategy == "wrapped"
    assert [(a.runtime, a.precision) for a in m.artifacts] == [("onnx", "fp32")]
    want = Bundle.load(bundle_dir).manifest.metrics["onnx-fp32"]
    for k in ("accuracy", "sensitivity", "specificity", "auc"):
        assert m.metrics["onnx-fp32"][k] == pytest.approx(want[k], abs=1e-9), k


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("truncated", "LiteRT cannot load bad.tflite: The model is not a valid Flatbuffer buffer"),
        ("wrong-shape", "calibration samples of shape (28, 28) do not fit model input (1, 260)"),
        (
            "wrong-labels",
            "classify_heartbeats_cnn.tflite outputs 5 values per sample but 3 labels "
            "were given (N, S, V)",
        ),
        ("budget", "--budget compares with a float model, which a wrapped model lacks"),
        ("cam", "--cam adds an output to a Keras model; a wrapped model has none"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, make: str, message: str) -> None:
    model, calib, labels, extra = MODEL, ECG, "N,S,V,F,Q", []
    if make == "truncated":
        model = tmp_path / "bad.tflite"
        model.write_bytes(MODEL.read_bytes()[:3000])
    elif make == "wrong-shape":
        calib = breast_cnn.DATA
        extra = ["--calib-split", "train"]
    elif make == "wrong-labels":
        labels = "N,S,V"
    elif make == "budget":
        extra = ["--budget", "sensitivity=0.01"]
    else:
        extra = ["--cam"]
    out = tmp_path / "out"
    r = medge(
        "convert",
        str(model),
        "--calib",
        str(calib),
        "--eval",
        str(ECG),
        "--labels",
        labels,
        "--preprocess",
        "zscore",
        "--out",
        str(out),
        *extra,
    )
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("medge: error:")]
    assert errors == [f"medge: error: {message}"], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
