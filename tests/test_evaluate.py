"""`medge evaluate` by the bundle's task, on hand-written ONNX models run by the device runtime
over real BreastMNIST images. The segmentation masks are SIMULATED (a grey-level threshold of
the real images); the expected numbers are computed independently in numpy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from converter.errors import ConversionError
from converter.evaluate import evaluate_bundle, format_evaluation
from converter.metrics import classification_metrics, image_metrics, segmentation_metrics
from edge_agent.bundle import (
    SCHEMA_VERSION,
    Artifact,
    Decode,
    Manifest,
    Preprocess,
    Provenance,
    TensorSpec,
    file_entry,
    write_manifest,
)
from models import breast_cnn

with np.load(breast_cnn.DATA) as _d:
    X = _d["val_images"][:24]  # uint8, 28x28
    Y = _d["val_labels"][:24].reshape(-1)
X01 = X.astype(np.float64) / 255.0


def _const(name: str, value: float) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, [], [value])


def _graph(nodes: list[Any], out_shape: list[int], consts: dict[str, float]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 28, 28, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [_const(k, v) for k, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _bundle(out: Path, model: onnx.ModelProto, task: str, labels: list[str], **decode: Any) -> Path:
    positive = decode.pop("positive", None)
    out.mkdir(parents=True)
    onnx.save(model, out / "model_fp32.onnx")

    def spec(v: Any) -> TensorSpec:
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        return TensorSpec(name=v.name, shape=dims, dtype="float32")

    art = Artifact(
        file="model_fp32.onnx",
        runtime="onnx",
        precision="fp32",
        inputs=[spec(v) for v in model.graph.input],
        outputs=[spec(v) for v in model.graph.output],
    )
    write_manifest(
        out,
        Manifest(
            schema_version=SCHEMA_VERSION,
            name=f"eval-{task}",
            version="1",
            created="2026-11-26",
            task=task,  # type: ignore[arg-type]
            profile="x86",
            preprocess=Preprocess(kind="scale01"),
            decode=Decode(kind=task, **decode),  # type: ignore[arg-type]
            labels=labels,
            positive_label=positive,
            artifacts=[art],
            files={art.file: file_entry(out / art.file)},
            provenance=Provenance(
                source_sha256="0" * 64, source_format="onnx", converter_version="hand-written"
            ),
        ),
    )
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@pytest.fixture
def seg_data(tmp_path: Path) -> Path:
    np.savez(tmp_path / "seg.npz", x=X, y=(X >= 0.4 * 255).astype(np.uint8))
    return tmp_path / "seg.npz"


def test_segmentation_bundle_reports_dice_and_hd95(tmp_path: Path, seg_data: Path) -> None:
    # sigmoid(20 x - 10): foreground where the scaled image >= 0.5, against masks at >= 0.4
    model = _graph(
        [
            helper.make_node("Mul", ["x", "k"], ["a"]),
            helper.make_node("Sub", ["a", "b"], ["z"]),
            helper.make_node("Sigmoid", ["z"], ["y"]),
        ],
        [1, 28, 28, 1],
        {"k": 20.0, "b": 10.0},
    )
    b = _bundle(
        tmp_path / "seg", model, "segmentation", ["background", "bright"], activation="sigmoid"
    )
    got = evaluate_bundle(b, seg_data, runtime="onnx")
    want = segmentation_metrics(X >= 0.4 * 255, _sigmoid(20 * X01 - 10), 0.5)
    assert got["task"] == "segmentation" and got["artifact"] == "onnx-fp32" and got["n"] == 24
    for k in ("dice", "iou", "hd95", "hd95_n", "hd95_undefined"):
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
    assert 0.3 < got["dice"] < 1.0, "the masks differ, so Dice must be below 1"
    assert got["dice_ci"][0] <= got["dice"] <= got["dice_ci"][1]


def test_segmentation_threshold_comes_from_the_manifest(tmp_path: Path, seg_data: Path) -> None:
    # three-class logits [0, L, L - 2] (activation none): the device's softmax, then
    # foreground = 1 - p(background) >= mask_threshold 0.8
    model = _graph(
        [
            helper.make_node("Mul", ["x", "k"], ["a"]),
            helper.make_node("Sub", ["a", "b"], ["logit"]),
            helper.make_node("Sub", ["logit", "two"], ["rim"]),
            helper.make_node("Mul", ["logit", "zero"], ["bg"]),
            helper.make_node("Concat", ["bg", "logit", "rim"], ["y"], axis=3),
        ],
        [1, 28, 28, 3],
        {"k": 20.0, "b": 10.0, "two": 2.0, "zero": 0.0},
    )
    b = _bundle(
        tmp_path / "seg3",
        model,
        "segmentation",
        ["bg", "lesion", "rim"],
        activation="none",
        mask_threshold=0.8,
    )
    got = evaluate_bundle(b, seg_data, runtime="onnx")
    logit = 20 * X01 - 10
    z = np.stack([np.zeros_like(logit), logit, logit - 2], -1)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = segmentation_metrics(X >= 0.4 * 255, 1 - p[..., 0], 0.8)
    assert got["threshold"] == 0.8
    assert got["dice"] == pytest.approx(want["dice"], abs=1e-9)
    assert got["hd95"] == pytest.approx(want["hd95"], abs=1e-9)


def test_image_to_image_bundle_reports_psnr_and_ssim(tmp_path: Path) -> None:
    np.savez(tmp_path / "img.npz", x=X, y=X01.astype(np.float32))  # reference: the clean image
    model = _graph([helper.make_node("Mul", ["x", "x"], ["y"])], [1, 28, 28, 1], {})  # x^2
    b = _bundle(tmp_path / "img", model, "image_to_image", ["image"])
    got = evaluate_bundle(b, tmp_path / "img.npz", runtime="onnx")
    want = image_metrics(X01, X01**2)
    assert got["task"] == "image_to_image"
    assert got["psnr"] == pytest.approx(want["psnr"], abs=1e-4)
    assert got["ssim"] == pytest.approx(want["ssim"], abs=1e-5)
    assert got["psnr_ci"][0] <= got["psnr"] <= got["psnr_ci"][1]


def test_classification_has_intervals_per_class_and_roc(tmp_path: Path) -> None:
    # 'malignant' score = softmax over [8 (1 - mean), 8 mean] of the image's mean grey
    model = _graph(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("Sub", ["one", "m"], ["dark"]),
            helper.make_node("Concat", ["dark", "m"], ["c"], axis=0),
            helper.make_node("Mul", ["c", "k"], ["l"]),
            helper.make_node("Unsqueeze", ["l", "ax"], ["l2"]),
            helper.make_node("Softmax", ["l2"], ["y"], axis=1),
        ],
        [1, 2],
        {"one": 1.0, "k": 8.0},
    )
    model.graph.initializer.append(helper.make_tensor("ax", TensorProto.INT64, [1], [0]))
    b = _bundle(
        tmp_path / "cls", model, "classification", ["malignant", "benign"], positive="malignant"
    )
    np.savez(tmp_path / "cls.npz", x=X, y=Y)
    got = evaluate_bundle(b, tmp_path / "cls.npz", runtime="onnx", roc=True)
    mean = X01.mean((1, 2))
    logits = np.stack([8 * (1 - mean), 8 * mean], 1)
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = classification_metrics(Y, scores, scores.argmax(1), 0)
    assert got["confusion"] == want["confusion"]
    assert got["auc"] == pytest.approx(want["auc"])
    assert set(got["ci"]) == {"accuracy", "sensitivity", "specificity", "precision", "f1", "auc"}
    assert got["per_class"]["0"]["recall"] == pytest.approx(got["sensitivity"])
    assert got["roc"]["fpr"][0] == 0.0 and got["roc"]["tpr"][-1] == 1.0


def test_masks_that_do_not_fit_the_output_are_one_clear_error(tmp_path: Path) -> None:
    model = _graph([helper.make_node("Sigmoid", ["x"], ["y"])], [1, 28, 28, 1], {})
    b = _bundle(tmp_path / "seg", model, "segmentation", ["bg", "fg"], activation="sigmoid")
    np.savez(tmp_path / "bad.npz", x=X, y=np.zeros((24, 14, 14), np.uint8))
    with pytest.raises(ConversionError, match=r"masks of shape \(14, 14\) do not match"):
        evaluate_bundle(b, tmp_path / "bad.npz", runtime="onnx")
    np.savez(tmp_path / "nomask.npz", val_images=X)
    with pytest.raises(ConversionError, match="needs x/y or <split>_images/<split>_masks"):
        evaluate_bundle(b, tmp_path / "nomask.npz", runtime="onnx")


def test_evaluate_cli_prints_segmentation_metrics(tmp_path: Path, seg_data: Path) -> None:
    model = _graph([helper.make_node("Sigmoid", ["x"], ["y"])], [1, 28, 28, 1], {})
    b = _bundle(tmp_path / "seg", model, "segmentation", ["bg", "fg"], activation="sigmoid")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medge",
            "evaluate",
            str(b),
            "--data",
            str(seg_data),
            "--runtime",
            "onnx",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    # sigmoid(x) >= 0.5 for every x >= 0: the whole image is foreground
    full = np.ones_like(X, dtype=float)
    assert got["dice"] == pytest.approx(segmentation_metrics(X >= 0.4 * 255, full)["dice"])


def test_format_evaluation_shows_intervals_and_classes(tmp_path: Path, seg_data: Path) -> None:
    model = _graph([helper.make_node("Sigmoid", ["x"], ["y"])], [1, 28, 28, 1], {})
    b = _bundle(tmp_path / "seg", model, "segmentation", ["bg", "fg"], activation="sigmoid")
    seg = evaluate_bundle(b, seg_data, runtime="onnx")
    text = format_evaluation(seg)
    lo, hi = seg["dice_ci"]
    assert f"dice                   {seg['dice']:.4f}  (95% CI {lo:.4f}-{hi:.4f})" in text
    assert "dice_ci" not in text and "{" not in text
    cls = {
        "labels": ["malignant", "benign"],
        **classification_metrics(Y, np.eye(2)[Y], Y, 0),
    }
    text = format_evaluation(cls)
    assert "malignant              precision 1.0000, recall 1.0000, f1 1.0000, support" in text
    assert "sensitivity            1.0000  (95% CI" in text
