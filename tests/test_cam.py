"""Class activation maps: ``convert --cam`` on the zoo CNN, checked against the float model's
Grad-CAM, and the device's heatmap (edge_agent.cam)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converter import ConvertRequest, convert
from edge_agent.bundle import SCHEMA_VERSION, Bundle, Preprocess
from edge_agent.cam import cam_heatmap, explain, resize_bilinear
from edge_agent.errors import BundleError
from edge_agent.keys import load_signer_key
from edge_agent.model import LoadedModel
from models import breast_cnn

pytestmark = pytest.mark.slow

# Grad-CAM of the float Keras model (TensorFlow, so in a child process): for the predicted
# class c, alpha_k = mean over (h, w) of d logit_c / d A_k, map = ReLU(sum_k alpha_k A_k),
# with A the feature maps of last_conv and logit_c the classifier's pre-softmax score.
# Also saves a CNN with a Flatten head, which has no class activation map.
GRAD_CAM = textwrap.dedent("""\
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np, tensorflow as tf
    from models import breast_cnn
    out = sys.argv[1]
    model = keras.saving.load_model(breast_cnn.WEIGHTS, compile=False)
    with np.load(breast_cnn.DATA) as d:
        x = d["val_images"][..., None].astype("float32") / 255.0
    features = keras.Model(model.inputs, model.get_layer("last_conv").output)(x)
    kernel, bias = model.get_layer("probs").get_weights()
    with tf.GradientTape() as tape:
        tape.watch(features)
        logits = tf.reduce_mean(features, axis=(1, 2)) @ kernel + bias
        pred = tf.argmax(logits, axis=1)
        score = tf.gather(logits, pred, axis=1, batch_dims=1)
    alpha = tf.reduce_mean(tape.gradient(score, features), axis=(1, 2))
    grad_cam = tf.nn.relu(tf.einsum("nhwk,nk->nhw", features, alpha)).numpy()
    from converter.child.rebuild import cam_model
    probs, float_cam = cam_model(model)[0].predict(x, verbose=0)
    np.savez(os.path.join(out, "gradcam.npz"), grad_cam=grad_cam, float_cam=float_cam,
             pred=pred.numpy(), probs=probs)
    inp = keras.Input((28, 28, 1))
    h = keras.layers.Flatten()(keras.layers.Conv2D(2, 3)(inp))
    keras.Model(inp, keras.layers.Dense(2, activation="softmax")(h)).save(
        os.path.join(out, "flat_head.keras"))
    """)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


@pytest.fixture(scope="module")
def cam(tmp_path_factory: pytest.TempPathFactory, site_dir: Path) -> dict[str, Any]:
    """The zoo CNN converted with --cam (and signed), beside the float Grad-CAM and then the
    refused --cam conversion of a Flatten-head CNN: two at a time, each mostly one core."""
    work = tmp_path_factory.mktemp("cam")

    def bundle() -> Path:
        out = work / "breast-cnn-cam"
        convert(
            ConvertRequest(
                model=breast_cnn.WEIGHTS,
                calib=breast_cnn.DATA,
                eval=breast_cnn.DATA,
                out=out,
                preprocess=Preprocess(kind="scale01"),
                labels=breast_cnn.CLASS_NAMES,
                positive_label=breast_cnn.POSITIVE,
                calib_split="train",
                eval_split="val",
                name="breast-cnn-cam",
                sign_key=site_dir / "bundle-signer.key",
                cam=True,
                float_artifacts="none",  # the same file list on a quiet or a loaded machine
            )
        )
        return out

    def grad_cam_then_flat_head() -> tuple[Path, subprocess.CompletedProcess[str]]:
        r = subprocess.run(
            [sys.executable, "-c", GRAD_CAM, str(work)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        flat = subprocess.run(
            [
                sys.executable,
                "-m",
                "medge",
                "convert",
                str(work / "flat_head.keras"),
                "--calib",
                str(breast_cnn.DATA),
                "--calib-split",
                "train",
                "--eval",
                str(breast_cnn.DATA),
                "--eval-split",
                "val",
                "--preprocess",
                "scale01",
                "--labels",
                "malignant,benign",
                "--cam",
                "--out",
                str(work / "flat"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        return work / "gradcam.npz", flat

    with ThreadPoolExecutor(2) as pool:
        b, g = pool.submit(bundle), pool.submit(grad_cam_then_flat_head)
        grad_cam, flat = g.result()
        return {"bundle": b.result(), "grad_cam": grad_cam, "flat": flat, "work": work}


def test_manifest_declares_the_cam_as_an_optional_second_output(
    cam: dict[str, Any], site_dir: Path
) -> None:
    trusted = [load_signer_key(site_dir / "bundle-signer.key").public_key()]
    m = Bundle.load(cam["bundle"], trusted).manifest
    assert m.schema_version == SCHEMA_VERSION and m.schema_version.startswith("1.")
    assert m.cam is not None
    assert (m.cam.output, m.cam.layer, m.cam.upsample_to) == (1, "last_conv", [28, 28])
    assert [(a.runtime, a.precision) for a in m.artifacts] == [
        ("litert", "int8"),
        ("onnx", "fp32"),
        ("onnx", "int8"),
    ]
    for art in m.artifacts:
        assert [o.shape for o in art.outputs] == [[1, 2], [1, 7, 7, 2]], art.file
        assert art.outputs[1].name == "cam", art.file
    litert = m.artifacts[0].outputs[1]
    assert litert.dtype == "int8" and litert.quantization is not None, "quantized with the rest"
    report = json.loads((cam["bundle"] / "report.json").read_text())
    assert report["agreement"]["litert-int8"] >= 0.97, "the extra output costs no accuracy"
    assert report["warnings"] == []


def test_int8_cam_matches_the_float_models_grad_cam(cam: dict[str, Any]) -> None:
    ref = np.load(cam["grad_cam"])
    grad_cam, pred = ref["grad_cam"], ref["pred"]
    # the method: ReLU of the float CAM is Grad-CAM (up to 1/(h*w)) for this GAP -> Dense head
    float_cos = [
        _cosine(np.maximum(ref["float_cam"][i, ..., c], 0), grad_cam[i]) for i, c in enumerate(pred)
    ]
    assert min(float_cos) > 0.9999
    with np.load(breast_cnn.DATA) as d:
        images = d["val_images"]
    bundle = Bundle.load(cam["bundle"])
    for runtime, precision, floor in (("litert", "int8", 0.99), ("onnx", "int8", 0.99)):
        model = LoadedModel(bundle, runtime, precision=precision)
        cos = [
            _cosine(np.maximum(model.infer_outputs(model.prepare(x))[1][0, ..., c], 0), g)
            for x, c, g in zip(images, pred, grad_cam, strict=True)
        ]
        assert len(cos) == 78
        # measured on the 78 validation images: LiteRT int8 mean 0.9987, min 0.9939
        assert np.mean(cos) >= floor, (runtime, np.mean(cos), np.min(cos))
        assert np.min(cos) >= 0.95, (runtime, np.min(cos))


def test_heatmap_is_a_small_uint8_image_of_the_predicted_class(cam: dict[str, Any]) -> None:
    model = LoadedModel(Bundle.load(cam["bundle"]))
    with np.load(breast_cnn.DATA) as d:
        image = d["val_images"][0]
    result, heat = explain(model, image)
    assert result == model.predict(image)
    assert heat.dtype == np.uint8 and heat.shape == (28, 28)
    assert heat.max() == 255
    raw = model.infer_outputs(model.prepare(image))[1][0, ..., result.pred]
    peak = np.unravel_index(np.argmax(raw), raw.shape)
    hot = np.unravel_index(np.argmax(heat), heat.shape)
    assert abs(hot[0] // 4 - peak[0]) <= 1 and abs(hot[1] // 4 - peak[1]) <= 1


def test_heatmap_functions() -> None:
    import cv2

    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 7)).astype(np.float32)
    np.testing.assert_allclose(
        resize_bilinear(a, (28, 28)),
        cv2.resize(a, (28, 28), interpolation=cv2.INTER_LINEAR),
        atol=1e-5,
    )
    cam = np.zeros((1, 7, 7, 2), np.float32)
    cam[0, 2, 3, 1] = 2.0
    cam[0, :, :, 0] = -1.0
    assert not cam_heatmap(cam, 0, (28, 28)).any(), "no evidence: an all-zero heatmap"
    heat = cam_heatmap(cam, 1, (14, 14))
    assert heat.shape == (14, 14) and heat.max() == 255
    assert np.unravel_index(np.argmax(heat), heat.shape) in {(4, 6), (4, 7), (5, 6), (5, 7)}
    one = np.full((1, 7, 7, 1), -3.0, np.float32)  # one sigmoid unit: -map is class 0's
    assert cam_heatmap(one, 0, (7, 7)).min() == 255 and not cam_heatmap(one, 1, (7, 7)).any()


def test_a_cam_index_past_the_outputs_is_refused(cam: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(cam["bundle"], copy)
    (copy / "manifest.sig").unlink()
    path = copy / "manifest.json"
    data = json.loads(path.read_text())
    data["cam"]["output"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="model_int8.tflite has no output 2 \\(cam\\)"):
        Bundle.load(copy)


def test_cam_without_a_pooling_head_is_one_clear_line(cam: dict[str, Any]) -> None:
    r = cam["flat"]
    assert isinstance(r, subprocess.CompletedProcess)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("medge: error:")]
    assert errors == [
        "medge: error: --cam needs a GlobalAveragePooling2D -> Dense head; 'dense' follows Flatten"
    ], r.stderr
    assert not (cam["work"] / "flat").exists()
