"""Decoding by task (edge_agent.decode) and what a result carries: segmentation masks summed up
(area, bbox, components, contour), image-to-image statistics and thumbnail, the CAM heatmap as
a small PNG. The models are tiny ONNX graphs built here; the images are real BreastMNIST
ultrasound images (models/data, CC BY 4.0)."""

from __future__ import annotations

import base64
import shutil
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent.bundle import (
    SCHEMA_VERSION,
    Artifact,
    Bundle,
    CamSpec,
    Decode,
    Manifest,
    Preprocess,
    Provenance,
    TensorSpec,
    file_entry,
    sign_bundle,
    write_manifest,
)
from edge_agent.cam import cam_heatmap, explain
from edge_agent.decode import (
    components,
    image_stats,
    segment,
    simplify_polygon,
    trace_contour,
)
from edge_agent.keys import load_signer_key
from edge_agent.model import LoadedModel
from edge_agent.pipeline import run_pipeline
from edge_agent.png import encode_png, thumbnail
from edge_agent.sources import NpzSettings, open_source
from edge_agent.telemetry import PipelineStats
from gateway.dashboard.cam import check_cam
from models import breast_cnn

IMAGES = breast_cnn.DATA  # models/data/breastmnist_dev.npz
DARK = 0.25  # the test models' threshold on the scaled image: darker than this is 'lesion'


def images(n: int = 6) -> np.ndarray:
    with np.load(IMAGES) as d:
        return np.asarray(d["val_images"][:n])


def decode_png(b64: str) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None, "not a PNG"
    return np.asarray(img)


def _const(name: str, value: float) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, [], [value])


def seg_graph(classes: int) -> onnx.ModelProto:
    """(1, 28, 28, 1) scaled image -> per-pixel probability of 'dark': sigmoid(40 (0.25 - x));
    with 3 classes, softmax over [0, logit, logit - 2] (background, lesion, rim)."""
    nodes = [
        helper.make_node("Sub", ["t", "x"], ["d"]),
        helper.make_node("Mul", ["d", "k"], ["logit"]),
    ]
    if classes == 1:
        nodes.append(helper.make_node("Sigmoid", ["logit"], ["y"]))
    else:
        nodes += [
            helper.make_node("Sub", ["logit", "two"], ["rim"]),
            helper.make_node("Mul", ["logit", "zero"], ["bg"]),
            helper.make_node("Concat", ["bg", "logit", "rim"], ["z"], axis=3),
            helper.make_node("Softmax", ["z"], ["y"], axis=3),
        ]
    graph = helper.make_graph(
        nodes,
        "seg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 28, 28, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 28, 28, classes])],
        [_const("t", DARK), _const("k", 40.0), _const("two", 2.0), _const("zero", 0.0)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def invert_graph() -> onnx.ModelProto:
    """Image to image: 1 - x."""
    graph = helper.make_graph(
        [helper.make_node("Sub", ["one", "x"], ["y"])],
        "invert",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 28, 28, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 28, 28, 1])],
        [_const("one", 1.0)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def cam_graph() -> onnx.ModelProto:
    """A two-class 'classifier' with a class activation map, CAM-shaped as the converter
    makes them: maps (1, 7, 7, 2) = [darkness, brightness] averaged over 4x4 blocks, and
    probs = softmax(8 * global average of the maps)."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["xc"], perm=[0, 3, 1, 2]),
        helper.make_node("AveragePool", ["xc"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Transpose", ["p"], ["bright"], perm=[0, 2, 3, 1]),
        helper.make_node("Sub", ["one", "bright"], ["dark"]),
        helper.make_node("Concat", ["dark", "bright"], ["cam"], axis=3),
        helper.make_node("ReduceMean", ["cam"], ["g"], axes=[1, 2], keepdims=0),
        helper.make_node("Mul", ["g", "eight"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cam",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 28, 28, 1])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("cam", TensorProto.FLOAT, [1, 7, 7, 2]),
        ],
        [_const("one", 1.0), _const("eight", 8.0)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def onnx_bundle(
    out: Path,
    model: onnx.ModelProto,
    task: str,
    labels: list[str],
    key: Path,
    decode: dict[str, Any] | None = None,
    cam: CamSpec | None = None,
) -> Bundle:
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
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        name=f"tiny-{task}",
        version="1",
        created="2026-11-26",
        task=task,
        profile="x86",
        preprocess=Preprocess(kind="scale01"),  # type: ignore[arg-type]
        decode=Decode(kind=task, **(decode or {})),
        labels=labels,  # type: ignore[arg-type]
        artifacts=[art],
        files={art.file: file_entry(out / art.file)},
        provenance=Provenance(
            source_sha256="0" * 64, source_format="onnx", converter_version="hand-written"
        ),
        cam=cam,
    )
    write_manifest(out, manifest)
    sign_bundle(out, load_signer_key(key))
    return Bundle.load(out, [load_signer_key(key).public_key()])


@pytest.fixture
def key(site_dir: Path) -> Path:
    return site_dir / "bundle-signer.key"


def run_npz(model: LoadedModel, n: int, cam: bool = True) -> list[dict[str, Any]]:
    src = open_source(NpzSettings(path=IMAGES, split="val", rate_hz=0, limit=n))
    sent: list[dict[str, Any]] = []
    run_pipeline(
        src.stream(threading.Event()), model, lambda k, b: sent.append(b), PipelineStats(), cam
    )
    return sent


def test_sigmoid_mask_of_real_images_gives_area_bbox_components_and_contour(
    tmp_path: Path, key: Path
) -> None:
    b = onnx_bundle(tmp_path / "s", seg_graph(1), "segmentation", ["tissue", "lesion"], key)
    sent = run_npz(LoadedModel(b, "onnx"), 6)
    assert len(sent) == 6
    for img, r in zip(images(6), sent, strict=True):
        want = img.astype(np.float32) / 255.0 < DARK  # what the graph thresholds, in numpy
        m = r["mask"]
        assert m["area_px"] == int(want.sum()) and m["size"] == [28, 28]
        assert m["area_frac"] == pytest.approx(want.mean(), abs=1e-6)
        ys, xs = np.nonzero(want)
        assert m["bbox"] == [xs.min(), ys.min(), xs.max(), ys.max()]
        n, _ = cv2.connectedComponents(want.astype(np.uint8), connectivity=8)
        assert m["components"] == n - 1
        assert 3 <= len(m["contour"]) <= 32
        assert all(want[y, x] for x, y in m["contour"]), "contour vertices are mask pixels"
        assert (r["pred_label"], r["scores"]) == ("lesion", [])
        assert "data" not in r and len(str(r)) < 4000, "never the frame"


def test_softmax_mask_counts_pixels_per_class(tmp_path: Path, key: Path) -> None:
    labels = ["background", "lesion", "rim"]
    b = onnx_bundle(
        tmp_path / "k", seg_graph(3), "segmentation", labels, key, {"mask_threshold": 0.4}
    )
    [r] = run_npz(LoadedModel(b, "onnx"), 1)
    x = images(1)[0].astype(np.float32) / 255.0
    logit = 40.0 * (DARK - x)
    z = np.stack([np.zeros_like(logit), logit, logit - 2.0], axis=-1)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    best = p.argmax(-1)
    fg = (best > 0) & (p.max(-1) >= 0.4)
    assert r["mask"]["area_px"] == int(fg.sum()) > 0
    assert r["mask"]["class_px"] == {"lesion": int((fg & (best == 1)).sum()), "rim": 0}
    assert r["pred_label"] == "lesion"


def test_components_and_the_traced_contour_agree_with_opencv() -> None:
    rng = np.random.default_rng(7)
    masks = [images(8)[i] < 64 for i in range(8)] + [rng.random((40, 50)) < 0.3]
    for m in masks:
        lab, n = components(m)  # OpenCV here
        ref_n, ref = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        assert n == ref_n - 1
        # same partition, whatever the numbering
        pairs = set(zip(lab[m].tolist(), ref[m].tolist(), strict=True))
        assert len(pairs) == n
    from edge_agent import decode

    blob = np.zeros((30, 30), bool)
    blob[5:20, 8:25] = True
    blob[12:25, 3:10] = True
    traced = trace_contour(blob)
    found, _ = cv2.findContours(blob.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    assert {tuple(p) for p in traced} == {tuple(p) for p in found[0].reshape(-1, 2).tolist()}
    poly = simplify_polygon(traced)
    # the L shape keeps its 6 corners (and the 2 diagonal steps where its blocks join)
    assert sorted(map(tuple, poly)) == sorted(
        [(8, 5), (24, 5), (24, 19), (10, 19), (9, 20), (9, 24), (3, 24), (3, 12), (7, 12), (8, 11)]
    )
    area = cv2.contourArea(np.array(poly, np.int32).reshape(-1, 1, 2))
    assert area == cv2.contourArea(found[0])
    yy, xx = np.mgrid[:60, :60]
    ragged = trace_contour((yy - 30) ** 2 + (xx - 28) ** 2 < 400)  # a disc, radius 20
    assert len(simplify_polygon(ragged)) <= decode.MAX_POLYGON < len(ragged)


def test_image_to_image_result_has_statistics_and_a_thumbnail(tmp_path: Path, key: Path) -> None:
    b = onnx_bundle(tmp_path / "i", invert_graph(), "image_to_image", ["image"], key)
    sent = run_npz(LoadedModel(b, "onnx"), 2)
    for img, r in zip(images(2), sent, strict=True):
        y = 1.0 - img.astype(np.float32) / 255.0
        got = r["image"]
        assert got["min"] == pytest.approx(y.min(), abs=1e-6)
        assert got["max"] == pytest.approx(y.max(), abs=1e-6)
        assert got["mean"] == pytest.approx(y.mean(), abs=1e-5) and got["size"] == [28, 28]
        png = decode_png(got["png"])
        want = np.rint((y - y.min()) * 255.0 / (y.max() - y.min()))
        assert png.shape == (28, 28) and np.abs(png.astype(int) - want).max() <= 1


def test_png_writer_and_thumbnail() -> None:
    rgb = np.dstack([images(1)[0]] * 3)
    rgb[..., 0] = 0
    back = decode_png(base64.b64encode(encode_png(rgb)).decode())
    assert np.array_equal(back[..., ::-1], rgb)  # OpenCV reads BGR
    big = np.arange(200 * 130, dtype=np.float32).reshape(200, 130) % 256
    small = thumbnail(big, 64)
    assert small.dtype == np.uint8 and max(small.shape) <= 64
    with pytest.raises(ValueError, match="PNG needs uint8"):
        encode_png(np.zeros((4, 4), np.float32))
    stats = image_stats(np.ones((1, 100, 100, 1)), ["x"])
    assert (stats.min, stats.max) == (1.0, 1.0) and decode_png(stats.body()["png"]).max() == 0


def test_cam_in_results_is_a_small_png_whose_hottest_region_is_the_devices(
    tmp_path: Path, key: Path
) -> None:
    cam = CamSpec(output=1, layer="pool", upsample_to=[112, 112])
    b = onnx_bundle(tmp_path / "c", cam_graph(), "classification", ["dark", "bright"], key, cam=cam)
    model = LoadedModel(b, "onnx")
    sent = run_npz(model, 4)
    assert len(sent) == 4
    for img, r in zip(images(4), sent, strict=True):
        heat = decode_png(r["cam"]["png"])
        assert heat.shape == (64, 64) and heat.dtype == np.uint8  # 112 shrunk to at most 64
        assert r["cam"]["label"] == r["pred_label"]
        shown, why = check_cam(r["cam"])  # the dashboard shows exactly this field
        assert why is None and shown == {"png": r["cam"]["png"], "label": r["pred_label"]}
        result, device = explain(model, img)
        assert result.pred == r["pred"]
        small = cam_heatmap(model.infer_outputs(model.prepare(img))[1], r["pred"], (64, 64))
        assert np.array_equal(heat, small)
        # the hottest 4x4-block of the image's own evidence is where the PNG is hottest
        x = img.astype(np.float32).reshape(7, 4, 7, 4).mean(axis=(1, 3)) / 255.0
        evidence = x if r["pred"] == 1 else 1.0 - x
        hy, hx = np.unravel_index(np.argmax(heat), heat.shape)
        assert evidence[hy * 7 // 64, hx * 7 // 64] == pytest.approx(evidence.max(), abs=0.02)
        dy, dx = np.unravel_index(np.argmax(device), device.shape)
        assert abs(dy * 64 / 112 - hy) <= 3 and abs(dx * 64 / 112 - hx) <= 3
    off = run_npz(model, 1, cam=False)
    assert "cam" not in off[0] and off[0]["pred"] == sent[0]["pred"]


def test_a_bundle_without_cam_has_no_cam_field(tmp_path: Path, key: Path) -> None:
    b = onnx_bundle(tmp_path / "s", seg_graph(1), "segmentation", ["tissue", "lesion"], key)
    assert "cam" not in run_npz(LoadedModel(b, "onnx"), 1)[0]
    shutil.rmtree(tmp_path / "s")


def test_segment_of_an_empty_mask() -> None:
    s = segment(np.zeros((1, 8, 8, 1), np.float32), Decode(kind="segmentation"), ["bg", "fg"])
    assert (s.area_px, s.bbox, s.components, s.contour, s.pred_label) == (0, None, 0, [], "bg")


NO_CV2 = """
import json, sys, threading
sys.modules["cv2"] = None  # as on a device without opencv-python-headless: import cv2 fails
from pathlib import Path
from edge_agent.bundle import Bundle
from edge_agent.errors import SourceError
from edge_agent.model import LoadedModel
from edge_agent.pipeline import run_pipeline
from edge_agent.sources import (EcgSettings, ImagesSettings, NpzSettings, VideoSettings,
                                open_source)
from edge_agent.telemetry import PipelineStats
from gateway.dashboard.cam import check_cam
bundle, npz, data, pngs = (Path(a) for a in sys.argv[1:5])
sent = []
src = open_source(NpzSettings(path=npz, split="val", rate_hz=0, limit=6))
run_pipeline(src.stream(threading.Event()), LoadedModel(Bundle.load(bundle), "onnx"),
             lambda k, b: sent.append(b), PipelineStats())
ecg = open_source(EcgSettings(path=data / "ecg" / "100.hea", limit=3))
errors = []
for cfg in (VideoSettings(path=data / "video" / "Subject_2-Fall-13.mp4"),
            ImagesSettings(path=pngs)):
    try:
        next(iter(open_source(cfg).stream(threading.Event())))
    except SourceError as exc:
        errors.append(str(exc))
print(json.dumps({"results": sent, "ecg": len(list(ecg.stream(threading.Event()))),
                  "errors": errors, "cv2": sys.modules["cv2"] is None}))
"""


def test_without_opencv_npz_ecg_and_segmentation_work_and_video_says_what_to_install(
    tmp_path: Path, key: Path
) -> None:
    import json
    import subprocess
    import sys

    b = onnx_bundle(tmp_path / "s", seg_graph(1), "segmentation", ["tissue", "lesion"], key)
    data = Path(__file__).parent / "data"
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    (pngs / "us-0.png").write_bytes(encode_png(images(1)[0]))
    r = subprocess.run(
        [sys.executable, "-c", NO_CV2, str(b.directory), str(IMAGES), str(data), str(pngs)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    assert got["cv2"] is True and got["ecg"] == 3
    hint = "this source needs opencv-python-headless: pip install opencv-python-headless"
    assert got["errors"] == [hint, hint]
    with_cv2 = run_npz(LoadedModel(b, "onnx"), 6)
    assert len(got["results"]) == 6
    for a, c in zip(got["results"], with_cv2, strict=True):  # numpy fallback == OpenCV
        ma, mc = a["mask"], c["mask"]
        assert (ma["area_px"], ma["bbox"], ma["components"]) == (
            mc["area_px"],
            mc["bbox"],
            mc["components"],
        )
        pa = cv2.contourArea(np.array(ma["contour"], np.int32).reshape(-1, 1, 2))
        pc = cv2.contourArea(np.array(mc["contour"], np.int32).reshape(-1, 1, 2))
        assert pa == pytest.approx(pc, rel=0.1, abs=3)
